"""Routing alignment: (token, top-k slot) pairs sorted by expert, each expert's run padded to BLOCK_M.

Shape legend: T tokens, k slots per token, P = T * k pairs, E experts.
Outputs, all on the device and sized for the worst case so nothing waits on the host:
  sorted_ids [max_slots] int32: pair index p = t * k + j, or P for a padding slot;
  expert_ids [max_blocks] int32: the expert of each BLOCK_M block of sorted_ids;
  num_post_pad [1] int32: slots in use (blocks at or past it hold no work).
"""

from dataclasses import dataclass

import torch
import triton

from mxconvert.kernels._align import _align_small_kernel, _count_kernel, _scatter_kernel

CHUNK = 128
SMALL = 128  # up to this many pairs (T 32 at top-4): one launch, no memset (_align_small_kernel)


@dataclass
class Alignment:
    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_post_pad: torch.Tensor
    block_m: int

    @property
    def max_blocks(self) -> int:
        return self.expert_ids.numel()


def max_slots(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Worst case of sum_e roundup(count_e, block_m): every used expert wastes up to block_m - 1 slots."""
    used = min(num_experts, num_pairs)
    return triton.cdiv(num_pairs + used * (block_m - 1), block_m) * block_m


def align_routing(topk_ids: torch.Tensor, *, num_experts: int, block_m: int) -> Alignment:
    """topk_ids [T, k] (ids in [0, E); id E: placed nowhere) -> Alignment; no host synchronization.
    Up to SMALL pairs one launch, else a memset and two launches."""
    ids = topk_ids.reshape(-1).to(torch.int32)
    p = ids.numel()
    slots = max_slots(p, num_experts, block_m)
    e_pad = triton.next_power_of_2(num_experts + 1)
    dev = topk_ids.device
    if 0 < p <= SMALL:
        sorted_ids = torch.empty(slots, dtype=torch.int32, device=dev)
        expert_ids = torch.empty(slots // block_m, dtype=torch.int32, device=dev)
        num_post_pad = torch.empty(1, dtype=torch.int32, device=dev)
        _align_small_kernel[(1,)](
            ids,
            sorted_ids,
            expert_ids,
            num_post_pad,
            p,
            slots,
            slots // block_m,
            E_PAD=e_pad,
            CHUNK=SMALL,
            E=num_experts,
            BLOCK_M=block_m,
            num_warps=4,
        )
        return Alignment(sorted_ids, expert_ids, num_post_pad, block_m)
    scratch = torch.zeros(2 * e_pad + 1, dtype=torch.int32, device=dev)  # counts, cursors, slots used
    num_post_pad = scratch[2 * e_pad :]
    sorted_ids = torch.empty(slots, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(slots // block_m, dtype=torch.int32, device=dev)
    if p:
        grid = (triton.cdiv(p, CHUNK),)
        _count_kernel[grid](ids, scratch, sorted_ids, p, slots, E_PAD=e_pad, CHUNK=CHUNK, E=num_experts)
        _scatter_kernel[grid](
            ids,
            scratch,
            sorted_ids,
            expert_ids,
            num_post_pad,
            p,
            slots // block_m,
            E_PAD=e_pad,
            CHUNK=CHUNK,
            E=num_experts,
            BLOCK_M=block_m,
        )
    return Alignment(sorted_ids, expert_ids, num_post_pad, block_m)


def align_routing_reference(topk_ids: torch.Tensor, *, num_experts: int, block_m: int):
    """Pure torch, stable order: (sorted_ids, expert_ids, num_post_pad) trimmed to the slots in use."""
    ids = topk_ids.reshape(-1).long().cpu()
    p = ids.numel()
    sorted_ids, expert_ids = [], []
    for e in range(num_experts):
        pairs = (ids == e).nonzero().flatten().tolist()
        n = -(-len(pairs) // block_m) * block_m
        sorted_ids += pairs + [p] * (n - len(pairs))
        expert_ids += [e] * (n // block_m)
    return (torch.tensor(sorted_ids, dtype=torch.int32), torch.tensor(expert_ids, dtype=torch.int32), len(sorted_ids))
