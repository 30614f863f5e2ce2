"""Small files, written whole or not at all, and hashed; and the test-only crash hook.

A small file (config, index, side file, card, manifest, record) is written under a temporary name,
flushed and renamed into place, so a crash never leaves one that looks finished.
"""

import hashlib
import json
import os
import signal
import threading
from pathlib import Path

from .errors import MxconvertError

PARTIAL = ".partial"  # suffix of files still being written
HASH_CHUNK = 16 * 2**20  # bytes per read when hashing or comparing files
WRITE_FIX = "Free disk space (or fix what the error says), then run the same command with --resume"
# Test-only: MXCONVERT_TEST_KILL_AT="<event>:<n>" sends this process MXCONVERT_TEST_KILL_SIGNAL (default
# SIGKILL) at the n-th event: "start", "write" (a chunk into a shard), "shard" (a shard finished and
# recorded) or an output file's name (a small file flushed, just before its rename).
_KILL_EVENT, _, _KILL_COUNT = os.environ.get("MXCONVERT_TEST_KILL_AT", "").rpartition(":")
_events: dict[str, int] = {}
_events_lock = threading.Lock()


def crash_point(event: str) -> None:
    if event != _KILL_EVENT:
        return
    with _events_lock:
        _events[event] = _events.get(event, 0) + 1
        hit = _events[event] == int(_KILL_COUNT)
    if hit:
        os.kill(os.getpid(), getattr(signal, os.environ.get("MXCONVERT_TEST_KILL_SIGNAL", "SIGKILL")))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """A small file: written under a temporary name, flushed, then renamed into place."""
    tmp = path.with_name(path.name + PARTIAL)
    try:
        if os.path.lexists(tmp):  # an earlier run's leftover (or a planted link): never written through
            os.unlink(tmp)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        crash_point(path.name)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MxconvertError(path, f"write failed ({e.strerror})", WRITE_FIX) from e


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def sha256_file(path: Path, on_bytes=None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest()
