"""MxconvertMoEMethod: one converted expert group P in vLLM's RoutedExperts, served by the runtime's MoELayer.

Shape legend: E experts (global), e on this rank, H hidden, I expert intermediate (whole), i = I / T.
create_weights registers the rank's part of each stored tensor (docs/FORMAT.md dtypes and layouts); each
parameter's weight_loader takes the whole stacked tensor and copies the rank's slice (sharding.py), so
TP and EP slicing are the loader's and the runtime's. After loading: check every parameter was
loaded, then hand them to MoELayer (BF16 copies for native_only; FP8 dropped where never used).
"""

import torch
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase

from mxconvert import format as fmt
from mxconvert.errors import MxconvertError
from mxconvert.runtime.bands import bands_for
from mxconvert.runtime.moe import ExpertWeights, MoELayer, runs_native
from mxconvert.runtime.sharding import Ranks, expert_slices

# safetensors dtype of docs/FORMAT.md -> torch dtype of the parameter (bytes kept as they are on disk)
TORCH_DTYPE = {"F8_E4M3FNUZ": torch.float8_e4m3fnuz, "U8": torch.uint8, "BF16": torch.bfloat16}
FIELD = {  # parameter suffix -> ExpertWeights field
    "w13_weight": "w13",
    "w13_weight_scale": "w13_scale",
    "w2_weight": "w2",
    "w2_weight_scale": "w2_scale",
    "w13_weight_bf16": "w13_bf16",
    "w2_weight_bf16": "w2_bf16",
}


class MxconvertMoEMethod(FusedMoEMethodBase):
    """vLLM's MoE method for a converted expert group: the loader's slicing, the runtime's hybrid forward."""

    def __init__(self, quant_config, *, group: str, storage: str, moe):
        super().__init__(moe)
        self.quant_config, self.group, self.storage = quant_config, group, storage
        self.moe_layer: MoELayer | None = None

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        self._refuse_fused_paths(layer)
        par = layer.moe_config.moe_parallel_config
        self.ranks = Ranks(tp_rank=par.tp_rank, tp_size=par.tp_size, ep_rank=par.ep_rank, ep_size=par.ep_size)
        e_global = extra_weight_attrs.get("global_num_experts", num_experts)
        h, i = hidden_size, intermediate_size_per_partition * par.tp_size
        self.bands = bands_for(torch.get_default_device(), default=self.quant_config.dispatch)
        native = runs_native(*self.bands, storage=self.storage, expert_parallel=self.ranks.expert_parallel)
        # FP8 copies are read only where they run, or where the BF16 copies must be derived from them
        wanted = [
            s for s in fmt.STORED[self.storage] if native or s in fmt.BF16_TENSORS or self.storage == fmt.NATIVE_ONLY
        ]
        self.first_expert = None
        layer.mxconvert_loaded = set()
        for suffix in wanted:
            dtype, shape_of = fmt.EXPERT_TENSORS[suffix]
            full = shape_of(e_global, h, i)
            sl = expert_slices(suffix, full, self.ranks)
            if sl.shape[0] != num_experts:
                raise MxconvertError(
                    f"{self.group}.{suffix}",
                    f"vLLM holds {num_experts} experts here, the rank's slice {sl.shape[0]}",
                    "serve with an expert-parallel size dividing E",
                )
            self.first_expert = sl.experts.start
            param = torch.nn.Parameter(torch.empty(sl.shape, dtype=TORCH_DTYPE[dtype]), requires_grad=False)
            param.weight_loader = self._weight_loader(layer, suffix, full, sl)
            layer.register_parameter(suffix, param)
        self._check_placement(layer, num_experts)

    def _refuse_fused_paths(self, layer):
        """Paths of vLLM's ROCm MiniMax-M3 that bypass or widen the routed experts this method serves."""
        from vllm.config import get_current_vllm_config

        if getattr(layer.expert_map_manager, "num_fused_shared_experts", 0):
            raise MxconvertError(
                self.group,
                "vLLM fused the shared expert into the routed experts (VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS)",
                "Unset VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS: the plugin serves the routed experts alone",
            )
        if getattr(get_current_vllm_config().kernel_config, "monokernel", False):
            raise MxconvertError(
                self.group,
                "vLLM's specialized decode (monokernel) reads expert weights in its own layout",
                "Serve without the monokernel kernel option",
            )

    def _check_placement(self, layer, num_experts):
        """vLLM's expert map must put this rank's experts where the slices do (linear placement)."""
        expert_map = getattr(layer, "_expert_map", None)
        if expert_map is None:
            return
        local = (expert_map >= 0).nonzero().flatten().tolist()
        if local != list(range(self.first_expert, self.first_expert + num_experts)):
            raise MxconvertError(
                self.group,
                f"vLLM placed experts {local[:4]}... on this rank, not a contiguous range from {self.first_expert}",
                "Serve with --expert-placement-strategy linear",
            )

    def _weight_loader(self, layer, suffix, full_shape, sl):
        name = f"{self.group}.{suffix}"

        def load(param: torch.nn.Parameter, loaded: torch.Tensor, *args, **kwargs) -> None:
            if tuple(loaded.shape) != tuple(full_shape) or loaded.dtype != param.dtype:
                raise MxconvertError(
                    name,
                    f"is {loaded.dtype} {tuple(loaded.shape)}, expected {param.dtype} {tuple(full_shape)}",
                    "The checkpoint does not match its config.json: convert it again",
                )
            param.data.copy_(sl.apply(loaded))
            layer.mxconvert_loaded.add(suffix)

        return load

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self.moe_layer is not None:
            return
        registered = [s for s in fmt.EXPERT_TENSORS if s in layer._parameters]
        missing = [s for s in registered if s not in layer.mxconvert_loaded]
        if missing:
            raise MxconvertError(
                f"{self.group}.{missing[0]}",
                f"is not in the checkpoint ({len(missing)} of this layer's expert tensors missing: {missing})",
                "The download or conversion is incomplete: run mxconvert verify OUT_DIR, and convert again if it fails",
            )
        weights = ExpertWeights(
            **{FIELD[s]: (layer._parameters[s].data if s in registered else None) for s in FIELD},
            storage=self.storage,
            first_expert=self.first_expert,
            num_experts=layer.global_num_experts,
        )
        self.moe_layer = MoELayer(
            weights,
            bf16_max_tokens=self.bands[0],
            bf16_min_tokens=self.bands[1],
            activation=self.quant_config.activation,
        )
        kept = self.moe_layer.weights  # what the MoE layer keeps (BF16 derived, FP8 dropped): the parameters
        for s in FIELD:
            t = getattr(kept, FIELD[s])
            if t is None:
                layer._parameters.pop(s, None)
            elif s not in layer._parameters or layer._parameters[s].data_ptr() != t.data_ptr():
                layer.register_parameter(s, torch.nn.Parameter(t, requires_grad=False))

    def get_fused_moe_quant_config(self, layer: torch.nn.Module):
        return None  # no vLLM modular kernel: apply() runs the runtime's MoELayer

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input) -> torch.Tensor:
        # x [T, H] BF16, topk_ids [T, k] global expert ids -> this rank's partial [T, H] (the runner all-reduces)
        return self.moe_layer.forward(x, topk_weights, topk_ids)
