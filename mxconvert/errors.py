"""The one error type users see: names the file or tensor, says what is wrong and what to do."""

import json


class MxconvertError(Exception):
    """`<subject>: <problem>. <fix>.`; the CLI prints it as one line, with no traceback."""

    def __init__(self, subject: str, problem: str, fix: str = ""):
        self.subject, self.problem, self.fix = str(subject), problem.rstrip("."), fix.rstrip(".")
        super().__init__(f"{self.subject}: {self.problem}." + (f" {self.fix}." if self.fix else ""))


class OptionError(MxconvertError):
    """A bad option value or combination: a usage error (the CLI exits with 2, not 1)."""


def read_json(path, *, fix: str, missing_fix: str | None = None) -> dict:
    """The JSON object in `path`, or an MxconvertError naming the file: missing (say missing_fix), not
    JSON, or not an object (say fix)."""
    if missing_fix is not None and not path.is_file():
        raise MxconvertError(path, "is missing", missing_fix)
    try:
        text = path.read_bytes()  # json.loads decodes: bad UTF-8 is a ValueError there
    except OSError as e:
        raise MxconvertError(path, f"cannot be read ({e.strerror})", fix) from e
    try:
        data = json.loads(text)
    except ValueError as e:
        raise MxconvertError(path, f"is not valid JSON ({e})", fix) from e
    if not isinstance(data, dict):
        raise MxconvertError(path, "is not a JSON object", fix)
    return data
