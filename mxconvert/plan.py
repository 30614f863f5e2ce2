"""What goes where: each expert group's storage, every output tensor, and its shard. Reads headers only.

Shape legend: E experts, H hidden, I expert intermediate.
"""

import re
from dataclasses import dataclass, field

from . import format as fmt
from .checkpoint import ExpertGroup, SourceCheckpoint
from .errors import MxconvertError, OptionError
from .headers import DTYPE_BYTES, TensorInfo
from .layout import BLOCK

PROJECTIONS = ("gate", "up", "down")
# The order stream.write_group fills a group's tensors in: scales, then w13, then w2.
WRITE_ORDER = ("w13_weight_scale", "w2_weight_scale", "w13_weight", "w13_weight_bf16", "w2_weight", "w2_weight_bf16")
VALUE_DTYPE = "F8_E4M3"
SCALE_DTYPES = ("U8", "F8_E8M0")


@dataclass
class PlannedGroup:
    prefix: str
    layer: int | None  # decoder layer index, None for groups outside the decoder (e.g. MTP)
    storage: str
    num_experts: int
    hidden: int
    inter: int
    source: ExpertGroup


@dataclass
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorInfo | None = None  # passed through byte for byte
    group: PlannedGroup | None = None  # or built from this expert group
    kind: str | None = None  # ... as this FORMAT tensor (e.g. "w13_weight")

    @property
    def nbytes(self) -> int:
        if self.source is not None:
            return self.source.nbytes
        n = DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass
class Shard:
    name: str
    tensors: list[OutputTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class Plan:
    groups: list[PlannedGroup]
    shards: list[Shard]

    @property
    def tensors(self) -> list[OutputTensor]:
        return [t for shard in self.shards for t in shard.tensors]

    @property
    def output_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)


COPY_CHUNK = 64 * 2**20  # bytes per read/write of a passed-through tensor


SIZE_UNITS = {
    "": 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "KI": 2**10,
    "MI": 2**20,
    "GI": 2**30,
    "TI": 2**40,
}
SIZE = re.compile(r"\s*([0-9]{1,15})(?:\.([0-9]{1,9}))?\s*([KMGT]?I?)B?\s*", re.ASCII)


def parse_size(text: str | int) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, as Hugging Face tools read shard sizes; at least 1 byte."""
    shown = repr(text) if len(str(text)) <= 40 else repr(str(text)[:20] + "...")  # echo no 400-digit line
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        m = SIZE.fullmatch(str(text).upper())
        if not m or m[3] == "I":
            raise OptionError("--max-shard-size", f"{shown} is not a size", "Write it like 5GB, 500MB or 2GiB")
        whole, fraction, unit = int(m[1]), m[2] or "", SIZE_UNITS[m[3]]
        size = whole * unit + int(fraction or 0) * unit // 10 ** len(fraction)  # exact: no float rounding
    if size < 1:
        raise OptionError("--max-shard-size", f"{shown} is less than one byte", "Write it like 5GB, 500MB or 2GiB")
    return size


def _natural_key(name: str):
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"([0-9]+)", name))]  # odd: digits


def _storage(prefix: str, *, long_context: bool, bf16: str) -> tuple[int | None, str]:
    m = fmt.DECODER_GROUP.match(prefix)
    layer = int(m["layer"]) if m else None
    if long_context and layer is not None and layer % fmt.LONG_CONTEXT_EVERY == 0:
        return layer, fmt.BF16_ONLY
    return layer, fmt.NATIVE_ONLY if bf16 == "derive" else fmt.DUAL


def _check_group(group: ExpertGroup, text_config: dict) -> tuple[int, int, int]:
    """(E, H, I) of a complete group shaped as config.json says, or an error naming the first bad tensor."""
    count, hidden, inter = (text_config[k] for k in ("num_local_experts", "hidden_size", "intermediate_size"))
    for e in range(count):
        for proj in PROJECTIONS:
            weight, scale = group.experts.get(e, {}).get(proj, (None, None))
            if weight is None or scale is None:
                what = "weight" if weight is None else "weight scale"
                raise MxconvertError(
                    f"{group.prefix}.{e}",
                    f"{proj} {what} is missing from the checkpoint",
                    "Re-download the checkpoint; every expert needs w1, w2, w3 and their scales",
                )
    if max(group.experts) >= count:
        raise MxconvertError(
            group.prefix,
            f"has expert {max(group.experts)} but the config says {count} experts",
            "Check num_local_experts in config.json",
        )
    want = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    for e in range(count):
        for proj, (rows, cols) in want.items():
            weight, scale = group.experts[e][proj]
            for info, dtypes, shape in (
                (weight, (VALUE_DTYPE,), (rows, cols)),
                (scale, SCALE_DTYPES, (rows, cols // BLOCK)),
            ):
                if info.dtype not in dtypes or info.shape != shape:
                    raise MxconvertError(
                        info.name,
                        f"is {info.dtype} {list(info.shape)}, expected {dtypes[0]} {list(shape)} "
                        f"(hidden_size {hidden}, intermediate_size {inter} in config.json)",
                        "The checkpoint is not MiniMax-M3 MXFP8-shaped; re-download it",
                    )
    return count, hidden, inter


def make_plan(source: SourceCheckpoint, *, long_context: bool, bf16: str, max_shard_size: int) -> Plan:
    """Every output tensor in source order (a group's stacked tensors where its first expert stood), sharded."""
    expert_names = {}
    groups: dict[str, PlannedGroup] = {}
    for prefix, group in source.groups.items():
        count, hidden, inter = _check_group(group, source.text_config)
        layer, storage = _storage(prefix, long_context=long_context, bf16=bf16)
        if layer is not None and layer >= source.text_config["num_hidden_layers"]:
            raise MxconvertError(
                prefix,
                f"is layer {layer} but config.json says num_hidden_layers {source.text_config['num_hidden_layers']}",
                "Re-download the checkpoint (config and weights differ)",
            )
        groups[prefix] = PlannedGroup(prefix, layer, storage, count, hidden, inter, group)
        for slot in group.experts.values():
            for weight, scale in slot.values():
                expert_names[weight.name] = expert_names[scale.name] = prefix

    outputs: list[OutputTensor] = []
    for name in sorted(source.tensors, key=_natural_key):
        prefix = expert_names.get(name)
        if prefix is None:
            info = source.tensors[name]
            outputs.append(OutputTensor(name, info.dtype, info.shape, source=info))
        elif prefix in groups:
            g = groups.pop(prefix)
            for kind in sorted(fmt.STORED[g.storage], key=WRITE_ORDER.index):
                dtype, shape = fmt.EXPERT_TENSORS[kind]
                outputs.append(
                    OutputTensor(f"{prefix}.{kind}", dtype, shape(g.num_experts, g.hidden, g.inter), group=g, kind=kind)
                )
    names = [t.name for t in outputs]
    if len(set(names)) != len(names):
        seen: set[str] = set()
        twice = next(n for n in names if n in seen or seen.add(n))
        raise MxconvertError(twice, "would be written twice (a source tensor has the name of a converted one)",
                             "Rename or remove the source tensor")  # fmt: skip
    planned = sorted(
        {t.group.prefix: t.group for t in outputs if t.group}.values(), key=lambda g: _natural_key(g.prefix)
    )
    return Plan(planned, _assign_shards(outputs, max_shard_size))


def _assign_shards(tensors: list[OutputTensor], max_shard_size: int) -> list[Shard]:
    """Greedy in order: a shard closes before the tensor that would take it past the limit."""
    shards, filled = [Shard("")], 0
    for t in tensors:
        if shards[-1].tensors and filled + t.nbytes > max_shard_size:
            shards.append(Shard(""))
            filled = 0
        shards[-1].tensors.append(t)
        filled += t.nbytes
    for i, shard in enumerate(shards):
        shard.name = fmt.shard_name(i + 1, len(shards))
    return shards
