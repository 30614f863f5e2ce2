"""Whole MoE experts forwards (native MXFP8 and BF16) and their float32 reference.

Shape legend: T tokens, k slots, P = T * k, E experts, H hidden, I intermediate per rank.
hidden [T, H] BF16, topk_weights [T, k] (float), topk_ids [T, k] (int) -> out [T, H] BF16.
Steps: align routing (decode configs with direct=True skip it: a block per pair); (quantize hidden);
GEMM1 [P, 2I] (split-K configs: fp32 partials, which the SwiGLU kernel sums); SwiGLU-OAI (+ quantize)
[P, I]; GEMM2 with the top-k weights [P, H]; sum over k. No host synchronization: every buffer is sized
from shapes alone, so the forward can be captured in a CUDA graph and replayed with new routing.
W8A8 activation quantization follows quant.py's rounding rule (E4M3FN, max 448, on NVIDIA; E4M3FNUZ,
max 240, on gfx942).
"""

import dataclasses

import torch

from mxconvert.errors import MxconvertError
from mxconvert.kernels import config as cfg
from mxconvert.kernels.align import align_routing
from mxconvert.kernels.moe_gemm import moe_gemm
from mxconvert.kernels.quant import (
    SwigluOAI,
    quantize_mxfp8,
    quantize_mxfp8_reference,
    swiglu_oai,
    swiglu_oai_reference,
)
from mxconvert.layout import BLOCK

native_mode = cfg.native_mode


def _check(hidden, topk_weights, topk_ids, w13, w2):
    t, h = hidden.shape
    e, n1, k1 = w13.shape
    if hidden.dtype != torch.bfloat16 or k1 != h or tuple(w2.shape) != (e, h, n1 // 2) or n1 % (2 * BLOCK):
        raise MxconvertError(
            "moe experts",
            f"hidden {tuple(hidden.shape)} {hidden.dtype}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}",
            "expected BF16 [T, H], w13 [E, 2I, H], w2 [E, H, I], I % 32 == 0",
        )
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != t:
        raise MxconvertError(
            "moe experts",
            f"topk_ids {tuple(topk_ids.shape)} vs topk_weights {tuple(topk_weights.shape)}",
            "both must be [T, k]",
        )
    return t, h, e, n1 // 2, topk_ids.shape[1]


def _forward(
    hidden,
    topk_weights,
    topk_ids,
    w13,
    w2,
    *,
    mode,
    w13_scale=None,
    w2_scale=None,
    activation,
    config,
    fp8_format,
    outside,
    dequant="auto",
):
    t, h, e, i, k = _check(hidden, topk_weights, topk_ids, w13, w2)
    if t == 0:
        return torch.empty(0, h, dtype=torch.bfloat16, device=hidden.device)
    if outside:  # experts held elsewhere: id E is counted nowhere, so its pairs stay unwritten zeros
        topk_ids = torch.where((topk_ids >= 0) & (topk_ids < e), topk_ids, e)
    config = config or cfg.moe_config(
        tokens=t, top_k=k, num_experts=e, hidden=h, intermediate=i, mode=mode, device=hidden.device
    )
    if dequant != "auto":
        config = dataclasses.replace(
            config,
            gemm1=dataclasses.replace(config.gemm1, dequant=dequant),
            gemm2=dataclasses.replace(config.gemm2, dequant=dequant),
        )
    if config.direct:  # decode: each pair its own block, no alignment launch
        align = None
    else:
        align = align_routing(topk_ids, num_experts=e, block_m=config.block_m)
    weights = topk_weights.reshape(-1).float().contiguous()
    ids = topk_ids.to(torch.int32).contiguous() if config.direct else None
    gemm = dict(align=align, num_pairs=t * k, mode=mode, fp8_format=fp8_format, topk_ids=ids, block_m=config.block_m)
    if mode == "w8a8":  # MXFP8 activations into both GEMMs
        xq, xs = quantize_mxfp8(hidden, fp8_format=fp8_format)
        y1 = moe_gemm(xq, w13, a_div=k, tile=config.gemm1, a_scale=xs, b_scale=w13_scale, **gemm)
        aq, as_ = swiglu_oai(y1, act=activation, fp8_format=fp8_format)
        y2 = moe_gemm(
            aq,
            w2,
            a_div=1,
            tile=config.gemm2,
            a_scale=as_,
            b_scale=w2_scale,
            topk_weights=weights,
            zero=outside,
            **gemm,
        )
    else:  # BF16 activations; FP8 weights (w8a16) are dequantized in registers
        y1 = moe_gemm(hidden.contiguous(), w13, a_div=k, tile=config.gemm1, b_scale=w13_scale, **gemm)
        a2 = swiglu_oai(y1, act=activation)
        y2 = moe_gemm(a2, w2, a_div=1, tile=config.gemm2, b_scale=w2_scale, topk_weights=weights, zero=outside, **gemm)
    return y2.view(t, k, h).sum(dim=1)  # one kernel, fp32 accumulation inside, BF16 out


def moe_experts_mxfp8(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    activation: SwigluOAI = SwigluOAI(),
    mode: str | None = None,
    fp8_format: str | None = None,
    config: cfg.MoeConfig | None = None,
    zero_outside_experts: bool = False,
    dequant: str = "auto",
) -> torch.Tensor:
    """Native MXFP8 experts: w13 [E, 2I, H] / w2 [E, H, I] FNUZ bytes, scales [E, H/32, 2I] / [E, I/32, H].

    mode "w8a8" (MXFP8 activations) or "w8a16" (BF16 activations, weights dequantized in registers);
    default native_mode(device). fp8_format default cfg.fp8_format(device) ("fn" on NVIDIA).
    zero_outside_experts: topk_ids outside [0, E) (experts on other ranks) contribute zero; otherwise
    every id must lie in [0, E).
    dequant: the FP8 -> BF16 weight route for both GEMMs, W8A16's and W8A8's BF16 dots (tile w8a8 "bf16", the
    H200 table's rows at 1-2 tokens per expert) ("auto": the tiles' choice, moe_gemm.resolve_dequant, whose
    NVIDIA routes need scale bytes <= 143; pass "fp32" for weights with larger scales).
    """
    mode = mode or native_mode(hidden.device)
    if mode not in ("w8a8", "w8a16"):
        raise MxconvertError("moe_experts_mxfp8", f"mode {mode!r}", "use 'w8a8' or 'w8a16'")
    return _forward(
        hidden,
        topk_weights,
        topk_ids,
        w13,
        w2,
        mode=mode,
        w13_scale=w13_scale,
        w2_scale=w2_scale,
        activation=activation,
        config=config,
        fp8_format=fp8_format or cfg.fp8_format(hidden.device),
        outside=zero_outside_experts,
        dequant=dequant,
    )


def moe_experts_bf16(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    w13_bf16: torch.Tensor,
    w2_bf16: torch.Tensor,
    activation: SwigluOAI = SwigluOAI(),
    config: cfg.MoeConfig | None = None,
    zero_outside_experts: bool = False,
) -> torch.Tensor:
    """BF16 experts: w13_bf16 [E, 2I, H], w2_bf16 [E, H, I]; zero_outside_experts as moe_experts_mxfp8."""
    return _forward(
        hidden,
        topk_weights,
        topk_ids,
        w13_bf16,
        w2_bf16,
        mode="bf16",
        activation=activation,
        config=config,
        fp8_format="fn",
        outside=zero_outside_experts,
    )


def moe_experts_reference(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: SwigluOAI = SwigluOAI(),
    fp8_format: str | None = None,
) -> torch.Tensor:
    """float32 forward from float weights w13 [E, 2I, H], w2 [E, H, I] (dequantized first).

    fp8_format="fn"/"fnuz" emulates W8A8: both GEMM inputs pass through quantize_mxfp8_reference.
    GEMM1's output is rounded to BF16, as the kernels store it. Ids outside [0, E) contribute zero.
    """

    def q(x):
        if not fp8_format:
            return x.float()
        v, s = quantize_mxfp8_reference(x, fp8_format=fp8_format)
        return (v.float().view(x.shape[0], -1, BLOCK) * torch.exp2(s.float() - 127).unsqueeze(-1)).view(x.shape)

    t, h = hidden.shape
    ids = topk_ids.reshape(-1)
    x = q(hidden)
    out = torch.zeros(ids.numel(), h, dtype=torch.float32, device=hidden.device)
    for e in [e for e in ids.unique().tolist() if 0 <= e < w13.shape[0]]:
        p = (ids == e).nonzero().flatten()
        y1 = (x[p // topk_ids.shape[1]] @ w13[e].float().T).to(torch.bfloat16)
        out[p] = q(swiglu_oai_reference(y1, act=activation)) @ w2[e].float().T
    out *= topk_weights.reshape(-1, 1).float()
    return out.view(t, -1, h).sum(1)


def capture_cuda_graph(fn):
    """Warm fn up on a side stream, then capture one call: returns (graph, fn's output). The forwards
    make no host synchronization, so serving stacks can capture them like this and replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
