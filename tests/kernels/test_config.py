"""Tile config selection and the forwards' argument checks."""

import pytest
import torch

from mxconvert.errors import MxconvertError
from mxconvert.kernels import config as cfg
from mxconvert.kernels.moe import moe_experts_bf16, moe_experts_mxfp8


@pytest.mark.parametrize("gpu", sorted(cfg.TABLES))
@pytest.mark.parametrize("mode", ["bf16", "w8a16", "w8a8"])
def test_hopper_table_is_ordered_and_valid(gpu, mode):
    rows = cfg.TABLES[gpu][mode]
    limits = [r[0] for r in rows[:-1]]
    assert limits == sorted(limits) and rows[-1][0] is None
    for _, bm, *tiles in rows:
        tiles = [t for t in tiles if t != cfg.DIRECT]
        assert bm in (16, 32, 64, 128)
        for t in tiles:
            assert t.block_k % 32 == 0 and t.block_k & (t.block_k - 1) == 0 and t.num_warps in (1, 2, 4, 8)
            assert t.split_k >= 1 and t.dequant == "auto" and t.w8a8 in ("fp8", "bf16")


def test_seed_gfx942_rules():
    # the brief's examples at TP8: GEMM1 N 768 K 6144 -> 32 / 128 / 1 warp; GEMM2 N 6144 K 384 -> 64 / 64 / 2
    t = lambda *a: (lambda g: (g.block_n, g.block_k, g.num_warps))(cfg._gfx942(*a))
    assert t(128, 768, 6144, 16) == (32, 128, 1)
    assert t(128, 6144, 384, 16) == (64, 64, 2)


def test_block_m_follows_tokens_per_expert(monkeypatch):
    monkeypatch.setattr(cfg, "device_family", lambda device=None: "hopper")
    monkeypatch.setattr(cfg, "hopper_table", lambda device=None: cfg.TABLES["h100"])
    pick = lambda t: (
        cfg.moe_config(tokens=t, top_k=4, num_experts=128, hidden=6144, intermediate=384, mode="w8a16").block_m
    )
    assert [pick(t) for t in (1, 128, 512, 1024, 8192)] == [16, 16, 32, 64, 128]
    monkeypatch.setattr(cfg, "device_family", lambda device=None: "gfx942")
    assert [pick(t) for t in (1, 512, 8192)] == [16, 16, 64]


def test_forward_argument_errors():
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    ids, w = torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1)
    w13, w2 = torch.zeros(2, 64, 64, dtype=torch.bfloat16), torch.zeros(2, 64, 32, dtype=torch.bfloat16)
    with pytest.raises(MxconvertError, match="moe experts"):
        moe_experts_bf16(x, w, ids, w13_bf16=w13, w2_bf16=w2[:, :, :16])
    with pytest.raises(MxconvertError, match="topk_ids"):
        moe_experts_bf16(x, w[:1], ids, w13_bf16=w13, w2_bf16=w2)
    with pytest.raises(MxconvertError, match="mode"):
        moe_experts_mxfp8(x, w, ids, w13=w13, w13_scale=None, w2=w2, w2_scale=None, mode="fp4")


def test_h200_table_decode_rows(monkeypatch):
    # H200 W8A16: no alignment launch and split-K GEMM1 up to T 8; aligned blocks from T 16
    monkeypatch.setattr(cfg, "device_family", lambda device=None: "hopper")
    monkeypatch.setattr(cfg, "hopper_table", lambda device=None: cfg.TABLES["h200"])
    pick = lambda t: cfg.moe_config(tokens=t, top_k=4, num_experts=128, hidden=6144, intermediate=384, mode="w8a16")
    assert [pick(t).direct for t in (1, 8, 16, 1024)] == [True, True, False, False]
    assert pick(1).gemm1.split_k == 4 and pick(128).gemm1.split_k == 1


def test_h200_w8a8_rows(monkeypatch):
    # H200 W8A8: the W8A16 rows' tiles; FP8 dots except BF16 dots at 1-2 tokens per expert (T 32)
    monkeypatch.setattr(cfg, "device_family", lambda device=None: "hopper")
    monkeypatch.setattr(cfg, "hopper_table", lambda device=None: cfg.TABLES["h200"])
    pick = lambda t: cfg.moe_config(tokens=t, top_k=4, num_experts=128, hidden=6144, intermediate=384, mode="w8a8")
    assert [pick(t).gemm1.w8a8 for t in (1, 8, 32, 128, 1024)] == ["fp8", "fp8", "bf16", "fp8", "fp8"]
    assert pick(1).direct and pick(1).gemm1.split_k == 4
