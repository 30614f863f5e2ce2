"""A float64 reference of one MoE layer computed from the ORIGINAL MXFP8 source checkpoint (E4M3FN bytes
and E8M0 scales per expert and projection), for tests and the demo: independent of the conversion.

Shape legend: T tokens, k slots, E experts, H hidden, I expert intermediate.
"""

from pathlib import Path

import torch

from mxconvert import layout
from mxconvert.checkpoint import SourceCheckpoint
from mxconvert.kernels.quant import SwigluOAI


def source_experts(src_dir: str | Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (w13 [E, 2I, H] gate rows then up, w2 [E, H, I]), exact, from the source's bytes."""
    src = SourceCheckpoint(Path(src_dir))
    try:
        group = src.groups[prefix].experts
        w13, w2 = [], []
        for e in sorted(group):
            deq = {
                p: layout.dequantize(src.read_tensor(v), src.read_tensor(s), fnuz=False)
                for p, (v, s) in group[e].items()
            }
            w13.append(torch.cat([deq["gate"], deq["up"]]))
            w2.append(deq["down"])
    finally:
        src.close()
    return torch.stack(w13), torch.stack(w2)


def reference64(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    act: SwigluOAI = SwigluOAI(),
) -> torch.Tensor:
    """The layer in float64 on the CPU: hidden [T, H], topk_weights / topk_ids [T, k] -> [T, H]."""
    x = hidden.double().cpu()
    ids, weights = topk_ids.long().cpu().reshape(-1), topk_weights.double().cpu().reshape(-1)
    out = torch.zeros(ids.numel(), x.shape[1], dtype=torch.float64)  # [T * k, H]
    for e in ids.unique().tolist():
        p = (ids == e).nonzero().flatten()
        g, u = (x[p // topk_ids.shape[1]] @ w13[e].double().T).chunk(2, dim=-1)
        gate, up = g.clamp(max=act.limit), u.clamp(-act.limit, act.limit)
        out[p] = (gate * torch.sigmoid(act.alpha * gate) * (up + act.beta)) @ w2[e].double().T
    return (out * weights[:, None]).view(x.shape[0], -1, x.shape[1]).sum(1)
