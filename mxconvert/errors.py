"""The one error type users see: names the file or tensor, says what is wrong and what to do."""


class MxconvertError(Exception):
    """`<subject>: <problem>. <fix>.`; the CLI prints it as one line, with no traceback."""

    def __init__(self, subject: str, problem: str, fix: str = ""):
        self.subject, self.problem, self.fix = str(subject), problem.rstrip("."), fix.rstrip(".")
        super().__init__(f"{self.subject}: {self.problem}." + (f" {self.fix}." if self.fix else ""))


class OptionError(MxconvertError):
    """A bad option value or combination: a usage error (the CLI exits with 2, not 1)."""
