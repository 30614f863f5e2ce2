"""Triton bodies: MXFP8 activation quantization and the fused SwiGLU-OAI (+ quantization).

FP8 bytes are encoded with integer arithmetic rather than `.to(fp8)`: the Triton interpreter rounds
subnormals and some ties wrongly, and gfx942's FNUZ encoding must also run on NVIDIA for tests.
"""

import triton
import triton.language as tl


@triton.jit
def _to_bf16(x, INTERP: tl.constexpr):
    # fp32 -> BF16, nearest even. The interpreter's own cast truncates, so it gets the integer form.
    if INTERP:
        bits = x.to(tl.int32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def _scale_byte(amax, MAX_EXP: tl.constexpr, MAX_MANT: tl.constexpr):
    # Smallest e with amax <= FP8_MAX * 2**e, as the E8M0 byte e + 127, clamped to [1, 254].
    # FP8_MAX = 1.MAX_MANT * 2**MAX_EXP; amax = 1.mant * 2**(be - 127).
    bits = amax.to(tl.int32, bitcast=True)
    be = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    byte = be - MAX_EXP + (mant > MAX_MANT).to(tl.int32)
    return tl.minimum(tl.maximum(byte, 1), 254)


@triton.jit
def _encode_e4m3(x, BIAS: tl.constexpr):
    # fp32 x with |x| <= FP8 max -> E4M3 byte (exponent bias 7 = FN, 8 = FNUZ), round to nearest even.
    # Any zero becomes 0x00 (0x80 is NaN in FNUZ; -0 and +0 are the same value in FN).
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.abs(x)
    abits = a.to(tl.int32, bitcast=True)
    r = abits + 0x7FFFF + ((abits >> 20) & 1)  # RNE of the fp32 mantissa to 3 bits
    normal = ((((r >> 23) & 0xFF) - 127 + BIAS) << 3) | ((r >> 20) & 7)
    # Subnormals are multiples of 2**(-2 - BIAS): adding C (ulp(C) = that step) rounds to nearest even.
    C: tl.constexpr = 2.0 ** (21 - BIAS)
    STEPS: tl.constexpr = 2.0 ** (2 + BIAS)
    MIN_NORMAL: tl.constexpr = 2.0 ** (1 - BIAS)
    sub = (((a + C) - C) * STEPS).to(tl.int32)
    mag = tl.where(a < MIN_NORMAL, sub, normal)
    return tl.where(mag == 0, 0, mag | sign).to(tl.uint8)


@triton.jit
def _quantize_tile(
    y,
    q_ptrs,
    s_ptrs,
    mask,
    smask,
    BR: tl.constexpr,
    BC: tl.constexpr,
    BIAS: tl.constexpr,
    MAX_EXP: tl.constexpr,
    MAX_MANT: tl.constexpr,
):
    # y: fp32 [BR, BC] -> bytes at q_ptrs [BR, BC], scale bytes at s_ptrs [BR, BC // 32].
    # Subnormal inputs count as zero, whatever the device's denormal mode.
    y = tl.where(tl.abs(y) < 1.1754943508222875e-38, 0.0, y)
    g = tl.reshape(y, (BR, BC // 32, 32))
    byte = _scale_byte(tl.max(tl.abs(g), axis=2), MAX_EXP, MAX_MANT)
    inv = ((254 - byte) << 23).to(tl.float32, bitcast=True)  # 2**(127 - byte), exact
    q = _encode_e4m3(tl.reshape(g * inv[:, :, None], (BR, BC)), BIAS)
    tl.store(q_ptrs, q, mask=mask)
    tl.store(s_ptrs, byte.to(tl.uint8), mask=smask)


@triton.jit
def _quantize_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    M,
    K,
    stride_xm,
    stride_qm,
    stride_sm,
    BR: tl.constexpr,
    BC: tl.constexpr,
    BIAS: tl.constexpr,
    MAX_EXP: tl.constexpr,
    MAX_MANT: tl.constexpr,
):
    # x [M, K] bf16 -> q [M, K] bytes, s [M, K/32] bytes
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    groups = tl.program_id(1) * (BC // 32) + tl.arange(0, BC // 32)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    smask = (rows[:, None] < M) & (groups[None, :] < K // 32)
    y = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    _quantize_tile(
        y,
        q_ptr + rows[:, None] * stride_qm + cols[None, :],
        s_ptr + rows[:, None] * stride_sm + groups[None, :],
        mask,
        smask,
        BR,
        BC,
        BIAS,
        MAX_EXP,
        MAX_MANT,
    )


@triton.jit
def _swiglu_kernel(
    x_ptr,
    out_ptr,
    s_ptr,
    M,
    I,
    stride_xs,
    stride_xm,
    stride_om,
    stride_sm,
    alpha,
    beta,
    limit,
    BR: tl.constexpr,
    BC: tl.constexpr,
    QUANT: tl.constexpr,
    INTERP: tl.constexpr,
    SPLIT: tl.constexpr,
    BIAS: tl.constexpr,
    MAX_EXP: tl.constexpr,
    MAX_MANT: tl.constexpr,
):
    # x [M, 2I] bf16 (gate | up), or SPLIT fp32 partials [SPLIT, M, 2I] summed and rounded to BF16 here
    # (what an unsplit GEMM1 would have stored) -> out [M, I]: bf16, or FP8 bytes + scales [M, I/32] when QUANT
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows[:, None] < M) & (cols[None, :] < I)
    base = x_ptr + rows[:, None] * stride_xm + cols[None, :]
    g = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(base + I, mask=mask, other=0.0).to(tl.float32)
    if SPLIT > 1:
        for s in tl.static_range(1, SPLIT):
            g += tl.load(base + s * stride_xs, mask=mask, other=0.0)
            u += tl.load(base + s * stride_xs + I, mask=mask, other=0.0)
        g = _to_bf16(g, INTERP).to(tl.float32)
        u = _to_bf16(u, INTERP).to(tl.float32)
    # as torch.clamp in the reference: a NaN (inf - inf from overflowed weights) stays NaN
    gate = tl.minimum(g, limit, propagate_nan=tl.PropagateNan.ALL)
    up = tl.maximum(u, -limit, propagate_nan=tl.PropagateNan.ALL)
    up = tl.minimum(up, limit, propagate_nan=tl.PropagateNan.ALL)
    y = _to_bf16(gate / (1.0 + tl.exp(-alpha * gate)) * (up + beta), INTERP)
    o_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    if QUANT:
        groups = tl.program_id(1) * (BC // 32) + tl.arange(0, BC // 32)
        smask = (rows[:, None] < M) & (groups[None, :] < I // 32)
        _quantize_tile(
            y.to(tl.float32),
            o_ptrs,
            s_ptr + rows[:, None] * stride_sm + groups[None, :],
            mask,
            smask,
            BR,
            BC,
            BIAS,
            MAX_EXP,
            MAX_MANT,
        )
    else:
        tl.store(o_ptrs, y, mask=mask)
