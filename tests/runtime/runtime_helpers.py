"""Shared helpers of the runtime tests: tiny checkpoints, inputs, the error measure. The reference
(runtime/reference.py) reads the ORIGINAL MXFP8 checkpoint, never the converted one, so a conversion or
loading bug cannot cancel out."""

import torch
from make_tiny_checkpoint import make_tiny_checkpoint
from measure import rel_err  # noqa: F401 - re-exported for the tests here

from mxconvert.convert import convert
from mxconvert.runtime.reference import reference64, source_experts  # noqa: F401 (the tests' reference)

# H 128, I 64 (TP 2 gives 32 per rank), 4 experts, top-2; MoE layers 3, 4, 5 (5 is bf16_only with
# --long-context). Layer 3 holds the generator's planted edge bytes (scale 253: BF16 overflows).
SHAPE = dict(hidden_size=128, intermediate_size=64, num_experts=4, top_k=2, num_hidden_layers=6)
PLANTED, DUAL, BF16_ONLY = (f"language_model.model.layers.{L}.block_sparse_moe.experts" for L in (3, 4, 5))


def build_checkpoints(root, **shape):
    src = make_tiny_checkpoint(root / "src", mtp=False, num_shards=3, **shape)
    out = {"src": src}
    for bf16 in ("materialize", "derive"):
        out["dual" if bf16 == "materialize" else "derive"] = root / bf16
        convert(
            model_dir=str(src),
            out_dir=str(root / bf16),
            bf16=bf16,
            long_context=True,
            progress=False,
            bf16_max_tokens=8,
            bf16_min_tokens=1024,
        )  # fmt: skip  (the hybrid: both paths to test)
    return out


def inputs(t, *, experts=4, top_k=2, seed=0, device="cpu"):
    """hidden [T, H] BF16 (scaled so GEMM1 outputs are O(1)) and router-like routing."""
    from mxconvert.runtime.router import route

    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(t, SHAPE["hidden_size"], generator=g) * 2**-8).bfloat16()
    w, ids = route(torch.randn(t, experts, generator=g), torch.randn(experts, generator=g) * 0.1, top_k=top_k)
    return hidden.to(device), w.to(device), ids.to(device)
