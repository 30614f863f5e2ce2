"""The fused MoE grouped GEMM: launch wrapper and its pure-torch reference.

Shape legend: T tokens, k slots, P = T * k pairs, E experts, N out, K in, G = K / 32.
A is [T, K] (a_div = k: GEMM1 reads each token for each of its slots) or [P, K] (a_div = 1: GEMM2).
B is [E, N, K]: BF16, or FP8 bytes with E8M0 scales packed [E, G, N] (docs/FORMAT.md).
"""

import torch

from mxconvert.errors import MxconvertError
from mxconvert.kernels._moe_gemm import _fused_moe_kernel
from mxconvert.kernels.align import Alignment
from mxconvert.kernels.config import GemmTile
from mxconvert.layout import BLOCK, dequantize, unpack_scales

MODES = {"bf16": 0, "w8a16": 1, "w8a8": 2}
# W8A16 dequantization routes (_moe_gemm.py); the NVIDIA ones ("asm_*") need every scale byte <= 143
DEQUANT = {"fp32": 0, "bits": 1, "asm_f16_1": 2, "asm_f16_pair": 3}
# W8A8 dot formulations (_moe_gemm.py W8A8_DOT): FP8 dots per 32-group rescaled in fp32, or both operands
# dequantized exactly to BF16 (the weights by the W8A16 route) and one BF16 dot per step
W8A8_DOT = {"fp8": 0, "bf16": 1}
FP8_VIEW = {"fn": torch.float8_e4m3fn, "fnuz": torch.float8_e4m3fnuz}


def interpreted() -> bool:
    """Whether the kernels were defined under TRITON_INTERPRET=1 (Triton reads it at definition): then they
    run on the CPU."""
    return type(_fused_moe_kernel).__name__ == "InterpretedFunction"


def moe_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    align: Alignment | None,
    num_pairs: int,
    a_div: int,
    tile: GemmTile,
    mode: str,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    fp8_format: str = "fn",
    topk_weights: torch.Tensor | None = None,
    zero: bool = False,
    topk_ids: torch.Tensor | None = None,
    block_m: int = 16,
) -> torch.Tensor:
    """C [P, N] BF16 = A[p // a_div] @ B[expert(p)]^T (* topk_weights[p]); no host synchronization.
    Rows of pairs that no block holds (ids outside [0, E)) are left unwritten: zeros with zero=True.
    tile.split_k > 1: fp32 partial sums [split_k, P, N] instead, which the caller adds up.
    align None: no alignment, each pair its own block_m block (topk_ids [T, k] int32 give the experts).

    FP8 B bytes are E4M3FNUZ. fp8_format "fnuz" feeds them to the dot as they are (gfx942); "fn" reads
    them as E4M3FN, which doubles each value, and lowers every scale exponent by one (exact) to undo it.
    """
    e, n, k = b.shape
    if k % BLOCK or a.shape[-1] != k:
        raise MxconvertError(
            "moe_gemm", f"K {k} of B [{e}, {n}, {k}] vs A {tuple(a.shape)}", "K must match and be a multiple of 32"
        )
    if mode != "bf16" and (b_scale is None or tuple(b_scale.shape) != (e, k // BLOCK, n)):
        raise MxconvertError(
            "moe_gemm",
            f"scales {None if b_scale is None else tuple(b_scale.shape)}",
            f"pass packed E8M0 scales [{e}, {k // BLOCK}, {n}]",
        )
    if mode == "w8a8" and (a_scale is None or a.dtype not in FP8_VIEW.values()):
        raise MxconvertError("moe_gemm", "w8a8 without FP8 activations", "quantize A with quantize_mxfp8")
    if align is None and (topk_ids is None or topk_ids.numel() != num_pairs):
        raise MxconvertError("moe_gemm", "no alignment and no topk_ids", "pass align or topk_ids [T, k]")
    split = tile.split_k
    shape, dtype = ((split, num_pairs, n), torch.float32) if split > 1 else ((num_pairs, n), torch.bfloat16)
    c = (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=a.device)
    if num_pairs == 0:
        return c
    w8a8 = tile.w8a8 if mode == "w8a8" else "fp8"
    if w8a8 not in W8A8_DOT:
        raise MxconvertError("moe_gemm", f"w8a8 {w8a8!r}", f"use one of {sorted(W8A8_DOT)}")
    converts_b = mode == "w8a16" or w8a8 == "bf16"
    dequant = resolve_dequant(tile.dequant, a.device, tile.swap_ab) if converts_b else "fp32"
    if mode != "bf16":  # bit-placement dequantization reads the bytes as they are
        b = b.view(torch.uint8) if dequant != "fp32" else b.view(torch.uint8).view(FP8_VIEW[fp8_format])
    if mode == "w8a8":
        a = a.view(torch.uint8).view(FP8_VIEW[fp8_format])
    n_tiles = -(-n // tile.block_n)
    dummy = c
    if align is None:
        ids = topk_ids.reshape(-1)
        blocks, bm, sorted_ids, expert_ids, num_post_pad = num_pairs, block_m, ids, ids, ids
    else:
        blocks, bm = align.max_blocks, align.block_m
        sorted_ids, expert_ids, num_post_pad = align.sorted_ids, align.expert_ids, align.num_post_pad
    _fused_moe_kernel[(blocks * n_tiles, split)](
        a,
        a_scale if a_scale is not None else dummy,
        b,
        b_scale if b_scale is not None else dummy,
        c,
        topk_weights if topk_weights is not None else dummy,
        sorted_ids,
        expert_ids,
        num_post_pad,
        n,
        k,
        num_pairs,
        e,
        a.stride(0),
        a_scale.stride(0) if a_scale is not None else 0,
        b.stride(0),
        b.stride(1),
        b_scale.stride(0) if b_scale is not None else 0,
        b_scale.stride(1) if b_scale is not None else 0,
        c.stride(-2),
        A_DIV=a_div,
        MODE=MODES[mode],
        SCALE_SHIFT=int(fp8_format == "fn"),
        MUL_WEIGHT=topk_weights is not None,
        SWAP_AB=tile.swap_ab,
        UPCAST=a.device.type == "cpu",
        EVEN_K=k % tile.block_k == 0,
        DEQUANT=DEQUANT[dequant],
        W8A8_DOT=W8A8_DOT[w8a8],
        SPLIT_K=split,
        DIRECT=align is None,
        BLOCK_M=bm,
        BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k,
        GROUP_M=tile.group_m,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
    return c


def resolve_dequant(dequant: str, device: torch.device, swap_ab: bool = False) -> str:
    """'auto' -> the W8A16 dequantization route for the device and tile orientation: on NVIDIA the inline-PTX
    f16 route, two weights per instance in the swap-AB (wgmma register operand) layout, four otherwise;
    bit placement in plain Triton under the interpreter; the fp32 route elsewhere (gfx942: not measured).
    The NVIDIA routes need every scale byte <= 143 (MAX_SCALE_BYTE): MoELayer checks once at load and
    falls back to "fp32"; off NVIDIA they run as "bits"."""
    if dequant != "auto":
        if dequant not in DEQUANT:
            raise MxconvertError("moe_gemm", f"dequant {dequant!r}", f"use one of {sorted(DEQUANT)} or 'auto'")
        return "bits" if dequant.startswith("asm") and device.type != "cuda" else dequant
    if device.type == "cpu":
        return "bits"
    if torch.version.hip is not None:
        return "fp32"
    return "asm_f16_pair" if swap_ab else "asm_f16_1"


# The largest E8M0 byte each route decodes exactly (the others: every byte).
MAX_SCALE_BYTE = {"asm_f16_1": 143, "asm_f16_pair": 143}


def dequantized_weights(b: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """FNUZ bytes [E, N, K] + packed scales [E, G, N] -> exact float32 values (layout's rules)."""
    return dequantize(b.view(torch.uint8), unpack_scales(b_scale), fnuz=True, dtype=torch.float64).float()


def moe_gemm_reference(
    a: torch.Tensor, b: torch.Tensor, topk_ids: torch.Tensor, *, a_div: int, topk_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 C [P, N] from float A and float B [E, N, K] (dequantize first), one expert at a time."""
    ids = topk_ids.reshape(-1)
    c = torch.zeros(ids.numel(), b.shape[1], dtype=torch.float32, device=a.device)
    for e in ids.unique().tolist():
        p = (ids == e).nonzero().flatten()
        c[p] = a[p // a_div].float() @ b[e].float().T
    if topk_weights is not None:
        c *= topk_weights.reshape(-1, 1).float()
    return c
