"""The bit-level rules of FORMAT.md: E4M3FN -> E4M3FNUZ bytes, scale +1, packed scales, dequantization.

All functions take and return uint8 byte tensors (values and E8M0 scales), on any device.
Shape legend: E experts, N out, K in, G = K // 32 scale groups.
"""

import numpy as np
import torch

BLOCK = 32  # weights per E8M0 scale, along K
FN_NEG_ZERO = 0x80  # -0 in E4M3FN, NaN in E4M3FNUZ
FN_NAN = (0x7F, 0xFF)  # NaN in E4M3FN; the FNUZ maximum (+-240), which a valid source never yields
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


def fn_to_fnuz_scales(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes + 1, which doubles the scale to undo FNUZ's halving of the values."""
    return scales + 1


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

    Fast and exact: an FP8 value has 4 significant bits and a scale is a power of two, so the
    bf16 x bf16 product (formed in fp32, then rounded once) is the exactly rounded value.
    """
    *lead, n, k = values.shape
    v = values.view(torch.float8_e4m3fnuz).to(torch.bfloat16).reshape(*lead, n, k // BLOCK, BLOCK)
    s = e8m0_to_float(scales, torch.bfloat16).unsqueeze(-1)
    if out is None:
        out = torch.empty(values.shape, dtype=torch.bfloat16, device=values.device)
    torch.mul(v, s, out=out.view(*lead, n, k // BLOCK, BLOCK))
    return out
