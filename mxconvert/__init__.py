"""mxconvert: MiniMax-M3 MXFP8 checkpoints, converted once for MI300X."""

import os as _os

__version__ = "0.1.0"

# Run from a source tree (no install): kernels/ and runtime/ sit beside this package and are
# reached as mxconvert.kernels / mxconvert.runtime, the names an install gives them.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(_os.path.join(_root, "pyproject.toml")):
    __path__.append(_root)
