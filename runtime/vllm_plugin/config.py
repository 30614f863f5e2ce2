"""MxconvertQuantConfig: vLLM's quantization config for a converted checkpoint (docs/FORMAT.md, v1).

MoE layers (vLLM's RoutedExperts) get MxconvertMoEMethod; every other layer is handed to the config
vLLM builds from `source_quantization_config` (for MiniMax-M3's "mxfp8": ModelOptMxFp8Config), so it
is served exactly as vLLM serves the source. The stacked expert tensors reach the MoE parameters
through get_checkpoint_weight_mapper(), which AutoWeightsLoader applies to checkpoint names.
"""

import regex as re
import torch
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.quantization import get_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.models.utils import WeightsMapper

from mxconvert import format as fmt
from mxconvert.errors import MxconvertError
from mxconvert.kernels.quant import SwigluOAI

# P.<suffix> (checkpoint) -> P.routed_experts.<suffix> (vLLM's RoutedExperts under the MoE runner)
_SUFFIXES = "|".join(sorted(fmt.EXPERT_TENSORS, key=len, reverse=True))
EXPERT_NAME = re.compile(rf"\.experts\.({_SUFFIXES})\Z")
ROUTED = r".experts.routed_experts.\1"


class MxconvertQuantConfig(QuantizationConfig):
    """The converted `quantization_config`: expert groups and their storage, dispatch bands, activation."""

    def __init__(self, config: dict):
        super().__init__()
        quant = fmt.ConvertedQuant.read({"quant_method": fmt.QUANT_METHOD, **config}, "config.json")
        self.layers, self.dispatch = quant.layers, quant.dispatch
        self.activation = SwigluOAI(**quant.activation)
        self.source = get_quantization_config(quant.source["quant_method"]).from_config(quant.source)
        self._ignore_unexpected_suffixes = self.source._ignore_unexpected_suffixes

    # The model fills packed_modules_mapping in; the source config is the one that reads it.
    @property
    def packed_modules_mapping(self) -> dict[str, list[str]]:
        return self.source.packed_modules_mapping

    @packed_modules_mapping.setter
    def packed_modules_mapping(self, value: dict[str, list[str]]) -> None:
        if hasattr(self, "source"):
            self.source.packed_modules_mapping = value

    @classmethod
    def from_config(cls, config: dict) -> "MxconvertQuantConfig":
        return cls(config)

    def get_name(self) -> str:
        return fmt.QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the source's MXFP8 linears (ModelOptMxFp8Config) need as much

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # read from config.json's quantization_config

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, RoutedExperts):
            from .moe_method import MxconvertMoEMethod

            group = self.group_for(prefix)
            return MxconvertMoEMethod(self, group=group, storage=self.layers[group], moe=layer.moe_config)
        return self.source.get_quant_method(layer, prefix)

    def group_for(self, prefix: str) -> str:
        """The expert group P of a vLLM MoE layer prefix: the same name, or one that ends the other."""
        if prefix in self.layers:
            return prefix
        found = [p for p in self.layers if p.endswith("." + prefix) or prefix.endswith("." + p)]
        if len(found) != 1:
            raise MxconvertError(
                prefix,
                f"vLLM's MoE layer matches {len(found)} expert groups of config.json ({sorted(self.layers)[:4]}...)",
                "Serve the checkpoint that was converted from this model",
            )
        return found[0]

    def get_checkpoint_weight_mapper(self) -> WeightsMapper:
        return self.source.get_checkpoint_weight_mapper() | WeightsMapper(orig_to_new_regex={EXPERT_NAME: ROUTED})

    def get_cache_scale_mapper(self) -> WeightsMapper:
        return self.source.get_cache_scale_mapper()

    def apply_vllm_mapper(self, hf_to_vllm_mapper: WeightsMapper) -> None:
        self.source.apply_vllm_mapper(hf_to_vllm_mapper)

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        self.source.maybe_update_config(model_name, hf_config=hf_config, revision=revision)
