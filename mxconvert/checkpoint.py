"""Reading a source checkpoint: config, index, shard headers, raw tensor bytes, and the expert name table.

Tensor bytes are read with pread into our own buffers rather than through safetensors' mmap: mapped
pages count towards the process's resident memory, which would then grow with the shards' size.
"""

import hashlib
import json
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import MxconvertError, read_json
from .layout import BLOCK

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

# Routed experts, one row per naming the FORMAT accepts: MiniMax w1/w3/w2, HF gate/up/down_proj;
# scales `weight_scale_inv` (MiniMax) or `weight_scale` (compressed-tensors).
EXPERT_NAME = re.compile(
    r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\."
    r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.(?P<kind>weight|weight_scale_inv|weight_scale)$"
)
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name; "./x", "../x" are paths
PROJECTION = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
MXFP8_METHODS = ("mxfp8", "compressed-tensors")
MXFP8_WEIGHTS = {"num_bits": 8, "type": "float", "group_size": BLOCK}  # compressed-tensors' MXFP8 weights
CONFIG_SIZES = ("hidden_size", "intermediate_size", "num_local_experts", "num_hidden_layers")
ALIGNED_SIZES = ("hidden_size", "intermediate_size")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


@dataclass
class ExpertGroup:
    """One MoE layer's routed experts in the source: {expert: {"gate"|"up"|"down": (weight, scale)}}."""

    prefix: str
    experts: dict[int, dict[str, tuple[TensorInfo | None, TensorInfo | None]]] = field(default_factory=dict)


def read_header(path: Path) -> tuple[dict, int, bytes]:
    """A safetensors header: (tensor entries, data start offset, raw header bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MxconvertError(path, "file is shorter than a safetensors header", "Re-download it")
            (size,) = struct.unpack("<Q", head)
            if size > 100_000_000 or size > os.path.getsize(path) - 8:
                raise MxconvertError(
                    path, f"header length {size} is corrupt or the file is truncated", "Re-download this file"
                )
            raw = f.read(size)
        header = json.loads(raw)
    except (OSError, ValueError) as e:
        raise MxconvertError(path, f"cannot read the safetensors header ({e})", "Re-download this file") from e
    if not isinstance(header, dict):
        raise MxconvertError(path, "safetensors header is not a JSON object", "Re-download this file")
    header.pop("__metadata__", None)
    _check_layout(path, header, os.path.getsize(path) - 8 - size)
    return header, 8 + size, raw


def _entry_ok(entry) -> bool:
    if not isinstance(entry, dict):
        return False
    ints = lambda xs: isinstance(xs, list) and all(type(x) is int and x >= 0 for x in xs)  # noqa: E731
    offsets = entry.get("data_offsets")
    return isinstance(entry.get("dtype"), str) and ints(entry.get("shape")) and ints(offsets) and len(offsets) == 2


def _check_layout(path: Path, header: dict, data_size: int) -> None:
    """Each entry is well-formed, its bytes lie in the file, no two overlap, and sizes match dtype and shape."""
    for name, entry in header.items():
        if not _entry_ok(entry):
            problem = f"header entry {name} is corrupt (needs dtype, shape and two data_offsets)"
            raise MxconvertError(path, problem, "Re-download this file")
    previous, end = None, 0
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        begin, stop = entry["data_offsets"]
        count, shape = 1, entry["shape"]
        for d in shape:
            count *= d
        itemsize = DTYPE_BYTES.get(entry["dtype"])  # a dtype we do not know is passed through unchecked
        if stop < begin:
            problem = f"header is corrupt: tensor {name} has data_offsets [{begin}, {stop}) that run backwards"
        elif stop > data_size:
            problem = f"is truncated or its header is corrupt: tensor {name} ends at data byte {stop}"
            problem += f", the file holds {data_size}"
        elif begin < end:
            problem = f"header is corrupt: tensor {name} at [{begin}, {stop}) overlaps {previous} (ends at {end})"
        elif itemsize and stop - begin != count * itemsize:
            problem = f"header is corrupt: tensor {name} has {stop - begin} bytes, not {entry['dtype']} {shape}"
        else:
            previous, end = name, stop
            continue
        raise MxconvertError(path, problem, "Re-download this file")


class SourceCheckpoint:
    """A local MXFP8 checkpoint directory: config, tensors by name, and their raw bytes."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            problem = "is not a directory" if self.dir.exists() else "does not exist"
            raise MxconvertError(self.dir, problem, "Pass a checkpoint directory or a Hub repo id")
        self.config = self._load_json(self.dir / "config.json")
        self.text_config = self.config.get("text_config", self.config)
        self.quant_config = self._check_config()
        self.shards = self._shard_files()
        self.header_sha256: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self.shards:
            header, start, raw = read_header(shard)
            self.header_sha256[shard.name] = hashlib.sha256(raw).hexdigest()
            for name, entry in header.items():
                begin, end = entry["data_offsets"]
                self.tensors[name] = TensorInfo(
                    name, shard, entry["dtype"], tuple(entry["shape"]), start + begin, end - begin
                )
        self._check_index()
        self.groups = self._expert_groups()
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()  # reads come from several threads

    def _load_json(self, path: Path) -> dict:
        return read_json(path, fix="Re-download it", missing_fix="Pass the directory of a Hugging Face checkpoint")

    def _check_config(self) -> dict:
        """The sizes the plan relies on (32-aligned where MXFP8 needs it), and MXFP8 quantization: returns
        the quantization_config."""
        path, where = self.dir / "config.json", "text_config." if "text_config" in self.config else ""
        fix = "Pass a MiniMax-M3 MXFP8 checkpoint (its config.json unchanged)"
        if not isinstance(self.text_config, dict):
            raise MxconvertError(path, "text_config is not a JSON object", fix)
        for key in CONFIG_SIZES:
            value = self.text_config.get(key)
            if type(value) is not int or value <= 0:
                raise MxconvertError(path, f"{where}{key} is {value!r}, not a positive integer", fix)
            if key in ALIGNED_SIZES and value % BLOCK:
                raise MxconvertError(path, f"{where}{key} {value} is not a multiple of {BLOCK} (the MXFP8 block)", fix)
        quant = self.config.get("quantization_config") or self.text_config.get("quantization_config")
        quant = quant if isinstance(quant, dict) else {}
        method = quant.get("quant_method")
        if method not in MXFP8_METHODS:
            raise MxconvertError(
                path, f"quantization_config.quant_method is {method!r}, not an MXFP8 checkpoint",
                "Convert the MiniMax-M3 MXFP8 release (quant_method 'mxfp8')",
            )  # fmt: skip
        block = quant.get("weight_block_size", [1, BLOCK])
        if method == "mxfp8" and block != [1, BLOCK]:
            raise MxconvertError(
                path, f"quantization_config.weight_block_size is {block}, not [1, {BLOCK}] (MXFP8)",
                "Convert the MiniMax-M3 MXFP8 release",
            )  # fmt: skip
        groups = quant.get("config_groups") if method == "compressed-tensors" else None
        for name, group in (groups if isinstance(groups, dict) else {}).items():
            weights = group.get("weights") if isinstance(group, dict) else None
            if isinstance(weights, dict) and any(weights.get(k, v) != v for k, v in MXFP8_WEIGHTS.items()):
                raise MxconvertError(
                    path, f"quantization_config.config_groups.{name}.weights is not MXFP8 (8-bit float, group_size "
                    f"{BLOCK})", "Convert an MXFP8 checkpoint",
                )  # fmt: skip
        return quant

    def _shard_files(self) -> list[Path]:
        if (self.dir / INDEX_NAME).is_file():
            weight_map = self._load_json(self.dir / INDEX_NAME).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise MxconvertError(
                    self.dir / INDEX_NAME, "weight_map is not a map of tensor names to shard files", "Re-download it"
                )
            shards = [self.dir / name for name in sorted(set(weight_map.values()))]
        elif (self.dir / SINGLE_NAME).is_file():
            shards = [self.dir / SINGLE_NAME]
        else:
            raise MxconvertError(
                self.dir, f"has neither {INDEX_NAME} nor {SINGLE_NAME}", "Pass a safetensors checkpoint"
            )
        for shard in shards:
            if not shard.is_file():
                raise MxconvertError(shard, f"is named in {INDEX_NAME} but missing", "Re-download the checkpoint")
        return shards

    def _check_index(self) -> None:
        """The index names every tensor of every shard, each in the shard that holds it."""
        if not (self.dir / INDEX_NAME).is_file():
            return
        weight_map = self._load_json(self.dir / INDEX_NAME).get("weight_map", {})
        for name, shard in weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != shard:
                raise MxconvertError(name, f"is in {INDEX_NAME} under {shard} but not in that shard",
                                     "Re-download the checkpoint (index and shards differ)")  # fmt: skip
        for name, info in self.tensors.items():
            if name not in weight_map:
                raise MxconvertError(name, f"is in {info.file.name} but not in {INDEX_NAME}",
                                     "Re-download the checkpoint (index and shards differ)")  # fmt: skip

    def _expert_groups(self) -> dict[str, ExpertGroup]:
        groups: dict[str, ExpertGroup] = {}
        for name in self.tensors:
            m = EXPERT_NAME.match(name)
            if not m:
                continue
            group = groups.setdefault(m["prefix"], ExpertGroup(m["prefix"]))
            slot = group.experts.setdefault(int(m["expert"]), {})
            weight, scale = slot.get(PROJECTION[m["proj"]], (None, None))
            info = self.tensors[name]
            slot[PROJECTION[m["proj"]]] = (info, scale) if m["kind"] == "weight" else (weight, info)
        return groups

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def read(
        self, info: TensorInfo, start: int = 0, length: int | None = None, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Bytes [start, start + length) of a tensor's data as a uint8 tensor (into `out` if given)."""
        length = info.nbytes - start if length is None else length
        if out is None:
            out = torch.empty(length, dtype=torch.uint8)
        view, done, fd = memoryview(out.numpy()).cast("B"), 0, self._fd(info.file)
        assert len(view) == length, (info.name, len(view), length)
        while done < length:
            n = os.preadv(fd, [view[done:]], info.offset + start + done)
            if n == 0:
                raise MxconvertError(info.file, f"ends inside tensor {info.name}", "Re-download this shard")
            done += n
        if hasattr(os, "posix_fadvise"):  # read once: let the page cache drop it, not what we write
            os.posix_fadvise(fd, info.offset + start, length, os.POSIX_FADV_DONTNEED)
        return out

    def read_tensor(self, info: TensorInfo, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """A whole tensor's bytes, shaped [*shape] for one-byte dtypes, flat otherwise."""
        data = self.read(info, out=out)
        return data.view(info.shape) if DTYPE_BYTES[info.dtype] == 1 else data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def resolve_model_dir(model_dir: str | Path, *, allow_patterns: tuple[str, ...]) -> tuple[Path, dict]:
    """A local directory, or a Hub repo id fetched into the Hugging Face cache (only the files needed).

    Returns the directory and what identifies the source: {"path"} or {"repo_id", "revision"}.
    """
    local = Path(model_dir).expanduser()
    if local.exists() or not REPO_ID.fullmatch(str(model_dir)):
        return local, {"path": str(local.resolve())}
    from huggingface_hub import snapshot_download  # network only when a repo id is given
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(str(model_dir), allow_patterns=list(allow_patterns)))
    except LocalEntryNotFoundError as e:
        raise MxconvertError(
            model_dir,
            "is not a local directory and cannot be fetched from the Hub offline",
            "Unset HF_HUB_OFFLINE, or download it first, or pass a local path",
        ) from e
    except HfHubHTTPError as e:
        raise MxconvertError(
            model_dir,
            f"cannot be fetched from the Hub ({e.__class__.__name__})",
            "Check the repo id, your network and HF_TOKEN",
        ) from e
    except HFValidationError as e:
        raise MxconvertError(model_dir, "is neither a local directory nor a Hub repo id", "Check the path") from e
    return path, {"repo_id": str(model_dir), "revision": path.name}
