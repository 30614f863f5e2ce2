"""The manifest `mxconvert.json` (written last: without it a directory is not a finished conversion) and verify."""

import hashlib
import json
from pathlib import Path

import torch

from . import __version__, layout
from . import format as fmt
from .checkpoint import SourceCheckpoint, read_header
from .errors import MxconvertError
from .writer import HASH_CHUNK, write_json_atomic


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def source_files(source: SourceCheckpoint) -> list[dict]:
    """The input's fingerprint: each weight file's name, size and header sha256 (cheap: no tensor bytes)."""
    return [
        {"name": s.name, "size": s.stat().st_size, "header_sha256": source.header_sha256[s.name]} for s in source.shards
    ]


def write_manifest(
    out_dir: Path, *, options: dict, source: SourceCheckpoint, source_id: dict, files: dict[str, str]
) -> None:
    """files: output file name -> sha256. The manifest names itself nowhere and is renamed into place last."""
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "tool": {"name": "mxconvert", "version": __version__},
        "options": options,
        "source": {**source_id, "files": source_files(source)},
        "files": [{"name": n, "size": (out_dir / n).stat().st_size, "sha256": files[n]} for n in sorted(files)],
    }
    write_json_atomic(out_dir / fmt.MANIFEST_NAME, manifest)


def load_manifest(out_dir: Path) -> dict:
    path = Path(out_dir) / fmt.MANIFEST_NAME
    if not path.is_file():
        raise MxconvertError(
            out_dir,
            f"has no {fmt.MANIFEST_NAME}, so it is not a finished conversion",
            "Run the conversion again (with --resume if it was interrupted)",
        )
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise MxconvertError(path, f"is not valid JSON ({e})", "Run the conversion again") from e
    if manifest.get("format_version") != fmt.FORMAT_VERSION:
        raise MxconvertError(
            path,
            f"format_version {manifest.get('format_version')!r} is unknown to mxconvert {__version__}",
            "Use the mxconvert version that wrote it, or convert again",
        )
    return manifest


def verify(*, out_dir: Path, source: Path | None = None, full: bool = True) -> dict:
    """Check a converted directory against its manifest, index and FORMAT.md; raise MxconvertError if not.

    full=False is the cheap part run after each conversion (sizes, headers, index, config); full=True
    also hashes every file; `source` compares every tensor with the source checkpoint, bit for bit.
    """
    out_dir = Path(out_dir)
    manifest = load_manifest(out_dir)
    for entry in manifest["files"]:
        path = out_dir / entry["name"]
        if not path.is_file() or path.stat().st_size != entry["size"]:
            raise MxconvertError(path, "is missing or its size differs from the manifest", "Convert again")
        if full and sha256_file(path) != entry["sha256"]:
            raise MxconvertError(
                path, "sha256 differs from the manifest (the file changed or is corrupt)", "Convert again"
            )
    tensors = _check_index(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    _check_format(config["quantization_config"], tensors)
    if source is not None:
        _compare_with_source(out_dir, tensors, config["quantization_config"], SourceCheckpoint(Path(source)))
    return manifest


def _check_index(out_dir: Path) -> dict[str, tuple[Path, dict, int]]:
    """Every shard's header matches the index exactly; returns name -> (shard, header entry, data start)."""
    index = json.loads((out_dir / fmt.INDEX_NAME).read_text())
    weight_map = index["weight_map"]
    if list(weight_map) != sorted(weight_map):
        raise MxconvertError(out_dir / fmt.INDEX_NAME, "weight_map is not sorted", "Convert again")
    tensors, total = {}, 0
    for shard in sorted(set(weight_map.values())):
        header, start, _ = read_header(out_dir / shard)
        names = {n for n, s in weight_map.items() if s == shard}
        if set(header) != names:
            raise MxconvertError(
                out_dir / shard, f"holds {sorted(set(header) ^ names)[:3]} unlike the index", "Convert again"
            )
        for name, entry in header.items():
            tensors[name] = (out_dir / shard, entry, start)
            total += entry["data_offsets"][1] - entry["data_offsets"][0]
    if index["metadata"]["total_size"] != total:
        raise MxconvertError(out_dir / fmt.INDEX_NAME, f"total_size is not {total}", "Convert again")
    return tensors


def _check_format(quant: dict, tensors: dict) -> None:
    if quant.get("quant_method") != fmt.QUANT_METHOD or quant.get("format_version") != fmt.FORMAT_VERSION:
        raise MxconvertError("config.json", "quantization_config is not mxconvert format v1", "Convert again")
    for prefix, storage in quant["experts"]["layers"].items():
        present = {k for k in fmt.EXPERT_TENSORS if f"{prefix}.{k}" in tensors}
        if present != set(fmt.STORED[storage]):
            raise MxconvertError(prefix, f"is {storage} but has {sorted(present)}", "Convert again")
        E, two_i, H = tensors[f"{prefix}.{fmt.STORED[storage][0]}"][1]["shape"]  # w13 [E, 2I, H] leads
        I = two_i // 2
        for kind in fmt.STORED[storage]:
            dtype, shape = fmt.EXPERT_TENSORS[kind]
            entry = tensors[f"{prefix}.{kind}"][1]
            if entry["dtype"] != dtype or tuple(entry["shape"]) != shape(E, H, I):
                raise MxconvertError(
                    f"{prefix}.{kind}",
                    f"is {entry['dtype']} {entry['shape']}, expected {dtype} {list(shape(E, H, I))}",
                    "Convert again",
                )


def _read(path: Path, entry: dict, start: int, offset: int, nbytes: int) -> torch.Tensor:
    with open(path, "rb") as f:
        f.seek(start + entry["data_offsets"][0] + offset)
        return torch.frombuffer(bytearray(f.read(nbytes)), dtype=torch.uint8)


def _compare_with_source(out_dir: Path, tensors: dict, quant: dict, src: SourceCheckpoint) -> None:
    """Pass-through tensors byte for byte; expert tensors value bytes, scales, dequantized values, BF16."""
    groups = quant["experts"]["layers"]
    expert_names = {f"{p}.{k}" for p in groups for k in fmt.EXPERT_TENSORS}
    for name, (path, entry, start) in tensors.items():
        if name in expert_names:
            continue
        info = src.tensors.get(name)
        size = entry["data_offsets"][1] - entry["data_offsets"][0]
        if info is None or info.nbytes != size:
            raise MxconvertError(name, "is not in the source or has another size", "Convert again")
        for off in range(0, size, HASH_CHUNK):
            n = min(HASH_CHUNK, size - off)
            if not torch.equal(_read(path, entry, start, off, n), src.read(info, off, n)):
                raise MxconvertError(name, f"differs from the source within bytes [{off}, {off + n})", "Convert again")
    for prefix, storage in groups.items():
        experts = src.groups[prefix].experts
        for e in sorted(experts):
            for stack, projs in (("w13", ("gate", "up")), ("w2", ("down",))):
                fn_values = torch.cat([src.read_tensor(experts[e][p][0]) for p in projs])  # [N, K]
                fn_scales = torch.cat([src.read_tensor(experts[e][p][1]) for p in projs])  # [N, K/32]
                want = layout.dequantize(fn_values, fn_scales, fnuz=False)  # float64, exact
                fnuz_values, fnuz_scales = layout.fn_to_fnuz_values(fn_values), layout.fn_to_fnuz_scales(fn_scales)
                got = {}
                for kind in fmt.STORED[storage]:
                    if not kind.startswith(stack + "_"):
                        continue
                    path, entry, start = tensors[f"{prefix}.{kind}"]
                    per_expert = (entry["data_offsets"][1] - entry["data_offsets"][0]) // entry["shape"][0]
                    raw = _read(path, entry, start, e * per_expert, per_expert)
                    got[kind] = (raw.view(torch.bfloat16) if entry["dtype"] == "BF16" else raw).view(entry["shape"][1:])
                if f"{stack}_weight" in got:
                    values, packed = got[f"{stack}_weight"], got[f"{stack}_weight_scale"]
                    scales = layout.unpack_scales(packed)
                    ok = (
                        torch.equal(values, fnuz_values)
                        and torch.equal(scales, fnuz_scales)
                        and torch.equal(layout.dequantize(values, scales, fnuz=True), want)
                    )
                    if not ok:
                        raise MxconvertError(
                            f"{prefix}.{stack}_weight", f"expert {e} differs from the source", "Convert again"
                        )
                if f"{stack}_weight_bf16" in got:
                    bf16 = got[f"{stack}_weight_bf16"]
                    # bit for bit: the FNUZ value rounded (source -0 is +0 there, as FORMAT.md says)
                    rounded = layout.dequantize(fnuz_values, fnuz_scales, fnuz=True).to(torch.bfloat16)
                    if not torch.equal(bf16.view(torch.int16), rounded.view(torch.int16)):
                        raise MxconvertError(
                            f"{prefix}.{stack}_weight_bf16",
                            f"expert {e} is not the rounded source value",
                            "Convert again",
                        )
    src.close()
