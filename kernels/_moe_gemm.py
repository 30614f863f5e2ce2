"""Triton body: the fused MoE grouped GEMM over expert-sorted rows (vLLM's fused-MoE structure).

C[p, n] = sum_k A[p // A_DIV, k] * B[e, n, k] (* topk_weight[p]) for every pair p of a BLOCK_M block of
sorted_ids, e that block's expert. MODE 0: BF16 A and B. MODE 1 (W8A16): BF16 A, FP8 B times its E8M0
scale dequantized to BF16 in registers. MODE 2 (W8A8): FP8 A and B, one 32-wide FP8 dot per scale
group, rescaled by sa * sb into the fp32 accumulator. SWAP_AB computes C^T = B A^T, so the weight tile
fills the MMA's M side (wgmma needs 64) when a block holds few tokens.
"""

import triton
import triton.language as tl

from mxconvert.kernels._quant import _to_bf16


@triton.jit
def _e8m0(byte, SHIFT: tl.constexpr):
    # E8M0 byte -> 2**(byte - SHIFT - 127) as fp32, exactly, by placing it in the exponent field.
    return (tl.maximum(byte.to(tl.int32) - SHIFT, 0) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _dequant(b, scale):
    # FP8 b times a power-of-two fp32 scale, as BF16: exact (FP8 has 4 significant bits). Through fp32:
    # on the H100 a BF16 multiply after a native FP8 -> BF16 cast measured 7-22% slower (notes/kernels.md).
    return (b.to(tl.float32) * scale).to(tl.bfloat16)


@triton.jit
def _dot(x, y, acc, UPCAST: tl.constexpr):
    # UPCAST: the Triton interpreter multiplies BF16 dots as integers; fp32 is exact there.
    if UPCAST:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(x, y, acc)


@triton.jit
def _fused_moe_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    c_ptr,
    w_ptr,
    sorted_ptr,
    expert_ids_ptr,
    num_post_pad_ptr,
    N,
    K,
    P,
    stride_am,
    stride_asm,
    stride_be,
    stride_bn,
    stride_bse,
    stride_bsg,
    stride_cm,
    A_DIV: tl.constexpr,
    MODE: tl.constexpr,
    SCALE_SHIFT: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    SWAP_AB: tl.constexpr,
    UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Shape legend: P pairs, N out, K in, G = K / 32; A [P / A_DIV, K], B [E, N, K], C [P, N].
    pid = tl.program_id(0)
    num_m = tl.cdiv(tl.load(num_post_pad_ptr), BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    if first_m >= num_m:
        return  # a surplus program of the worst-case grid
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m

    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < P
    rows = tl.where(row_ok, pairs // A_DIV, 0)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    b_base = b_ptr + expert * stride_be
    bs_base = bs_ptr + expert * stride_bse

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    G: tl.constexpr = BLOCK_K // 32

    for k0 in range(0, K, BLOCK_K):
        if MODE == 2:
            # W8A8: per 32-group FP8 dot, then both scales in fp32 (a scale may not cross groups).
            for g in tl.static_range(G):
                kk = k0 + g * 32 + tl.arange(0, 32)
                k_ok = (kk < K) | EVEN_K
                grp = tl.minimum(k0 // 32 + g, K // 32 - 1)  # past K: any scale, the values are masked to 0
                sa = _e8m0(tl.load(as_ptr + rows * stride_asm + grp, mask=row_ok, other=127), 0)
                sb = _e8m0(tl.load(bs_base + grp * stride_bsg + offs_n, mask=n_ok, other=127), SCALE_SHIFT)
                if SWAP_AB:
                    a = tl.load(
                        a_ptr + rows[None, :] * stride_am + kk[:, None], mask=row_ok[None, :] & k_ok[:, None], other=0.0
                    )
                    b = tl.load(
                        b_base + offs_n[:, None] * stride_bn + kk[None, :],
                        mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0,
                    )
                    part = tl.dot(b, a)
                    acc += part * (sb[:, None] * sa[None, :])
                else:
                    a = tl.load(
                        a_ptr + rows[:, None] * stride_am + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
                    )
                    b = tl.load(
                        b_base + offs_n[None, :] * stride_bn + kk[:, None],
                        mask=n_ok[None, :] & k_ok[:, None],
                        other=0.0,
                    )
                    part = tl.dot(a, b)
                    acc += part * (sa[:, None] * sb[None, :])
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = (kk < K) | EVEN_K  # EVEN_K: no K tail, so no mask for the compiler to keep
            gg = k0 // 32 + tl.arange(0, G)
            if SWAP_AB:
                a = tl.load(
                    a_ptr + rows[None, :] * stride_am + kk[:, None], mask=row_ok[None, :] & k_ok[:, None], other=0.0
                )
                b = tl.load(
                    b_base + offs_n[:, None] * stride_bn + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0
                )
                if MODE == 1:
                    sb = _e8m0(
                        tl.load(
                            bs_base + gg[None, :] * stride_bsg + offs_n[:, None],
                            mask=n_ok[:, None] & (gg[None, :] < K // 32),
                            other=127,
                        ),
                        SCALE_SHIFT,
                    )
                    b = tl.reshape(_dequant(tl.reshape(b, (BLOCK_N, G, 32)), sb[:, :, None]), (BLOCK_N, BLOCK_K))
                acc = _dot(b, a, acc, UPCAST)
            else:
                a = tl.load(
                    a_ptr + rows[:, None] * stride_am + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
                )
                b = tl.load(
                    b_base + offs_n[None, :] * stride_bn + kk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0
                )
                if MODE == 1:
                    sb = _e8m0(
                        tl.load(
                            bs_base + gg[:, None] * stride_bsg + offs_n[None, :],
                            mask=n_ok[None, :] & (gg[:, None] < K // 32),
                            other=127,
                        ),
                        SCALE_SHIFT,
                    )
                    b = tl.reshape(_dequant(tl.reshape(b, (G, 32, BLOCK_N)), sb[:, None, :]), (BLOCK_K, BLOCK_N))
                acc = _dot(a, b, acc, UPCAST)

    if SWAP_AB:
        if MUL_WEIGHT:
            acc = acc * tl.load(w_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + pairs[None, :].to(tl.int64) * stride_cm + offs_n[:, None]
        tl.store(c_ptrs, _to_bf16(acc, UPCAST), mask=row_ok[None, :] & n_ok[:, None])
    else:
        if MUL_WEIGHT:
            acc = acc * tl.load(w_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        c_ptrs = c_ptr + pairs[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, _to_bf16(acc, UPCAST), mask=row_ok[:, None] & n_ok[None, :])
