"""`python -m mxconvert`: the same command as `mxconvert`, for environments without the script on PATH."""

from .cli import main

main(prog_name="mxconvert")
