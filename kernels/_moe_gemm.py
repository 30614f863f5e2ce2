"""Triton body: the fused MoE grouped GEMM over expert-sorted rows (vLLM's fused-MoE structure).

C[p, n] = sum_k A[p // A_DIV, k] * B[e, n, k] (* topk_weight[p]) for every pair p of a BLOCK_M block of
sorted_ids, e that block's expert. MODE 0: BF16 A and B. MODE 1 (W8A16): BF16 A, FP8 B times its E8M0
scale dequantized to BF16 in registers. MODE 2 (W8A8): FP8 A and B, one 32-wide FP8 dot per scale
group, rescaled by sa * sb into the fp32 accumulator. SWAP_AB computes C^T = B A^T, so the weight tile
fills the MMA's M side (wgmma needs 64) when a block holds few tokens. SPLIT_K > 1 (no top-k weights):
program axis 1 takes one K slice and stores fp32 partials [SPLIT_K, P, N] that the consumer sums, so
more CTAs stream weights when few blocks exist (decode).

W8A16 dequantization (DEQUANT): 0 through fp32 (portable); 1 bit placement: the E4M3 byte's sign and 7
exponent-mantissa bits go straight into a BF16 pattern (exact, subnormals included: value * 2**-119 read
as FNUZ) and the bias difference rides on the power-of-two scale; 2 the same in NVIDIA inline PTX, four
weights per instance (prmt + shifts + two packed BF16 multiplies).
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
def _route_scale(byte, DEQUANT: tl.constexpr, FP32: tl.constexpr):
    # The power-of-two factor each route multiplies by last, from the E8M0 byte s (FNUZ reading):
    # routes 1-2 (bit placement, value * 2**-119, then * 2**127): 2**(s - 135); 3 (cvt as E4M3FN, f16 bits
    # shifted into BF16: value * 2**-111, then * 2**112): 2**(s - 128); 4: 2**(s - 8) and 5: 2**(s - 16),
    # one multiply, so only for s <= 135 / 143. Subnormal BF16 scales keep the small bytes exact.
    s = byte.to(tl.int32)
    if FP32:  # interpreter, routes 1-2: exact fp32 (subnormal below byte 9)
        bits = tl.where(s >= 9, (s - 8) << 23, 1 << (s + 14))
        return bits.to(tl.float32, bitcast=True)
    else:
        if DEQUANT <= 2:
            bits = tl.where(s >= 9, (s - 8) << 7, tl.where(s >= 2, 1 << tl.maximum(s - 2, 0), 0))
        elif DEQUANT == 3 or DEQUANT == 7:
            bits = tl.where(s >= 2, (s - 1) << 7, 1 << (s + 5))
        elif DEQUANT == 4:
            bits = (s + 119) << 7
        else:  # 5, 6
            bits = (s + 111) << 7
        return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _dequant_bits(b, scale, FP32: tl.constexpr):
    # uint8 E4M3 bytes -> BF16 by bit placement: sign to bit 15, exponent-mantissa to bits 4..10 (an exact
    # BF16 of the FNUZ value times 2**-119), then * 2**127 * scale. FP32: the interpreter's exact route.
    v = b.to(tl.int32)
    bits = ((v & 0x80) << 8) | ((v & 0x7F) << 4)
    if FP32:
        x = (bits << 16).to(tl.float32, bitcast=True) * 1.7014118346046923e38  # 2**127
        return _to_bf16(x * scale, True)
    else:
        x = bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
        return x * 1.7014118346046923e38 * scale


# Four weights per instance: $2 holds four bytes, $3 / $4 the scales of weights 0-1 / 2-3 (bf16x2),
# $0 / $1 the BF16 results. fma with -0 is an exact multiply (every factor is a power of two).
_ASM_BITS = """
        {
        .reg .b32 t0, t1, m0, m1, nz;
        prmt.b32 t0, $2, 0, 0x1404;
        prmt.b32 t1, $2, 0, 0x3424;
        shr.b32 m0, t0, 4;
        shr.b32 m1, t1, 4;
        and.b32 m0, m0, 0x07F007F0;
        and.b32 m1, m1, 0x07F007F0;
        and.b32 t0, t0, 0x80008000;
        and.b32 t1, t1, 0x80008000;
        or.b32 t0, t0, m0;
        or.b32 t1, t1, m1;
        mov.b32 nz, 0x80008000;
"""
_ASM_F16 = """
        {
        .reg .b16 lo, hi;
        .reg .b32 t0, t1, m0, m1, nz;
        mov.b32 {lo, hi}, $2;
        cvt.rn.f16x2.e4m3x2 t0, lo;
        cvt.rn.f16x2.e4m3x2 t1, hi;
        shr.b32 m0, t0, 3;
        shr.b32 m1, t1, 3;
        and.b32 m0, m0, 0x0FFF0FFF;
        and.b32 m1, m1, 0x0FFF0FFF;
        and.b32 t0, t0, 0x80008000;
        and.b32 t1, t1, 0x80008000;
        or.b32 t0, t0, m0;
        or.b32 t1, t1, m1;
        mov.b32 nz, 0x80008000;
"""
_ASM_BIG = """
        {
        .reg .b32 big;
        mov.b32 big, BIG;
        fma.rn.bf16x2 t0, t0, big, nz;
        fma.rn.bf16x2 t1, t1, big, nz;
        }
"""
_ASM_SCALE = """
        fma.rn.bf16x2 $0, t0, $3, nz;
        fma.rn.bf16x2 $1, t1, $4, nz;
        }
"""
ASM_BITS = tl.constexpr(_ASM_BITS + _ASM_BIG.replace("BIG", "0x7F007F00") + _ASM_SCALE)  # 2**127
ASM_F16 = tl.constexpr(_ASM_F16 + _ASM_BIG.replace("BIG", "0x77807780") + _ASM_SCALE)  # 2**112
ASM_BITS1 = tl.constexpr(_ASM_BITS + _ASM_SCALE)
ASM_F16_1 = tl.constexpr(_ASM_F16 + _ASM_SCALE)
# Two weights per instance ($1: two bytes as .b16): matches the pairs of the wgmma register operand.
ASM_F16_PAIR = tl.constexpr("""
        {
        .reg .b32 t, m, nz;
        cvt.rn.f16x2.e4m3x2 t, $1;
        shr.b32 m, t, 3;
        and.b32 m, m, 0x0FFF0FFF;
        and.b32 t, t, 0x80008000;
        or.b32 t, t, m;
        mov.b32 nz, 0x80008000;
        fma.rn.bf16x2 $0, t, $2, nz;
        }
""")
ASM_F16_PAIR2 = tl.constexpr(
    ASM_F16_PAIR.value.replace(
        "fma.rn.bf16x2 $0, t, $2, nz;", "mov.b32 m, 0x77807780;\n        fma.rn.bf16x2 t, t, m, nz;\n        fma.rn.bf16x2 $0, t, $2, nz;"
    )
)


@triton.jit
def _dequant_asm(b, scale, DEQUANT: tl.constexpr):
    # NVIDIA inline PTX of routes 2-5; b: uint8 bytes, scale: BF16 from _route_scale.
    if DEQUANT == 6:
        return tl.inline_asm_elementwise(
            asm=ASM_F16_PAIR, constraints="=r,h,r", args=[b, scale], dtype=tl.bfloat16, is_pure=True, pack=2
        )
    if DEQUANT == 7:
        return tl.inline_asm_elementwise(
            asm=ASM_F16_PAIR2, constraints="=r,h,r", args=[b, scale], dtype=tl.bfloat16, is_pure=True, pack=2
        )
    if DEQUANT == 2:
        asm: tl.constexpr = ASM_BITS
    elif DEQUANT == 3:
        asm: tl.constexpr = ASM_F16
    elif DEQUANT == 4:
        asm: tl.constexpr = ASM_BITS1
    else:
        asm: tl.constexpr = ASM_F16_1
    return tl.inline_asm_elementwise(
        asm=asm, constraints="=r,=r,r,r,r", args=[b, scale], dtype=tl.bfloat16, is_pure=True, pack=4
    )


@triton.jit
def _w8a16_tile(
    b,
    bs_ptrs,
    bs_mask,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    SCALE_SHIFT: tl.constexpr,
    DEQUANT: tl.constexpr,
    UPCAST: tl.constexpr,
    SCALE_AXIS: tl.constexpr,
):
    # A weight tile (FP8 view, or uint8 bytes when DEQUANT > 0) times its E8M0 scales -> BF16 [ROWS, COLS].
    # SCALE_AXIS 1: tile [N, K], scales [N, G]; 0: tile [K, N], scales [G, N].
    byte = tl.load(bs_ptrs, mask=bs_mask, other=127)
    if DEQUANT == 0:
        sc = _e8m0(byte, SCALE_SHIFT)
    else:
        sc = _route_scale(byte, DEQUANT, UPCAST)
    if SCALE_AXIS == 1:
        b3 = tl.reshape(b, (ROWS, COLS // 32, 32))
        sc = tl.broadcast_to(sc[:, :, None], (ROWS, COLS // 32, 32))
    else:
        b3 = tl.reshape(b, (ROWS // 32, 32, COLS))
        sc = tl.broadcast_to(sc[:, None, :], (ROWS // 32, 32, COLS))
    if DEQUANT == 0:
        w = _dequant(b3, sc)
    elif DEQUANT == 1 or UPCAST:
        w = _dequant_bits(b3, sc, UPCAST)
    else:
        w = _dequant_asm(b3, sc, DEQUANT)
    return tl.reshape(w, (ROWS, COLS))


@triton.jit
def _dot(x, y, acc, UPCAST: tl.constexpr):
    # UPCAST: the Triton interpreter multiplies BF16 dots as integers; fp32 is exact there.
    if UPCAST:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(x, y, acc)


@triton.jit
def _k_step(acc, k0, a_ptr, as_ptr, b_base, bs_base, rows, row_ok, offs_n, n_ok, K, stride_am, stride_asm, stride_bn,
            stride_bsg, MODE: tl.constexpr, SCALE_SHIFT: tl.constexpr, SWAP_AB: tl.constexpr, UPCAST: tl.constexpr,
            EVEN_K: tl.constexpr, DEQUANT: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    # One BLOCK_K step of the accumulation (see the module docstring for the modes).
    G: tl.constexpr = BLOCK_K // 32
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
                    b_base + offs_n[:, None] * stride_bn + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0
                )
                acc += tl.dot(b, a) * (sb[:, None] * sa[None, :])
            else:
                a = tl.load(
                    a_ptr + rows[:, None] * stride_am + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
                )
                b = tl.load(
                    b_base + offs_n[None, :] * stride_bn + kk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0
                )
                acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
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
                b = _w8a16_tile(
                    b,
                    bs_base + gg[None, :] * stride_bsg + offs_n[:, None],
                    n_ok[:, None] & (gg[None, :] < K // 32),
                    b.shape[0],
                    BLOCK_K,
                    SCALE_SHIFT,
                    DEQUANT,
                    UPCAST,
                    1,
                )
            acc = _dot(b, a, acc, UPCAST)
        else:
            a = tl.load(
                a_ptr + rows[:, None] * stride_am + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )
            b = tl.load(
                b_base + offs_n[None, :] * stride_bn + kk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0
            )
            if MODE == 1:
                b = _w8a16_tile(
                    b,
                    bs_base + gg[:, None] * stride_bsg + offs_n[None, :],
                    n_ok[None, :] & (gg[:, None] < K // 32),
                    BLOCK_K,
                    b.shape[1],
                    SCALE_SHIFT,
                    DEQUANT,
                    UPCAST,
                    0,
                )
            acc = _dot(a, b, acc, UPCAST)
    return acc


@triton.jit
def _store_c(acc, c_ptr, w_ptr, pairs, row_ok, offs_n, n_ok, stride_cm, MUL_WEIGHT: tl.constexpr,
             SWAP_AB: tl.constexpr, UPCAST: tl.constexpr, FP32_OUT: tl.constexpr):  # fmt: skip
    # (* top-k weight) and store: BF16, or fp32 split-K partials.
    if SWAP_AB:
        if MUL_WEIGHT:
            acc = acc * tl.load(w_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + pairs[None, :].to(tl.int64) * stride_cm + offs_n[:, None]
        if FP32_OUT:
            tl.store(c_ptrs, acc, mask=row_ok[None, :] & n_ok[:, None])
        else:
            tl.store(c_ptrs, _to_bf16(acc, UPCAST), mask=row_ok[None, :] & n_ok[:, None])
    else:
        if MUL_WEIGHT:
            acc = acc * tl.load(w_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        c_ptrs = c_ptr + pairs[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
        if FP32_OUT:
            tl.store(c_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])
        else:
            tl.store(c_ptrs, _to_bf16(acc, UPCAST), mask=row_ok[:, None] & n_ok[None, :])


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
    E,
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
    DEQUANT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Shape legend: P pairs, N out, K in, G = K / 32; A [P / A_DIV, K], B [E, N, K], C [P, N]
    # (SPLIT_K > 1: fp32 C [SPLIT_K, P, N]). DIRECT: no alignment; program row block m is pair m alone and
    # expert_ids_ptr the flat top-k ids (decode: skips the alignment launch; pairs sharing an expert stream
    # its weights once each).
    pid = tl.program_id(0)
    if DIRECT:
        num_m = P
    else:
        num_m = tl.cdiv(tl.load(num_post_pad_ptr), BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    if first_m >= num_m:
        return  # a surplus program of the worst-case grid
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m

    if DIRECT:
        pairs = pid_m + tl.zeros((BLOCK_M,), tl.int32)
        row_ok = tl.arange(0, BLOCK_M) == 0
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        if (expert < 0) | (expert >= E):
            return  # an expert held elsewhere: the row stays unwritten
    else:
        pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = pairs < P
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    rows = tl.where(row_ok, pairs // A_DIV, 0)
    b_base = b_ptr + expert * stride_be
    bs_base = bs_ptr + expert * stride_bse

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = 0
    k_hi = K
    if SPLIT_K > 1:  # this program's K slice, whole BLOCK_K steps; fp32 partials
        per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_lo = tl.program_id(1) * per
        k_hi = tl.minimum(k_lo + per, K)
        c_ptr += tl.program_id(1).to(tl.int64) * P * stride_cm

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    for k0 in range(k_lo, k_hi, BLOCK_K):
        acc = _k_step(acc, k0, a_ptr, as_ptr, b_base, bs_base, rows, row_ok, offs_n, n_ok, K, stride_am, stride_asm,
                      stride_bn, stride_bsg, MODE, SCALE_SHIFT, SWAP_AB, UPCAST, EVEN_K, DEQUANT, BLOCK_K)  # fmt: skip
    _store_c(acc, c_ptr, w_ptr, pairs, row_ok, offs_n, n_ok, stride_cm, MUL_WEIGHT, SWAP_AB, UPCAST, SPLIT_K > 1)
