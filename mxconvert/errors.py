"""The one error type users see, and the strict readers of what users hand us: JSON files and file names."""

import json
import os
import stat
from pathlib import Path

MAX_JSON_DEPTH = 64  # deeper than any config, index, header or record we write or read


class MxconvertError(Exception):
    """`<subject>: <problem>. <fix>.`; the CLI prints it as one line, with no traceback."""

    def __init__(self, subject: str, problem: str, fix: str = ""):
        self.subject, self.problem, self.fix = _one_line(str(subject)), _one_line(problem).rstrip("."), fix.rstrip(".")
        super().__init__(f"{self.subject}: {self.problem}." + (f" {self.fix}." if self.fix else ""))


def _one_line(text: str) -> str:
    """Names from the input may hold newlines or control characters: shown escaped, the line stays one."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class OptionError(MxconvertError):
    """A bad option value or combination: a usage error (the CLI exits with 2, not 1)."""


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {key!r} appears twice")
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _too_deep(data) -> bool:
    """Nested deeper than MAX_JSON_DEPTH (walked without recursion: writing it back would recurse)."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return True
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return False


def parse_json(raw: bytes, subject, *, fix: str, what: str = "") -> object:
    """UTF-8 JSON (no byte-order mark), no duplicate keys, no NaN/Infinity, nested at most MAX_JSON_DEPTH:
    one strict reading, so that no later reader can see the bytes differently."""
    what = what or "is"
    if raw.startswith(b"\xef\xbb\xbf"):
        raise MxconvertError(subject, f"{what} not plain UTF-8 JSON (it starts with a byte-order mark)", fix)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        hint = " (it looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in raw[:4] else ""
        raise MxconvertError(subject, f"{what} not UTF-8 JSON{hint}: byte {e.start} is not UTF-8", fix) from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise MxconvertError(subject, f"{what} JSON nested deeper than {MAX_JSON_DEPTH} levels", fix) from None
    except ValueError as e:
        raise MxconvertError(subject, f"{what} not valid JSON ({e})", fix) from None
    if _too_deep(data):
        raise MxconvertError(subject, f"{what} JSON nested deeper than {MAX_JSON_DEPTH} levels", fix)
    return data


def read_json(path, *, fix: str, missing_fix: str | None = None, subject=None) -> dict:
    """The JSON object in `path` (a regular file), or an MxconvertError naming the file: missing (say
    missing_fix), not a file, not strict JSON, or not an object (say fix)."""
    path = Path(path)
    subject = path if subject is None else subject
    if missing_fix is not None and not path.exists():
        raise MxconvertError(subject, "is missing", missing_fix)
    check_regular(path, subject, fix=fix)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise MxconvertError(subject, f"cannot be read ({e.strerror})", fix) from None
    data = parse_json(raw, subject, fix=fix)
    if not isinstance(data, dict):
        raise MxconvertError(subject, "is not a JSON object", fix)
    return data


def check_regular(path: Path, subject=None, *, fix: str) -> os.stat_result:
    """The stat of `path` if it is a regular file (links followed); else say what it is instead. Opening a
    FIFO or a device would block or read forever."""
    subject = path if subject is None else subject
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MxconvertError(subject, "is missing (or a link to nothing)", fix) from None
    except OSError as e:
        raise MxconvertError(subject, f"cannot be read ({e.strerror})", fix) from None
    if not stat.S_ISREG(st.st_mode):
        raise MxconvertError(subject, f"is {_kind(st.st_mode)}, not a regular file", fix)
    return st


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def require(ok: bool, subject, field: str, fix: str) -> None:
    """A field of a JSON file we wrote (manifest, record) that must be there and well-formed."""
    if not ok:
        raise MxconvertError(subject, f"{field} is missing or malformed", fix)


def real_path(path: Path) -> Path:
    """Where a path really leads, links resolved; a link loop is left for the next stat to report (as an
    OSError naming the file), not raised here (pathlib raises RuntimeError on one)."""
    return Path(os.path.realpath(path))


def plain_name(value, subject, *, fix: str, what: str = "file name") -> str:
    """A file name read from JSON: a plain name inside its directory (no path, no `..`, nothing hidden)."""
    ok = (
        isinstance(value, str)
        and value not in ("", ".", "..")
        and "/" not in value
        and "\\" not in value
        and "\x00" not in value
        and len(value.encode("utf-8", "surrogatepass")) <= 255
        and value.isprintable()
    )
    if not ok:
        raise MxconvertError(subject, f"names {value!r} as a {what}, which is not a plain file name", fix)
    return value
