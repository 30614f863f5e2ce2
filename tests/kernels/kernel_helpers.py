"""Shared helpers of the kernel tests (data with the docs/FORMAT.md layouts, routing, error measure)."""

import torch
from measure import rel_err  # noqa: F401 - re-exported for the tests here

ON_GPU = torch.cuda.is_available()


def random_fnuz_weights(e, n, k, gen, *, scale_lo=118, scale_hi=124):
    """FNUZ value bytes [E, N, K] (never 0x80, 0x7F, 0xFF) and packed E8M0 scales [E, K/32, N]."""
    vals = (torch.randn(e, n, k, generator=gen) * 16).clamp(-224, 224).to(torch.float8_e4m3fnuz)
    scales = torch.randint(scale_lo, scale_hi + 1, (e, k // 32, n), generator=gen, dtype=torch.uint8)
    return vals.view(torch.uint8), scales


def random_routing(t, k, e, gen, *, skew=False):
    """topk_ids [T, k] distinct experts per token, topk_weights [T, k] positive, rows summing to 1."""
    scores = torch.rand(t, e, generator=gen)
    if skew:  # most tokens on a few experts, many experts empty
        scores[:, : max(1, e // 4)] += 2.0
    ids = scores.topk(k, dim=1).indices.to(torch.int32)
    w = torch.rand(t, k, generator=gen) + 0.1
    return ids, (w / w.sum(1, keepdim=True)).float()
