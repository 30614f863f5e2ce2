"""vLLM general plugin (entry point `vllm.general_plugins`): serves mxconvert checkpoints in vLLM 0.33.

register() runs in every vLLM process: it registers the quantization method "mxconvert" once, imports
vLLM's quantization modules only then, does nothing when MXCONVERT_VLLM_PLUGIN=0, and on a vLLM other
than the supported one registers a config that refuses to load, saying which version to install.
"""

import logging
import os
from importlib import metadata

from mxconvert.format import QUANT_METHOD

SUPPORTED_VLLM = "0.33.0"
DISABLE_ENV = "MXCONVERT_VLLM_PLUGIN"  # "0": do not register
log = logging.getLogger(__name__)
_registered: str | None = None  # "ok", "refused", or "off" once register() ran


def vllm_version() -> str | None:
    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return None


def register() -> None:
    """Register "mxconvert" with vLLM's quantization registry; idempotent."""
    global _registered
    if os.environ.get(DISABLE_ENV, "1") == "0":
        _registered = "off"
        return
    if _registered in ("ok", "refused"):
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    version = vllm_version()
    if version and version.split("+")[0] == SUPPORTED_VLLM:  # a local build label (+cu130) is the same release
        from .config import MxconvertQuantConfig

        register_quantization_config(QUANT_METHOD)(MxconvertQuantConfig)
        _registered = "ok"
    else:
        from ._refused import refused_config

        register_quantization_config(QUANT_METHOD)(refused_config(version))
        log.warning(
            "mxconvert: vLLM %s is not supported (needs %s); converted checkpoints will not load",
            version,
            SUPPORTED_VLLM,
        )
        _registered = "refused"
