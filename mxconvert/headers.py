"""safetensors headers, read strictly and checked as the safetensors library checks them: by the
converter (source shards), by verify and by the runtime's loader (output shards)."""

import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import MxconvertError, check_regular, parse_json

# dtype -> bytes per element: the byte-sized dtypes safetensors reads; anything else is refused by name
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER = 100_000_000  # safetensors' own limit on a header's length


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_header(path: Path, *, subject=None, fix: str = "Re-download this file") -> tuple[dict, int, bytes]:
    """A safetensors header, parsed strictly and checked as safetensors would: (tensor entries, data
    start offset, raw header bytes). `path` is opened; errors name `subject` (the path by default)."""
    subject = path if subject is None else subject
    return parse_header(*read_head(path, subject, fix=fix), subject=subject, fix=fix)


def read_head(path: Path, subject, *, fix: str) -> tuple[bytes, int]:
    """A regular file's first bytes (the 8-byte header length and that many more) and its size."""
    size = check_regular(path, subject, fix=fix).st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) == 8:
                raw += f.read(min(struct.unpack("<Q", raw)[0], MAX_HEADER + 1))
    except OSError as e:
        raise MxconvertError(subject, f"cannot read the safetensors header ({e.strerror})", fix) from None
    return raw, size


def parse_header(raw: bytes, size: int, *, subject, fix: str = "Re-download this file") -> tuple[dict, int, bytes]:
    """The header of a safetensors file of `size` bytes whose first bytes are `raw` (the 8-byte length and
    at least that many more): (tensor entries, data start offset, raw header JSON)."""
    if len(raw) < 8 or size < 8:
        raise MxconvertError(subject, "file is shorter than a safetensors header", fix)
    (length,) = struct.unpack("<Q", raw[:8])
    if length > MAX_HEADER or length > size - 8 or len(raw) < 8 + length:
        raise MxconvertError(subject, f"header length {length} is corrupt or the file is truncated", fix)
    raw = raw[8 : 8 + length]
    header = parse_json(raw, subject, fix=fix, what="safetensors header is")
    if not isinstance(header, dict):
        raise MxconvertError(subject, "safetensors header is not a JSON object", fix)
    header.pop("__metadata__", None)
    _check_layout(subject, header, size - 8 - length, fix)
    return header, 8 + length, raw


def _entry_ok(entry) -> bool:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        return False
    ints = lambda xs: isinstance(xs, list) and all(type(x) is int and x >= 0 for x in xs)  # noqa: E731
    offsets = entry.get("data_offsets")
    return isinstance(entry.get("dtype"), str) and ints(entry.get("shape")) and ints(offsets) and len(offsets) == 2


def _check_layout(path, header: dict, data_size: int, fix: str) -> None:
    """Each entry is well-formed with a dtype safetensors reads, sizes match dtype and shape, and the
    tensors tile the data exactly (no overlap, no gap, nothing after the last): what safetensors checks."""
    for name, entry in header.items():
        if not _entry_ok(entry):
            problem = f"header entry {name} is corrupt (needs dtype, shape and two data_offsets, nothing else)"
            raise MxconvertError(path, problem, fix)
        if entry["dtype"] not in DTYPE_BYTES:
            problem = f"header gives tensor {name} dtype {entry['dtype']!r}, which is not a safetensors dtype"
            raise MxconvertError(path, f"{problem} mxconvert can read ({', '.join(DTYPE_BYTES)})", fix)
    previous, end = None, 0
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        begin, stop = entry["data_offsets"]
        count, shape = 1, entry["shape"]
        for d in shape:
            count *= d
        if stop < begin:
            problem = f"header is corrupt: tensor {name} has data_offsets [{begin}, {stop}) that run backwards"
        elif stop > data_size:
            problem = f"is truncated or its header is corrupt: tensor {name} ends at data byte {stop}"
            problem += f", the file holds {data_size}"
        elif begin < end:
            problem = f"header is corrupt: tensor {name} at [{begin}, {stop}) overlaps {previous} (ends at {end})"
        elif begin > end:
            problem = f"header is corrupt: a gap of {begin - end} bytes lies before tensor {name}"
        elif stop - begin != count * DTYPE_BYTES[entry["dtype"]]:
            problem = f"header is corrupt: tensor {name} has {stop - begin} bytes, not {entry['dtype']} {shape}"
        else:
            previous, end = name, stop
            continue
        raise MxconvertError(path, problem, fix)
    if end != data_size:
        raise MxconvertError(path, f"has {data_size - end} bytes after its last tensor (corrupt or extended)", fix)
