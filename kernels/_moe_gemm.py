"""Triton body: the fused MoE grouped GEMM over expert-sorted rows (vLLM's fused-MoE structure).

C[p, n] = sum_k A[p // A_DIV, k] * B[e, n, k] (* topk_weight[p]) for every pair p of a BLOCK_M block of
sorted_ids, e that block's expert. MODE 0: BF16 A and B. MODE 1 (W8A16): BF16 A, FP8 B times its E8M0
scale dequantized to BF16 in registers. MODE 2 (W8A8): FP8 A and B with E8M0 scales per 32 along K, by
W8A8_DOT: 0 one 32-wide FP8 dot per scale group, rescaled by sa * sb into the fp32 accumulator, the scale
bytes loaded into registers one step ahead (they feed no dot, so Triton's pipeliner would leave them as
synchronous loads in the step: up to 1.5x slower on the H200); 1 both operands dequantized exactly to BF16
(A times sa, its bytes prefetched likewise; B times sb by the W8A16 route DEQUANT) and one BF16 dot per step
on the loop-carried accumulator. SWAP_AB computes C^T = B A^T, so the weight tile fills the MMA's M side
(wgmma needs 64) when a block holds few tokens. SPLIT_K > 1 (no top-k weights):
program axis 1 takes one K slice and stores fp32 partials [SPLIT_K, P, N] that the consumer sums, so
more CTAs stream weights when few blocks exist (decode).

W8A16 dequantization (DEQUANT; moe_gemm.DEQUANT names them): 0 "fp32", through fp32 (portable); 1 "bits",
bit placement: the E4M3 byte's sign and 7 exponent-mantissa bits go straight into a BF16 pattern (exact,
subnormals included: value * 2**-119 read as FNUZ) and the bias difference rides on the power-of-two scale
(plain Triton; what the interpreter runs); 2 "asm_f16_1" / 3 "asm_f16_pair", NVIDIA inline PTX: hardware
E4M3 -> f16, f16 bits shifted into BF16, one packed multiply by the scale (bytes <= 143), four weights per
instance on plain tiles, two on swap-AB tiles (notes/kernels.md has the routes tried and dropped).
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
    # The power-of-two factor each bit route multiplies by last, from the E8M0 byte s (FNUZ reading):
    # route 1 (bit placement: value * 2**-119, then * 2**127): 2**(s - 135), subnormal below byte 9, exact
    # down to byte 2 in BF16 and byte 0 in fp32 (FP32: the interpreter); routes 2-3 (cvt as E4M3FN, f16 bits
    # shifted into BF16: value * 2**-111): 2**(s - 16) in one multiply, so scale bytes <= 143 only.
    s = byte.to(tl.int32)
    if FP32:
        bits = tl.where(s >= 9, (s - 8) << 23, 1 << (s + 14))
        return bits.to(tl.float32, bitcast=True)
    else:
        if DEQUANT == 1:
            bits = tl.where(s >= 9, (s - 8) << 7, tl.where(s >= 2, 1 << tl.maximum(s - 2, 0), 0))
        else:
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


# Route 2, four weights per instance ($2: four bytes; $3 / $4: the BF16 scales of weights 0-1 / 2-3; $0 / $1:
# BF16 results): hardware cvt E4M3FN -> f16 (exact), the f16 bits shifted right by 3 are a BF16 of the value
# times 2**-112 (zero stays zero; E4M3 gives no f16 subnormals), sign put back; fma with -0 is an exact
# multiply by the power-of-two scale.
ASM_F16X4 = tl.constexpr("""
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
        fma.rn.bf16x2 $0, t0, $3, nz;
        fma.rn.bf16x2 $1, t1, $4, nz;
        }
""")
# Route 3, two weights per instance ($1: two bytes as .b16): the (k, k+1) pair a 2-byte LDS brings and a
# wgmma register operand holds, so Triton packs and unpacks nothing around it (swap-AB tiles).
ASM_F16X2 = tl.constexpr("""
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


@triton.jit
def _dequant_asm(b, scale, DEQUANT: tl.constexpr):
    # NVIDIA inline PTX of routes 2 (four weights per instance) and 3 (two); b: uint8 bytes, scale: BF16.
    if DEQUANT == 2:
        return tl.inline_asm_elementwise(
            asm=ASM_F16X4, constraints="=r,=r,r,r,r", args=[b, scale], dtype=tl.bfloat16, is_pure=True, pack=4
        )
    else:
        return tl.inline_asm_elementwise(
            asm=ASM_F16X2, constraints="=r,h,r", args=[b, scale], dtype=tl.bfloat16, is_pure=True, pack=2
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
    return _scaled_tile(b, byte, ROWS, COLS, SCALE_SHIFT, DEQUANT, UPCAST, SCALE_AXIS)


@triton.jit
def _scaled_tile(b, byte, ROWS: tl.constexpr, COLS: tl.constexpr, SCALE_SHIFT: tl.constexpr, DEQUANT: tl.constexpr,
                 UPCAST: tl.constexpr, SCALE_AXIS: tl.constexpr):  # fmt: skip
    # _w8a16_tile with the scale bytes already loaded.
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
def _col(x, g: tl.constexpr, G: tl.constexpr):
    # Column g of x [R, G] (G 1, 2, 4 or 8) by in-register splits, lowest index bit first: no gather.
    R: tl.constexpr = x.shape[0]
    y = x
    if G >= 2:
        y0, y1 = tl.split(tl.reshape(y, (R, G // 2, 2)))
        y = _pick(y0, y1, g % 2)
    if G >= 4:
        y0, y1 = tl.split(tl.reshape(y, (R, G // 4, 2)))
        y = _pick(y0, y1, (g // 2) % 2)
    if G >= 8:
        y0, y1 = tl.split(tl.reshape(y, (R, G // 8, 2)))
        y = _pick(y0, y1, (g // 4) % 2)
    return tl.reshape(y, (R,))


@triton.jit
def _pick(y0, y1, one: tl.constexpr):
    if one:
        return y1
    else:
        return y0


@triton.jit
def _dot(x, y, acc, UPCAST: tl.constexpr):
    # UPCAST: the Triton interpreter multiplies BF16 dots as integers; fp32 is exact there.
    if UPCAST:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(x, y, acc)


@triton.jit
def _w8a8_scale_bytes(k0, as_ptr, bs_base, rows, row_ok, offs_n, n_ok, K, stride_asm, stride_bsg,
                      BLOCK_K: tl.constexpr, WITH_B: tl.constexpr):  # fmt: skip
    # One step's E8M0 bytes: A's [BLOCK_M, G] and (WITH_B) B's [BLOCK_N, G] (past K: 127, never used).
    gg = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    g_ok = gg < K // 32
    sab = tl.load(as_ptr + rows[:, None] * stride_asm + gg[None, :], mask=row_ok[:, None] & g_ok[None, :], other=127)
    if WITH_B:
        sbb = tl.load(
            bs_base + gg[None, :] * stride_bsg + offs_n[:, None], mask=n_ok[:, None] & g_ok[None, :], other=127
        )
    else:
        sbb = sab
    return sab, sbb


@triton.jit
def _k_step(acc, k0, a_ptr, as_ptr, b_base, bs_base, rows, row_ok, offs_n, n_ok, K, stride_am, stride_asm, stride_bn,
            stride_bsg, sab, sbb, MODE: tl.constexpr, SCALE_SHIFT: tl.constexpr, SWAP_AB: tl.constexpr,
            UPCAST: tl.constexpr, EVEN_K: tl.constexpr, DEQUANT: tl.constexpr, W8A8_DOT: tl.constexpr,
            BLOCK_K: tl.constexpr):  # fmt: skip
    # One BLOCK_K step of the accumulation (see the module docstring for the modes); sab / sbb: this step's
    # prefetched W8A8 scale bytes.
    G: tl.constexpr = BLOCK_K // 32
    if MODE == 2 and W8A8_DOT == 0:
        # W8A8: per 32-group FP8 dot, then both scales in fp32 (a scale may not cross groups).
        for g in tl.static_range(G):
            kk = k0 + g * 32 + tl.arange(0, 32)
            k_ok = (kk < K) | EVEN_K
            sa = _e8m0(_col(sab, g, G), 0)
            sb = _e8m0(_col(sbb, g, G), SCALE_SHIFT)
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
            if MODE == 2:  # W8A8 as BF16: A [K, M] times its prefetched scales, exactly (fp32 route)
                a = _scaled_tile(
                    a,
                    tl.trans(sab),
                    BLOCK_K,
                    a.shape[1],
                    0,
                    0,
                    UPCAST,
                    0,
                )
            if MODE >= 1:
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
            if MODE == 2:  # W8A8 as BF16: A [M, K] times its prefetched scales, exactly (fp32 route)
                a = _scaled_tile(
                    a,
                    sab,
                    a.shape[0],
                    BLOCK_K,
                    0,
                    0,
                    UPCAST,
                    1,
                )
            if MODE >= 1:
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
    W8A8_DOT: tl.constexpr,
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
    if MODE == 2:  # W8A8 scale bytes one step ahead, in registers (BF16 dots: A's only)
        sab, sbb = _w8a8_scale_bytes(k_lo, as_ptr, bs_base, rows, row_ok, offs_n, n_ok, K, stride_asm, stride_bsg,
                                     BLOCK_K, W8A8_DOT == 0)  # fmt: skip
        for k0 in range(k_lo, k_hi, BLOCK_K):
            sab_next, sbb_next = _w8a8_scale_bytes(k0 + BLOCK_K, as_ptr, bs_base, rows, row_ok, offs_n, n_ok, K,
                                                   stride_asm, stride_bsg, BLOCK_K, W8A8_DOT == 0)  # fmt: skip
            acc = _k_step(acc, k0, a_ptr, as_ptr, b_base, bs_base, rows, row_ok, offs_n, n_ok, K, stride_am,
                          stride_asm, stride_bn, stride_bsg, sab, sbb, MODE, SCALE_SHIFT, SWAP_AB, UPCAST, EVEN_K,
                          DEQUANT, W8A8_DOT, BLOCK_K)  # fmt: skip
            sab = sab_next
            sbb = sbb_next
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            acc = _k_step(acc, k0, a_ptr, as_ptr, b_base, bs_base, rows, row_ok, offs_n, n_ok, K, stride_am,
                          stride_asm, stride_bn, stride_bsg, 0, 0, MODE, SCALE_SHIFT, SWAP_AB, UPCAST, EVEN_K, DEQUANT,
                          W8A8_DOT, BLOCK_K)  # fmt: skip
    _store_c(acc, c_ptr, w_ptr, pairs, row_ok, offs_n, n_ok, stride_cm, MUL_WEIGHT, SWAP_AB, UPCAST, SPLIT_K > 1)
