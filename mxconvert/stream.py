"""Streaming each output tensor's bytes from the source: pass-through chunks, and experts one at a time.

Each source byte is read once: one expert's gate, up and down projections yield every stored tensor's
slice for that expert (FNUZ values, packed scales, BF16 copies) before the next expert is read.
Experts run on a small thread pool (torch, numpy and pread/pwrite release the GIL), a bounded number
in flight, so memory stays at a few experts' worth whatever the model's size.
Shape legend: N out, K in, G = K // 32; w13 is [2I, H] per expert, w2 [H, I].
"""

import threading
from collections import deque
from concurrent.futures import Executor, wait

import torch

from . import format as fmt
from . import layout
from .checkpoint import SourceCheckpoint, TensorInfo
from .errors import MxconvertError
from .plan import COPY_CHUNK, PlannedGroup
from .writer import ShardSet

STACKS = (("w13", ("gate", "up")), ("w2", ("down",)))  # w13 rows: gate then up
BF16_ROWS = 256  # rows per BF16 conversion step: keeps the temporaries in cache
_scratch = threading.local()


def _buffer(role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer reused across experts: fresh 100 MB allocations cost more in page faults
    than the conversion itself."""
    numel = 1
    for d in shape:
        numel *= d
    buf = getattr(_scratch, role, None)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = torch.empty(numel, dtype=dtype)
        setattr(_scratch, role, buf)
    return buf[:numel].view(shape)


def copy_tensor(source: SourceCheckpoint, info: TensorInfo, sink: ShardSet) -> None:
    """A passed-through tensor, byte for byte, in chunks of COPY_CHUNK."""
    for start in range(0, max(info.nbytes, 1), COPY_CHUNK):
        sink.write(info.name, start, source.read(info, start, min(COPY_CHUNK, info.nbytes - start)))


def _read_checked(source: SourceCheckpoint, infos: list[TensorInfo], *, scale: bool) -> torch.Tensor:
    """The tensors stacked along rows into one buffer, refusing bytes FNUZ cannot represent."""
    rows = sum(info.shape[0] for info in infos)
    out = _buffer("scales" if scale else "values", (rows, infos[0].shape[1]), torch.uint8)  # [N, K] or [N, G]
    row = 0
    for info in infos:
        part = source.read_tensor(info, out=out[row : row + info.shape[0]])
        bad = layout.first_bad_scale(part) if scale else layout.first_bad_value(part)
        if bad is not None:
            r, c = divmod(bad, part.shape[1])
            why = (f"scale byte {int(part[r, c])} at [{r}, {c}] has no E4M3FNUZ counterpart (max 253)"
                   if scale else f"value byte 0x{int(part[r, c]):02X} at [{r}, {c}] is NaN in E4M3FN")
            raise MxconvertError(info.name, why, "The source checkpoint is corrupt or not MXFP8; re-download it")
        row += info.shape[0]
    return out


def _bf16(values: torch.Tensor, scales: torch.Tensor, device: str) -> torch.Tensor:
    """Exact BF16 copies [N, K], on the CPU in row blocks, or on a GPU in one go."""
    if device != "cpu":
        return layout.dequantize_bf16(values.to(device), scales.to(device)).cpu()
    out = _buffer("bf16", tuple(values.shape), torch.bfloat16)
    for r in range(0, values.shape[0], BF16_ROWS):
        layout.dequantize_bf16(values[r : r + BF16_ROWS], scales[r : r + BF16_ROWS], out=out[r : r + BF16_ROWS])
    return out


def write_expert(source: SourceCheckpoint, group: PlannedGroup, e: int, sink: ShardSet, *, device: str) -> None:
    """Expert e's slice of every stored tensor of its group, at offset e * slice size."""
    stored, slot = fmt.STORED[group.storage], group.source.experts[e]
    for stack, projs in STACKS:
        values = _read_checked(source, [slot[p][0] for p in projs], scale=False)  # [N, K] FN bytes
        scales = _read_checked(source, [slot[p][1] for p in projs], scale=True)  # [N, G]
        layout.fn_to_fnuz_values(values, inplace=True)
        scales = layout.fn_to_fnuz_scales(scales)
        if f"{stack}_weight" in stored:
            sink.write(f"{group.prefix}.{stack}_weight", e * values.numel(), values)
            sink.write(f"{group.prefix}.{stack}_weight_scale", e * scales.numel(), layout.pack_scales(scales))  # [G, N]
        if f"{stack}_weight_bf16" in stored:
            sink.write(f"{group.prefix}.{stack}_weight_bf16", e * values.numel() * 2, _bf16(values, scales, device))


def write_group(source: SourceCheckpoint, group: PlannedGroup, sink: ShardSet, *, device: str, pool: Executor,
                in_flight: int) -> None:
    """Every expert of a group on the pool, at most `in_flight` at a time; the first error stops the rest."""
    pending = deque()
    try:
        for e in range(group.num_experts):
            if len(pending) >= in_flight:
                pending.popleft().result()
            pending.append(pool.submit(write_expert, source, group, e, sink, device=device))
        while pending:
            pending.popleft().result()
    except BaseException:
        for future in pending:
            future.cancel()
        wait(pending)  # nothing may still write once the caller aborts the shards
        raise
