"""Dispatch bands measured per device by scripts/tune_bands.py (it rewrites this file; edit by re-running it).

device name (torch.cuda.get_device_name) -> bf16_max_tokens / bf16_min_tokens and how they were measured.
"""

BANDS = {
    "NVIDIA H100 80GB HBM3": {
        "bf16_max_tokens": 0,
        "bf16_min_tokens": 1921,
        "measured": "2026-11-24 torch 2.11.0+cu130",
        "native_mode": "w8a16",
        "shape": {"experts": 128, "hidden": 6144, "intermediate": 384, "top_k": 4},
    },
    "NVIDIA H200": {
        "bf16_max_tokens": 0,
        "bf16_min_tokens": 1729,
        "measured": "2026-12-02 torch 2.11.0+cu130",
        "native_mode": "w8a16",
        "shape": {"experts": 128, "hidden": 6144, "intermediate": 384, "top_k": 4},
    },
}
