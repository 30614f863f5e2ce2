"""Triton kernels for the converted MiniMax-M3 experts (installed as mxconvert.kernels)."""
