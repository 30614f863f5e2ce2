"""MXFP8 activation quantization and the fused SwiGLU-OAI (+ quantization): launch wrappers and references.

Rounding rule (both FP8 formats). Per row and per 32 consecutive values along K, with amax the block's
largest |x| (x in BF16, widened to fp32 exactly; subnormals, |x| < 2**-126, count as 0):
  scale byte s = the smallest e with amax <= FP8_MAX * 2**e, plus 127, clamped to [1, 254]
                 (FP8_MAX 448 for E4M3FN, 240 for E4M3FNUZ; s = 1 for an all-zero block);
  value byte   = x * 2**(127 - s) (exact) rounded to nearest-even E4M3; it never overflows; every zero,
                 -0 included, is byte 0x00.
So each block's maximum lands in the top binade of the FP8 range: ceil(log2(amax / FP8_MAX)) + 127,
computed exactly on the bits rather than through a float log2.

SwiGLU-OAI, gate g and up u the two halves of GEMM1's output, in fp32, rounded once to BF16:
  out = min(g, limit) * sigmoid(alpha * min(g, limit)) * (clamp(u, -limit, limit) + beta);
the fused variant quantizes that BF16 value by the rule above.
"""

from dataclasses import dataclass

import torch

from mxconvert import format as fmt
from mxconvert.kernels._quant import _quantize_kernel, _swiglu_kernel
from mxconvert.layout import BLOCK

# format -> (torch dtype, exponent bias, FP8_MAX as 1.mant * 2**exp: exp, mantissa bits)
FP8_FORMATS = {
    "fn": (torch.float8_e4m3fn, 7, 8, 0x600000),  # 448 = 1.75 * 2**8
    "fnuz": (torch.float8_e4m3fnuz, 8, 7, 0x700000),  # 240 = 1.875 * 2**7
}


@dataclass(frozen=True)
class SwigluOAI:
    """MiniMax-M3's activation (config.json swiglu_alpha / swiglu_beta / swiglu_limit)."""

    alpha: float = fmt.ACTIVATION["alpha"]
    beta: float = fmt.ACTIVATION["beta"]
    limit: float = fmt.ACTIVATION["limit"]


def _consts(fp8_format):
    _, bias, max_exp, max_mant = FP8_FORMATS[fp8_format]
    return dict(BIAS=bias, MAX_EXP=max_exp, MAX_MANT=max_mant)


def quantize_mxfp8(x: torch.Tensor, *, fp8_format: str = "fn") -> tuple[torch.Tensor, torch.Tensor]:
    """BF16 [M, K] -> (FP8 [M, K] in `fp8_format` ("fn" E4M3FN, "fnuz" E4M3FNUZ), E8M0 scale bytes [M, K/32])."""
    assert x.dim() == 2 and x.dtype == torch.bfloat16 and x.shape[1] % BLOCK == 0, (x.shape, x.dtype)
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8_FORMATS[fp8_format][0], device=x.device)
    s = torch.empty(m, k // BLOCK, dtype=torch.uint8, device=x.device)
    if m:
        br, bc = 4, 256
        grid = (triton_cdiv(m, br), triton_cdiv(k, bc))
        _quantize_kernel[grid](
            x,
            q.view(torch.uint8),
            s,
            m,
            k,
            x.stride(0),
            q.stride(0),
            s.stride(0),
            BR=br,
            BC=bc,
            **_consts(fp8_format),
            num_warps=4,
        )
    return q, s


def quantize_mxfp8_reference(x: torch.Tensor, *, fp8_format: str = "fn") -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch quantize_mxfp8: the same bytes, by frexp and torch's nearest-even FP8 cast."""
    dtype, _, max_exp, max_mant = FP8_FORMATS[fp8_format]
    fp8_max = (1.0 + max_mant / 2**23) * 2.0**max_exp
    m, k = x.shape
    g = x.double().reshape(m, k // BLOCK, BLOCK)
    g = g.masked_fill(g.abs() < 2.0**-126, 0.0)
    amax = g.abs().amax(-1)
    mant, exp = torch.frexp(amax / fp8_max)  # amax / max = mant * 2**exp, mant in [0.5, 1)
    e = torch.where(mant == 0.5, exp - 1, exp)  # ceil(log2): an exact power of two needs no bump
    byte = (e + 127).clamp(1, 254).masked_fill(amax == 0, 1)
    q = (g * torch.ldexp(torch.ones_like(g), (127 - byte).unsqueeze(-1))).float().to(dtype)
    q = q.view(torch.uint8).masked_fill(q.float() == 0, 0).view(dtype)
    return q.reshape(m, k), byte.to(torch.uint8)


def swiglu_oai(x: torch.Tensor, *, act: SwigluOAI = SwigluOAI(), fp8_format: str | None = None):
    """GEMM1 output [M, 2I] BF16 -> BF16 [M, I], or quantized with fp8_format="fn"/"fnuz" (FP8 [M, I], scales
    [M, I/32]).
    x may also be split-K partials, fp32 [S, M, 2I]: summed, rounded to BF16, then as above."""
    split = x.shape[0] if x.dim() == 3 else 1
    assert (x.dim() == 2 and x.dtype == torch.bfloat16) or (x.dim() == 3 and x.dtype == torch.float32), (
        x.shape,
        x.dtype,
    )
    assert x.shape[-1] % (2 * BLOCK) == 0 and x.stride(-1) == 1, (x.shape, x.stride())
    m, i = x.shape[-2], x.shape[-1] // 2
    if fp8_format:
        out = torch.empty(m, i, dtype=FP8_FORMATS[fp8_format][0], device=x.device)
        s = torch.empty(m, i // BLOCK, dtype=torch.uint8, device=x.device)
    else:
        out, s = torch.empty(m, i, dtype=torch.bfloat16, device=x.device), None
    if m:
        br, bc = 4, 128
        grid = (triton_cdiv(m, br), triton_cdiv(i, bc))
        _swiglu_kernel[grid](
            x,
            out.view(torch.uint8) if fp8_format else out,
            s if fp8_format else out,
            m,
            i,
            x.stride(0) if split > 1 else 0,
            x.stride(-2),
            out.stride(0),
            s.stride(0) if fp8_format else 0,
            act.alpha,
            act.beta,
            act.limit,
            BR=br,
            BC=bc,
            QUANT=bool(fp8_format),
            INTERP=x.device.type == "cpu",
            SPLIT=split,
            **_consts(fp8_format or "fn"),
            num_warps=4,
        )
    return (out, s) if fp8_format else out


def swiglu_oai_reference(x: torch.Tensor, *, act: SwigluOAI = SwigluOAI(), fp8_format: str | None = None):
    """Pure-torch swiglu_oai, in fp32, rounded once to BF16 (then quantize_mxfp8_reference); fp32 split-K
    partials [S, M, 2I] are summed and rounded to BF16 first."""
    if x.dim() == 3:
        x = x.sum(0).to(torch.bfloat16)
    g, u = x.float().chunk(2, dim=-1)
    gate = g.clamp(max=act.limit)
    up = u.clamp(-act.limit, act.limit)
    y = (gate * torch.sigmoid(act.alpha * gate) * (up + act.beta)).to(torch.bfloat16)
    return quantize_mxfp8_reference(y, fp8_format=fp8_format) if fp8_format else y


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
