"""The bit-level rules of docs/FORMAT.md, checked exhaustively over every value byte and scale byte."""

import torch

from mxconvert import layout

ALL_VALUES = torch.arange(256, dtype=torch.uint8)
FN_NAN = (ALL_VALUES & 0x7F) == 0x7F


def _grid(scale_bytes):
    """Every value byte (32 per group, 8 groups) under every scale byte: values [S, 256], scales [S, 8]."""
    values = ALL_VALUES.expand(len(scale_bytes), 256).contiguous()
    scales = torch.tensor(scale_bytes, dtype=torch.uint8)[:, None].expand(-1, 8).contiguous()
    return values, scales


def test_fn_to_fnuz_edge_bytes():
    values = torch.tensor([0x00, 0x7E, 0x80, 0xFE, 0x01, 0x81], dtype=torch.uint8)
    assert layout.fn_to_fnuz_values(values).tolist() == [0x00, 0x7E, 0x00, 0xFE, 0x01, 0x81]
    scales = torch.tensor([0, 1, 127, 253], dtype=torch.uint8)
    assert layout.fn_to_fnuz_scales(scales).tolist() == [1, 2, 128, 254]


def test_fnuz_dequantizes_to_the_source_value_for_every_byte_pair():
    values, scales = _grid(list(range(254)))  # every convertible scale byte
    values = values.masked_fill(FN_NAN, 0)  # NaN bytes are rejected before conversion
    want = layout.dequantize(values, scales, fnuz=False)
    got = layout.dequantize(layout.fn_to_fnuz_values(values), layout.fn_to_fnuz_scales(scales), fnuz=True)
    assert torch.equal(got, want)  # float64 holds every value; -0 == +0
    assert torch.isfinite(got).all()


def test_bf16_copy_is_the_rounded_value_for_every_byte_pair():
    values, scales = _grid(list(range(255)))  # every FNUZ scale byte a conversion can write (1..254) and 0
    values = values.masked_fill(values == 0x80, 0)  # 0x80 is NaN in FNUZ and never written
    want = layout.dequantize(values, scales, fnuz=True).to(torch.bfloat16)
    got = layout.dequantize_bf16(values, scales)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    # near the top of E8M0 the value exceeds BF16's range: exact elsewhere, +-inf there (docs/FORMAT.md)
    big = layout.dequantize(values, scales, fnuz=True).abs() >= 2.0**128
    assert torch.isinf(got[big]).all() and torch.isfinite(got[~big]).all()


def test_e8m0_decoding_edges():
    s = torch.tensor([0, 1, 127, 253, 254, 255], dtype=torch.uint8)
    f = layout.e8m0_to_float(s)
    assert f[:5].tolist() == [2.0**-127, 2.0**-126, 1.0, 2.0**126, 2.0**127]
    assert torch.isnan(f[5])
    assert layout.e8m0_to_float(s[:5], torch.bfloat16).float().tolist() == f[:5].tolist()


def test_pack_scales_layout_and_inverse():
    scales = torch.arange(2 * 3 * 4, dtype=torch.uint8).view(2, 3, 4)  # [E, N, G]
    packed = layout.pack_scales(scales)  # [E, G, N]
    assert packed.shape == (2, 4, 3)
    assert all(packed[e, g, n] == scales[e, n, g] for e in range(2) for n in range(3) for g in range(4))
    assert torch.equal(layout.unpack_scales(packed), scales)


def test_bad_bytes_are_found():
    values = torch.zeros(4, 8, dtype=torch.uint8)
    assert layout.first_bad_value(values) is None
    values[2, 3] = 0xFF
    values[3, 0] = 0x7F
    assert layout.first_bad_value(values) == 2 * 8 + 3
    scales = torch.full((3, 2), 253, dtype=torch.uint8)
    assert layout.first_bad_scale(scales) is None
    scales[1, 1] = 254
    assert layout.first_bad_scale(scales) == 3
