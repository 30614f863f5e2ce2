"""One MoE layer's routed experts on one rank, with the hybrid dispatch by batch size.

Shape legend: T tokens, k slots, E experts (global), e experts on this rank, H hidden, I intermediate
on this rank. A batch runs on the BF16 experts when T <= bf16_max_tokens or T >= bf16_min_tokens (or the
layer is bf16_only, or experts are split over ranks), else on the device's native MXFP8 path (W8A8 on
MI300X, W8A16 on Hopper: kernels/config.py). The choice depends on T alone, so it costs no host sync.
A layer keeps only the copies its bands use: with an empty BF16 band (runtime/bands.py) FP8 and scales
alone.
"""

import logging
from dataclasses import dataclass, fields, replace

import torch

from mxconvert import format as fmt
from mxconvert.errors import MxconvertError
from mxconvert.format import bf16_band_empty
from mxconvert.kernels import config as kcfg
from mxconvert.kernels.moe import moe_experts_bf16, moe_experts_mxfp8, moe_experts_reference
from mxconvert.kernels.moe_gemm import MAX_SCALE_BYTE, dequantized_weights
from mxconvert.kernels.quant import SwigluOAI
from mxconvert.layout import dequantize_bf16, unpack_scales

log = logging.getLogger(__name__)
DEQUANT_EXPERTS = 8  # experts dequantized per step on a GPU (bounds the temporaries)


@dataclass
class ExpertWeights:
    """One rank's expert tensors (docs/FORMAT.md layouts; FP8 and scales as uint8 bytes); None where absent."""

    w13: torch.Tensor | None  # [e, 2I, H] FNUZ bytes
    w13_scale: torch.Tensor | None  # [e, H/32, 2I] E8M0, packed
    w2: torch.Tensor | None  # [e, H, I]
    w2_scale: torch.Tensor | None  # [e, I/32, H]
    w13_bf16: torch.Tensor | None  # [e, 2I, H] BF16
    w2_bf16: torch.Tensor | None  # [e, H, I] BF16
    storage: str = fmt.DUAL
    first_expert: int = 0  # global id of local expert 0 (expert parallel)
    num_experts: int | None = None  # global E; None: e

    def __post_init__(self):
        if self.num_experts is None:
            self.num_experts = self.local_experts

    @property
    def has_native(self) -> bool:
        return all(t is not None for t in (self.w13, self.w13_scale, self.w2, self.w2_scale))

    @property
    def has_bf16(self) -> bool:
        return self.w13_bf16 is not None and self.w2_bf16 is not None

    @property
    def local_experts(self) -> int:
        return (self.w13 if self.w13 is not None else self.w13_bf16).shape[0]

    @property
    def device(self) -> torch.device:
        return (self.w13 if self.w13 is not None else self.w13_bf16).device

    def nbytes(self) -> int:
        return sum(t.nbytes for f in fields(self) if isinstance(t := getattr(self, f.name), torch.Tensor))


def bf16_copies(
    w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13_bf16, w2_bf16) from FNUZ bytes and packed scales, on their device: the rule `--bf16
    materialize` stores (layout.dequantize_bf16), so the bits are the same."""
    out = []
    for values, packed in ((w13, w13_scale), (w2, w2_scale)):
        bf16 = torch.empty(values.shape, dtype=torch.bfloat16, device=values.device)
        step = 1 if values.device.type == "cpu" else DEQUANT_EXPERTS  # per expert: the CPU's 2-D fast path
        for j in range(0, values.shape[0], step):
            v, s = values[j : j + step].view(torch.uint8), unpack_scales(packed[j : j + step])
            if step == 1:
                dequantize_bf16(v[0], s[0], out=bf16[j])
            else:
                dequantize_bf16(v, s, out=bf16[j : j + step])
        out.append(bf16)
    return out[0], out[1]


def triton_runs(device: torch.device) -> bool:
    """Triton kernels run on a GPU, or on the CPU when they were built under TRITON_INTERPRET=1."""
    from mxconvert.kernels.moe_gemm import interpreted

    return device.type == "cuda" or interpreted()


def runs_native(bf16_max_tokens: int, bf16_min_tokens: int, *, storage: str = fmt.DUAL, expert_parallel=False) -> bool:
    """Whether some batch size takes a layer's native MXFP8 path: it has FP8 experts, all of them here,
    and a native band between the BF16 ones. The loader and the vLLM plugin ask it before reading FP8."""
    return storage != fmt.BF16_ONLY and not expert_parallel and bf16_max_tokens + 1 < bf16_min_tokens


def needs_bf16(bf16_max_tokens: int, bf16_min_tokens: int, *, storage: str = fmt.DUAL, expert_parallel=False) -> bool:
    """Whether a layer with these bands keeps BF16 experts: some batch size takes them (or it can run
    nothing else). The loader can ask this before deriving BF16 copies of native_only weights."""
    if storage == fmt.BF16_ONLY or expert_parallel or bf16_max_tokens + 1 >= bf16_min_tokens:
        return True
    return not bf16_band_empty(bf16_max_tokens, bf16_min_tokens)


def max_scale_byte(*scales: torch.Tensor) -> int:
    """The largest E8M0 byte of the scale tensors (one host sync: at load, not per forward)."""
    return max(int(s.max()) for s in scales if s is not None and s.numel())


class MoELayer:
    """forward(hidden [T, H] BF16, topk_weights [T, k], topk_ids [T, k] global ids) -> [T, H] BF16.

    On one rank of several (TP or EP) the output is that rank's partial sum: all-reduce it over ranks.
    A layer holds only what its bands use: with an empty BF16 band (format.bf16_band_empty) it keeps FP8
    weights and scales alone, drops BF16 copies it was given and derives none.
    """

    def __init__(
        self,
        weights: ExpertWeights,
        *,
        bf16_max_tokens: int,
        bf16_min_tokens: int,
        activation: SwigluOAI = SwigluOAI(),
        native_mode: str | None = None,
    ):
        weights = self.weights = replace(weights)  # ours to trim: the caller's stays as it was
        self.bf16_max_tokens, self.bf16_min_tokens = bf16_max_tokens, bf16_min_tokens
        self.activation = activation
        self.device = weights.device
        self.native_mode = native_mode or kcfg.native_mode(self.device)
        if self.native_mode not in ("w8a8", "w8a16"):
            raise MxconvertError("MoELayer", f"native_mode {self.native_mode!r}", "use 'w8a8' or 'w8a16'")
        self.expert_parallel = weights.local_experts < weights.num_experts
        self.native = runs_native(
            bf16_max_tokens, bf16_min_tokens, storage=weights.storage, expert_parallel=self.expert_parallel
        )
        if self.native and not weights.has_native:
            raise MxconvertError("MoELayer", f"{weights.storage} weights without FP8 copies", "load them (native=True)")
        self.uses_bf16 = needs_bf16(
            bf16_max_tokens, bf16_min_tokens, storage=weights.storage, expert_parallel=self.expert_parallel
        )
        if not self.uses_bf16:  # never used: free BF16 copies
            weights.w13_bf16 = weights.w2_bf16 = None
        elif not weights.has_bf16:
            if not weights.has_native:
                raise MxconvertError("MoELayer", "weights hold neither BF16 nor FP8 experts", "load the layer")
            weights.w13_bf16, weights.w2_bf16 = bf16_copies(
                weights.w13, weights.w13_scale, weights.w2, weights.w2_scale
            )
        if not self.native:  # never used: free the FP8 copies
            weights.w13 = weights.w13_scale = weights.w2 = weights.w2_scale = None
        # The fast NVIDIA dequantization routes (W8A16, and W8A8's BF16-dot rows) decode scale bytes up to
        # MAX_SCALE_BYTE (143): larger ones take the exact fp32 route
        self.dequant = "auto"
        limit = min(MAX_SCALE_BYTE.values())
        if self.native and max_scale_byte(weights.w13_scale, weights.w2_scale) > limit:
            self.dequant = "fp32"
        self.triton = triton_runs(self.device)
        self.last_path: str | None = None

    def path_for(self, num_tokens: int) -> str:
        """'bf16', 'w8a8' or 'w8a16': the path a batch of num_tokens takes."""
        if not self.native:
            return "bf16"
        if self.uses_bf16 and (num_tokens <= self.bf16_max_tokens or num_tokens >= self.bf16_min_tokens):
            return "bf16"
        return self.native_mode

    def resident_bytes(self) -> int:
        """Bytes of expert tensors this layer holds (FP8, scales, BF16 copies)."""
        return self.weights.nbytes()

    def forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        path = self.path_for(hidden.shape[0])
        self.last_path = path
        if log.isEnabledFor(logging.DEBUG):
            log.debug("MoE T=%d -> %s", hidden.shape[0], path)
        w = self.weights
        ids = topk_ids - w.first_expert if w.first_expert else topk_ids  # local ids; others' fall outside
        if not self.triton:
            return self._reference(hidden, topk_weights, ids, path)
        if path == "bf16":
            return moe_experts_bf16(
                hidden,
                topk_weights,
                ids,
                w13_bf16=w.w13_bf16,
                w2_bf16=w.w2_bf16,
                activation=self.activation,
                zero_outside_experts=self.expert_parallel,
            )
        return moe_experts_mxfp8(
            hidden,
            topk_weights,
            ids,
            w13=w.w13,
            w13_scale=w.w13_scale,
            w2=w.w2,
            w2_scale=w.w2_scale,
            activation=self.activation,
            mode=path,
            dequant=self.dequant,
        )

    __call__ = forward

    def _reference(self, hidden, topk_weights, ids, path):
        """Where Triton cannot run (CPU without TRITON_INTERPRET=1): the kernels' pure-torch reference."""
        w = self.weights
        if path == "bf16":
            w13, w2 = w.w13_bf16.float(), w.w2_bf16.float()
        else:
            w13, w2 = dequantized_weights(w.w13, w.w13_scale), dequantized_weights(w.w2, w.w2_scale)
        fp8_format = kcfg.fp8_format(self.device) if path == "w8a8" else None
        out = moe_experts_reference(
            hidden, topk_weights, ids, w13=w13, w2=w2, activation=self.activation, fp8_format=fp8_format
        )
        return out.to(torch.bfloat16)
