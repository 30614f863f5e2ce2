"""The streaming safetensors writer: headers planned from shapes and dtypes, then the bytes at their offsets.

Every file is written under a temporary name and renamed once complete and flushed, so a crash never
leaves a file that looks finished. Memory holds only the chunk being written.
"""

import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import MxconvertError
from .files import HASH_CHUNK, PARTIAL, WRITE_FIX, crash_point, fsync_dir
from .plan import OutputTensor, Plan, Shard

RELEASE_STEP = 256 * 2**20


CONVERT_AGAIN = "Convert again (mxconvert MODEL_DIR OUT_DIR --force)"


def _pwrite_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    done = 0
    try:
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
    except OSError as e:
        raise MxconvertError(path, f"write failed ({e.strerror})", WRITE_FIX) from e


def safetensors_header(tensors: list[OutputTensor]) -> tuple[bytes, dict[str, int]]:
    """The header bytes (8-byte length, JSON padded to 8) and each tensor's offset in the data."""
    header, offsets, offset = {"__metadata__": {"format": "pt"}}, {}, 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offsets[t.name] = offset
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


class ShardWriter:
    """One output shard, written from several threads at planned offsets and hashed as it grows.

    The sha256 takes each write straight from memory when it extends the hashed prefix (the common
    case: tensors fill in order); a range written ahead of it is read back once the prefix reaches it.
    finish() runs after the last write returned, so every range is recorded by then.
    """

    def __init__(self, path: Path, tensors: list[OutputTensor]):
        header, offsets = safetensors_header(tensors)
        self.path, self.tmp = path, path.with_name(path.name + PARTIAL)
        self.offsets = {name: len(header) + off for name, off in offsets.items()}
        self.size = len(header) + sum(t.nbytes for t in tensors)
        self.remaining = self.size - len(header)
        self._open(header)
        self._digest, self._hashed, self._ahead = hashlib.sha256(header), len(header), {}
        self._lock, self._hashing, self._released = threading.Lock(), False, 0
        self._idle = threading.Condition(self._lock)

    def _open(self, header: bytes) -> None:
        try:
            self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_EXCL, 0o644)
        except FileExistsError:  # an earlier run's leftover: ours by name, redone from scratch
            os.unlink(self.tmp)
            return self._open(header)
        except OSError as e:
            raise MxconvertError(self.tmp, f"cannot be created ({e.strerror})", WRITE_FIX) from e
        try:
            _pwrite_all(self.fd, memoryview(header), 0, self.tmp)
        except MxconvertError:
            self.abort()
            raise

    def _put(self, raw: memoryview, start: int, name: str) -> None:
        _pwrite_all(self.fd, raw, start, self.tmp)
        crash_point("write")

    prefetches = False  # nothing to read ahead when writing

    def prefetch(self, name: str, offset: int, nbytes: int) -> None:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, self.offsets[name] + offset, nbytes, os.POSIX_FADV_WILLNEED)

    def write(self, name: str, offset: int, data: torch.Tensor) -> int:
        """Write a contiguous CPU tensor's bytes at `offset` within tensor `name`; returns the byte count."""
        raw = memoryview(data.contiguous().view(-1).view(torch.uint8).numpy())
        if not len(raw):
            return 0
        start = self.offsets[name] + offset
        self._put(raw, start, name)
        self._hash(start, raw)
        return len(raw)

    def _hash(self, start: int | None = None, raw: memoryview | None = None) -> None:
        """Extend the digest over every range now contiguous with the hashed prefix. One thread at a
        time hashes; the others record their range (read back later) and go on, none waits."""
        with self._lock:
            if raw is not None:
                self._ahead[start] = start + len(raw)  # the end only: holding `raw` would keep its tensor alive
            if self._hashing:
                return
            self._hashing = True
        while True:
            with self._lock:
                range_start, end = self._hashed, self._ahead.pop(self._hashed, None)
                if end is None:
                    self._hashing = False
                    self._idle.notify_all()
                    return
            if raw is not None and range_start == start:  # our own bytes, still in memory
                self._digest.update(raw)
                self._hashed = end
            else:  # another thread's buffer, maybe reused by now: read the file
                while self._hashed < end:
                    chunk = os.pread(self.fd, min(HASH_CHUNK, end - self._hashed), self._hashed)
                    self._digest.update(chunk)
                    self._hashed += len(chunk)
            if self._hashed - self._released >= RELEASE_STEP and hasattr(os, "posix_fadvise"):
                # hashed bytes are needed no more: start their writeback now and let the cache drop them
                os.posix_fadvise(self.fd, self._released, self._hashed - self._released, os.POSIX_FADV_DONTNEED)
                self._released = self._hashed

    def finish(self) -> tuple[str, str]:
        """Hash what is left, flush, rename into place; returns (file name, sha256)."""
        with self._lock:
            self._idle.wait_for(lambda: not self._hashing)
        self._hash()
        if self.remaining != 0 or self._hashed != self.size:  # a bug of ours, never the input's
            raise RuntimeError(f"{self.path.name}: {self.remaining} bytes were never written")
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)
        except OSError as e:
            raise MxconvertError(self.tmp, f"flush failed ({e.strerror})", WRITE_FIX) from e
        return self.path.name, self._digest.hexdigest()

    def abort(self) -> None:
        """Close and delete the unfinished file: it is redone on --resume, and its space is free meanwhile."""
        os.close(self.fd)
        self.tmp.unlink(missing_ok=True)


_buffers = threading.local()


def _read_buffer(size: int) -> bytearray:
    """A per-thread bytearray of exactly `size` bytes, reused: a few sizes recur (chunks, row blocks)."""
    cache = _buffers.__dict__.setdefault("by_size", {})
    if size not in cache:
        if len(cache) >= 4:
            cache.pop(next(iter(cache)))
        cache[size] = bytearray(size)
    return cache[size]


class ShardChecker(ShardWriter):
    """verify --source: an existing shard compared with the bytes the converter would write, hashed as
    it is read (the same prefix hashing as ShardWriter), nothing written."""

    def _open(self, header: bytes) -> None:
        self.fd = os.open(self.path, os.O_RDONLY)
        if os.pread(self.fd, len(header), 0) != header:
            self.abort()
            raise MxconvertError(self.path, "header differs from the one the converter writes", CONVERT_AGAIN)

    def _put(self, raw: memoryview, start: int, name: str) -> None:
        for off in range(0, len(raw), HASH_CHUNK):
            want = raw[off : off + HASH_CHUNK]
            got = _read_buffer(len(want))  # bytearray == memoryview is a memcmp; memoryview == bytes is 10x slower
            if os.preadv(self.fd, [got], start + off) != len(want) or got != want:
                begin = start + off - self.offsets[name]
                problem = f"bytes [{begin}, {begin + len(want)}) differ from the source's conversion"
                raise MxconvertError(f"{self.path.name}: {name}", problem, CONVERT_AGAIN)

    prefetches = True  # the bytes to compare with: read ahead while the expert is computed

    def finish(self) -> tuple[str, str]:
        with self._lock:
            self._idle.wait_for(lambda: not self._hashing)
        self._hash()
        os.close(self.fd)
        return self.path.name, self._digest.hexdigest()

    def abort(self) -> None:
        os.close(self.fd)


class ShardSet:
    """All shards of a plan, written from several threads; a shard is opened when first written and
    handed to on_full (which finishes it) once its last byte is in."""

    def __init__(
        self,
        out_dir: Path,
        plan: Plan,
        on_full: Callable[[ShardWriter], None],
        on_bytes: Callable[[int], None],
        shard_type: type[ShardWriter] = ShardWriter,
    ):
        self.out_dir, self.on_full, self.on_bytes, self.shard_type = out_dir, on_full, on_bytes, shard_type
        self.plan = plan
        self.shard_of = {t.name: shard for shard in plan.shards for t in shard.tensors}
        self.open: dict[str, ShardWriter] = {}
        self._lock = threading.Lock()

    def write(self, name: str, offset: int, data: torch.Tensor) -> None:
        if data.numel() == 0:  # an empty tensor is all header: a shard is full once its bytes are in
            return
        shard = self.shard_of[name]
        writer = self._writer(shard)
        n = writer.write(name, offset, data)
        with self._lock:
            writer.remaining -= n
            full = writer.remaining == 0
            if full:
                del self.open[shard.name]
            self.on_bytes(n)
        if full:
            self.on_full(writer)

    def prefetch(self, name: str, offset: int, nbytes: int) -> None:
        """A read-ahead hint for bytes of tensor `name` that a later write will compare (ShardChecker)."""
        if not self.shard_type.prefetches or nbytes == 0:
            return
        self._writer(self.shard_of[name]).prefetch(name, offset, nbytes)

    def _writer(self, shard: Shard) -> ShardWriter:
        """The shard's open writer (or checker), opened on first use."""
        with self._lock:
            writer = self.open.get(shard.name)
            if writer is None:
                writer = self.open[shard.name] = self.shard_type(self.out_dir / shard.name, shard.tensors)
            return writer

    def empty_shards(self) -> list[Shard]:
        """Shards without a data byte (only empty tensors): no write ever opens them."""
        return [shard for shard in self.plan.shards if shard.nbytes == 0]

    def abort(self) -> None:
        with self._lock:
            for writer in self.open.values():
                writer.abort()
            self.open.clear()
