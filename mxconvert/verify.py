"""verify: is OUT_DIR exactly a finished conversion? What users trust before serving or publishing it.

Without a source: the manifest names every file of OUT_DIR (no more, no fewer), sizes and sha256s match,
the index matches every shard header, the format's tensors are all there with their dtypes and shapes,
and safetensors opens every shard. With `source`: the whole correspondence, both ways: the source is the
one converted (its fingerprint), and every output byte is the byte the converter would write from it
(config, index, side files, every shard header and tensor), streamed as fast as the conversion.
"""

import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from safetensors import safe_open
from tqdm.auto import tqdm

from . import format as fmt
from .checkpoint import SourceCheckpoint
from .errors import MxconvertError, plain_name, read_json
from .files import sha256_file
from .headers import read_header
from .manifest import load_manifest
from .outputs import output_names, small_files
from .plan import make_plan, parse_size
from .stream import WORKERS, stream_shards
from .writer import CONVERT_AGAIN, ShardChecker

READERS = WORKERS + 1  # one more than the converter: reads of the output block where its writes did not


def verify(*, out_dir: Path, source: Path | None = None, full: bool = True, progress: bool = False) -> dict:
    """Check a converted directory; raise MxconvertError naming the first difference. Returns the manifest.

    full=False skips the sha256 of every file (sizes, headers, index, format only); `source` compares
    every output byte with a fresh conversion of the source, streamed (no output is written).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        problem = "does not exist" if not out_dir.exists() else "is not a directory"
        raise MxconvertError(out_dir, problem, "Pass the OUT_DIR of an mxconvert conversion")
    manifest = load_manifest(out_dir)
    listed = {e["name"]: e for e in manifest["files"]}
    check_files(out_dir, listed)
    check_structure(out_dir, set(listed))
    if source is not None:
        _compare_with_source(out_dir, manifest, Path(source), progress=progress)  # reads every byte anyway
    elif full:
        _check_hashes(out_dir, listed, progress=progress)
    return manifest


def check_files(out_dir: Path, listed: dict[str, dict], ignore: tuple[str, ...] = ()) -> None:
    """OUT_DIR holds exactly the listed files (and the manifest), each a regular file of the listed size."""
    present = {name for name in os.listdir(out_dir) if name not in (fmt.MANIFEST_NAME, fmt.LOCK_NAME, *ignore)}
    if fmt.RECORD_NAME in present:
        raise MxconvertError(
            out_dir / fmt.RECORD_NAME, "is the record of a run that stopped after writing the manifest",
            "Run the same conversion with --resume to finish it",
        )  # fmt: skip
    extra, missing = sorted(present - set(listed)), sorted(set(listed) - present)
    if missing:
        raise MxconvertError(out_dir / missing[0], "is in the manifest but missing", CONVERT_AGAIN)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise MxconvertError(
            out_dir / extra[0], f"is not in the manifest{more}: OUT_DIR holds files the conversion did not write",
            "Move it out of OUT_DIR, or convert again",
        )  # fmt: skip
    for name, entry in listed.items():
        st = os.lstat(out_dir / name)
        if not stat.S_ISREG(st.st_mode):
            raise MxconvertError(out_dir / name, "is not a regular file (a link, directory or device)", CONVERT_AGAIN)
        if st.st_size != entry["size"]:
            raise MxconvertError(
                out_dir / name, f"has {st.st_size} bytes, the manifest says {entry['size']}", CONVERT_AGAIN
            )


def check_structure(out_dir: Path, names: set[str]) -> dict[str, tuple[Path, dict]]:
    """The index against every shard header, the format's tensors, and safetensors opening each shard;
    returns tensor name -> (shard, header entry). `names`: the files OUT_DIR holds."""
    for required in ("config.json", fmt.INDEX_NAME):
        if required not in names:
            raise MxconvertError(out_dir / required, "is not in the manifest", CONVERT_AGAIN)
    tensors = _check_index(out_dir, names)
    config = read_json(out_dir / "config.json", fix=CONVERT_AGAIN)
    _check_format(fmt.read_converted(config, out_dir / "config.json").layers, tensors)
    by_shard: dict[Path, set[str]] = {}
    for name, (shard, _) in tensors.items():
        by_shard.setdefault(shard, set()).add(name)
    for shard, names_in_shard in sorted(by_shard.items()):
        _open_with_safetensors(shard, names_in_shard)
    return tensors


def _check_index(out_dir: Path, names: set[str]) -> dict[str, tuple[Path, dict]]:
    path = out_dir / fmt.INDEX_NAME
    index = read_json(path, fix=CONVERT_AGAIN)
    weight_map, metadata = index.get("weight_map"), index.get("metadata")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise MxconvertError(path, "weight_map is not a map of tensor names to shard files", CONVERT_AGAIN)
    if list(weight_map) != sorted(weight_map):
        raise MxconvertError(path, "weight_map is not sorted", CONVERT_AGAIN)
    by_shard: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(plain_name(shard, path, fix=CONVERT_AGAIN, what="shard"), set()).add(name)
    unindexed = sorted(n for n in names if n.endswith(".safetensors") and n not in by_shard)
    if unindexed:
        raise MxconvertError(out_dir / unindexed[0], f"is not named in {fmt.INDEX_NAME}", CONVERT_AGAIN)
    tensors, total = {}, 0
    for shard, expected in sorted(by_shard.items()):
        if shard not in names:
            raise MxconvertError(path, f"names shard {shard}, which is not in the manifest", CONVERT_AGAIN)
        header, _, _ = read_header(out_dir / shard, fix=CONVERT_AGAIN)
        if set(header) != expected:
            differ = sorted(set(header) ^ expected)[:3]
            raise MxconvertError(out_dir / shard, f"holds {differ} unlike the index", CONVERT_AGAIN)
        for name, entry in header.items():
            tensors[name] = (out_dir / shard, entry)
            total += entry["data_offsets"][1] - entry["data_offsets"][0]
    if not isinstance(metadata, dict) or metadata.get("total_size") != total:
        raise MxconvertError(path, f"metadata.total_size is not {total}", CONVERT_AGAIN)
    return tensors


def _check_format(layers: dict[str, str], tensors: dict) -> None:
    """Each expert group the config lists holds exactly its storage's tensors, dtypes and shapes."""
    for prefix, storage in layers.items():
        present = {k for k in fmt.EXPERT_TENSORS if f"{prefix}.{k}" in tensors}
        if present != set(fmt.STORED[storage]):
            raise MxconvertError(prefix, f"is {storage} but has {sorted(present)}", CONVERT_AGAIN)
        shape = tensors[f"{prefix}.{fmt.STORED[storage][0]}"][1]["shape"]  # w13 [E, 2I, H] leads
        if len(shape) != 3 or shape[1] % 2:
            raise MxconvertError(f"{prefix}.{fmt.STORED[storage][0]}", f"has shape {shape}, not [E, 2I, H]",
                                 CONVERT_AGAIN)  # fmt: skip
        E, H, I = shape[0], shape[2], shape[1] // 2
        for kind in fmt.STORED[storage]:
            dtype, want = fmt.EXPERT_TENSORS[kind]
            entry = tensors[f"{prefix}.{kind}"][1]
            if entry["dtype"] != dtype or tuple(entry["shape"]) != want(E, H, I):
                raise MxconvertError(
                    f"{prefix}.{kind}",
                    f"is {entry['dtype']} {entry['shape']}, expected {dtype} {list(want(E, H, I))}",
                    CONVERT_AGAIN,
                )
    stray = sorted(n for n in tensors if (m := fmt.CONVERTED_NAME.match(n)) and m["prefix"] not in layers)
    if stray:
        raise MxconvertError(stray[0], "is a converted expert tensor of a group config.json does not list",
                             CONVERT_AGAIN)  # fmt: skip


def _open_with_safetensors(shard: Path, names: set[str]) -> None:
    """The safetensors library itself reads the shard (what every loader will do)."""
    try:
        with safe_open(shard, framework="pt") as f:
            keys = set(f.keys())
    except Exception as e:  # noqa: BLE001 - its errors have no common base: each becomes one line
        raise MxconvertError(shard, f"safetensors cannot open it ({str(e).splitlines()[0][:200]})", CONVERT_AGAIN)
    if keys != names:
        raise MxconvertError(shard, "safetensors reads other tensors from it than its header names", CONVERT_AGAIN)


def _check_hashes(out_dir: Path, listed: dict[str, dict], *, progress: bool) -> None:
    names = sorted(listed)
    with (
        tqdm(
            total=sum(listed[n]["size"] for n in names),
            unit="B",
            unit_scale=True,
            desc="verifying",
            disable=None if progress else True,
        ) as bar,  # fmt: skip
        ThreadPoolExecutor(WORKERS) as pool,
    ):
        hashes = dict(zip(names, pool.map(lambda n: sha256_file(out_dir / n, on_bytes=bar.update), names)))
    for name in names:
        if hashes[name] != listed[name]["sha256"]:
            raise MxconvertError(
                out_dir / name, "sha256 differs from the manifest (the file changed or is corrupt)", CONVERT_AGAIN
            )


def _compare_with_source(out_dir: Path, manifest: dict, source_dir: Path, *, progress: bool) -> None:
    """A fresh conversion of the source, streamed against OUT_DIR: every file, header and byte."""
    src = SourceCheckpoint(source_dir)
    try:
        _same_source(src, manifest, source_dir)
        options = manifest["options"]
        try:
            plan = make_plan(
                src, long_context=options["long_context"] is True, bf16=options["bf16"],
                max_shard_size=parse_size(options["max_shard_size"]),
            )  # fmt: skip
        except (KeyError, TypeError) as e:
            raise MxconvertError(out_dir / fmt.MANIFEST_NAME, f"options are malformed ({e})", CONVERT_AGAIN) from None
        listed = {e["name"]: e for e in manifest["files"]}
        want = set(output_names(src, plan))
        if set(listed) != want:
            name = sorted(set(listed) ^ want)[0]
            why = "is not a file the converter writes from this source" if name in listed else "is missing"
            raise MxconvertError(out_dir / name, why, CONVERT_AGAIN)
        small = small_files(src, plan, options)
        for name, data in small.items():
            if (out_dir / name).read_bytes() != data:
                raise MxconvertError(out_dir / name, "differs from what the converter writes from the source",
                                     CONVERT_AGAIN)  # fmt: skip

        def finished(name: str, size: int, sha256: str) -> None:
            if sha256 != listed[name]["sha256"]:
                raise MxconvertError(out_dir / name, "sha256 differs from the manifest", CONVERT_AGAIN)

        stream_shards(src, plan, out_dir, plan.shards, on_finished=finished, shard_type=ShardChecker,
                      progress=progress, desc="verifying", workers=READERS)  # fmt: skip
        for name in want - {s.name for s in plan.shards}:  # equal to `small` where it was compared: hash that
            sha = hashlib.sha256(small[name]).hexdigest() if name in small else sha256_file(out_dir / name)
            if sha != listed[name]["sha256"]:
                raise MxconvertError(out_dir / name, "sha256 differs from the manifest", CONVERT_AGAIN)
    finally:
        src.close()


def _same_source(src: SourceCheckpoint, manifest: dict, source_dir: Path) -> None:
    """The source's fingerprint (sizes, header and small-file sha256s) is the one the manifest recorded."""
    was = {f["name"]: f for f in manifest["source"]["files"]}
    now = {f["name"]: f for f in src.fingerprint()}
    for name in sorted(was.keys() | now.keys()):
        if was.get(name) != now.get(name):
            if name not in was:
                problem = "is an input now but was not in the source that was converted"
            elif name not in now:
                problem = "was in the source that was converted but is missing here"
            else:
                problem = "differs from the source that was converted (size or sha256 in the manifest)"
            raise MxconvertError(source_dir / name, problem, "Pass the same source checkpoint as the conversion")
