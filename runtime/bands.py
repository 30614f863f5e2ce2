"""Dispatch bands per device: the checkpoint's config, moved to the bands scripts/tune_bands.py measured.

A batch of T tokens runs on the BF16 experts when T <= bf16_max_tokens or T >= bf16_min_tokens.
bf16_max_tokens 0 with bf16_min_tokens format.NEVER is the empty BF16 band: every batch native, no BF16 copies.
The checkpoint decides whether BF16 copies are held at all (memory); the table only where its band lies.
"""

import torch

from mxconvert.format import bf16_band_empty
from mxconvert.runtime._bands_table import BANDS


def device_name(device: torch.device | str) -> str | None:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def bands_for(device: torch.device | str, *, default: tuple[int, int], table: dict | None = None) -> tuple[int, int]:
    """(bf16_max_tokens, bf16_min_tokens) measured on this device's model if the table has it, else default.
    An empty BF16 band in default stays empty: the table never adds BF16 copies the checkpoint left out."""
    entry = (BANDS if table is None else table).get(device_name(device))
    if entry is None or bf16_band_empty(*default):
        return tuple(default)
    return entry["bf16_max_tokens"], entry["bf16_min_tokens"]
