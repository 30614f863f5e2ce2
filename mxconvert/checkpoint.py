"""Reading a source checkpoint: config, index, shard headers, raw tensor bytes, and the expert name table.

Tensor bytes are read with pread into our own buffers rather than through safetensors' mmap: mapped
pages count towards the process's resident memory, which would then grow with the shards' size.
"""

import fnmatch
import hashlib
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import format as fmt
from .errors import MxconvertError, check_regular, parse_json, plain_name, real_path
from .headers import DTYPE_BYTES, TensorInfo, parse_header, read_head
from .layout import BLOCK

SINGLE_NAME = "model.safetensors"
# Routed experts, one row per naming the FORMAT accepts: MiniMax w1/w3/w2, HF gate/up/down_proj;
# scales `weight_scale_inv` (MiniMax) or `weight_scale` (compressed-tensors). Indices are ASCII digits
# without leading zeros, so that no two names mean the same expert.
EXPERT_NAME = re.compile(
    r"^(?P<prefix>.+\.experts)\.(?P<expert>0|[1-9][0-9]*)\."
    r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.(?P<kind>weight|weight_scale_inv|weight_scale)\Z",
    re.ASCII,
)
UNDER_EXPERTS = re.compile(r"(^|\.)experts\.")  # a name that must parse as EXPERT_NAME
PROJECTION = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
MXFP8_METHODS = ("mxfp8", "compressed-tensors")
MXFP8_WEIGHTS = {"num_bits": 8, "type": "float", "group_size": BLOCK}  # compressed-tensors' MXFP8 weights
CONFIG_SIZES = ("hidden_size", "intermediate_size", "num_local_experts", "num_hidden_layers")
MAX_SIZE = 2**20  # above any model's width, expert count or depth: a larger value is a corrupt config
ALIGNED_SIZES = ("hidden_size", "intermediate_size")
# Files copied unchanged beside the weights (tokenizer, templates, remote code, licence).
SIDE_FILES = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.tiktoken",
    "chat_template*", "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json", "*.py", "LICENSE*",
)  # fmt: skip
NOT_SIDE_FILES = ("config.json", fmt.INDEX_NAME, SINGLE_NAME, fmt.CARD_NAME)
REDOWNLOAD = "Re-download the checkpoint"
LINK_FIX = "Replace the link with the file itself, or remove it: mxconvert reads nothing outside MODEL_DIR"


@dataclass
class ExpertGroup:
    """One MoE layer's routed experts in the source: {expert: {"gate"|"up"|"down": (weight, scale)}}."""

    prefix: str
    experts: dict[int, dict[str, tuple[TensorInfo | None, TensorInfo | None]]] = field(default_factory=dict)


def moe_layers(text_config: dict) -> list[int] | None:
    """The decoder layers config.json declares MoE (mlp_layer_types, moe_layer_freq, or
    first_k_dense_replace), or None where it declares none of these."""
    n = text_config["num_hidden_layers"]
    types, freq, first = (text_config.get(k) for k in ("mlp_layer_types", "moe_layer_freq", "first_k_dense_replace"))
    if isinstance(types, list) and len(types) == n:
        return [i for i, t in enumerate(types) if t == "sparse"]
    if isinstance(freq, list) and len(freq) == n:
        return [i for i, f in enumerate(freq) if f == 1]
    if type(first) is int and 0 <= first <= n:
        return list(range(first, n))
    return None


class LocalFiles:
    """A checkpoint directory's files, each opened only if it is a regular file inside it (or inside its
    Hugging Face cache's blobs/, where a snapshot's links point); other links are refused by name."""

    def __init__(self, model_dir: Path, *, ident: dict | None = None):
        self.dir = Path(model_dir)
        self.ident = ident or {"name": real_path(self.dir).name}  # a Hub snapshot's is its repo id and revision
        if not self.dir.is_dir():
            problem = "is not a directory" if self.dir.exists() else "does not exist"
            raise MxconvertError(self.dir, problem, "Pass a checkpoint directory or a Hub repo id")
        root = real_path(self.dir)
        blobs = root.parent.parent / "blobs"  # a Hub cache snapshot: models--org--name/snapshots/<rev>/
        self._roots = (root, blobs) if root.parent.name == "snapshots" and blobs.is_dir() else (root,)
        self.real: dict[Path, Path] = {}  # each input as named -> the file it really is

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.dir / name)

    def _input(self, name: str, *, missing_fix: str = REDOWNLOAD) -> Path:
        """The real path of input `name`: a regular file inside the source (or its Hub cache blobs)."""
        path = self.dir / name
        if not os.path.lexists(path):
            raise MxconvertError(path, "is missing", missing_fix)
        real = real_path(path)
        if os.path.islink(path) and not any(real == r or r in real.parents for r in self._roots):
            raise MxconvertError(path, f"is a link to {real}, outside the source directory", LINK_FIX)
        check_regular(real, path, fix=REDOWNLOAD)
        self.real[path] = real
        return real

    def read_small(self, name: str, *, missing_fix: str = REDOWNLOAD) -> bytes:
        real = self._input(name, missing_fix=missing_fix)
        try:
            return real.read_bytes()
        except OSError as e:
            raise MxconvertError(self.dir / name, f"cannot be read ({e.strerror})", REDOWNLOAD) from None

    def header(self, name: str) -> tuple[bytes, int]:
        """A weight file's first bytes (its header) and its size."""
        return read_head(self._input(name), self.dir / name, fix=REDOWNLOAD)

    def size(self, name: str) -> int:
        return os.stat(self.real[self.dir / name]).st_size

    def side_file_names(self) -> list[str]:
        """Tokenizer, templates, code and licence files beside the weights; directories are not copied."""
        names = []
        for path in sorted(self.dir.iterdir()):
            if is_side_file(path.name) and not stat.S_ISDIR(os.lstat(path).st_mode):
                names.append(path.name)
        return names

    def open(self, name: str) -> int:
        return os.open(self.real[self.dir / name], os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))


def is_side_file(name: str) -> bool:
    return name not in NOT_SIDE_FILES and any(fnmatch.fnmatchcase(name, pat) for pat in SIDE_FILES)


class SourceCheckpoint:
    """An MXFP8 checkpoint, read once and strictly: config, index, shard headers, side files and card,
    the expert name table, and raw tensor bytes on demand. `files` is a local directory (LocalFiles), or
    a Hub repo read through its headers alone (hub.HubFiles, for --dry-run: no tensor bytes)."""

    def __init__(self, files):
        self.files = files if hasattr(files, "header") else LocalFiles(files)
        self.dir, self.ident = self.files.dir, self.files.ident
        self.config_bytes = self.files.read_small(
            "config.json", missing_fix="Pass the directory of a Hugging Face checkpoint"
        )
        self.config = parse_json(self.config_bytes, self.dir / "config.json", fix="Re-download it")
        if not isinstance(self.config, dict):
            raise MxconvertError(self.dir / "config.json", "is not a JSON object", "Re-download it")
        self.text_config = self.config.get("text_config", self.config)
        self.quant_config = self._check_config()
        self.index_bytes = self.files.read_small(fmt.INDEX_NAME) if self.files.exists(fmt.INDEX_NAME) else None
        self.shards = self._shard_files()
        self.header_sha256: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for shard in self.shards:
            header, start, raw = parse_header(*self.files.header(shard.name), subject=shard)
            self.header_sha256[shard.name] = hashlib.sha256(raw).hexdigest()
            for name, entry in header.items():
                if name in self.tensors:
                    raise MxconvertError(
                        name, f"is in both {self.tensors[name].file.name} and {shard.name}", REDOWNLOAD
                    )
                begin, end = entry["data_offsets"]
                self.tensors[name] = TensorInfo(
                    name, shard, entry["dtype"], tuple(entry["shape"]), start + begin, end - begin
                )
        self._check_index()
        if not self.tensors:
            raise MxconvertError(self.shards[0] if len(self.shards) == 1 else self.dir / fmt.INDEX_NAME,
                                 "holds no tensors", REDOWNLOAD)  # fmt: skip
        self.groups = self._expert_groups()
        self._check_moe_layers()
        self.side_files = {name: self.files.read_small(name) for name in self.files.side_file_names()}
        self.card = self.files.read_small(fmt.CARD_NAME) if self.files.exists(fmt.CARD_NAME) else None
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()  # reads come from several threads

    def input_paths(self) -> list[Path]:
        """Every file this source reads, as it really is (links resolved): OUT_DIR must hold none."""
        return sorted(set(getattr(self.files, "real", {}).values()))

    # Checking what was read ---------------------------------------------------------------------------
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
            if value > MAX_SIZE:
                raise MxconvertError(path, f"{where}{key} {value} is larger than any model's ({MAX_SIZE})", fix)
            if key in ALIGNED_SIZES and value % BLOCK:
                raise MxconvertError(path, f"{where}{key} {value} is not a multiple of {BLOCK} (the MXFP8 block)", fix)
        for key in ("swiglu_alpha", "swiglu_beta", "swiglu_limit"):
            value = self.text_config.get(key)
            if value is not None and (type(value) not in (int, float)):
                raise MxconvertError(path, f"{where}{key} is {value!r}, not a number", fix)
        quant = fmt.find_quant(self.config)
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

    def _weight_map(self) -> dict[str, str] | None:
        if self.index_bytes is None:
            return None
        path = self.dir / fmt.INDEX_NAME
        index = parse_json(self.index_bytes, path, fix="Re-download it")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise MxconvertError(path, "weight_map is not a map of tensor names to shard files", "Re-download it")
        if not weight_map:
            raise MxconvertError(path, "weight_map is empty: the checkpoint names no tensors", REDOWNLOAD)
        for shard in set(weight_map.values()):
            plain_name(shard, path, fix=REDOWNLOAD, what="shard")
        return weight_map

    def _shard_files(self) -> list[Path]:
        weight_map = self._weight_map()
        if weight_map is not None:
            names = sorted(set(weight_map.values()))
        elif self.files.exists(SINGLE_NAME):
            names = [SINGLE_NAME]
        else:
            raise MxconvertError(
                self.dir, f"has neither {fmt.INDEX_NAME} nor {SINGLE_NAME}", "Pass a safetensors checkpoint"
            )
        for name in names:
            if not self.files.exists(name):
                raise MxconvertError(self.dir / name, f"is named in {fmt.INDEX_NAME} but missing", REDOWNLOAD)
        return [self.dir / name for name in names]

    def _check_index(self) -> None:
        """The index names every tensor of every shard, each in the shard that holds it."""
        weight_map = self._weight_map()
        if weight_map is None:
            return
        for name, shard in weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != shard:
                raise MxconvertError(name, f"is in {fmt.INDEX_NAME} under {shard} but not in that shard",
                                     "Re-download the checkpoint (index and shards differ)")  # fmt: skip
        for name, info in self.tensors.items():
            if name not in weight_map:
                raise MxconvertError(name, f"is in {info.file.name} but not in {fmt.INDEX_NAME}",
                                     "Re-download the checkpoint (index and shards differ)")  # fmt: skip

    def _expert_groups(self) -> dict[str, ExpertGroup]:
        """Every routed expert tensor, parsed strictly; a name under `experts.` that does not parse, or two
        names for one expert's tensor, is refused (it would pass through unconverted, or replace another)."""
        groups: dict[str, ExpertGroup] = {}
        for name, info in self.tensors.items():
            m = EXPERT_NAME.match(name)
            if not m:
                if UNDER_EXPERTS.search(name):
                    raise MxconvertError(
                        name, "lies under `experts.` but is not a routed expert tensor "
                        "(<prefix>.experts.<index>.<w1|w2|w3|gate_proj|up_proj|down_proj>.<weight|weight_scale_inv|"
                        "weight_scale>, index without leading zeros)", "Rename or remove it: it would not be converted",
                    )  # fmt: skip
                continue
            group = groups.setdefault(m["prefix"], ExpertGroup(m["prefix"]))
            slot = group.experts.setdefault(int(m["expert"]), {})
            proj, is_weight = PROJECTION[m["proj"]], m["kind"] == "weight"
            weight, scale = slot.get(proj, (None, None))
            if (weight if is_weight else scale) is not None:
                other = (weight if is_weight else scale).name
                raise MxconvertError(name, f"and {other} are the same expert tensor under two names", REDOWNLOAD)
            slot[proj] = (info, scale) if is_weight else (weight, info)
        return groups

    def _check_moe_layers(self) -> None:
        """Every decoder layer config.json declares MoE has its routed experts in the checkpoint."""
        path = self.dir / "config.json"
        declared = moe_layers(self.text_config)
        found = {}
        for prefix in self.groups:
            m = fmt.DECODER_GROUP.match(prefix)
            if m:
                found.setdefault(int(m["layer"]), prefix)
        if declared is None:
            if not self.groups:
                raise MxconvertError(self.dir, "holds no routed experts (no <prefix>.experts.<e>.w1.weight)",
                                     "Pass the MiniMax-M3 MXFP8 checkpoint")  # fmt: skip
            return
        if not declared:
            raise MxconvertError(path, "declares no MoE layer (mlp_layer_types / moe_layer_freq)",
                                 "Pass a MiniMax-M3 MXFP8 checkpoint (its config.json unchanged)")  # fmt: skip
        missing = [layer for layer in declared if layer not in found]
        if missing:
            more = f" (and {len(missing) - 1} more MoE layers)" if len(missing) > 1 else ""
            raise MxconvertError(
                f"layer {missing[0]}", f"is a MoE layer in config.json but the checkpoint has no routed experts for it"
                f"{more}", "Re-download the checkpoint; every MoE layer needs <prefix>.layers.<L>.<mlp>.experts.<e>.*",
            )  # fmt: skip
        extra = sorted(layer for layer in found if layer not in declared)
        if extra:
            raise MxconvertError(found[extra[0]], f"has routed experts but config.json says layer {extra[0]} is dense",
                                 "Re-download the checkpoint (config and weights differ)")  # fmt: skip

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = self.files.open(path.name)
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

    def prefetch(self, info: TensorInfo) -> None:
        """Start reading a tensor's bytes into the page cache (a hint; read() drops them once used)."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd(info.file), info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)

    def read_tensor(self, info: TensorInfo, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """A whole tensor's bytes, shaped [*shape] for one-byte dtypes, flat otherwise."""
        data = self.read(info, out=out)
        return data.view(info.shape) if DTYPE_BYTES[info.dtype] == 1 else data

    def fingerprint(self) -> list[dict]:
        """What identifies the input, cheaply: each weight file's size and header sha256 (no tensor bytes),
        and the sha256 of config.json, the index, the card and each side file (as read, once)."""
        files = [
            {"name": s.name, "size": self.files.size(s.name), "header_sha256": self.header_sha256[s.name]}
            for s in self.shards
        ]
        small = {"config.json": self.config_bytes, fmt.INDEX_NAME: self.index_bytes, fmt.CARD_NAME: self.card}
        small |= self.side_files
        files += [
            {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in sorted(small.items())
            if data is not None
        ]
        return files

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
