"""Run one MoE layer of a converted checkpoint through the runtime for a few batch sizes.

    python scripts/demo_moe.py OUT_DIR --source SOURCE_DIR [--layer 4] [--tokens 1,8,9,64,1024]

Per batch: the path the hybrid dispatch took, the output's largest magnitude, and its relative error
against a float64 reference computed from the ORIGINAL MXFP8 source checkpoint (not the converted one).
Inputs are ordinary: hidden states drawn from N(0, 1), as after an RMSNorm; routing comes from the
layer's own router (gate weight and correction bias, as stored). Exits 1 if an output is not finite or
an error exceeds its path's bound. On a machine without a GPU the kernels run under the Triton
interpreter (slow, exact). Meant for the demo checkpoint (`make_tiny_checkpoint.py` without
--edge-bytes): the edge kind's planted scales overflow BF16 by design.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mxconvert.errors import MxconvertError  # noqa: E402
from mxconvert.format import bf16_band_empty  # noqa: E402
from mxconvert.runtime.loader import ConvertedCheckpoint, load_moe_layer  # noqa: E402
from mxconvert.runtime.reference import reference64, source_experts  # noqa: E402
from mxconvert.runtime.router import route  # noqa: E402

BOUND = {"bf16": 1e-2, "w8a16": 1e-2, "w8a8": 0.15}  # relative error vs float64 (tests/runtime says why)


def pick_layer(ckpt: ConvertedCheckpoint, layer: int | None) -> str:
    if layer is None:  # the first group with a native band to show, else the first
        return next((p for p, storage in ckpt.layers.items() if storage != "bf16_only"), next(iter(ckpt.layers)))
    for p in ckpt.layers:
        if f".layers.{layer}." in p:
            return p
    raise MxconvertError(f"--layer {layer}", "has no MoE experts in this checkpoint", f"use one of {list(ckpt.layers)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", help="a converted checkpoint (mxconvert OUT_DIR)")
    ap.add_argument("--source", required=True, help="the original MXFP8 checkpoint it was converted from")
    ap.add_argument("--layer", type=int, help="decoder layer index (default: the first MoE layer not bf16_only)")
    ap.add_argument("--tokens", default="1,8,9,64,1024", help="batch sizes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        ckpt = ConvertedCheckpoint(args.out_dir)
        prefix = pick_layer(ckpt, args.layer)
        layer = load_moe_layer(ckpt, prefix, device=device)
        moe = prefix.rsplit(".experts", 1)[0]
        gate = ckpt.read(f"{moe}.gate.weight", device=device).float()  # [E, H]
        bias = ckpt.read(f"{moe}.e_score_correction_bias", device=device)  # [E]
        w13, w2 = source_experts(args.source, prefix)
    except MxconvertError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    lo, hi = layer.bf16_max_tokens, layer.bf16_min_tokens
    band = "no BF16 band, every batch on" if bf16_band_empty(lo, hi) else f"BF16 at T <= {lo} or T >= {hi}, else"
    held = f"{layer.resident_bytes() / 1e6:.2f} MB of expert weights held"
    print(f"{prefix} ({layer.weights.storage}) on {device}: {band} {layer.native_mode}; {held}")
    print("| tokens | path | max abs output | rel. error vs float64 (source) | bound | seconds (first call compiles) |")
    print("|---|---|---|---|---|---|")
    worst_ok = True
    g = torch.Generator().manual_seed(args.seed)
    for t in [int(v) for v in args.tokens.split(",")]:
        hidden = torch.randn(t, w13.shape[-1], generator=g).bfloat16().to(device)
        weights, ids = route(
            hidden.float() @ gate.T, bias, top_k=ckpt.top_k, routed_scaling_factor=ckpt.routed_scaling_factor
        )
        t0 = time.perf_counter()
        out = layer(hidden, weights, ids)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        ref = reference64(hidden, weights, ids, w13, w2, ckpt.activation)
        err = ((out.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-300)).item()
        peak = out.float().abs().max().item()
        ok = err < BOUND[layer.last_path] and bool(torch.isfinite(out).all())  # NaN fails too
        worst_ok &= ok
        flag = "" if ok else " TOO LARGE"
        bound = BOUND[layer.last_path]
        print(f"| {t} | {layer.last_path} | {peak:.3g} | {err:.2e}{flag} | {bound:g} | {seconds:.2f} |")
    return 0 if worst_ok else 1


if __name__ == "__main__":
    sys.exit(main())
