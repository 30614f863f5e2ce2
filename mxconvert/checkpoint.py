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

from .errors import MxconvertError

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
PROJECTION = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
MXFP8_METHODS = ("mxfp8", "compressed-tensors")


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
                raise MxconvertError(path, f"header length {size} is corrupt", "Re-download the file")
            raw = f.read(size)
        header = json.loads(raw)
    except (OSError, ValueError) as e:
        raise MxconvertError(path, f"cannot read the safetensors header ({e})", "Re-download the file") from e
    header.pop("__metadata__", None)
    _check_layout(path, header, os.path.getsize(path) - 8 - size)
    return header, 8 + size, raw


def _check_layout(path: Path, header: dict, data_size: int) -> None:
    """Each tensor's bytes lie in the file, no two overlap, and their size matches dtype and shape."""
    end = 0
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        begin, stop = entry["data_offsets"]
        count = 1
        for d in entry["shape"]:
            count *= d
        itemsize = DTYPE_BYTES.get(entry["dtype"])  # a dtype we do not know is passed through unchecked
        if begin < end or stop > data_size or (itemsize and stop - begin != count * itemsize):
            raise MxconvertError(
                path, f"header entry {name} has offsets [{begin}, {stop}) that overlap, run past the file's "
                f"{data_size} data bytes or do not fit {entry['dtype']} {entry['shape']}", "Re-download this shard",
            )  # fmt: skip
        end = stop


class SourceCheckpoint:
    """A local MXFP8 checkpoint directory: config, tensors by name, and their raw bytes."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise MxconvertError(self.dir, "is not a directory", "Pass a checkpoint directory or a Hub repo id")
        self.config = self._load_json(self.dir / "config.json")
        self.text_config = self.config.get("text_config", self.config)
        self.quant_config = self.config.get("quantization_config") or self.text_config.get("quantization_config")
        method = (self.quant_config or {}).get("quant_method")
        if method not in MXFP8_METHODS:
            raise MxconvertError(
                self.dir / "config.json", f"quantization_config.quant_method is {method!r}, not an MXFP8 checkpoint",
                "Convert the MiniMax-M3 MXFP8 release (quant_method 'mxfp8')",
            )  # fmt: skip
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
        if not path.is_file():
            raise MxconvertError(path, "is missing", "Pass the directory of a Hugging Face checkpoint")
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise MxconvertError(path, f"is not valid JSON ({e})", "Re-download it") from e

    def _shard_files(self) -> list[Path]:
        if (self.dir / INDEX_NAME).is_file():
            weight_map = self._load_json(self.dir / INDEX_NAME).get("weight_map", {})
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
    if local.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(model_dir)):
        return local, {"path": str(local.resolve())}
    from huggingface_hub import snapshot_download  # network only when a repo id is given
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

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
    return path, {"repo_id": str(model_dir), "revision": path.name}
