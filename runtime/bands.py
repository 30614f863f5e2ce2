"""Dispatch bands per device: the table scripts/tune_bands.py measured, else the checkpoint's config.

A batch of T tokens runs on the BF16 experts when T <= bf16_max_tokens or T >= bf16_min_tokens.
bf16_max_tokens 0 with bf16_min_tokens NEVER is the empty BF16 band: every batch native, no BF16 copies.
"""

import torch

from mxconvert.runtime._bands_table import BANDS

NEVER = 1 << 30  # bf16_min_tokens when no batch size is large enough for the BF16 experts


def bf16_band_empty(bf16_max_tokens: int, bf16_min_tokens: int) -> bool:
    """No batch size (T >= 1) takes the BF16 experts."""
    return bf16_max_tokens < 1 and bf16_min_tokens >= NEVER


def device_name(device: torch.device | str) -> str | None:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def bands_for(device: torch.device | str, *, default: tuple[int, int], table: dict | None = None) -> tuple[int, int]:
    """(bf16_max_tokens, bf16_min_tokens) measured on this device's model if the table has it, else default."""
    entry = (BANDS if table is None else table).get(device_name(device))
    if entry is None:
        return tuple(default)
    return entry["bf16_max_tokens"], entry["bf16_min_tokens"]
