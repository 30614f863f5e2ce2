"""MiniMax-M3's router, for tests and demos: sigmoid scores, a correction bias for selection only,
top-k, renormalized, times the routed scaling factor.

Shape legend: T tokens, E experts, k experts per token.
"""

import torch


def route(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    *,
    top_k: int,
    routed_scaling_factor: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E], correction_bias [E] -> (topk_weights [T, k] float32, topk_ids [T, k] int32)."""
    scores = torch.sigmoid(router_logits.float())  # [T, E]
    ids = (scores + correction_bias.float()).topk(top_k, dim=-1).indices  # the bias picks, never weighs
    weights = scores.gather(-1, ids)  # [T, k]
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20) * routed_scaling_factor
    return weights, ids.to(torch.int32)
