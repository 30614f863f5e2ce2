"""Serving cost of one full-size MiniMax-M3 MoE layer on one GPU: ours (converted offline) beside the load-time
paths every MI300X stack runs today, then the whole model extrapolated per TP8 and TP4 rank.

    python3 scripts/bench_load.py [--drop-caches] [--json out.json] [--workdir DIR]

Rows: ours `--bf16 derive` and `--bf16 materialize` with the device's dispatch bands (hybrid: FP8 and BF16
copies resident), ours FP8 only (the empty BF16 band), BF16 emulation at load (vLLM 0.33) and block-FP8
requantization at load (SGLang, vLLM PR 45726), the last two from the MXFP8 source (scripts/load_time_paths.py).
Each row runs in its own process (its own CUDA context and memory statistics) twice: a first start (page
cache dropped, empty Triton cache) and a restart (warm page cache, Triton cache kept). Per run: seconds to
load, to the first forward (T 1) and to warm up (a CUDA graph for each of vLLM's 67 capture sizes, 1-512
tokens), peak and resident GPU memory, and the weight error against the source's MXFP8 values (ours
checked bit for bit). The load-time paths run vLLM's Triton kernels (scripts/peers/). Without a GPU, a
small shape on the CPU checks the script.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_convert import CHUNK, E, H, I, files_of, fsync_files, make_full_size_source  # noqa: E402
from load_time_paths import (  # noqa: E402
    SourceExperts,
    bf16_at_load,
    block_fp8_at_load,
    block_fp8_values,
)

from mxconvert.convert import convert  # noqa: E402
from mxconvert.format import NEVER  # noqa: E402
from mxconvert.kernels.moe import capture_cuda_graph, moe_experts_reference  # noqa: E402
from mxconvert.kernels.moe_gemm import dequantized_weights  # noqa: E402
from mxconvert.layout import dequantize  # noqa: E402
from mxconvert.runtime.loader import ConvertedCheckpoint, load_moe_layer  # noqa: E402

PATHS = {
    "ours_derive": "ours, --bf16 derive, device bands",
    "ours_materialize": "ours, --bf16 materialize, device bands",
    "ours_native": "ours, FP8 only (empty BF16 band)",
    "bf16_at_load": "BF16 emulation at load",
    "block_fp8_at_load": "block-FP8 128x128 requantized at load",
}
CAPTURE_SIZES = [1, 2, 4] + list(range(8, 513, 8))  # vLLM's default CUDA-graph batch sizes
MOE_LAYERS = 57  # MiniMax-M3's MoE layers
HBM_GB = {"MI300X": 192, "H200": 141}
TOP_K = 4


def evict(files, drop_caches: bool) -> None:
    """Empty the page cache of these files (posix_fadvise), and with drop_caches all of it (root)."""
    fsync_files(files, evict=True)
    if drop_caches:
        subprocess.run(["sync"], check=False)
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        except OSError as exc:
            print(f"drop_caches: {exc}; posix_fadvise only", flush=True)


def plain_read(files) -> int:
    """Read each file sequentially through one buffer (the storage's rate); returns the bytes read."""
    buf, total = bytearray(CHUNK), 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


# One row, in its own process ---------------------------------------------------------------------------
def load_path(path: str, work: Path, device: str, peers: Path | None):
    """Load one path's experts: (forward(x, topk_weights, topk_ids), {name: tensor held})."""
    from mxconvert.kernels.align import align_routing
    from mxconvert.kernels.quant import swiglu_oai

    if path.startswith("ours"):
        ckpt = ConvertedCheckpoint(work / ("materialize" if path == "ours_materialize" else "derive"))
        bands = (0, NEVER) if path == "ours_native" else None  # None: the device's measured bands
        layer = load_moe_layer(ckpt, next(iter(ckpt.layers)), device=device, bands=bands)
        return layer.forward, {k: v for k, v in vars(layer.weights).items() if isinstance(v, torch.Tensor)}
    src = SourceExperts(work / "src")
    held = (bf16_at_load if path == "bf16_at_load" else block_fp8_at_load)(src, device)
    if device == "cpu":  # the kernels' reference, from the values held
        if path == "bf16_at_load":
            w13, w2 = held["w13_bf16"].float(), held["w2_bf16"].float()
        else:
            w13, w2 = (block_fp8_values(held[k], held[k + "_scale"]) for k in ("w13", "w2"))
        return lambda x, w, ids: moe_experts_reference(x, w, ids, w13=w13, w2=w2), held
    if peers is None:
        return None, held
    sys.path.insert(0, str(peers.resolve()))
    import vllm_fused_moe as vfm

    def align(ids, block_m):
        a = align_routing(ids, num_experts=src.num_experts, block_m=block_m)
        return a.sorted_ids, a.expert_ids, a.num_post_pad

    kw = dict(align_fn=align, act_fn=swiglu_oai)
    if path == "bf16_at_load":
        conf = vfm.load_config("vllm_E128_N384_H200_bf16.json")
        return lambda x, w, ids: vfm.fused_experts(
            x, w, ids, held["w13_bf16"], held["w2_bf16"], configs=conf, **kw
        ), held
    # Hopper's dot reads E4M3FN: the FNUZ bytes (-0 cleared) are twice their FNUZ value, so half the scale
    q13, q2 = (held[k].view(torch.float8_e4m3fn) for k in ("w13", "w2"))
    s13, s2 = held["w13_scale"] / 2, held["w2_scale"] / 2
    conf = vfm.load_config("vllm_E128_N384_H200_fp8_block128.json")
    return lambda x, w, ids: vfm.fused_experts(
        x, w, ids, q13, q2, configs=conf, w1_scale=s13, w2_scale=s2, block_shape=[128, 128], **kw
    ), held


def weight_error(path: str, held: dict, work: Path, device: str) -> dict:
    """Relative Frobenius error of the weights served against the source's MXFP8 values, and whether they
    are those values bit for bit (FP8 paths: the dequantized FP8; BF16 copies: the exact BF16)."""
    src = SourceExperts(work / "src")
    err, ref, exact = {}, {}, True
    for first, raw in src.chunks(device):
        c = raw["w13"].shape[0]
        for k in ("w13", "w2"):
            want = dequantize(raw[k], raw["s" + k[1:]], fnuz=False)  # float64: exact
            served = []
            if held.get(k) is not None:  # FP8: block-FP8's FP32 scales, or our packed E8M0
                v, s = held[k][first : first + c], held[k + "_scale"][first : first + c]
                served.append(
                    block_fp8_values(v, s) if s.dtype == torch.float32 else dequantized_weights(v, s).double()
                )
            if held.get(k + "_bf16") is not None:
                served.append(held[k + "_bf16"][first : first + c].double())
            for got in served:
                got = got.double()
                exact &= torch.equal(got, want)
                err[k] = err.get(k, 0.0) + float((got - want).pow(2).sum()) / len(served)
                ref[k] = ref.get(k, 0.0) + float(want.pow(2).sum()) / len(served)
    return dict(weight_rel_err=(sum(err.values()) / sum(ref.values())) ** 0.5, bit_exact=exact)


def worker(path: str, work: Path, peers: Path | None, check: bool) -> dict:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.empty(1, device=device)  # the CUDA context, outside every timing
    sync()
    t0 = time.perf_counter()
    forward, held = load_path(path, work, device, peers)
    sync()
    row = dict(path=path, load_s=time.perf_counter() - t0, held_bytes=sum(t.nbytes for t in held.values()))
    if cuda:
        row.update(peak_bytes=torch.cuda.max_memory_allocated(), resident_bytes=torch.cuda.memory_allocated())
    if check:
        row.update(weight_error(path, held, work, device))
        if cuda:
            torch.cuda.reset_peak_memory_stats()  # the check's temporaries are not the path's
    if forward is None:
        return row
    e, h = next(held[k] for k in ("w2", "w2_bf16") if held.get(k) is not None).shape[:2]  # [E, H, I]
    gen = torch.Generator(device=device).manual_seed(0)

    def batch(t):
        x = (torch.randn(t, h, device=device, generator=gen) * 0.1).bfloat16()
        scores = torch.rand(t, e, device=device, generator=gen)
        w, ids = scores.topk(TOP_K, dim=-1)
        return x, (w / w.sum(-1, keepdim=True)).float(), ids.to(torch.int32)

    x, w, ids = batch(1)
    t0 = time.perf_counter()
    forward(x, w, ids)
    sync()
    row["first_forward_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    graphs = []
    for t in CAPTURE_SIZES if cuda else [1, 8]:
        x, w, ids = batch(t)
        graphs.append(capture_cuda_graph(lambda: forward(x, w, ids)) if cuda else forward(x, w, ids))
    sync()
    row["warmup_s"] = time.perf_counter() - t0
    if cuda:
        row["peak_bytes"] = max(row["peak_bytes"], torch.cuda.max_memory_allocated())
    return row


# The driver --------------------------------------------------------------------------------------------
def run_row(path: str, work: Path, start: str, peers: Path | None) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=str(work / "triton" / path))  # one cache per path: each compiles its own
    cmd = [sys.executable, __file__, "--worker", path, "--workdir", str(work)] + (
        ["--check"] if start == "cold" else []
    )
    cmd += ["--peers", str(peers)] if peers else []
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:  # a row that fails is reported, not hidden
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"{path} {start}: failed: {' | '.join(tail)}", flush=True)
        return dict(path=path, start=start, error=" | ".join(tail))
    row = dict(json.loads(lines[-1][7:]), start=start, process_s=time.perf_counter() - t0)
    print(f"{path} {start}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if isinstance(v, float)), flush=True)
    return row


def gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def sec(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_tables(result: dict) -> None:
    rows = [r for r in result["rows"] if "error" not in r]
    print(f"\ndevice: {result['device']}  one MoE layer: E {result['shape']['E']} H {result['shape']['H']} "
          f"I {result['shape']['I']}  cold source read {result['cold_read_GBps']:.2f} GB/s")  # fmt: skip
    print("| path | start | load s | first forward s | warm-up s | peak GB | resident GB | weight error | bit-exact |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        err = r.get("weight_rel_err")
        print(f"| {PATHS[r['path']]} | {r['start']} | {sec(r['load_s'])} | {sec(r.get('first_forward_s'))} "
              f"| {sec(r.get('warmup_s'))} | {gb(r.get('peak_bytes'))} | {gb(r['held_bytes'])} "
              f"| {'-' if err is None else f'{100 * err:.2f}%'} | {r.get('bit_exact', '-')} |")  # fmt: skip
    print(f"\nWhole model ({MOE_LAYERS} MoE layers): routed experts per rank, what is left of the HBM for everything")
    print("else (attention, KV cache, activations), and the cold load (every rank's bytes from one disk):")
    print("| path | TP8 rank GB | TP4 rank GB | left at TP8, MI300X / H200 GB | at TP4 | cold load s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in (r for r in rows if r["start"] == "cold"):
        per = {tp: MOE_LAYERS * r["held_bytes"] / tp / 1e9 for tp in (8, 4)}
        left = {tp: " / ".join(f"{hbm - per[tp]:.0f}" for hbm in HBM_GB.values()) for tp in (8, 4)}
        print(f"| {PATHS[r['path']]} | {per[8]:.1f} | {per[4]:.1f} | {left[8]} | {left[4]} "
              f"| {MOE_LAYERS * r['load_s']:.0f} |")  # fmt: skip


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, help="where the checkpoints go (default: a temp dir); needs ~40 GB free")
    ap.add_argument("--peers", type=Path, default=ROOT / "scripts" / "peers", help="the peer kernels' folder")
    ap.add_argument("--drop-caches", action="store_true", help="also drop the whole page cache (root; the GPU box)")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ", ".join(PATHS))
    ap.add_argument("--shape", help="E,H,I of the layer (default: MiniMax-M3's on a GPU, 4,256,128 on a CPU)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir")
    ap.add_argument("--worker", choices=list(PATHS), help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.workdir, args.peers, args.check)), flush=True)
        return {}
    cuda = torch.cuda.is_available()
    e, h, i = [int(v) for v in args.shape.split(",")] if args.shape else (E, H, I) if cuda else (4, 256, 128)
    work = Path(tempfile.mkdtemp(prefix="bench_load_", dir=args.workdir))
    result = dict(device=torch.cuda.get_device_name() if cuda else "cpu", shape=dict(E=e, H=h, I=i), rows=[],
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__)  # fmt: skip
    try:
        t0 = time.perf_counter()
        make_full_size_source(work / "src", layers=1, experts=e, hidden=h, intermediate=i, edges=False)
        print(f"generated {e} experts H {h} I {i} in {time.perf_counter() - t0:.0f}s", flush=True)
        for mode in ("materialize", "derive"):
            t0 = time.perf_counter()
            convert(model_dir=str(work / "src"), out_dir=str(work / mode), bf16=mode, progress=False)
            print(f"converted --bf16 {mode} in {time.perf_counter() - t0:.0f}s", flush=True)
        files = files_of(work, "*.safetensors")
        evict(files, args.drop_caches)
        t0 = time.perf_counter()
        nbytes = plain_read(files_of(work / "src", "*.safetensors"))
        result["cold_read_GBps"] = nbytes / (time.perf_counter() - t0) / 1e9
        for path in args.paths.split(","):
            for start in ("cold", "warm"):
                if start == "cold":
                    evict(files, args.drop_caches)
                result["rows"].append(run_row(path, work, start, args.peers))
                if args.json:  # a run cut short keeps what it measured
                    args.json.write_text(json.dumps(result, indent=1))
    finally:
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    print_tables(result)
    return result


if __name__ == "__main__":
    main()
