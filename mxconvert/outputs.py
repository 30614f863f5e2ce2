"""The small files a conversion writes beside its shards, built from what was read once: config.json
(the source's, with the experts' format in quantization_config), the index, and the side files. The
converter writes these bytes and `verify --source` compares with them, so both follow one rule."""

import copy
import json

from . import __version__
from . import format as fmt
from .checkpoint import SourceCheckpoint
from .plan import Plan


def output_names(source: SourceCheckpoint, plan: Plan) -> list[str]:
    """Every file of a finished OUT_DIR but the manifest."""
    return [s.name for s in plan.shards] + ["config.json", fmt.INDEX_NAME, *source.side_files, fmt.CARD_NAME]


def small_files(source: SourceCheckpoint, plan: Plan, options: dict) -> dict[str, bytes]:
    """config.json, the index and the side files, byte for byte as the converter writes them (not the card)."""
    files = {"config.json": _json(_config(source, plan, options)), fmt.INDEX_NAME: _json(_index(plan))}
    return files | source.side_files


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def _index(plan: Plan) -> dict:
    weight_map = {t.name: shard.name for shard in plan.shards for t in shard.tensors}
    return {"metadata": {"total_size": plan.output_bytes}, "weight_map": dict(sorted(weight_map.items()))}


def _config(source: SourceCheckpoint, plan: Plan, options: dict) -> dict:
    """The source config (as read at the start, once), its quantization_config replaced where it was."""
    config = copy.deepcopy(source.config)
    text = source.text_config
    activation = {key: text.get(f"swiglu_{key}", default) for key, default in fmt.ACTIVATION.items()}
    holder = config if "quantization_config" in config else config.get("text_config", config)
    holder["quantization_config"] = fmt.quantization_config(
        source=source.quant_config,
        layers={g.prefix: g.storage for g in plan.groups},
        bf16_max_tokens=options["bf16_max_tokens"],
        bf16_min_tokens=options["bf16_min_tokens"],
        activation=activation,
        version=__version__,
    )
    return config
