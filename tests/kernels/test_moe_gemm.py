"""The fused MoE GEMM in each mode, tile orientation and FP8 reading, against a float32 reference."""

import pytest
import torch
from kernel_helpers import ON_GPU, random_fnuz_weights, random_routing, rel_err

from mxconvert.kernels.align import align_routing
from mxconvert.kernels.config import GemmTile
from mxconvert.kernels.moe_gemm import MAX_SCALE_BYTE, dequantized_weights, moe_gemm, moe_gemm_reference
from mxconvert.kernels.quant import quantize_mxfp8

# NVIDIA has no FNUZ dot (Triton rejects fp8e4b8 there): "fnuz" runs on gfx942 and in the interpreter
NO_FNUZ = ON_GPU and torch.version.hip is None


def skip_fnuz(fmt):
    if fmt == "fnuz" and NO_FNUZ:
        pytest.skip("no FNUZ dot on NVIDIA; the GPU reads FNUZ bytes as E4M3FN ('fn')")


TILES = [GemmTile(32, 64, 4, 1), GemmTile(32, 32, 4, 1, swap_ab=True), GemmTile(64, 128, 4, 1, swap_ab=True)]


def run(mode, fmt, tile, t, k, e, n, kdim, gen, device, *, gemm2, block_m=16, scale_lo=118, scale_hi=124, direct=False):
    """(out, float32 reference) of one GEMM; split-K partials come back summed in fp32. direct: no alignment."""
    ids, w = random_routing(t, k, e, gen)
    vals, scales = random_fnuz_weights(e, n, kdim, gen, scale_lo=scale_lo, scale_hi=scale_hi)
    wf = dequantized_weights(vals, scales)
    a = torch.randn(t * k if gemm2 else t, kdim, generator=gen).bfloat16()
    align = None if direct else align_routing(ids.to(device), num_experts=e, block_m=block_m)
    kw = dict(
        topk_ids=ids.to(device),
        block_m=block_m,
        align=align,
        num_pairs=t * k,
        a_div=1 if gemm2 else k,
        tile=tile,
        mode=mode,
        fp8_format=fmt,
        topk_weights=w.reshape(-1).to(device) if gemm2 else None,
    )
    if mode == "bf16":
        b = wf.bfloat16()
        out = moe_gemm(a.to(device), b.to(device), **kw)
        ref_b = b.float()
    else:
        kw["b_scale"] = scales.to(device)
        ref_b = wf
        if mode == "w8a8":
            aq, s = quantize_mxfp8(a.to(device), fp8_format=fmt)
            kw["a_scale"] = s
            a_ref = aq.cpu().float().view(a.shape[0], -1, 32) * torch.exp2(s.cpu().float() - 127).unsqueeze(-1)
            out = moe_gemm(aq, vals.to(device), **kw)
            a = a_ref.view(a.shape)
        else:
            out = moe_gemm(a.to(device), vals.to(device), **kw)
    ref = moe_gemm_reference(a, ref_b, ids, a_div=1 if gemm2 else k, topk_weights=w if gemm2 else None)
    if tile.split_k > 1:
        assert out.shape == (tile.split_k, t * k, n) and out.dtype == torch.float32
        out = out.sum(0)
    return out.cpu(), ref


@pytest.mark.parametrize(
    "mode,fmt", [("bf16", "fn"), ("w8a16", "fn"), ("w8a16", "fnuz"), ("w8a8", "fn"), ("w8a8", "fnuz")]
)
@pytest.mark.parametrize("tile", TILES, ids=["plain", "swap32", "swap64"])
@pytest.mark.parametrize("gemm2", [False, True], ids=["gemm1", "gemm2"])
def test_moe_gemm_modes(mode, fmt, tile, gemm2, device, gen):
    skip_fnuz(fmt)
    # K and N multiples of 32, not of 64 / 128; odd T; masked tails on both
    out, ref = run(mode, fmt, tile, 7, 2, 3, 96, 160, gen, device, gemm2=gemm2)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 5e-3  # BF16 output rounding, fp32 accumulation


ROUTES = ["fp32", "bits", "asm_f16_1", "asm_f16_pair"]


@pytest.mark.parametrize("dequant", ROUTES)
@pytest.mark.parametrize("tile", TILES[:2], ids=["plain", "swap32"])
def test_w8a16_dequant_routes(dequant, tile, device, gen):
    # every FP8 -> BF16 route ("asm" is NVIDIA PTX; elsewhere it falls back to "bits"), both orientations
    t = GemmTile(tile.block_n, tile.block_k, tile.num_warps, tile.num_stages, tile.swap_ab, dequant=dequant)
    out, ref = run("w8a16", "fn", t, 7, 2, 3, 96, 160, gen, device, gemm2=False)
    assert rel_err(out, ref) < 5e-3  # BF16 output rounding, fp32 accumulation


def test_bit_placement_is_exact():
    # the rule the "bits"/"asm" routes use, in torch: every byte but FNUZ NaN 0x80 gives its FNUZ value
    b = torch.arange(256, dtype=torch.int32)
    bits = ((b & 0x80) << 8) | ((b & 0x7F) << 4)
    placed = (bits << 16).view(torch.float32).double() * 2.0**119
    fnuz = b.to(torch.uint8).view(torch.float8_e4m3fnuz).double()
    ok = b != 0x80
    assert torch.equal(placed[ok], fnuz[ok]) and placed[0x80] == 0


W8A8_DOTS = ["fp8", "bf16"]


@pytest.mark.parametrize("dot", W8A8_DOTS)
@pytest.mark.parametrize("fmt", ["fn", "fnuz"])
@pytest.mark.parametrize("tile", TILES, ids=["plain", "swap32", "swap64"])
@pytest.mark.parametrize("gemm2", [False, True], ids=["gemm1", "gemm2"])
def test_w8a8_dots(dot, fmt, tile, gemm2, device, gen):
    # every W8A8 formulation is the per-32 math: K 160 = 5 groups over 64/128-wide steps (tail masked)
    skip_fnuz(fmt)
    t = GemmTile(tile.block_n, tile.block_k, tile.num_warps, tile.num_stages, tile.swap_ab, w8a8=dot)
    out, ref = run("w8a8", fmt, t, 7, 2, 3, 96, 160, gen, device, gemm2=gemm2)
    assert rel_err(out, ref) < 5e-3  # BF16 output rounding, fp32 accumulation


@pytest.mark.parametrize("dot", W8A8_DOTS)
@pytest.mark.parametrize("swap", [False, True])
def test_w8a8_dots_split_direct(dot, swap, device, gen):
    # split-K slices end mid-K (prefetch reads past a slice) and DIRECT blocks, each formulation
    tile = GemmTile(32, 64, 4, 1, swap_ab=swap, split_k=3, w8a8=dot)
    out, ref = run("w8a8", "fn", tile, 5, 2, 3, 64, 320, gen, device, gemm2=False)
    assert rel_err(out, ref) < 5e-3
    tile = GemmTile(64, 64, 4, 1, swap_ab=swap, w8a8=dot)
    out, ref = run("w8a8", "fn", tile, 5, 2, 3, 96, 160, gen, device, gemm2=True, direct=True)
    assert rel_err(out, ref) < 5e-3


@pytest.mark.parametrize("mode", ["w8a16", "w8a8", "bf16"])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("gemm2", [False, True], ids=["gemm1", "gemm2"])
def test_direct(mode, swap, gemm2, device, gen):
    # no alignment: a block per pair (split-K too); N 96 = 1.5 tiles of 64
    for tile in (GemmTile(64, 64, 4, 1, swap_ab=swap), GemmTile(32, 64, 4, 1, swap_ab=swap, split_k=2)):
        out, ref = run(mode, "fn", tile, 5, 2, 3, 96, 160, gen, device, gemm2=gemm2, direct=True)
        assert rel_err(out, ref) < 5e-3, tile


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("mode", ["w8a16", "w8a8", "bf16"])
@pytest.mark.parametrize("swap", [False, True])
def test_split_k(split, mode, swap, device, gen):
    # K 320 over 64-wide steps: uneven slices (3 steps of 64 + a tail) and an empty-ish last slice
    tile = GemmTile(32, 64, 4, 1, swap_ab=swap, split_k=split)
    out, ref = run(mode, "fn", tile, 5, 2, 3, 64, 320, gen, device, gemm2=False)
    assert rel_err(out, ref) < 1e-4 if mode != "w8a8" else rel_err(out, ref) < 5e-3  # fp32 partials


@pytest.mark.parametrize("mode", ["w8a16", "w8a8"])
@pytest.mark.parametrize("fmt", ["fn", "fnuz"])
@pytest.mark.parametrize("dequant", ROUTES)
@pytest.mark.parametrize("lo,hi", [(1, 10), (100, 140), (200, 230)], ids=["tiny", "mid", "huge"])
def test_e8m0_edge_bytes(mode, fmt, dequant, lo, hi, device, gen):
    skip_fnuz(fmt)
    if dequant in MAX_SCALE_BYTE and hi > MAX_SCALE_BYTE[dequant]:
        pytest.skip("the NVIDIA routes decode scale bytes up to 143 (MoELayer routes larger ones to fp32)")
    # scale byte 1 is 2**-126 (byte 0 once "fn" lowers it: decoded as 0, a 2**-127 difference); the bit
    # routes are exact from byte 2 (BF16 subnormal scales below byte 9); 100-140 straddles byte 135,
    # where one BF16 scale could no longer hold 2**(byte - 8) (hence the constant 2**127 first)
    # W8A8: "fp32" runs the FP8 dots, the other routes W8A8 as BF16 dots with that route for the weights
    w8a8 = "fp8" if dequant == "fp32" else "bf16"
    out, ref = run(
        mode,
        fmt,
        GemmTile(32, 64, 4, 1, dequant=dequant, w8a8=w8a8),
        5,
        1,
        2,
        64,
        128,
        gen,
        device,
        gemm2=False,
        scale_lo=lo,
        scale_hi=hi,
    )
    if lo == 1:  # BF16 output is subnormal or zero down there: compare in units of the largest scale
        assert (out.float() - ref).abs().max() <= ref.abs().max() * 2e-2 + 2.0**-120
    else:
        assert rel_err(out, ref) < 5e-3


@pytest.mark.parametrize("t,k,e", [(0, 2, 4), (1, 1, 1), (3, 8, 16), (40, 4, 128)])
def test_moe_gemm_routing_shapes(t, k, e, device, gen):
    # empty batch, one expert, top-8, many experts with no tokens
    out, ref = run("w8a16", "fn", GemmTile(32, 64, 4, 1), t, k, e, 64, 64, gen, device, gemm2=True)
    assert out.shape == (t * k, 64)
    if t:
        assert rel_err(out, ref) < 5e-3


def test_block_m_32(device, gen):
    out, ref = run(
        "w8a8", "fn", GemmTile(32, 64, 4, 1, swap_ab=True), 50, 4, 4, 64, 96, gen, device, gemm2=False, block_m=32
    )
    assert rel_err(out, ref) < 5e-3
