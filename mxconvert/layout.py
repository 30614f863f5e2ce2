"""The bit-level rules of docs/FORMAT.md: E4M3FN -> E4M3FNUZ bytes, scale +1, packed scales, dequantization.

All functions take and return uint8 byte tensors (values and E8M0 scales), on any device.
Shape legend: E experts, N out, K in, G = K // 32 scale groups.
"""

import numpy as np
import torch

BLOCK = 32  # weights per E8M0 scale, along K
FN_NEG_ZERO = 0x80  # -0 in E4M3FN, NaN in E4M3FNUZ
SCALE_LIMIT = 254  # a source scale byte >= this has no FNUZ counterpart (254 + 1 is E8M0 NaN)


def first_bad_value(values: torch.Tensor) -> int | None:
    """Flat index of the first E4M3FN NaN byte (0x7F, 0xFF), or None."""
    bad = np.bitwise_and(values.numpy(), 0x7F) == 0x7F  # numpy: about 10x torch's uint8 speed on CPU
    return int(bad.argmax()) if bad.any() else None


def first_bad_scale(scales: torch.Tensor) -> int | None:
    """Flat index of the first source scale byte that FNUZ cannot represent (>= 254), or None."""
    bad = scales.numpy() >= SCALE_LIMIT
    return int(bad.argmax()) if bad.any() else None


def fn_to_fnuz_values(values: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """E4M3FN bytes -> E4M3FNUZ bytes meaning half the value: the same byte, but -0 becomes +0."""
    if not inplace or values.device.type != "cpu":
        return values.masked_fill(values == FN_NEG_ZERO, 0)
    array = values.numpy()
    np.putmask(array, array == FN_NEG_ZERO, 0)
    return values


def fn_to_fnuz_scales(scales: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """E8M0 bytes + 1, which doubles the scale to undo FNUZ's halving of the values."""
    return scales.add_(1) if inplace else scales + 1


def pack_scales(scales: torch.Tensor) -> torch.Tensor:
    """[..., N, G] -> [..., G, N]: a tile's BLOCK_N scales for one K group become contiguous."""
    return scales.transpose(-1, -2).contiguous()


def unpack_scales(packed: torch.Tensor) -> torch.Tensor:
    """[..., G, N] -> [..., N, G], the inverse of pack_scales."""
    return packed.transpose(-1, -2).contiguous()


def e8m0_to_float(scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Exact 2**(byte - 127); byte 255 is NaN. float32 and bfloat16 hold every byte (0 as a subnormal)."""
    exponent = scales.to(torch.int32) - 127
    out = torch.ldexp(torch.ones_like(exponent, dtype=torch.float64), exponent).to(dtype)
    return out.masked_fill(scales == 255, float("nan"))


def dequantize(
    values: torch.Tensor, scales: torch.Tensor, *, fnuz: bool, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Value bytes [..., N, K] times 2**(scale - 127) per 32 along K, scales [..., N, G] (unpacked).

    float64 is exact for every byte pair; float32 overflows above 2**128 (scale bytes near 254).
    """
    fp8 = torch.float8_e4m3fnuz if fnuz else torch.float8_e4m3fn
    *lead, n, k = values.shape
    assert k % BLOCK == 0 and scales.shape[-1] == k // BLOCK, (values.shape, scales.shape)
    v = values.view(fp8).to(dtype).reshape(*lead, n, k // BLOCK, BLOCK)
    s = e8m0_to_float(scales, torch.float64).to(dtype).unsqueeze(-1)
    return (v * s).reshape(*lead, n, k)


def dequantize_bf16(values: torch.Tensor, scales: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """FNUZ bytes [..., N, K] and unpacked scales [..., N, G] -> BF16, the value rounded to nearest even.

    Exact: an FP8 value has 4 significant bits and a scale is a power of two, so the bf16 x bf16
    product (formed in fp32, then rounded once) is the exactly rounded value. On the CPU the bits
    are assembled with integer arithmetic instead, about 3x faster, and checked equal to the product.
    """
    if out is None:
        out = torch.empty(values.shape, dtype=torch.bfloat16, device=values.device)
    if values.device.type == "cpu" and values.dim() == 2:
        return _dequantize_bf16_bits(values, scales, out)
    *lead, n, k = values.shape
    v = values.view(torch.float8_e4m3fnuz).to(torch.bfloat16).reshape(*lead, n, k // BLOCK, BLOCK)
    s = e8m0_to_float(scales, torch.bfloat16).unsqueeze(-1)
    torch.mul(v, s, out=out.view(*lead, n, k // BLOCK, BLOCK))
    return out


# Normal FNUZ bytes (exponent field e >= 1): value 2**(e - 8) * (1 + m/8), so its BF16 bits under
# scale byte s are sign << 15 | ((b & 0x7F) << 4) + ((s - 8) << 7), valid while that exponent stays in
# [1, 254], i.e. s in [8, 247]. Zeros and subnormals (e == 0) are fixed up afterwards.
_FAST_SCALES = (11, 247)  # subnormals need s >= 11 to stay normal in BF16


def _fix_zero_exponent(v: np.ndarray, s: np.ndarray, bits: np.ndarray) -> None:
    """Zeros and subnormals (exponent field 0): value m * 2**-10 * 2**(s - 127), exact and normal in
    float32, so its top half is the BF16. Few in real weights (found 8 bytes at a time), many in noise."""
    n, k = v.shape
    mask = (v & 0x78) == 0  # [N, K]
    count = int(np.count_nonzero(mask))
    if count == 0:
        return
    if count > v.size // 64:  # dense: every element, kept where masked
        value = np.ldexp(
            (v & 0x07).astype(np.float32).reshape(n, k // BLOCK, BLOCK), (s.astype(np.int32) - 137)[:, :, None]
        )
        fixed = (value.view(np.uint32) >> 16).astype(np.uint16).reshape(n, k) | ((v & 0x80).astype(np.uint16) << 8)
        np.copyto(bits, fixed, where=mask)
        return
    flat = mask.reshape(-1)
    words = np.flatnonzero(flat.view(np.uint64) != 0)  # K % 32 == 0: whole 8-byte words
    small = (words[:, None] * 8 + np.arange(8)).reshape(-1)
    small = small[flat[small]]
    byte = v.reshape(-1)[small]
    value = np.ldexp((byte & 0x07).astype(np.float32), s.reshape(-1)[small // BLOCK].astype(np.int32) - 137)
    bits.reshape(-1)[small] = (value.view(np.uint32) >> 16).astype(np.uint16) | ((byte & 0x80).astype(np.uint16) << 8)


def _dequantize_bf16_bits(values: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n, k = values.shape  # [N, K], scales [N, G]
    v, s = values.numpy(), scales.numpy()
    bits = out.view(torch.int16).numpy().view(np.uint16)
    wide = v.astype(np.uint16)
    np.left_shift(wide, 8, out=bits)
    np.bitwise_and(bits, 0x8000, out=bits)  # sign
    np.left_shift(wide, 4, out=wide)
    np.bitwise_and(wide, 0x07F0, out=wide)  # exponent and mantissa of the byte
    np.bitwise_or(bits, wide, out=bits)
    shift = (s.astype(np.uint16) - 8) << 7  # [N, G]
    np.add(bits.reshape(n, k // BLOCK, BLOCK), shift[:, :, None], out=bits.reshape(n, k // BLOCK, BLOCK))
    _fix_zero_exponent(v, s, bits)
    rows = np.flatnonzero(((s < _FAST_SCALES[0]) | (s > _FAST_SCALES[1])).any(axis=1))
    if rows.size:  # scale bytes at the ends of E8M0: the plain product, rounded
        idx = torch.from_numpy(rows)
        out[idx] = dequantize_bf16(values[idx].unsqueeze(0), scales[idx].unsqueeze(0))[0]
    return out
