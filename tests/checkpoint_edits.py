"""Breaking checkpoints and conversions on purpose, for the error, safety and fuzz tests.

A shard is edited as (header, data): header maps tensor name -> entry, data is the bytes after the
header. write_shard packs the tensors in header order as safetensors writes them (no gaps).
"""

import hashlib
import json
from pathlib import Path

INDEX = "model.safetensors.index.json"
MANIFEST = "mxconvert.json"


def edit_json(path: Path, edit) -> None:
    """edit(data) changes the parsed JSON in place; its return value is ignored."""
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def shard_of(src: Path, name: str) -> Path:
    return src / json.loads((src / INDEX).read_text())["weight_map"][name]


def read_shard(path: Path) -> tuple[dict, dict[str, bytes]]:
    """(header without __metadata__, tensor name -> its bytes), in the header's data order."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    header.pop("__metadata__", None)
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    return {k: header[k] for k in order}, {k: data[slice(*header[k]["data_offsets"])] for k in order}


def write_shard(path: Path, header: dict, tensors: dict[str, bytes]) -> None:
    """A shard of these tensors (dtype and shape from `header`), packed in the order of `tensors`."""
    out, offset = {}, 0
    for name, data in tensors.items():
        out[name] = {"dtype": header[name]["dtype"], "shape": header[name]["shape"]}
        out[name]["data_offsets"] = [offset, offset + len(data)]
        offset += len(data)
    text = json.dumps(out, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(tensors.values()))


def edit_tensors(src: Path, shard: Path, edit) -> None:
    """edit(header, tensors) renames, drops or adds tensors of one shard in place; the index follows."""
    header, tensors = read_shard(shard)
    before = set(tensors)
    edit(header, tensors)
    write_shard(shard, header, tensors)

    def follow(index):
        for name in before - set(tensors):
            index["weight_map"].pop(name, None)
        for name in set(tensors) - before:
            index["weight_map"][name] = shard.name
        index["weight_map"] = dict(sorted(index["weight_map"].items()))

    if (src / INDEX).exists():
        edit_json(src / INDEX, follow)


def rename_tensor(src: Path, old: str, new: str) -> None:
    def edit(header, tensors):
        header[new] = header.pop(old)
        tensors[new] = tensors.pop(old)

    edit_tensors(src, shard_of(src, old), edit)


def drop_tensors(src: Path, names: list[str]) -> None:
    for name in names:
        edit_tensors(src, shard_of(src, name), lambda header, tensors: tensors.pop(name))


def add_tensor(src: Path, shard: Path, name: str, dtype: str, shape: list[int], data: bytes) -> None:
    def edit(header, tensors):
        header[name] = {"dtype": dtype, "shape": shape}
        tensors[name] = data

    edit_tensors(src, shard, edit)


def tensor_names(src: Path) -> list[str]:
    return list(json.loads((src / INDEX).read_text())["weight_map"])


def refresh_manifest(out: Path) -> None:
    """Make the manifest agree with whatever OUT_DIR now holds: a forgery that only --source can catch."""

    def edit(manifest):
        manifest["files"] = [
            {"name": p.name, "size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
            for p in sorted(out.iterdir())
            if p.name != MANIFEST and p.is_file()
        ]

    edit_json(out / MANIFEST, edit)
