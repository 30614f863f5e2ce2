"""MXFP8 quantization and SwiGLU-OAI: kernels against their references, bit for bit where the rule is exact."""

import pytest
import torch

from mxconvert.kernels.quant import (
    SwigluOAI,
    quantize_mxfp8,
    quantize_mxfp8_reference,
    swiglu_oai,
    swiglu_oai_reference,
)


def edge_rows(k):
    """Rows that hit the rule's edges: zero blocks, exact FP8_MAX * 2**e ties, subnormal results, -0."""
    rows = [
        torch.zeros(k),
        torch.full((k,), -0.0),
        torch.full((k,), 448.0),
        torch.full((k,), 240.0 * 2**-20),
        torch.full((k,), 449.0),
        torch.full((k,), 3.0e38),
    ]
    mixed = torch.linspace(-1, 1, k) * 2**-12
    mixed[::32] = 1000.0  # one large value makes the rest FP8 subnormals or zero
    rows.append(mixed)
    tiny = torch.full((k,), 2.0**-133)  # BF16 subnormal amax: scale byte clamps to 1
    rows.append(tiny)
    return torch.stack(rows).bfloat16()


@pytest.mark.parametrize("fmt", ["fn", "fnuz"])
@pytest.mark.parametrize("m,k", [(0, 64), (1, 32), (3, 96), (37, 320)])
def test_quantize_bit_exact(fmt, m, k, device, gen):
    x = (torch.randn(m, k, generator=gen) * torch.logspace(-8, 8, k, base=2)).bfloat16()
    x = torch.cat([x, edge_rows(k)]) if m else x
    q, s = quantize_mxfp8(x.to(device), fp8_format=fmt)
    rq, rs = quantize_mxfp8_reference(x, fp8_format=fmt)
    assert q.dtype == rq.dtype and s.shape == (x.shape[0], k // 32)
    assert torch.equal(s.cpu(), rs)
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))


@pytest.mark.parametrize("fmt", ["fn", "fnuz"])
def test_quantize_fills_top_binade(fmt, gen):
    # the block maximum lands in [FP8_MAX / 2, FP8_MAX] (rounding may reach the lower end); error <= half a step
    x = (torch.randn(16, 256, generator=gen) * 3).bfloat16()
    q, s = quantize_mxfp8_reference(x, fp8_format=fmt)
    top = 448.0 if fmt == "fn" else 240.0
    qmax = q.float().abs().view(16, 8, 32).amax(-1)
    assert ((qmax >= top / 2) & (qmax <= top)).all()
    deq = q.float().view(16, 8, 32) * torch.exp2(s.float() - 127).unsqueeze(-1)
    assert ((deq.view(16, 256) - x.float()).abs() <= x.float().abs() * 2**-4 + 1e-30).all()


@pytest.mark.parametrize("m,i", [(0, 32), (1, 32), (5, 96), (33, 256)])
def test_swiglu(m, i, device, gen):
    x = (torch.randn(m, 2 * i, generator=gen) * 6).bfloat16()  # crosses the +-7 limits
    act = SwigluOAI()
    y = swiglu_oai(x.to(device), act=act).cpu()
    ref = swiglu_oai_reference(x, act=act)
    # exp may differ from torch's in the last fp32 bit: at most one BF16 step, on few elements
    diff = (y.float() - ref.float()).abs()
    assert (diff <= ref.float().abs() * 2**-7 + 1e-6).all()
    assert y.shape == (m, i) and (diff > 0).sum() <= 0.02 * diff.numel()


@pytest.mark.parametrize("fmt", ["fn", "fnuz"])
def test_swiglu_quantize_fused(fmt, device, gen):
    # the fused kernel quantizes exactly the BF16 values the unfused kernel writes
    x = (torch.randn(19, 2 * 160, generator=gen) * 4).bfloat16().to(device)
    y = swiglu_oai(x)
    q, s = swiglu_oai(x, fp8_format=fmt)
    rq, rs = quantize_mxfp8_reference(y.cpu(), fp8_format=fmt)
    assert torch.equal(s.cpu(), rs)
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))


def test_swiglu_keeps_nan_and_clamps_inf_as_the_reference(device):
    """Overflowed weights (scale bytes near 254) give inf and inf - inf = NaN in GEMM1: the clamps keep a
    NaN a NaN (torch.clamp does; a plain minimum would turn it into the limit) and take inf to the limit."""
    x = torch.zeros(2, 64)
    x[0, 0], x[0, 32], x[1, 1], x[1, 33], x[1, 2] = float("nan"), 1.0, float("inf"), float("-inf"), float("nan")
    y = swiglu_oai(x.bfloat16().to(device)).cpu().float()
    ref = swiglu_oai_reference(x.bfloat16()).float()
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.isnan(y[0, 0]) and torch.isnan(y[1, 2])
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(ref))
