"""Benchmark the MoE experts forwards on one GPU: ours (W8A16, W8A8, BF16) beside the peers a user could pick.

Peers (--peers DIR, default scripts/peers: vllm_fused_moe.py, hm_moe.py and configs/): the block-FP8
128x128 W8A8 path (vLLM's Triton fused-MoE kernel with its tuned H200 config, on the MXFP8 weights
requantized to 128x128 blocks as SGLang / vLLM PR 45726 do at load) and Humming's MXFP8 W8A16 / W8A8 where
the humming-kernels package is installed (skipped with a note otherwise). Every path gets the same MXFP8
values, hidden states and routing; its error is the relative Frobenius error against a float32 forward
from the same weights. Each latency is the whole experts forward (alignment, activation quantization, both
GEMMs, the activation, the top-k sum), captured in a CUDA graph and replayed (median of device-event
timings); the FP8 floor is the touched experts' FP8 bytes at the copy bandwidth measured in the same run.
Resident bytes: the expert tensors each path keeps for one layer at the shape (per rank).

  python3 scripts/bench_moe.py --json out.json                        # the table: TP8 uniform, TP8 Zipf,
                                                                      # TP4 uniform (--runs to change)
  python3 scripts/bench_moe.py --sweep --modes w8a16 --json sweep.json  # per-GEMM tile sweep (kernels/config.py)
  python3 scripts/bench_moe.py --compare-routes fp32,asm_f16_pair,asm_f16_1 --tokens 8,128  # W8A16 routes
  python3 scripts/bench_moe.py --hybrid --shapes tp8      # the runtime's MoELayer (hybrid dispatch, tuned
                                                          # bands) beside each single path, per token count
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_time_paths import block_fp8  # noqa: E402

from mxconvert.kernels import config as cfg  # noqa: E402
from mxconvert.kernels.align import align_routing  # noqa: E402
from mxconvert.kernels.moe import capture_cuda_graph, moe_experts_bf16, moe_experts_mxfp8  # noqa: E402
from mxconvert.kernels.moe_gemm import moe_gemm  # noqa: E402
from mxconvert.kernels.quant import quantize_mxfp8, swiglu_oai  # noqa: E402
from mxconvert.layout import dequantize_bf16, unpack_scales  # noqa: E402

SHAPES = {"tp8": (128, 6144, 384, 4), "tp4": (128, 6144, 768, 4), "tp1": (128, 6144, 3072, 4)}  # E, H, I/rank, k
TOKENS = [1, 8, 32, 128, 512, 1024, 4096]


def bench(fn, graph=True):
    """Median microseconds of fn, replayed from a CUDA graph (launch gaps out of the numbers)."""
    fn()
    run = capture_cuda_graph(fn)[0].replay if graph else fn
    return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median") * 1e3


def limits():
    n = 1 << 30
    src, dst = (
        torch.empty(n, dtype=torch.uint8, device="cuda").random_(),
        torch.empty(n, dtype=torch.uint8, device="cuda"),
    )
    copy_gbs = 2 * n / (bench(lambda: dst.copy_(src), graph=False) * 1e-6) / 1e9
    m = 8192
    a = torch.randn(m, m, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(m, m, device="cuda").to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    us = bench(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16), graph=False)
    return copy_gbs, 2 * m**3 / (us * 1e-6) / 1e12


def make_weights(e, h, i, device="cuda"):
    def fp8(n, k):
        v = (torch.randn(e, n, k, device=device) * 16).clamp(-224, 224).to(torch.float8_e4m3fnuz).view(torch.uint8)
        return v, torch.randint(118, 125, (e, k // 32, n), dtype=torch.uint8, device=device)

    w13, s13 = fp8(2 * i, h)
    w2, s2 = fp8(h, i)
    bf = [
        torch.cat([dequantize_bf16(v[j : j + 8], unpack_scales(s[j : j + 8])) for j in range(0, e, 8)])
        for v, s in ((w13, s13), (w2, s2))
    ]
    return dict(w13=w13, w13_scale=s13, w2=w2, w2_scale=s2), dict(w13_bf16=bf[0], w2_bf16=bf[1])


def routing(t, k, e, seed, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.rand(t, e, generator=g, device=device).topk(k, dim=1).indices.to(torch.int32)
    w = torch.rand(t, k, generator=g, device=device) + 0.1
    return ids, w / w.sum(1, keepdim=True)


def grouped_mm_forward(x, w, ids, w13t, w2t):
    """The vendor baseline: pairs sorted by expert, two torch._grouped_mm BF16, our SwiGLU kernel with the
    top-k weights folded into GEMM2's input ([P, I], not [P, H]), unsorted by a gather, top-k sum."""
    t, k = ids.shape
    e = w13t.shape[0]
    flat = ids.reshape(-1)
    order = torch.argsort(flat)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=x.device)
    counts = torch.zeros(e, dtype=torch.int32, device=x.device).scatter_add_(0, flat.long(), torch.ones_like(flat))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    y1 = torch._grouped_mm(x[order // k], w13t, offs=offs)
    a = swiglu_oai(y1) * w.reshape(-1)[order, None].to(torch.bfloat16)
    y2 = torch._grouped_mm(a, w2t, offs=offs)
    return y2[inverse].view(t, k, -1).sum(1)


def zipf_routing(t, k, e, seed, s=1.2, device="cuda"):
    """Skewed routing: expert popularity ~ 1 / rank**s (ranks shuffled once), k distinct experts per token."""
    g = torch.Generator(device=device).manual_seed(seed)
    rank = torch.randperm(e, generator=g, device=device).float() + 1
    probs = (rank**-s).expand(t, e).contiguous()
    ids = torch.multinomial(probs, k, replacement=False, generator=g).to(torch.int32)
    w = torch.rand(t, k, generator=g, device=device) + 0.1
    return ids, w / w.sum(1, keepdim=True)


PEERS = ("hm_w8a16", "hm_w8a8", "vllm_fp8b128")


def load_peers(peers_dir):
    """The peer kernels: the carried peer harness (vllm_fused_moe.py, hm_moe.py) from peers_dir, and Humming
    where its package is installed. Returns (vllm module or None, hm module or None, notes)."""
    notes = []
    if not peers_dir:
        return None, None, ["no --peers: the block-FP8 128x128 and Humming paths are not run"]
    sys.path.insert(0, str(Path(peers_dir).resolve()))
    import vllm_fused_moe as vfm

    try:
        import hm_moe
        import humming  # noqa: F401
    except ImportError as exc:
        hm_moe = None
        notes.append(f"Humming skipped: {exc} (install humming-kernels, the optional bench extra)")
    return vfm, hm_moe, notes


def requant_block128(w):
    """BF16 [E, N, K] -> the block-FP8 path's weights as Hopper reads them: E4M3FN with FP32 scales
    [E, N/128, K/128] (load_time_paths.block_fp8's FNUZ bytes, -0 cleared, are these values at half its scale)."""
    e, n, k = w.shape
    q = torch.empty(e, n, k, dtype=torch.uint8, device=w.device)
    sc = torch.empty(e, n // 128, k // 128, dtype=torch.float32, device=w.device)
    for j in range(0, e, 16):
        q[j : j + 16], sc[j : j + 16] = block_fp8(w[j : j + 16].float())
    return q.view(torch.float8_e4m3fn), sc / 2


def rel_err(out, ref):
    out = out.float()
    return float((out - ref).norm() / ref.norm()) if torch.isfinite(out).all() else float("nan")


def table(runs, copy_gbs, fp8_tflops, *, peers_dir=None, x_std=0.1, on_row=None):
    """Whole experts forwards of ours and the peers on the same MXFP8 values, hidden states and routing:
    latency, error against float32 from the same weights, % of the FP8 floor, resident bytes per layer.
    runs: [(shape, routing "uniform" / "zipf", [T, ...]), ...]; weights are built once per shape."""
    from mxconvert.kernels.align import align_routing as _align
    from mxconvert.kernels.moe import moe_experts_reference
    from mxconvert.kernels.moe_gemm import dequantized_weights

    vfm, hm_moe, notes = load_peers(peers_dir)
    for n in notes:
        print(n, flush=True)

    def align_fn(ids, block_m):
        a = _align(ids, num_experts=e, block_m=block_m)
        return a.sorted_ids, a.expert_ids, a.num_post_pad

    rows = []
    for name in dict.fromkeys(r[0] for r in runs):
        e, h, i, k = SHAPES[name]
        tokens = sorted({t for r in runs if r[0] == name for t in r[2]})
        fp8, bf = make_weights(e, h, i)
        wf = dict(
            w13=dequantized_weights(fp8["w13"], fp8["w13_scale"]), w2=dequantized_weights(fp8["w2"], fp8["w2_scale"])
        )
        nbytes = lambda *ts: sum(t.nbytes for t in ts)
        paths = {
            "ours_w8a16": (lambda x, w, ids: moe_experts_mxfp8(x, w, ids, **fp8, mode="w8a16"), nbytes(*fp8.values())),
            "ours_w8a8": (lambda x, w, ids: moe_experts_mxfp8(x, w, ids, **fp8, mode="w8a8"), nbytes(*fp8.values())),
            "ours_bf16": (lambda x, w, ids: moe_experts_bf16(x, w, ids, **bf), nbytes(*bf.values())),
        }
        setup = {}
        if vfm is not None:  # FNUZ bytes read as E4M3FN (the peers' format) are the same values with scale - 1
            from mxconvert.kernels.quant import swiglu_oai

            q13, qs13 = requant_block128(bf["w13_bf16"])
            q2, qs2 = requant_block128(bf["w2_bf16"])
            setup["requant_weight_err"] = rel_err(q13.float().view(e, 2 * i // 128, 128, h // 128, 128).mul(
                qs13[:, :, None, :, None]).view(e, 2 * i, h), wf["w13"])  # fmt: skip
            conf = vfm.load_config("vllm_E128_N384_H200_fp8_block128.json")  # vLLM's tuned H200 config (N 384)
            paths["vllm_fp8b128"] = (
                lambda x, w, ids: vfm.fused_experts(
                    x,
                    w,
                    ids,
                    q13,
                    q2,
                    configs=conf,
                    align_fn=align_fn,
                    act_fn=swiglu_oai,
                    w1_scale=qs13,
                    w2_scale=qs2,
                    block_shape=[128, 128],
                ),
                nbytes(q13, qs13, q2, qs2),
            )
            if hm_moe is not None:
                fn13, fn2 = fp8["w13"], fp8["w2"]
                s13, s2 = fp8["w13_scale"] - 1, fp8["w2_scale"] - 1
                for mode in ("w8a16", "w8a8"):
                    t0 = time.time()
                    m = hm_moe.HummingMoE(fn13, s13, fn2, s2, mode=mode, tokens=tokens, top_k=k, align_fn=align_fn,
                                          act_fn=swiglu_oai, mul_sum_fn=vfm.moe_fused_mul_sum)  # fmt: skip
                    held = nbytes(*[t for t in list(m.layer.parameters()) + list(m.layer.buffers())])
                    setup[f"hm_{mode}_build_s"] = round(time.time() - t0, 1)
                    paths[f"hm_{mode}"] = (lambda x, w, ids, m=m: m(x, w, ids), held)
        per_expert = 3 * h * i
        for _, routing_name, run_tokens in [r for r in runs if r[0] == name]:
            for t in run_tokens:
                x = (torch.randn(t, h, device="cuda") * x_std).bfloat16()
                ids, w = (zipf_routing if routing_name == "zipf" else routing)(t, k, e, t)
                touched = int(torch.unique(ids).numel())
                flops = 2 * t * k * per_expert
                floor = max(touched * per_expert * (1 + 1 / 32) / (copy_gbs * 1e3), flops / (fp8_tflops * 1e6))
                ref = moe_experts_reference(x, w, ids, **wf)
                res = {}
                for p, (fn, held) in paths.items():
                    try:
                        err = rel_err(fn(x, w, ids), ref)
                        us = bench(lambda: fn(x, w, ids))
                    except Exception as exc:  # a path that fails is reported, not hidden
                        print(f"{name} {routing_name} T={t} {p}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                        continue
                    res[p] = dict(us=us, err=err, floor_frac=floor / us, resident_bytes=held)
                best_peer = min((v["us"] for p, v in res.items() if p in PEERS), default=None)
                for v in res.values():
                    v["vs_best_peer"] = v["us"] / best_peer if best_peer else None
                rows.append(dict(shape=name, routing=routing_name, tokens=t, experts_touched=touched, floor_us=floor,
                                 paths=res, setup=setup))  # fmt: skip
                print(f"{name} {routing_name} T={t} floor {floor:.1f}us " + " ".join(
                    f"{p} {v['us']:.1f}us/{100 * v['err']:.2f}%" for p, v in res.items()), flush=True)  # fmt: skip
                if on_row:
                    on_row(rows)
        fp8 = bf = wf = paths = None  # free before the next shape (a del confuses ruff F821)
        torch.cuda.empty_cache()
    return rows


def print_table(rows, copy_gbs, fp8_tflops):
    print(
        f"\ndevice: {torch.cuda.get_device_name()}  copy {copy_gbs:.0f} GB/s  _scaled_mm FP8 8192^3 "
        f"{fp8_tflops:.0f} TFLOP/s  native mode: {cfg.native_mode()}"
    )
    print("us = whole experts forward (CUDA-graph replay, median); err = relative Frobenius error vs float32 from")
    print("the same weights; floor = the touched experts' FP8 bytes at copy bandwidth; x best peer = us / fastest peer")
    print("| shape | routing | T | path | us | x best peer | % of floor | err % | resident MB/layer | floor us |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for p, v in r["paths"].items():
            vs = f"{v['vs_best_peer']:.2f}" if v["vs_best_peer"] else "-"
            print(
                f"| {r['shape']} | {r['routing']} | {r['tokens']} | {p} | {v['us']:.1f} | {vs} | "
                f"{100 * v['floor_frac']:.0f} | {100 * v['err']:.2f} | {v['resident_bytes'] / 1e6:.0f} | "
                f"{r['floor_us']:.1f} |"
            )
    print("\nbest of ours (native MXFP8 paths only) against the best peer:")
    for r in rows:
        ours = {p: v for p, v in r["paths"].items() if p in ("ours_w8a16", "ours_w8a8")}
        peers = {p: v for p, v in r["paths"].items() if p in PEERS}
        if ours and peers:
            po, vo = min(ours.items(), key=lambda kv: kv[1]["us"])
            pp, vp = min(peers.items(), key=lambda kv: kv[1]["us"])
            print(f"- {r['shape']} {r['routing']} T={r['tokens']}: {po} {vo['us']:.1f} us vs {pp} {vp['us']:.1f} us "
                  f"(x{vo['us'] / vp['us']:.2f}, {100 * vo['floor_frac']:.0f}% of floor)")  # fmt: skip


SWAP = [(64, 128, 4, 4), (128, 128, 4, 3), (64, 256, 4, 3), (128, 64, 4, 4), (256, 128, 4, 3), (128, 128, 8, 4)]
PLAIN = [
    (64, 128, 4, 3),
    (128, 64, 4, 4),
    (128, 128, 8, 3),
    (64, 64, 4, 4),
    (256, 64, 8, 3),
    (128, 64, 8, 4),
    (256, 64, 8, 4),
    (128, 128, 4, 4),
]
BM_TOKENS = {  # tokens per expert (T * 4 / 128) 0.03-4 / 4-32 / 16-128 / 32-256
    16: [1, 8, 32, 128],
    32: [128, 512, 1024],
    64: [512, 1024, 4096, 8192],
    128: [1024, 4096, 8192],
}
SPLIT_TILES = [(64, 256, 4, 3), (128, 128, 4, 3), (64, 128, 4, 4)]  # GEMM1 split-K candidates (decode)


def sweep_tiles(mode, gemm, bm, t, k, e, swap_only, routes_swap, routes_plain, splits):
    """The candidate tiles of one (mode, GEMM, block_m, T): swap-AB at block_m <= 64 (or always with
    swap_only), plain ones, each W8A16 tile in every route given; split-K for GEMM1 when few blocks exist."""
    rs = routes_swap if mode in ("w8a16", "w8a8") else ["auto"]
    rp = routes_plain if mode in ("w8a16", "w8a8") else ["auto"]

    def tile(c, r, **kw):  # W8A8 sweeps its dot formulations (moe_gemm.W8A8_DOT), W8A16 its routes
        if mode == "w8a8":
            return cfg.GemmTile(*c, w8a8="fp8" if r == "auto" else r, **kw)
        return cfg.GemmTile(*c, dequant=r, **kw)

    tiles = [tile(c, r, swap_ab=True) for c in SWAP for r in rs] if bm <= 64 or swap_only else []
    if not swap_only:
        tiles += [tile(c, r) for c in (PLAIN[:2] if bm <= 32 else PLAIN) for r in rp]
    if gemm == "gemm1" and bm == 16 and t * k <= e:  # at most one block per expert: few CTAs
        tiles += [tile(c, rs[0], swap_ab=True, split_k=sp) for c in SPLIT_TILES for sp in splits]
    return tiles


def sweep(tokens, modes, swap_only=False, shape="tp8", routes_swap=("auto",), routes_plain=("auto",), splits=(2, 4)):
    """Per mode, T and block_m: the fastest tile of each GEMM alone; W8A16 also over dequantization routes,
    GEMM1 at decode also over split-K. Returns the rows and, per (mode, T), the best MoeConfig found."""
    e, h, i, k = SHAPES[shape]
    fp8, bf = make_weights(e, h, i)
    out = []
    for mode in modes:
        for bm, ts in BM_TOKENS.items():
            for t in [t for t in ts if t in tokens]:
                x = torch.randn(t, h, device="cuda").bfloat16()
                ids, w = routing(t, k, e, t)
                al = align_routing(ids, num_experts=e, block_m=bm)
                p = t * k
                a2 = torch.randn(p, i, device="cuda").bfloat16()
                if mode == "w8a8":
                    a1, s1 = quantize_mxfp8(x)
                    a2, s2 = quantize_mxfp8(a2)
                else:
                    a1, s1, s2 = x, None, None
                b1, b2 = (bf["w13_bf16"], bf["w2_bf16"]) if mode == "bf16" else (fp8["w13"], fp8["w2"])
                bs1, bs2 = (None, None) if mode == "bf16" else (fp8["w13_scale"], fp8["w2_scale"])
                for gemm, a, s, b, bs, div in (("gemm1", a1, s1, b1, bs1, k), ("gemm2", a2, s2, b2, bs2, 1)):
                    best = None
                    for tile in sweep_tiles(mode, gemm, bm, t, k, e, swap_only, routes_swap, routes_plain, splits):
                        fn = lambda: moe_gemm(
                            a,
                            b,
                            align=al,
                            num_pairs=p,
                            a_div=div,
                            tile=tile,
                            mode=mode,
                            a_scale=s,
                            b_scale=bs,
                            topk_weights=w.reshape(-1) if div == 1 else None,
                        )
                        try:
                            us = bench(fn)
                        except Exception as exc:
                            print(f"{mode} {gemm} bm{bm} {tile}: {type(exc).__name__} {str(exc)[:120]}", flush=True)
                            continue
                        out.append(dict(mode=mode, gemm=gemm, tokens=t, block_m=bm, tile=tile.__dict__, us=us))
                        if best is None or us < best[0]:
                            best = (us, tile)
                    if best:
                        print(f"{mode} {gemm} T={t} bm={bm}: best {best[0]:.1f}us {best[1]}", flush=True)
    chosen = {}
    for mode in modes:  # per T, the block_m whose two best GEMMs sum lowest
        for t in tokens:
            best = {}
            for r in out:
                if r["mode"] == mode and r["tokens"] == t:
                    key = (r["block_m"], r["gemm"])
                    if key not in best or r["us"] < best[key]["us"]:
                        best[key] = r
            sums = {
                bm: best[(bm, "gemm1")]["us"] + best[(bm, "gemm2")]["us"]
                for bm, g in best
                if g == "gemm1" and (bm, "gemm2") in best
            }
            if sums:
                bm = min(sums, key=sums.get)
                g1, g2 = best[(bm, "gemm1")], best[(bm, "gemm2")]
                chosen[(mode, t)] = cfg.MoeConfig(bm, cfg.GemmTile(**g1["tile"]), cfg.GemmTile(**g2["tile"]))
                print(
                    f"SUMMARY {mode} T={t} bm={bm} {sums[bm]:.1f}us g1={g1['tile']} {g1['us']:.1f} "
                    f"g2={g2['tile']} {g2['us']:.1f}"
                )
    return out, chosen


def compare_routes(tokens, routes, shape="tp8"):
    """Whole W8A16 forwards with the shipped tiles, each dequantization route forced on both GEMMs."""
    e, h, i, k = SHAPES[shape]
    fp8, _ = make_weights(e, h, i)
    rows = []
    for t in tokens:
        x = torch.randn(t, h, device="cuda").bfloat16()
        ids, w = routing(t, k, e, t)
        conf = cfg.moe_config(tokens=t, top_k=k, num_experts=e, hidden=h, intermediate=i, mode="w8a16")
        row = dict(tokens=t, config=repr(conf), us={})
        for r in routes:
            try:
                row["us"][r] = bench(lambda: moe_experts_mxfp8(x, w, ids, **fp8, mode="w8a16", dequant=r))
            except Exception as exc:
                print(f"T={t} {r}: {type(exc).__name__} {str(exc)[:200]}", flush=True)
        rows.append(row)
        print(
            f"ROUTES T={t} swap={conf.gemm1.swap_ab}/{conf.gemm2.swap_ab} "
            + " ".join(f"{r} {u:.1f}" for r, u in row["us"].items()),
            flush=True,
        )
    return rows


def compare_w8a8(tokens, dots, shape="tp8"):
    """Whole W8A8 forwards per dot formulation (moe_gemm.W8A8_DOT) on two tile sets: the W8A8 table's and the
    W8A16 table's (its split-K and DIRECT rows included); the W8A16 and the shipped W8A8 forwards beside them."""
    e, h, i, k = SHAPES[shape]
    fp8, _ = make_weights(e, h, i)
    rows = []
    for t in tokens:
        x = torch.randn(t, h, device="cuda").bfloat16()
        ids, w = routing(t, k, e, t)
        kw = dict(tokens=t, top_k=k, num_experts=e, hidden=h, intermediate=i)
        row = dict(tokens=t, us={})
        row["us"]["w8a16"] = bench(lambda: moe_experts_mxfp8(x, w, ids, **fp8, mode="w8a16"))
        row["us"]["w8a8 table"] = bench(lambda: moe_experts_mxfp8(x, w, ids, **fp8, mode="w8a8"))
        for tiles in ("w8a8", "w8a16"):
            base = cfg.moe_config(**kw, mode=tiles)
            for dot in dots:
                conf = dataclasses.replace(
                    base,
                    gemm1=dataclasses.replace(base.gemm1, w8a8=dot),
                    gemm2=dataclasses.replace(base.gemm2, w8a8=dot),
                )
                try:
                    us = bench(lambda: moe_experts_mxfp8(x, w, ids, **fp8, mode="w8a8", config=conf))
                except Exception as exc:
                    print(f"T={t} {tiles} tiles {dot}: {type(exc).__name__} {str(exc)[:200]}", flush=True)
                    continue
                row["us"][f"{dot}@{tiles}"] = us
        rows.append(row)
        print(f"W8A8 T={t} " + " ".join(f"{r} {u:.1f}" for r, u in row["us"].items()), flush=True)
    return rows


def forward_check(chosen, shape="tp8"):
    """Whole forwards: each (mode, T)'s swept config beside the shipped table's config (same run)."""
    e, h, i, k = SHAPES[shape]
    fp8, _ = make_weights(e, h, i)
    rows = []
    for (mode, t), conf in sorted(chosen.items()):
        if mode == "bf16":
            continue
        x = torch.randn(t, h, device="cuda").bfloat16()
        ids, w = routing(t, k, e, t)
        us_table = bench(lambda: moe_experts_mxfp8(x, w, ids, **fp8, mode=mode))
        us_swept = bench(lambda: moe_experts_mxfp8(x, w, ids, **fp8, mode=mode, config=conf))
        us_fp32 = bench(lambda: moe_experts_mxfp8(x, w, ids, **fp8, mode=mode, dequant="fp32"))
        rows.append(
            dict(mode=mode, tokens=t, table_us=us_table, swept_us=us_swept, table_fp32_us=us_fp32, config=repr(conf))
        )
        print(
            f"FORWARD {mode} T={t}: table {us_table:.1f}us (fp32 route {us_fp32:.1f}us) swept {us_swept:.1f}us {conf}",
            flush=True,
        )
    return rows


def hybrid(shapes, tokens, bands=None, device="cuda"):
    """Per token count: the runtime's MoELayer (dispatch by batch size) beside each single path, same run.
    bands: (bf16_max_tokens, bf16_min_tokens); default the device's tuned table (runtime/bands.py)."""
    from mxconvert.runtime.bands import bands_for
    from mxconvert.runtime.moe import ExpertWeights, MoELayer

    lo, hi = bands or bands_for(device, default=(8, 1024))
    mode = cfg.native_mode(device)
    rows = []
    for name in shapes:
        e, h, i, k = SHAPES[name]
        fp8, bf = make_weights(e, h, i, device)
        weights = ExpertWeights(fp8["w13"], fp8["w13_scale"], fp8["w2"], fp8["w2_scale"], bf["w13_bf16"], bf["w2_bf16"])
        layer = MoELayer(weights, bf16_max_tokens=lo, bf16_min_tokens=hi)
        for t in tokens:
            x = torch.randn(t, h, device=device).bfloat16()
            ids, w = routing(t, k, e, t, device)
            us = {
                "hybrid": bench(lambda: layer(x, w, ids)),
                "bf16": bench(lambda: moe_experts_bf16(x, w, ids, **bf)),
                mode: bench(lambda: moe_experts_mxfp8(x, w, ids, **fp8, mode=mode)),
            }
            best = min(us["bf16"], us[mode])
            rows.append(dict(shape=name, tokens=t, path=layer.path_for(t), us=us, vs_best=us["hybrid"] / best))
            print(
                f"{name} T={t} -> {layer.path_for(t)}: " + " ".join(f"{p} {v:.1f}us" for p, v in us.items()), flush=True
            )
        weights = layer = fp8 = bf = None
    gpu = torch.cuda.get_device_name() if device == "cuda" else device
    print(f"\ndevice: {gpu}  bands: BF16 at T <= {lo} or T >= {hi}, else {mode}")
    print(f"| shape | T | hybrid path | hybrid us | bf16 us | {mode} us | hybrid / best | within 5% |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        u = r["us"]
        print(
            f"| {r['shape']} | {r['tokens']} | {r['path']} | {u['hybrid']:.1f} | {u['bf16']:.1f} | {u[mode]:.1f} | "
            f"{r['vs_best']:.3f} | {'yes' if r['vs_best'] <= 1.05 else 'NO'} |"
        )
    print(f"hybrid within 5% of the best path at every count: {all(r['vs_best'] <= 1.05 for r in rows)}")
    return dict(bands=[lo, hi], rows=rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--shapes", default="tp8,tp1")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--modes", default="w8a16,w8a8,bf16")
    ap.add_argument("--swap-only", action="store_true")
    ap.add_argument("--compare-routes", default="", help="comma list: W8A16 forwards per dequantization route")
    ap.add_argument("--compare-w8a8", default="", help="comma list: W8A8 forwards per dot formulation")
    ap.add_argument("--routes-swap", default="auto", help="with --sweep: W8A16 routes (W8A8: dots) for swap-AB tiles")
    ap.add_argument("--routes-plain", default="auto", help="with --sweep: W8A16 routes (W8A8: dots) for plain tiles")
    ap.add_argument("--splits", default="2,4", help="with --sweep: GEMM1 split-K factors tried at decode")
    ap.add_argument("--forward", action="store_true", help="with --sweep: whole forwards with the swept configs")
    ap.add_argument(
        "--runs",
        default="tp8:uniform:;tp8:zipf:8,128,1024;tp4:uniform:1,32,512,4096",
        help="the table's runs, ';'-separated shape:routing:tokens (empty tokens: --tokens)",
    )
    ap.add_argument("--peers", type=Path, default=Path(__file__).resolve().parent / "peers",
                    help="the peer kernels' folder (vllm_fused_moe.py, hm_moe.py, configs/)")  # fmt: skip
    ap.add_argument("--hybrid", action="store_true", help="the runtime's hybrid dispatch vs each single path")
    ap.add_argument("--bands", help="with --hybrid: LO,HI instead of the device's tuned bands")
    args = ap.parse_args()
    tokens = [int(v) for v in args.tokens.split(",")]
    t0 = time.time()
    copy_gbs, fp8_tflops = limits()
    print(f"copy {copy_gbs:.0f} GB/s, _scaled_mm FP8 {fp8_tflops:.0f} TFLOP/s", flush=True)
    result = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        copy_gbs=copy_gbs,
        scaled_mm_fp8_tflops=fp8_tflops,
        native_mode=cfg.native_mode(),
    )
    if args.compare_routes:
        result["routes"] = compare_routes(tokens, args.compare_routes.split(","), args.shapes.split(",")[0])
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    if args.compare_w8a8:
        result["w8a8"] = compare_w8a8(tokens, args.compare_w8a8.split(","), args.shapes.split(",")[0])
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    if args.sweep:
        rows, chosen = sweep(
            tokens,
            args.modes.split(","),
            args.swap_only,
            args.shapes.split(",")[0],
            args.routes_swap.split(","),
            args.routes_plain.split(","),
            [int(v) for v in args.splits.split(",")],
        )
        result["sweep"] = rows
        result["chosen"] = {f"{m} {t}": repr(c) for (m, t), c in chosen.items()}
        if args.forward:
            result["forward"] = forward_check(chosen, args.shapes.split(",")[0])
    elif args.compare_routes or args.compare_w8a8:
        pass
    elif args.hybrid:
        bands = tuple(int(v) for v in args.bands.split(",")) if args.bands else None
        result["hybrid"] = hybrid(args.shapes.split(","), tokens, bands)
    else:
        runs = []
        for spec in args.runs.split(";"):  # shape:routing:tokens
            shape, routing_name, toks = spec.split(":")
            runs.append((shape, routing_name, [int(v) for v in toks.split(",")] if toks else tokens))

        def save(rows):  # after every row: a run cut short keeps what it measured
            if args.json:
                args.json.write_text(json.dumps({**result, "rows": rows}, indent=1))

        result["rows"] = table(runs, copy_gbs, fp8_tflops, peers_dir=args.peers, on_row=save)
        print_table(result["rows"], copy_gbs, fp8_tflops)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
