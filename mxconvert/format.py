"""The names, dtypes, shapes and config keys of docs/FORMAT.md (format v1), each written once, here.

Shape legend: E experts, H hidden, I expert intermediate, G = K // 32 scale groups.
"""

import re
from dataclasses import dataclass

from .errors import MxconvertError
from .layout import BLOCK

FORMAT_VERSION = 1
QUANT_METHOD = "mxconvert"
INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "mxconvert.json"
CARD_NAME = "README.md"
RECORD_NAME = "mxconvert.partial.json"  # an unfinished run's record (--resume)
LOCK_NAME = ".mxconvert.lock"  # held while a run writes OUT_DIR; never part of the output
DUAL, BF16_ONLY, NATIVE_ONLY = "dual", "bf16_only", "native_only"
LONG_CONTEXT_EVERY = 5  # --long-context: MoE layers with index % 5 == 0 keep BF16 only
PRODUCER = "mxconvert"  # the tool named in the manifest, the record and quantization_config.producer
NEVER = 1 << 30  # bf16_min_tokens when no batch is large enough for the BF16 experts
# Default bf16_max_tokens, bf16_min_tokens (BF16 at or below the first, at or above the second): the empty BF16
# band, so every batch runs native and no BF16 copy is held (exact weights at block-FP8's memory)
DISPATCH = (0, NEVER)
ACTIVATION = {"alpha": 1.702, "beta": 1.0, "limit": 7.0}  # SwiGLU-OAI where config.json gives no swiglu_*
STACKS = (("w13", ("gate", "up")), ("w2", ("down",)))  # the experts' stacked tensors: w13 rows are gate, then up


def bf16_band_empty(bf16_max_tokens: int, bf16_min_tokens: int) -> bool:
    """No batch size (T >= 1) takes the BF16 experts."""
    return bf16_max_tokens < 1 and bf16_min_tokens >= NEVER


# Output tensors of one expert group P: suffix -> (safetensors dtype, shape from (E, H, I)).
EXPERT_TENSORS = {
    "w13_weight": ("F8_E4M3FNUZ", lambda E, H, I: (E, 2 * I, H)),
    "w13_weight_scale": ("U8", lambda E, H, I: (E, H // BLOCK, 2 * I)),  # packed [e, k/32, n]
    "w2_weight": ("F8_E4M3FNUZ", lambda E, H, I: (E, H, I)),
    "w2_weight_scale": ("U8", lambda E, H, I: (E, I // BLOCK, H)),  # packed [e, k/32, n]
    "w13_weight_bf16": ("BF16", lambda E, H, I: (E, 2 * I, H)),
    "w2_weight_bf16": ("BF16", lambda E, H, I: (E, H, I)),
}
NATIVE_TENSORS = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")
BF16_TENSORS = ("w13_weight_bf16", "w2_weight_bf16")
STORED = {DUAL: NATIVE_TENSORS + BF16_TENSORS, NATIVE_ONLY: NATIVE_TENSORS, BF16_ONLY: BF16_TENSORS}

# A decoder layer's experts (the long-context rule applies to these); other groups, e.g. MTP's, do not.
DECODER_GROUP = re.compile(
    r"^(?:language_model\.)?model\.layers\.(?P<layer>0|[1-9][0-9]*)\.[A-Za-z_]+\.experts\Z", re.ASCII
)


# A tensor the converter generates: <prefix>.experts.<one of EXPERT_TENSORS>
CONVERTED_NAME = re.compile(rf"^(?P<prefix>.+\.experts)\.(?:{'|'.join(EXPERT_TENSORS)})\Z")


def find_quant(config: dict) -> dict:
    """The quantization_config of a config.json: at the top, or under text_config; {} if none."""
    for holder in (config, config.get("text_config")):
        quant = holder.get("quantization_config") if isinstance(holder, dict) else None
        if isinstance(quant, dict):
            return quant
    return {}


@dataclass(frozen=True)
class ConvertedQuant:
    """A converted checkpoint's quantization_config, read once and checked: what every reader of the
    format (verify, the runtime's loader, the vLLM plugin) asks of it."""

    layers: dict  # expert group prefix -> storage (DUAL, NATIVE_ONLY, BF16_ONLY)
    dispatch: tuple[int, int]  # (bf16_max_tokens, bf16_min_tokens)
    activation: dict  # SwiGLU-OAI's {"alpha", "beta", "limit"}
    source: dict  # the source checkpoint's quantization_config

    @classmethod
    def read(cls, quant: dict, subject) -> "ConvertedQuant":
        fix = "Convert the checkpoint with this mxconvert version"
        method, version = quant.get("quant_method"), quant.get("format_version")
        if method != QUANT_METHOD or version != FORMAT_VERSION:
            problem = f"quantization_config is {method!r} format_version {version!r}"
            raise MxconvertError(subject, f"{problem}, not {QUANT_METHOD!r} {FORMAT_VERSION}", fix)
        experts = quant.get("experts") if isinstance(quant.get("experts"), dict) else {}
        layers, dispatch, act = (experts.get(k) for k in ("layers", "dispatch", "activation"))
        number = lambda v: type(v) in (int, float)  # noqa: E731
        checks = {
            "experts.layers": isinstance(layers, dict) and all(v in STORED for v in layers.values()),
            "experts.dispatch": isinstance(dispatch, dict)
            and all(type(dispatch.get(k)) is int for k in ("bf16_max_tokens", "bf16_min_tokens")),
            "experts.activation": isinstance(act, dict) and all(number(act.get(k)) for k in ("alpha", "beta", "limit")),
            "source_quantization_config": isinstance(quant.get("source_quantization_config"), dict),
        }
        for key, ok in checks.items():
            if not ok:
                raise MxconvertError(subject, f"quantization_config.{key} is missing or malformed", fix)
        return cls(
            layers=dict(layers),
            dispatch=(dispatch["bf16_max_tokens"], dispatch["bf16_min_tokens"]),
            activation={k: act[k] for k in ("alpha", "beta", "limit")},
            source=quant["source_quantization_config"],
        )


def read_converted(config: dict, subject) -> ConvertedQuant:
    """The ConvertedQuant of a converted config.json (its quantization_config at the top or under text_config)."""
    return ConvertedQuant.read(find_quant(config), subject)


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def quantization_config(
    *, source: dict, layers: dict[str, str], bf16_max_tokens: int, bf16_min_tokens: int, activation: dict, version: str
) -> dict:
    """The output config's quantization_config: the source's kept inside, the experts' format beside it."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "source_quantization_config": source,
        "experts": {
            "value_dtype": "float8_e4m3fnuz",
            "scale_dtype": "e8m0",
            "block_size": BLOCK,
            "scale_layout": "expert_kblock_n",
            "layers": dict(sorted(layers.items())),
            "dispatch": {"bf16_max_tokens": bf16_max_tokens, "bf16_min_tokens": bf16_min_tokens},
            "activation": {"kind": "swigluoai", **activation},
        },
        "producer": {"name": PRODUCER, "version": version},
    }
