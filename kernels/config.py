"""Tile configs for the fused MoE GEMMs, chosen by device and shape, and each device's native mode.

Hopper tables: measured with scripts/bench_moe.py --sweep at MiniMax-M3 TP8 shapes (notes/kernels.md),
H100 (2026-11-24) and H200 (2026-12-02, W8A16 and W8A8: its BF16 rows are the H100's).
gfx942 (MI300X): the seed's rules, not measured here.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GemmTile:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    swap_ab: bool = False  # weights as the MMA's left operand: wgmma at few tokens per expert
    group_m: int = 8
    split_k: int = 1  # K slices on separate programs (fp32 partials): more CTAs streaming at decode
    dequant: str = "auto"  # FP8 -> BF16 route (W8A16, W8A8 "bf16"): "fp32", "bits", "asm" (moe_gemm.resolve_dequant)
    w8a8: str = "fp8"  # W8A8 dot: "fp8" (FP8 dot per 32-group) or "bf16" (exact BF16 operands; moe_gemm.W8A8_DOT)


@dataclass(frozen=True)
class MoeConfig:
    block_m: int  # shared by both GEMMs: one routing alignment per forward
    gemm1: GemmTile
    gemm2: GemmTile
    direct: bool = False  # no alignment: a block per pair (decode: one launch less; shared experts re-read)


# Native MXFP8 formulation per device family; Hopper's settled by the bench (notes/kernels.md).
NATIVE_MODE = {"gfx942": "w8a8", "hopper": "w8a16", "cpu": "w8a8", "other": "w8a16"}

Tile = GemmTile
SWAP_AB = True
# Hopper: (largest tokens per expert (T * k / E), block_m, GEMM1 tile, GEMM2 tile[, DIRECT]), first match wins.
# Rows are the sweep's best at T 1, 8-32, 128, 512, 1024, 4096, 8192 (top-4 of 128 experts).
HOPPER = {
    "bf16": [
        (0.1, 16, Tile(64, 256, 4, 3, SWAP_AB), Tile(64, 128, 4, 3)),
        (0.5, 16, Tile(64, 128, 4, 3), Tile(64, 128, 4, 3)),
        (2, 16, Tile(64, 128, 4, 4, SWAP_AB), Tile(128, 128, 4, 3, SWAP_AB)),
        (8, 16, Tile(128, 128, 4, 3, SWAP_AB), Tile(128, 128, 4, 3, SWAP_AB)),
        (24, 32, Tile(64, 128, 4, 3), Tile(64, 128, 4, 3)),
        (64, 64, Tile(128, 128, 8, 3), Tile(128, 64, 4, 4)),
        (192, 128, Tile(128, 128, 8, 3), Tile(256, 64, 8, 4)),
        (None, 128, Tile(256, 64, 8, 4), Tile(256, 64, 8, 4)),
    ],
    "w8a16": [
        (0.1, 16, Tile(64, 256, 4, 3, SWAP_AB), Tile(128, 128, 4, 3, SWAP_AB)),
        (2, 16, Tile(128, 128, 4, 3, SWAP_AB), Tile(128, 128, 4, 3, SWAP_AB)),
        (8, 16, Tile(128, 128, 4, 3, SWAP_AB), Tile(128, 64, 4, 4)),
        (24, 32, Tile(64, 256, 4, 3, SWAP_AB), Tile(128, 128, 4, 3, SWAP_AB)),
        (64, 64, Tile(128, 128, 4, 3, SWAP_AB), Tile(128, 128, 4, 3, SWAP_AB)),  # swap beat plain by 7% here
        (192, 64, Tile(128, 64, 4, 4), Tile(128, 64, 4, 4)),
        (None, 128, Tile(128, 64, 4, 4), Tile(128, 64, 4, 4)),
    ],
    "w8a8": [
        (0.1, 16, Tile(64, 256, 4, 3, SWAP_AB), Tile(64, 128, 4, 4, SWAP_AB)),
        (0.5, 16, Tile(64, 256, 4, 3, SWAP_AB), Tile(128, 128, 4, 3, SWAP_AB)),
        (2, 16, Tile(128, 128, 4, 3, SWAP_AB), Tile(64, 128, 4, 4, SWAP_AB)),
        (8, 16, Tile(64, 256, 4, 3, SWAP_AB), Tile(64, 128, 4, 4, SWAP_AB)),
        (24, 32, Tile(64, 128, 4, 4, SWAP_AB), Tile(64, 128, 4, 3)),
        (64, 64, Tile(64, 128, 4, 3), Tile(64, 64, 4, 4)),
        (None, 64, Tile(64, 64, 4, 4), Tile(64, 64, 4, 4)),
    ],
}


# H200 W8A16 (scripts/bench_moe.py --sweep, then per-row variants, 2026-12-02; notes/kernels.md): tiles
# with the NVIDIA dequantization routes (resolve_dequant: "auto"); GEMM1 split over K at decode, where
# 4-32 row blocks leave SMs idle; no alignment launch up to T 8 (DIRECT: 30 vs 40 us at T 1, 100 vs 112
# at T 8; a tie at T 16).
DIRECT = "direct"
H200_W8A16 = [
    (0.1, 16, Tile(64, 256, 4, 3, SWAP_AB, split_k=4), Tile(64, 128, 4, 3), DIRECT),
    (0.25, 16, Tile(128, 128, 4, 3, SWAP_AB, split_k=4), Tile(128, 128, 4, 3, SWAP_AB), DIRECT),
    (0.5, 16, Tile(128, 128, 4, 3, SWAP_AB, split_k=4), Tile(128, 128, 4, 3, SWAP_AB)),
    (8, 16, Tile(128, 128, 4, 3, SWAP_AB), Tile(128, 128, 4, 2)),
    (24, 32, Tile(64, 128, 4, 3, SWAP_AB), Tile(128, 64, 4, 4)),
    (None, 64, Tile(128, 128, 4, 3, SWAP_AB), Tile(128, 64, 4, 4)),
]
# H200 W8A8 (scripts/bench_moe.py --compare-w8a8, 2026-12-02; notes/kernels.md): the W8A16 rows' tiles beat
# the H100 W8A8 rows at every T but 512 (a tie); FP8 dots, but BF16 dots at 1-2 tokens per expert (T 32:
# 261.6 vs 276.7 us).
BF16_DOT = "bf16"
H200_W8A8 = [
    (0.1, 16, Tile(64, 256, 4, 3, SWAP_AB, split_k=4), Tile(64, 128, 4, 3), DIRECT),
    (0.25, 16, Tile(128, 128, 4, 3, SWAP_AB, split_k=4), Tile(128, 128, 4, 3, SWAP_AB), DIRECT),
    (0.5, 16, Tile(128, 128, 4, 3, SWAP_AB, split_k=4), Tile(128, 128, 4, 3, SWAP_AB)),
    (2, 16, Tile(128, 128, 4, 3, SWAP_AB, w8a8=BF16_DOT), Tile(128, 128, 4, 2, w8a8=BF16_DOT)),
    (8, 16, Tile(128, 128, 4, 3, SWAP_AB), Tile(128, 128, 4, 2)),
    (24, 32, Tile(64, 128, 4, 3, SWAP_AB), Tile(128, 64, 4, 4)),
    (None, 64, Tile(128, 128, 4, 3, SWAP_AB), Tile(128, 64, 4, 4)),
]
TABLES = {"h100": HOPPER, "h200": {**HOPPER, "w8a16": H200_W8A16, "w8a8": H200_W8A8}}


def hopper_table(device: torch.device | str | None = None) -> dict:
    """The Hopper tile tables of this GPU model (H200 by name; any other Hopper takes the H100's)."""
    device = torch.device(device if device is not None else "cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else ""
    return TABLES["h200" if "H200" in name else "h100"]


def device_family(device: torch.device | str | None = None) -> str:
    """'gfx942', 'hopper', 'cpu' (the Triton interpreter) or 'other'."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return "cpu"
    props = torch.cuda.get_device_properties(device)
    if torch.version.hip:
        return "gfx942" if getattr(props, "gcnArchName", "").startswith("gfx94") else "other"
    return "hopper" if (props.major, props.minor) == (9, 0) else "other"


def native_mode(device: torch.device | str | None = None) -> str:
    """The faster MXFP8 formulation measured on this device: 'w8a8' or 'w8a16'."""
    return NATIVE_MODE[device_family(device)]


def fp8_format(device: torch.device | str | None = None) -> str:
    """How FNUZ weight bytes enter the dot: 'fnuz' natively on gfx942, 'fn' with scale - 1 elsewhere."""
    return "fnuz" if device_family(device) == "gfx942" else "fn"


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _gfx942(pairs: int, n: int, k: int, block_m: int) -> GemmTile:
    # The seed design's gfx942 rules (the vLLM pull request mxconvert grew from), not measured here.
    if block_m <= 16 and k <= 512:
        return GemmTile(64, 64, 2, 2)
    if block_m <= 16:
        return GemmTile(64, 128, 2, 2) if pairs < 32 else GemmTile(32, 128, 1, 2)
    if block_m >= 64 and n >= 2048 and k >= 2048:
        return GemmTile(64, 128, 2, 2)
    return GemmTile(128, 64, 4 if block_m <= 32 else 8, 2)


def moe_config(
    *,
    tokens: int,
    top_k: int,
    num_experts: int,
    hidden: int,
    intermediate: int,
    mode: str,
    device: torch.device | str | None = None,
) -> MoeConfig:
    """Tiles for GEMM1 (N 2I, K H) and GEMM2 (N H, K I) of one experts forward."""
    family = device_family(device)
    tpe = tokens * top_k / max(num_experts, 1)
    if family == "cpu":  # interpreter: small tiles keep the CPU tests quick
        return MoeConfig(16, GemmTile(32, 64, 4, 1), GemmTile(32, 64, 4, 1))
    if family == "gfx942":
        bm = min(max(_next_pow2(max(1, int(tpe))), 16), 64)
        pairs = tokens * top_k
        return MoeConfig(bm, _gfx942(pairs, 2 * intermediate, hidden, bm), _gfx942(pairs, hidden, intermediate, bm))
    for limit, bm, t1, t2, *flags in hopper_table(device)[mode]:
        if limit is None or tpe <= limit:
            return MoeConfig(bm, t1, t2, direct=DIRECT in flags)
    raise AssertionError("unreachable: the last row has no limit")
