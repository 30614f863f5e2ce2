"""Which part of each stacked expert tensor a tensor- or expert-parallel rank holds (pure, no I/O).

Shape legend: E experts, H hidden, I expert intermediate (whole), i = I / T per TP rank, G = K / 32.
TP rank r of T: w13 [E, 2I, H] keeps rows [r*i, (r+1)*i) of the gate half and the same rows of the up
half (GEMM1's N); its packed scale [E, H/32, 2I] the matching columns; w2 [E, H, I] keeps columns
[r*i, (r+1)*i) (GEMM2's K) and its packed scale [E, I/32, H] rows [r*i/32, (r+1)*i/32). Summing the
ranks' outputs gives the whole layer's. EP rank r of T: experts [r*E/T, (r+1)*E/T), nothing sliced.
"""

from dataclasses import dataclass

import torch

from mxconvert.errors import MxconvertError
from mxconvert.format import EXPERT_TENSORS
from mxconvert.layout import BLOCK

# suffix -> (axis that TP slices, what one unit of that axis is: "n" (2I, gate then up), "k" (I) or
# "g" (I / 32 scale groups))
TP_AXIS = {
    "w13_weight": (1, "n"),
    "w13_weight_bf16": (1, "n"),
    "w13_weight_scale": (2, "n"),
    "w2_weight": (2, "k"),
    "w2_weight_bf16": (2, "k"),
    "w2_weight_scale": (1, "g"),
}


@dataclass(frozen=True)
class ExpertSlice:
    """experts: the rank's range on axis 0; parts: ranges on `axis`, concatenated in order."""

    experts: slice
    axis: int
    parts: tuple[slice, ...]
    full_shape: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.full_shape)
        shape[0] = self.experts.stop - self.experts.start
        shape[self.axis] = sum(p.stop - p.start for p in self.parts)
        return tuple(shape)

    @property
    def whole(self) -> bool:
        return self.shape == tuple(self.full_shape)

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """The slice of a full tensor [E, ...] (a view when it is one part)."""
        t = tensor[self.experts]
        views = [t.narrow(self.axis, p.start, p.stop - p.start) for p in self.parts]
        return views[0] if len(views) == 1 else torch.cat(views, dim=self.axis)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks that share the experts: tensor or expert parallel, not both."""

    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1

    def __post_init__(self):
        tp, ep = (self.tp_rank, self.tp_size), (self.ep_rank, self.ep_size)
        if self.tp_size < 1 or self.ep_size < 1 or not (0 <= tp[0] < tp[1]) or not (0 <= ep[0] < ep[1]):
            raise MxconvertError("parallel ranks", f"tp {tp[0]}/{tp[1]}, ep {ep[0]}/{ep[1]}", "need 0 <= rank < size")
        if self.tp_size > 1 and self.ep_size > 1:
            raise MxconvertError(
                "parallel ranks",
                f"tp_size {self.tp_size} and ep_size {self.ep_size} both > 1",
                "shard experts by tensor or by expert parallelism, not both",
            )

    @property
    def expert_parallel(self) -> bool:
        """Experts live on other ranks too: this rank holds a range of them (and runs them in BF16)."""
        return self.ep_size > 1


ONE_RANK = Ranks()


def expert_slices(suffix: str, shape: tuple[int, ...], ranks: Ranks = ONE_RANK) -> ExpertSlice:
    """The rank's ExpertSlice of the full stacked tensor `P.<suffix>` of this shape."""
    if suffix not in EXPERT_TENSORS:
        raise MxconvertError(
            suffix, "is not an expert tensor of docs/FORMAT.md", f"use one of {sorted(EXPERT_TENSORS)}"
        )
    tp_rank, tp_size, ep_rank, ep_size = ranks.tp_rank, ranks.tp_size, ranks.ep_rank, ranks.ep_size
    shape = tuple(int(d) for d in shape)
    e = shape[0]
    axis, unit = TP_AXIS[suffix]
    if ep_size > 1:
        if e % ep_size:
            raise MxconvertError(
                suffix, f"{e} experts do not split over {ep_size} expert-parallel ranks", "use an ep_size dividing E"
            )
        per = e // ep_size
        return ExpertSlice(slice(ep_rank * per, (ep_rank + 1) * per), axis, (slice(0, shape[axis]),), shape)
    whole_i = {"n": shape[axis] // 2, "k": shape[axis], "g": shape[axis] * BLOCK}[unit]
    i = whole_i // tp_size
    if whole_i % tp_size or i % BLOCK:
        raise MxconvertError(
            suffix,
            f"expert intermediate I {whole_i} over {tp_size} tensor-parallel ranks is not a multiple of {BLOCK}",
            f"use a tp_size with I / tp_size % {BLOCK} == 0 (each rank needs whole scale groups)",
        )
    lo, hi = tp_rank * i, (tp_rank + 1) * i
    if unit == "n":
        parts = (slice(lo, hi), slice(whole_i + lo, whole_i + hi))  # gate rows, then the same up rows
    elif unit == "k":
        parts = (slice(lo, hi),)
    else:
        parts = (slice(lo // BLOCK, hi // BLOCK),)
    return ExpertSlice(slice(0, e), axis, parts, shape)


def shard_expert_tensor(suffix: str, tensor: torch.Tensor, ranks: Ranks = ONE_RANK) -> torch.Tensor:
    """The rank's part of a full stacked tensor [E, ...], contiguous."""
    return expert_slices(suffix, tensor.shape, ranks).apply(tensor).contiguous()
