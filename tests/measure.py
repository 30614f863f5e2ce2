"""How far a result is from its reference: one measure for the kernel, runtime and demo tests."""

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error in float64 (norms of huge-scale outputs overflow fp32); fails on non-finite."""
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
