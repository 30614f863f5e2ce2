"""Streaming each output tensor's bytes from the source: pass-through chunks, and experts one at a time.

Each source byte is read once: one expert's gate, up and down projections yield every stored tensor's
slice for that expert (FNUZ values, packed scales, BF16 copies) before the next expert is read.
Shape legend: I expert intermediate, H hidden, G = K // 32.
"""

import torch

from . import format as fmt
from . import layout
from .checkpoint import SourceCheckpoint, TensorInfo
from .errors import MxconvertError
from .plan import COPY_CHUNK, PlannedGroup
from .writer import ShardSet


def copy_tensor(source: SourceCheckpoint, info: TensorInfo, sink: ShardSet) -> None:
    """A passed-through tensor, byte for byte, in chunks of COPY_CHUNK."""
    for start in range(0, max(info.nbytes, 1), COPY_CHUNK):
        sink.write(info.name, start, source.read(info, start, min(COPY_CHUNK, info.nbytes - start)))


def _read_checked(source: SourceCheckpoint, info: TensorInfo, *, scale: bool) -> torch.Tensor:
    data = source.read_tensor(info)
    bad = layout.first_bad_scale(data) if scale else layout.first_bad_value(data)
    if bad is not None:
        row, col = divmod(bad, data.shape[1])
        why = (f"scale byte {int(data[row, col])} at [{row}, {col}] has no E4M3FNUZ counterpart (max 253)"
               if scale else f"value byte 0x{int(data[row, col]):02X} at [{row}, {col}] is NaN in E4M3FN")
        raise MxconvertError(info.name, why, "The source checkpoint is corrupt or not MXFP8; re-download it")
    return data


def write_group(source: SourceCheckpoint, group: PlannedGroup, sink: ShardSet, *, device: str) -> None:
    """Every stored tensor of one expert group, expert by expert, at its offset in the stacked output."""
    stored = fmt.STORED[group.storage]
    for e in range(group.num_experts):
        slot = group.source.experts[e]
        for stack, projs in (("w13", ("gate", "up")), ("w2", ("down",))):
            values = torch.cat([_read_checked(source, slot[p][0], scale=False) for p in projs])  # [N, K]: w13 2I x H, w2 H x I
            scales = torch.cat([_read_checked(source, slot[p][1], scale=True) for p in projs])  # [N, G]
            values, scales = layout.fn_to_fnuz_values(values), layout.fn_to_fnuz_scales(scales)
            if f"{stack}_weight" in stored:
                sink.write(f"{group.prefix}.{stack}_weight", e * values.numel(), values)
                sink.write(f"{group.prefix}.{stack}_weight_scale", e * scales.numel(), layout.pack_scales(scales))  # [G, N]
            if f"{stack}_weight_bf16" in stored:
                bf16 = layout.dequantize_bf16(values.to(device), scales.to(device)).cpu()  # [N, K]
                sink.write(f"{group.prefix}.{stack}_weight_bf16", e * bf16.numel() * 2, bf16)
