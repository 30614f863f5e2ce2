"""Dispatch bands measured per device by scripts/tune_bands.py (it rewrites this file; edit by re-running it).

device name (torch.cuda.get_device_name) -> bf16_max_tokens / bf16_min_tokens and how they were measured.
"""

BANDS = {}
