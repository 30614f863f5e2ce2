"""Whole experts forwards (W8A8, W8A16, BF16) against the float32 reference; GPU: TP8 shapes, CUDA graphs."""

import pytest
import torch
from kernel_helpers import ON_GPU, random_fnuz_weights, random_routing, rel_err

from mxconvert.kernels.config import GemmTile, MoeConfig, fp8_format
from mxconvert.kernels.moe import (
    capture_cuda_graph,
    moe_experts_bf16,
    moe_experts_mxfp8,
    moe_experts_reference,
    native_mode,
)
from mxconvert.kernels.moe_gemm import dequantized_weights


def make(t, k, e, h, i, gen, device, skew=False):
    w13, s13 = random_fnuz_weights(e, 2 * i, h, gen)
    w2, s2 = random_fnuz_weights(e, h, i, gen)
    ids, w = random_routing(t, k, e, gen, skew=skew)
    x = torch.randn(t, h, generator=gen).bfloat16()
    d = lambda v: v.to(device)
    fp8 = dict(w13=d(w13), w13_scale=d(s13), w2=d(w2), w2_scale=d(s2))
    wf = dict(w13=dequantized_weights(d(w13), d(s13)), w2=dequantized_weights(d(w2), d(s2)))
    return d(x), d(w), d(ids), fp8, wf


def check_all(x, w, ids, fp8, wf, fmt=None):
    ref = moe_experts_reference(x, w, ids, **wf)
    bf = dict(w13_bf16=wf["w13"].bfloat16(), w2_bf16=wf["w2"].bfloat16())
    out = moe_experts_bf16(x, w, ids, **bf)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2  # BF16 rounding of the GEMM outputs and activation
    out = moe_experts_mxfp8(x, w, ids, **fp8, mode="w8a16", fp8_format=fmt)
    assert rel_err(out, ref) < 1e-2
    q = fmt or fp8_format(x.device)
    out = moe_experts_mxfp8(x, w, ids, **fp8, mode="w8a8", fp8_format=fmt)
    assert rel_err(out, moe_experts_reference(x, w, ids, **wf, fp8_format=q)) < 2e-2  # rare FP8 rounding flips
    # MXFP8 activations against none: about 0.10 measured at TP8 shapes (two quantized GEMM inputs;
    # SwiGLU outputs are heavy-tailed, so small values in a block lose most); a sanity bound only
    assert rel_err(out, ref) < 0.15


@pytest.mark.parametrize("t,k,e,skew", [(1, 1, 1, False), (7, 2, 4, False), (13, 8, 16, True), (33, 4, 128, True)])
@pytest.mark.parametrize("fmt", ["fn", "fnuz"])
def test_forward_small(t, k, e, skew, fmt, device, gen):
    if fmt == "fnuz" and ON_GPU and torch.version.hip is None:
        pytest.skip("NVIDIA has no FNUZ dot: the GPU reads FNUZ bytes as E4M3FN")
    x, w, ids, fp8, wf = make(t, k, e, 96, 64, gen, device, skew)  # H 96, I 64: not multiples of 128
    check_all(x, w, ids, fp8, wf, fmt)


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
def test_forward_split_k(mode, device, gen):
    # GEMM1 split over K (fp32 partials summed in the SwiGLU kernel) gives the unsplit forward's result
    x, w, ids, fp8, wf = make(3, 2, 4, 192, 64, gen, device)
    split = MoeConfig(16, GemmTile(32, 64, 4, 1, split_k=3), GemmTile(32, 64, 4, 1))
    out = moe_experts_mxfp8(x, w, ids, **fp8, mode=mode, config=split)
    q = fp8_format(x.device) if mode == "w8a8" else None
    assert rel_err(out, moe_experts_reference(x, w, ids, **wf, fp8_format=q)) < (1e-2 if mode == "w8a16" else 2e-2)
    plain = moe_experts_mxfp8(x, w, ids, **fp8, mode=mode, config=MoeConfig(16, GemmTile(32, 64, 4, 1), split.gemm2))
    assert rel_err(out, plain) < 1e-2  # the same up to fp32 summation order (one BF16 step at most)


@pytest.mark.parametrize("mode", ["w8a16", "bf16", "w8a8"])
def test_forward_decode_variants(mode, device, gen):
    # no alignment (direct) with split-K GEMM1
    x, w, ids, fp8, wf = make(3, 4, 8, 192, 64, gen, device)
    conf = MoeConfig(16, GemmTile(32, 64, 4, 1, split_k=2), GemmTile(32, 64, 4, 1, swap_ab=True), direct=True)
    q = fp8_format(x.device) if mode == "w8a8" else None
    ref = moe_experts_reference(x, w, ids, **wf, fp8_format=q)
    if mode == "bf16":
        out = moe_experts_bf16(x, w, ids, w13_bf16=wf["w13"].bfloat16(), w2_bf16=wf["w2"].bfloat16(), config=conf)
    else:
        out = moe_experts_mxfp8(x, w, ids, **fp8, mode=mode, config=conf)
    assert rel_err(out, ref) < (2e-2 if mode == "w8a8" else 1e-2)


def test_direct_zero_outside_experts(device, gen):
    # direct blocks skip pairs of experts held elsewhere: their rows stay zero
    x, w, ids, fp8, wf = make(4, 2, 4, 64, 32, gen, device)
    ids_ep = ids.clone()
    ids_ep[0] = torch.tensor([-1, 9], dtype=ids.dtype)
    conf = MoeConfig(16, GemmTile(32, 64, 4, 1), GemmTile(32, 32, 4, 1), direct=True)
    out = moe_experts_mxfp8(x, w, ids_ep, **fp8, mode="w8a16", config=conf, zero_outside_experts=True)
    assert torch.count_nonzero(out[0]) == 0
    assert rel_err(out, moe_experts_reference(x, w, ids_ep, **wf)) < 1e-2


def test_forward_empty(device, gen):
    x, w, ids, fp8, wf = make(0, 4, 8, 64, 32, gen, device)
    assert moe_experts_mxfp8(x, w, ids, **fp8).shape == (0, 64)
    assert moe_experts_bf16(x, w, ids, w13_bf16=wf["w13"].bfloat16(), w2_bf16=wf["w2"].bfloat16()).shape == (0, 64)


def test_native_mode(device):
    assert native_mode(device) in ("w8a8", "w8a16")


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 37, 300])
def test_forward_tp8_shapes(t, gen):
    # MiniMax-M3 per rank at TP8: E 128, H 6144, I 384, top-4
    x, w, ids, fp8, wf = make(t, 4, 128, 6144, 384, gen, "cuda")
    check_all(x, w, ids, fp8, wf)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["w8a8", "w8a16", "bf16"])
def test_cuda_graph_replay(path, gen):
    # capture with one routing, rewrite the routing in place, replay: the result follows the new routing
    t, k, e, h, i = 64, 4, 128, 1024, 384
    x, w, ids, fp8, wf = make(t, k, e, h, i, gen, "cuda")
    bf = dict(w13_bf16=wf["w13"].bfloat16(), w2_bf16=wf["w2"].bfloat16())
    fwd = (
        (lambda: moe_experts_bf16(x, w, ids, **bf))
        if path == "bf16"
        else (lambda: moe_experts_mxfp8(x, w, ids, **fp8, mode=path))
    )
    fwd()  # compile outside the capture
    graph, out = capture_cuda_graph(fwd)
    new_ids, new_w = random_routing(t, k, e, gen, skew=True)
    ids.copy_(new_ids)
    w.copy_(new_w)
    x.copy_(torch.randn(t, h, generator=gen).bfloat16())
    graph.replay()
    torch.cuda.synchronize()
    ref = moe_experts_reference(x, w, ids, **wf, fp8_format=fp8_format(x.device) if path == "w8a8" else None)
    assert rel_err(out, ref) < 2e-2


@pytest.mark.parametrize("path", ["bf16", "w8a16", "w8a8"])
def test_zero_outside_experts(path, device, gen):
    # expert parallelism: ids of other ranks' experts (negative, E, far above) contribute exactly zero
    t, k, e, h, i = 6, 3, 4, 64, 32
    x, w, ids, fp8, wf = make(t, k, e, h, i, gen, device)
    foreign = torch.tensor([-1, e, 1000, -300], dtype=ids.dtype, device=device)
    mask = torch.rand(t, k, generator=gen).to(device) < 0.5
    mask[0] = True  # token 0 has no expert here: its row is zero
    ids_ep = torch.where(mask, foreign[torch.arange(t * k, device=device).view(t, k) % 4], ids)
    ref = moe_experts_reference(x, w, ids_ep, **wf, fp8_format=fp8_format(device) if path == "w8a8" else None)
    if path == "bf16":
        bf = dict(w13_bf16=wf["w13"].bfloat16(), w2_bf16=wf["w2"].bfloat16())
        out = moe_experts_bf16(x, w, ids_ep, **bf, zero_outside_experts=True)
    else:
        out = moe_experts_mxfp8(x, w, ids_ep, **fp8, mode=path, zero_outside_experts=True)
    assert torch.count_nonzero(out[0]) == 0 and ref[0].abs().sum() == 0
    assert rel_err(out, ref) < 2e-2
