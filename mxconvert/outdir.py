"""OUT_DIR across runs: what may be replaced, the free-disk check, and the in-progress record for --resume.

A run keeps `mxconvert.partial.json` in OUT_DIR, rewritten atomically as each shard is finished: what
the run is (tool version, options, input fingerprint, planned shards) and each finished shard's size
and sha256. --resume refuses when any of the first differs, keeps the shards whose size and sha256
still match, and deletes the rest: the planned layout is deterministic, so redoing them gives the bytes
of an uninterrupted run.
"""

import hashlib
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from . import format as fmt
from .checkpoint import SourceCheckpoint
from .errors import MxconvertError, read_json
from .manifest import sha256_file, source_files
from .plan import Plan
from .writer import PARTIAL, write_json_atomic

RECORD_NAME = "mxconvert.partial.json"
START_OVER = "Run the same command as the first time, or pass --force to start over"


def identity(*, options: dict, source: SourceCheckpoint, plan: Plan) -> dict:
    """What a resumed run must share with the interrupted one."""
    return {
        "tool": {"name": "mxconvert", "version": __version__},
        "options": options,
        "source": {
            "config_sha256": hashlib.sha256((source.dir / "config.json").read_bytes()).hexdigest(),
            "files": source_files(source),
        },
        "shards": {s.name: s.nbytes for s in plan.shards},
    }


class Record:
    """The in-progress record, rewritten (atomically) each time a shard is finished."""

    def __init__(self, out: Path, ident: dict, finished: dict[str, dict]):
        self.path, self._lock = out / RECORD_NAME, threading.Lock()
        self.data = {"note": "an unfinished mxconvert run; `--resume` goes on from here", **ident}
        self.data["finished"] = dict(sorted(finished.items()))
        write_json_atomic(self.path, self.data)

    def finished(self, name: str, size: int, sha256: str) -> None:
        with self._lock:
            self.data["finished"][name] = {"size": size, "sha256": sha256}
            write_json_atomic(self.path, self.data)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class OutDir:
    """What a run will do with OUT_DIR: start it, replace it (--force), or go on in it (--resume)."""

    path: Path
    replace: bool = False  # --force: everything in it goes first
    complete: bool = False  # --resume found a finished conversion of the same input and options
    kept: dict[str, dict] = field(default_factory=dict)  # finished shards kept: name -> {"size", "sha256"}
    stale: list[Path] = field(default_factory=list)  # an interrupted run's leftovers, deleted first

    def reclaimable(self) -> int:
        """Bytes on disk that go before the first write."""
        doomed = [p for p in self.path.rglob("*") if p.is_file()] if self.replace else self.stale
        return sum(p.lstat().st_blocks * 512 for p in doomed)

    def open(self, ident: dict) -> Record:
        """Clear what must go, create OUT_DIR, and start the record (with the shards kept)."""
        if self.replace:
            shutil.rmtree(self.path)
        for path in self.stale:
            path.unlink(missing_ok=True)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MxconvertError(self.path, f"cannot be created ({e.strerror})", "Pick a writable OUT_DIR") from e
        return Record(self.path, ident, self.kept)


def check_paths(out: Path, source_dir: Path) -> None:
    """OUT_DIR must not be the source, lie inside it, or hold it (--force would delete it)."""
    out, src = out.resolve(), source_dir.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise MxconvertError(out, f"is, contains or lies inside the source {src}", "Pick an OUT_DIR outside MODEL_DIR")


def inspect(out: Path, source_dir: Path, *, force: bool, resume: bool, ident: dict, workers: int) -> OutDir:
    """Decide what to do with OUT_DIR, refusing whatever would lose or mix work; changes nothing on disk."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise MxconvertError(out, "is a file, not a directory", "Pick another OUT_DIR")
    if not out.exists() or not any(out.iterdir()):
        return OutDir(out)
    if force:
        return OutDir(out, replace=True)
    manifest, record = out / fmt.MANIFEST_NAME, out / RECORD_NAME
    if manifest.is_file():
        if not resume:
            raise MxconvertError(
                out, "already holds a finished conversion", "Pass --force to replace it, or pick another OUT_DIR"
            )
        _compare(_load(manifest), ident, out, source_dir)
        return OutDir(out, complete=True, stale=[record] if record.exists() else [])
    if not record.is_file():
        if resume:
            raise MxconvertError(
                out,
                f"has no {RECORD_NAME}, so it holds no interrupted conversion to resume",
                "Pass --force to replace what is there, or pick another OUT_DIR",
            )
        raise MxconvertError(
            out, "already exists and is not empty", "Pick another OUT_DIR, or pass --force to replace it"
        )
    if not resume:
        raise MxconvertError(
            out, "holds an interrupted conversion", "Pass --resume to go on with it, or --force to start over"
        )
    recorded = _load(record)
    _compare(recorded, ident, out, source_dir)
    kept = _still_there(out, recorded.get("finished", {}), workers)
    stale = [p for p in out.iterdir() if p.name.endswith(PARTIAL) or (p.name in ident["shards"] and p.name not in kept)]
    return OutDir(out, kept=kept, stale=sorted(stale))


def _load(path: Path) -> dict:
    return read_json(path, fix="Pass --force to start over")


def _compare(recorded: dict, ident: dict, out: Path, source_dir: Path) -> None:
    """Refuse, naming the first difference, unless the earlier run had the same tool, options and input."""
    before = recorded.get("tool", {}).get("version")
    if before != __version__:
        raise MxconvertError(
            out, f"was written by mxconvert {before}, this is {__version__}", f"Use mxconvert {before}, or --force"
        )
    for key, now in ident["options"].items():
        was = recorded.get("options", {}).get(key)
        if was != now:
            raise MxconvertError(f"--{key.replace('_', '-')}", f"is {now!r} now but was {was!r} in {out}", START_OVER)
    files_before = {f["name"]: f for f in recorded.get("source", {}).get("files", [])}
    files_now = {f["name"]: f for f in ident["source"]["files"]}
    for name in sorted(files_before.keys() | files_now.keys()):
        was, now = files_before.get(name), files_now.get(name)
        if was == now:
            continue
        if was is None:
            problem = f"is new: it was not an input of the run in {out}"
        elif now is None:
            problem = f"is gone: it was an input of the run in {out}"
        elif was["size"] != now["size"]:
            problem = f"has {now['size']} bytes now but had {was['size']} in the run in {out}"
        else:
            problem = f"has another header now (sha256 {now['header_sha256'][:12]}...) than in the run in {out}"
        raise MxconvertError(source_dir / name, problem, "Resume only with the same input, or pass --force")
    config_before = recorded.get("source", {}).get("config_sha256")
    if config_before is not None and config_before != ident["source"]["config_sha256"]:
        raise MxconvertError(source_dir / "config.json", f"changed since the run in {out}", START_OVER)
    if "shards" in recorded and recorded["shards"] != ident["shards"]:
        raise MxconvertError(out / RECORD_NAME, "plans other shards than this run", START_OVER)


def _still_there(out: Path, finished: dict, workers: int) -> dict[str, dict]:
    """The recorded shards whose size and sha256 still match (hashed again, in parallel)."""
    present = {
        name: f
        for name, f in finished.items()
        if isinstance(f, dict) and (out / name).is_file() and (out / name).stat().st_size == f.get("size")
    }
    with ThreadPoolExecutor(workers) as pool:
        hashes = dict(zip(present, pool.map(sha256_file, (out / name for name in present))))
    return {name: f for name, f in present.items() if hashes[name] == f.get("sha256")}


def free_bytes(path: Path) -> int:
    """Free bytes on the disk that holds `path` (or its nearest existing parent). Tests patch this."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_free_space(state: OutDir, needed: int) -> None:
    free = free_bytes(state.path) + state.reclaimable()
    if free < needed:
        raise MxconvertError(
            state.path,
            f"the output needs {human(needed)} of disk space but {human(free)} is free there",
            f"Free {human(needed - free)} more, or pick an OUT_DIR on another disk",
        )


def human(n: int) -> str:
    """Bytes in decimal units (as --max-shard-size reads them), 3 significant digits."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"
