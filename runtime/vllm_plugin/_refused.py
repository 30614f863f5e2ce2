"""The config registered on an unsupported vLLM: any converted checkpoint fails to load, saying why."""

from mxconvert.errors import MxconvertError


def refused_config(version: str | None):
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

    from . import SUPPORTED_VLLM

    class MxconvertRefusedConfig(QuantizationConfig):
        @classmethod
        def from_config(cls, config):
            raise MxconvertError(
                f"vLLM {version}",
                f"mxconvert's plugin supports vLLM {SUPPORTED_VLLM} only",
                f"Install vllm=={SUPPORTED_VLLM} (pip install vllm=={SUPPORTED_VLLM}) beside mxconvert",
            )

        def get_name(self):
            return "mxconvert"

        def get_supported_act_dtypes(self):
            return []

        @classmethod
        def get_min_capability(cls):
            return 0

        @staticmethod
        def get_config_filenames():
            return []

        def get_quant_method(self, layer, prefix):
            return None

    return MxconvertRefusedConfig
