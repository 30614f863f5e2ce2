"""scripts/load_time_paths.py (the peers' conversions at load, for the benchmarks) and scripts/bench_load.py
on the CPU: the stacking matches the source tensor by tensor, BF16 emulation equals our BF16 copies bit
for bit, block-FP8 follows its definition, and the benchmark runs end to end."""

import sys
from pathlib import Path

import pytest
import torch
from make_tiny_checkpoint import make_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from load_time_paths import (  # noqa: E402
    SourceExperts,
    bf16_at_load,
    block_fp8,
    block_fp8_at_load,
    block_fp8_values,
)

from mxconvert.convert import convert  # noqa: E402
from mxconvert.layout import dequantize, dequantize_bf16, unpack_scales  # noqa: E402
from mxconvert.runtime.loader import ConvertedCheckpoint  # noqa: E402

SHAPE = dict(hidden_size=256, intermediate_size=128, num_experts=5, top_k=2, num_hidden_layers=4, mtp=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("src") / "src", num_shards=2, edges=False, **SHAPE)


def test_chunks_stack_each_source_tensor_in_place(source):
    src = SourceExperts(source)
    e, i, h = src.num_experts, src.intermediate, src.hidden
    seen = 0
    for first, raw in src.chunks("cpu", step=2):  # 5 experts: chunks of 2, 2, 1
        c = raw["w13"].shape[0]
        assert {k: tuple(v.shape) for k, v in raw.items()} == src.shapes(c)
        for x in range(c):
            tensors = src.experts[first + x]
            read = lambda p, k: src.src.read_tensor(tensors[p][k]).clone()  # noqa: E731
            assert torch.equal(raw["w13"][x], torch.cat([read("gate", 0), read("up", 0)]))
            assert torch.equal(raw["s13"][x], torch.cat([read("gate", 1), read("up", 1)]))
            assert torch.equal(raw["w2"][x], read("down", 0)) and torch.equal(raw["s2"][x], read("down", 1))
        seen += c
    assert seen == e and (i, h) == (128, 256)


def test_bf16_emulation_holds_our_bf16_values(source, tmp_path):
    """The same BF16 values as our copies; bit for bit but for the source's -0, which stays -0 there
    (our FNUZ bytes have no -0)."""
    out = tmp_path / "out"
    convert(model_dir=str(source), out_dir=str(out), bf16="materialize", progress=False)
    ckpt = ConvertedCheckpoint(out)
    ours = ckpt.load_experts(next(iter(ckpt.layers)))
    theirs = bf16_at_load(SourceExperts(source), "cpu")
    for k in ("w13", "w2"):
        mine, stored = theirs[f"{k}_bf16"], getattr(ours, f"{k}_bf16")
        assert torch.equal(mine.float(), stored.float())  # -0 == +0
        differ = mine.view(torch.int16) != stored.view(torch.int16)
        assert differ.any() and (mine.view(torch.int16)[differ] == -(2**15)).all()  # only -0, and present here
        derived = dequantize_bf16(getattr(ours, k), unpack_scales(getattr(ours, f"{k}_scale")))
        assert torch.equal(derived.view(torch.int16), stored.view(torch.int16))


def test_block_fp8_follows_its_definition():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 256, 384, generator=g) * torch.logspace(-3, 2, 384)  # blocks of very different sizes
    w[1, :128, :128] = 0  # an all-zero block: scale stays finite, values zero
    q, s = block_fp8(w)
    assert q.dtype == torch.uint8 and q.shape == w.shape and s.shape == (2, 2, 3)
    assert not (q == 0x80).any()  # FNUZ: no -0 (it would be NaN)
    back = block_fp8_values(q, s)
    assert torch.equal(back[1, :128, :128], torch.zeros(128, 128)) and torch.isfinite(back).all()
    blocks = w.view(2, 2, 128, 3, 128).abs().amax(dim=(2, 4))
    assert torch.equal(s, (blocks / 448).clamp(min=torch.finfo(torch.float32).tiny) * 2)  # FN scale, doubled
    # each block's largest weight lands on the FP8 maximum (448 in FN = 224 in FNUZ, times the doubled scale)
    vmax = q.view(torch.float8_e4m3fnuz).float().abs().view(2, 2, 128, 3, 128).amax(dim=(2, 4))
    assert torch.equal(vmax[blocks > 0], torch.full_like(vmax[blocks > 0], 224.0))
    rel = ((back - w).norm() / w.norm()).item()
    assert 0 < rel < 0.05  # E4M3's 3 mantissa bits; tiny entries of a block lose more


def test_block_fp8_at_load_matches_block_fp8_of_the_values(source):
    src = SourceExperts(source)
    held = block_fp8_at_load(src, "cpu")
    first, raw = next(src.chunks("cpu", step=src.num_experts))
    for k in ("w13", "w2"):
        q, s = block_fp8(dequantize(raw[k], raw["s" + k[1:]], fnuz=False, dtype=torch.float32))
        assert torch.equal(held[k], q) and torch.equal(held[k + "_scale"], s)


def test_bench_load_runs_end_to_end_on_the_cpu(tmp_path):
    import bench_load

    paths = "ours_native,block_fp8_at_load"
    result = bench_load.main(["--workdir", str(tmp_path), "--paths", paths, "--shape", "4,256,128"])
    rows = {(r["path"], r["start"]): r for r in result["rows"]}
    assert set(rows) == {(p, s) for p in ("ours_native", "block_fp8_at_load") for s in ("cold", "warm")}
    assert all("error" not in r for r in rows.values()), rows
    assert rows["ours_native", "cold"]["bit_exact"] and rows["ours_native", "cold"]["weight_rel_err"] == 0
    assert 0 < rows["block_fp8_at_load", "cold"]["weight_rel_err"] < 0.05
    held = {p: rows[p, "cold"]["held_bytes"] for p in ("ours_native", "block_fp8_at_load")}
    assert held["block_fp8_at_load"] < held["ours_native"]  # block scales are fewer than per-32 ones
