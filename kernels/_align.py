"""Triton bodies: routing alignment (sort (token, slot) pairs by expert, pad each run to BLOCK_M).

Two launches over a zeroed int32 scratch [2 * E_PAD + 1] (counts, cursors, slots used); no host sync.
"""

import triton
import triton.language as tl


@triton.jit
def _count_kernel(
    ids_ptr, scratch_ptr, sorted_ptr, P, max_slots, E_PAD: tl.constexpr, CHUNK: tl.constexpr, E: tl.constexpr
):
    # Per chunk of pairs: expert histogram into counts; fill this program's slot range with P (= empty).
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < P, other=E)  # out-of-range pairs land in bin E, unused
    hist = tl.histogram(ids, E_PAD)
    e = tl.arange(0, E_PAD)
    tl.atomic_add(scratch_ptr + e, hist, mask=(e < E) & (hist > 0))
    SLOTS: tl.constexpr = 4 * CHUNK
    for s0 in range(pid * SLOTS, max_slots, tl.num_programs(0) * SLOTS):
        s = s0 + tl.arange(0, SLOTS)
        tl.store(sorted_ptr + s, tl.full((SLOTS,), 0, tl.int32) + P, mask=s < max_slots)


@triton.jit
def _scatter_kernel(
    ids_ptr,
    scratch_ptr,
    sorted_ptr,
    expert_ids_ptr,
    num_post_pad_ptr,
    P,
    max_blocks,
    E_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    E: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # Each pair goes to slot start[expert] + (its arrival at the expert's cursor); order within an
    # expert is arbitrary, which no output depends on (each row is computed on its own).
    pid = tl.program_id(0)
    e = tl.arange(0, E_PAD)
    counts = tl.load(scratch_ptr + e, mask=e < E, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    valid = offs < P
    ids = tl.load(ids_ptr + offs, mask=valid, other=0)
    start = tl.sum(tl.where(e[None, :] < ids[:, None], padded[None, :], 0), axis=1)
    rank = tl.atomic_add(scratch_ptr + E_PAD + ids, 1, mask=valid)
    tl.store(sorted_ptr + start + rank, offs, mask=valid)
    # Expert of each BLOCK_M block: how many experts' padded runs end at or before its first slot.
    for b0 in range(pid * CHUNK, max_blocks, tl.num_programs(0) * CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        before = tl.sum(((ends[None, :] <= b[:, None] * BLOCK_M) & (e[None, :] < E)).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + b, tl.minimum(before, E - 1), mask=b < max_blocks)
    if pid == 0:
        tl.store(num_post_pad_ptr, tl.sum(padded, 0))


@triton.jit
def _align_small_kernel(
    ids_ptr,
    sorted_ptr,
    expert_ids_ptr,
    num_post_pad_ptr,
    P,
    max_slots,
    max_blocks,
    E_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    E: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # All P <= CHUNK pairs in one program: counts, padded starts and each pair's rank among the earlier
    # pairs of its expert stay in registers, so no zeroed scratch (no memset) and one launch (decode).
    offs = tl.arange(0, CHUNK)
    valid = offs < P
    ids = tl.load(ids_ptr + offs, mask=valid, other=E)  # padding and foreign ids (E) are placed nowhere
    placed = valid & (ids < E)
    e = tl.arange(0, E_PAD)
    counts = tl.where(e < E, tl.histogram(ids, E_PAD), 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    start = tl.sum(tl.where(e[None, :] < ids[:, None], padded[None, :], 0), axis=1)
    earlier = (ids[None, :] == ids[:, None]) & (offs[None, :] < offs[:, None])
    rank = tl.sum(earlier.to(tl.int32), axis=1)
    SLOTS: tl.constexpr = 4 * CHUNK
    for s0 in range(0, max_slots, SLOTS):  # every slot empty first ...
        s = s0 + tl.arange(0, SLOTS)
        tl.store(sorted_ptr + s, tl.full((SLOTS,), 0, tl.int32) + P, mask=s < max_slots)
    tl.debug_barrier()  # ... then the pairs over them: the barrier orders the two stores
    tl.store(sorted_ptr + start + rank, offs, mask=placed)
    for b0 in range(0, max_blocks, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        before = tl.sum(((ends[None, :] <= b[:, None] * BLOCK_M) & (e[None, :] < E)).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + b, tl.minimum(before, E - 1), mask=b < max_blocks)
    tl.store(num_post_pad_ptr, tl.sum(padded, 0))
