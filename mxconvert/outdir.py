"""OUT_DIR across runs: the lock, what may be replaced, the free-disk check, and the record for --resume.

A run holds an exclusive lock on `OUT_DIR/.mxconvert.lock` and keeps `mxconvert.partial.json` there,
rewritten atomically as each shard is finished: what the run is (tool version, options, input
fingerprint, planned files) and each finished shard's size and sha256. --resume refuses when any of the
first differs, keeps the shards whose size and sha256 still match, and deletes the rest: the planned
layout is deterministic, so redoing them gives the bytes of an uninterrupted run. --force deletes only
the files a manifest or record of ours names, and refuses a directory holding anything else.
"""

import contextlib
import fcntl
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from . import format as fmt
from .errors import MxconvertError, plain_name, read_json, real_path, require
from .files import PARTIAL, sha256_file, write_json_atomic
from .manifest import load_manifest

RECORD_NAME, LOCK_NAME = fmt.RECORD_NAME, fmt.LOCK_NAME
START_OVER = "Run the same command as the first time, or pass --force to start over"
NOT_OURS = "--force replaces only a conversion of mxconvert's; pick another OUT_DIR, or empty it yourself"


def identity(*, options: dict, fingerprint: list[dict], shards: dict[str, int], outputs: list[str]) -> dict:
    """What a resumed run must share with the interrupted one; `outputs` names every file it writes."""
    return {
        "tool": {"name": fmt.PRODUCER, "version": __version__},
        "options": options,
        "source": {"files": fingerprint},
        "shards": shards,
        "outputs": sorted(outputs),
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
    complete: bool = False  # --resume found a finished conversion of the same input and options
    kept: dict[str, dict] = field(default_factory=dict)  # finished shards kept: name -> {"size", "sha256"}
    doomed: list[Path] = field(default_factory=list)  # our files deleted first (--force, or a run's leftovers)

    def reclaimable(self) -> int:
        """Bytes on disk that go before the first write."""
        return sum(p.lstat().st_blocks * 512 for p in self.doomed if p.exists())

    def open(self, ident: dict) -> Record:
        """Clear what must go and start the record (with the shards kept)."""
        for path in self.doomed:
            path.unlink(missing_ok=True)
        return Record(self.path, ident, self.kept)


@contextlib.contextmanager
def locked(out: Path):
    """OUT_DIR (created if missing) with an exclusive lock held by this process: one mxconvert at a time
    per OUT_DIR. On the way out the lock file goes, and OUT_DIR too if this call created it and it is empty."""
    out = real_path(out)
    if out.exists() and not out.is_dir():
        raise MxconvertError(out, "is a file, not a directory", "Pick another OUT_DIR")
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MxconvertError(out, f"cannot be created ({e.strerror})", "Pick a writable OUT_DIR") from None
    lock = out / LOCK_NAME
    try:
        fd = _acquire(lock, out)
    except BaseException:
        _remove_created(created)
        raise
    try:
        yield out
    finally:
        lock.unlink(missing_ok=True)  # before unlocking: a waiter then finds the file gone and retries
        os.close(fd)
        _remove_created(created)


def _acquire(lock: Path, out: Path) -> int:
    while True:
        if os.path.islink(lock):
            os.unlink(lock)  # a link planted there must not be written through
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise MxconvertError(lock, f"cannot be created ({e.strerror})", "Pick a writable OUT_DIR") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise MxconvertError(
                out, f"is in use by another mxconvert process (pid {holder})",
                "Wait for it to finish (or stop it), then run again",
            ) from None  # fmt: skip
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not unlinked by its last holder meanwhile
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def _remove_created(created: list[Path]) -> None:
    for path in created:  # deepest first
        try:
            path.rmdir()
        except OSError:  # not empty (a run left its record and shards) or not ours to remove
            return


@contextlib.contextmanager
def locked_for_reading(out: Path):
    """The lock for `push`: taken where OUT_DIR is writable (a read-only copy has no writer to fear)."""
    out = real_path(Path(out))
    if not out.is_dir() or not os.access(out, os.W_OK):
        yield out
        return
    fd = _acquire(out / LOCK_NAME, out)
    try:
        yield out
    finally:
        (out / LOCK_NAME).unlink(missing_ok=True)
        os.close(fd)


def check_paths(out: Path, source_dir: Path, inputs: list[Path]) -> None:
    """OUT_DIR must not be the source, lie inside it, or hold it or any file it reads (links resolved):
    the run writes there, and --force deletes there."""
    out, src = real_path(out), real_path(source_dir)
    if out == src or src in out.parents or out in src.parents:
        raise MxconvertError(out, f"is, contains or lies inside the source {src}", "Pick an OUT_DIR outside MODEL_DIR")
    for path in inputs:
        if out in path.parents:
            raise MxconvertError(
                out, f"holds {path}, a file of the source {src} (through a link)", "Pick an OUT_DIR outside MODEL_DIR"
            )


def inspect(out: Path, source_dir: Path, *, force: bool, resume: bool, ident: dict, workers: int) -> OutDir:
    """Decide what to do with OUT_DIR (locked by us), refusing whatever would lose or mix work; changes
    nothing on disk."""
    present = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
    if not present:
        return OutDir(out)
    manifest_path, record_path = out / fmt.MANIFEST_NAME, out / RECORD_NAME
    has_manifest, has_record = manifest_path.is_file(), record_path.is_file()
    if force:
        ours = _our_files(out, has_manifest, has_record)
        _refuse_foreign(out, present, ours, "--force")
        last = (fmt.MANIFEST_NAME, RECORD_NAME)  # deleted last: a run stopped midway still finds them and
        return OutDir(out, doomed=[out / n for n in sorted(present, key=lambda n: n in last)])  # what they name
    if has_manifest:
        if not resume:
            raise MxconvertError(
                out, "already holds a finished conversion", "Pass --force to replace it, or pick another OUT_DIR"
            )
        manifest = load_manifest(out)
        _refuse_foreign(out, present, _named(manifest) | {RECORD_NAME}, "--resume")
        _compare(manifest, ident, out, source_dir)
        return OutDir(out, complete=True, doomed=[record_path] if has_record else [])
    if not has_record:
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
    recorded = load_record(out)
    _refuse_foreign(out, present, _named(recorded), "--resume")
    _compare(recorded, ident, out, source_dir)
    kept = _still_there(out, recorded["finished"], workers)
    doomed = [out / name for name in present if name != RECORD_NAME and name not in kept]
    return OutDir(out, kept=kept, doomed=doomed)


def _our_files(out: Path, has_manifest: bool, has_record: bool) -> set[str]:
    try:
        if has_manifest:
            return _named(load_manifest(out)) | ({RECORD_NAME} if has_record else set())
        if has_record:
            return _named(load_record(out))
    except MxconvertError as e:  # which files are ours is unknown: deleting any could lose the user's
        raise MxconvertError(
            e.subject, f"{e.problem}, so --force cannot tell which files mxconvert wrote",
            "Delete that OUT_DIR yourself if it holds nothing else of yours, or pick another OUT_DIR",
        ) from None  # fmt: skip
    present = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
    more = f" and {len(present) - 3} more" if len(present) > 3 else ""
    raise MxconvertError(
        out, f"holds {', '.join(present[:3])}{more}, which no mxconvert run of it wrote (it has no "
        f"{fmt.MANIFEST_NAME} or {RECORD_NAME})", NOT_OURS[0].upper() + NOT_OURS[1:],
    )  # fmt: skip


def _named(data: dict) -> set[str]:
    """The files a manifest or a record names as ours, with their temporary names and its own."""
    names = {f["name"] for f in data["files"]} if "files" in data else set(data["outputs"])
    names |= {fmt.MANIFEST_NAME, RECORD_NAME}
    return names | {name + PARTIAL for name in names}


def _refuse_foreign(out: Path, present: list[str], ours: set[str], option: str) -> None:
    foreign = [name for name in present if name not in ours or not (out / name).is_file() or (out / name).is_symlink()]
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise MxconvertError(
            out, f"holds {', '.join(foreign[:3])}{more}, which no mxconvert run of it wrote",
            NOT_OURS if option == "--force" else "Move those away, or pick another OUT_DIR",
        )  # fmt: skip


def load_record(out: Path) -> dict:
    """The in-progress record, checked field by field (a hand-edited one gets an error, not a crash)."""
    path = out / RECORD_NAME
    fix = "It was edited or is not mxconvert's: delete that OUT_DIR yourself if it holds nothing else of yours"
    record = read_json(path, fix=fix)

    def need(ok: bool, field: str):
        require(ok, path, field, fix)

    tool, options, source = record.get("tool"), record.get("options"), record.get("source")
    need(isinstance(tool, dict) and isinstance(tool.get("version"), str), "tool.version")
    need(isinstance(options, dict), "options")
    need(isinstance(source, dict) and isinstance(source.get("files"), list), "source.files")
    need(all(isinstance(f, dict) and isinstance(f.get("name"), str) for f in source["files"]), "source.files")
    shards, outputs, finished = record.get("shards"), record.get("outputs"), record.get("finished")
    need(isinstance(shards, dict) and all(type(v) is int for v in shards.values()), "shards")
    need(isinstance(outputs, list), "outputs")
    need(isinstance(finished, dict), "finished")
    for name in [*shards, *outputs, *finished]:
        plain_name(name, path, fix=fix)
    for name, entry in finished.items():
        need(name in shards, f"finished.{name} (not a planned shard)")
        need(isinstance(entry, dict) and type(entry.get("size")) is int and isinstance(entry.get("sha256"), str),
             f"finished.{name}")  # fmt: skip
    return record


def _compare(recorded: dict, ident: dict, out: Path, source_dir: Path) -> None:
    """Refuse, naming the first difference, unless the earlier run had the same tool, options and input."""
    before = recorded["tool"].get("version")
    if before != __version__:
        raise MxconvertError(
            out, f"was written by mxconvert {before}, this is {__version__}", f"Use mxconvert {before}, or --force"
        )
    for key, now in ident["options"].items():
        was = recorded["options"].get(key)
        if was != now:
            raise MxconvertError(f"--{key.replace('_', '-')}", f"is {now!r} now but was {was!r} in {out}", START_OVER)
    files_before = {f["name"]: f for f in recorded["source"]["files"]}
    files_now = {f["name"]: f for f in ident["source"]["files"]}
    for name in sorted(files_before.keys() | files_now.keys()):
        was, now = files_before.get(name), files_now.get(name)
        if was == now:
            continue
        if was is None:
            problem = f"is new: it was not an input of the run in {out}"
        elif now is None:
            problem = f"is gone: it was an input of the run in {out}"
        elif was.get("size") != now["size"]:
            problem = f"has {now['size']} bytes now but had {was.get('size')} in the run in {out}"
        elif name == "config.json":
            raise MxconvertError(source_dir / name, f"changed since the run in {out}", START_OVER)
        elif "header_sha256" in now:
            problem = f"has another header now (sha256 {now['header_sha256'][:12]}...) than in the run in {out}"
        else:
            problem = f"has other contents now than in the run in {out}"
        raise MxconvertError(source_dir / name, problem, "Resume only with the same input, or pass --force")
    if "shards" in recorded and recorded["shards"] != ident["shards"]:
        raise MxconvertError(out / RECORD_NAME, "plans other shards than this run", START_OVER)


def _still_there(out: Path, finished: dict, workers: int) -> dict[str, dict]:
    """The recorded shards whose size and sha256 still match (hashed again, in parallel)."""
    present = {
        name: f
        for name, f in finished.items()
        if (out / name).is_file() and not (out / name).is_symlink() and (out / name).stat().st_size == f["size"]
    }
    with ThreadPoolExecutor(workers) as pool:
        hashes = dict(zip(present, pool.map(sha256_file, (out / name for name in present))))
    return {name: f for name, f in present.items() if hashes[name] == f["sha256"]}


def existing_parent(path: Path) -> Path:
    """`path`, or its nearest existing parent: where a directory still to be made would go."""
    while not path.exists():
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Free bytes on the disk that holds `path` (or its nearest existing parent). Tests patch this."""
    return shutil.disk_usage(existing_parent(path)).free


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
