"""Opening converted checkpoints, reading TP/EP slices from the files, BF16 copies at load time."""

import json
import shutil

import pytest
import torch
from runtime_helpers import BF16_ONLY, DUAL, PLANTED

from mxconvert import format as fmt
from mxconvert.errors import MxconvertError
from mxconvert.runtime import loader
from mxconvert.runtime.loader import ConvertedCheckpoint
from mxconvert.runtime.moe import bf16_copies
from mxconvert.runtime.sharding import Ranks, expert_slices, shard_expert_tensor


def test_open(ckpts):
    c = ConvertedCheckpoint(ckpts["dual"])
    assert c.layers == {PLANTED: "dual", DUAL: "dual", BF16_ONLY: "bf16_only"}
    assert ConvertedCheckpoint(ckpts["derive"]).layers[DUAL] == "native_only"
    assert c.dispatch == (8, 1024) and c.top_k == 2 and c.routed_scaling_factor == 2.0
    assert (c.activation.alpha, c.activation.beta, c.activation.limit) == (1.702, 1.0, 7.0)


def test_load_all_layers(ckpts):
    layers = loader.load_moe_layers(
        ConvertedCheckpoint(ckpts["derive"]), progress=False, ranks=Ranks(tp_rank=1, tp_size=2)
    )
    assert {p: layer.weights.storage for p, layer in layers.items()} == {
        PLANTED: "native_only",
        DUAL: "native_only",
        BF16_ONLY: "bf16_only",
    }
    for layer in layers.values():  # rank 1 of 2 holds half of I, BF16 copies derived where not stored
        e, n, h = layer.weights.w13_bf16.shape
        assert layer.weights.w2_bf16.shape == (e, h, n // 2)
        assert layer.native == (layer.weights.storage == "native_only")


def _copy_small(src, dst, skip=()):
    dst.mkdir()
    for name in ("config.json", fmt.INDEX_NAME, fmt.MANIFEST_NAME):
        if name not in skip:
            shutil.copy(src / name, dst / name)
    return dst


def test_refuses(ckpts, tmp_path):
    with pytest.raises(MxconvertError, match="mxconvert.json, so it is not a finished conversion"):
        ConvertedCheckpoint(_copy_small(ckpts["dual"], tmp_path / "a", skip=(fmt.MANIFEST_NAME,)))
    with pytest.raises(MxconvertError, match="is not the OUT_DIR|is not a directory"):
        ConvertedCheckpoint(tmp_path / "missing")
    d = _copy_small(ckpts["dual"], tmp_path / "b")
    manifest = json.loads((d / fmt.MANIFEST_NAME).read_text())
    (d / fmt.MANIFEST_NAME).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(MxconvertError, match="format_version 99 is unknown"):
        ConvertedCheckpoint(d)
    d = _copy_small(ckpts["dual"], tmp_path / "c")
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"]["format_version"] = 2
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(MxconvertError, match="format_version 2, not 'mxconvert' 1"):
        ConvertedCheckpoint(d)
    with pytest.raises(MxconvertError, match="not an expert group"):
        ConvertedCheckpoint(ckpts["dual"]).load_experts("model.layers.3.mlp.experts")


def test_sharding_tables():
    e, h, i = 4, 64, 128
    shapes = {k: shape(e, h, i) for k, (_, shape) in fmt.EXPERT_TENSORS.items()}
    assert set(shapes) == set(loader.fmt.EXPERT_TENSORS)
    w13 = torch.arange(e * 2 * i).view(e, 2 * i, 1)  # row number r + 2I*e
    got = shard_expert_tensor("w13_weight", w13, Ranks(tp_rank=1, tp_size=2))
    assert got[:, :, 0].tolist() == [
        list(range(x * 256 + 64, x * 256 + 128)) + list(range(x * 256 + 192, x * 256 + 256)) for x in range(e)
    ]
    assert expert_slices("w13_weight_scale", shapes["w13_weight_scale"], Ranks(tp_rank=1, tp_size=2)).shape == (
        4,
        2,
        128,
    )
    assert expert_slices("w2_weight", shapes["w2_weight"], Ranks(tp_rank=3, tp_size=4)).shape == (4, 64, 32)
    s = expert_slices("w2_weight_scale", shapes["w2_weight_scale"], Ranks(tp_rank=3, tp_size=4))
    assert s.shape == (4, 1, 64) and s.axis == 1 and s.parts == (slice(3, 4),)
    s = expert_slices("w2_weight_bf16", shapes["w2_weight_bf16"], Ranks(ep_rank=1, ep_size=2))
    assert s.shape == (2, 64, 128) and s.experts == slice(2, 4)
    assert expert_slices("w13_weight", shapes["w13_weight"]).whole
    for bad, match in (
        (dict(tp_rank=0, tp_size=8), "not a multiple of 32"),
        (dict(tp_rank=0, tp_size=3), "not a multiple of 32"),
        (dict(ep_rank=0, ep_size=3), "do not split over 3"),
        (dict(tp_rank=0, tp_size=2, ep_rank=0, ep_size=2), "not both"),
        (dict(tp_rank=2, tp_size=2), "need 0 <= rank < size"),
    ):
        with pytest.raises(MxconvertError, match=match):
            expert_slices("w2_weight", shapes["w2_weight"], Ranks(**bad))
    with pytest.raises(MxconvertError, match="not an expert tensor"):
        expert_slices("w4_weight", (1, 2, 3))


@pytest.mark.parametrize("ranks", [dict(tp_rank=1, tp_size=2), dict(ep_rank=1, ep_size=2), {}])
def test_slices_read_from_files(ckpts, ranks, device, monkeypatch):
    # a small staging chunk: many chunks, both pinned buffers, runs split across chunks
    monkeypatch.setattr(loader, "CHUNK", 4096 + 96)
    c = ConvertedCheckpoint(ckpts["dual"])
    for suffix in fmt.EXPERT_TENSORS:
        name = f"{DUAL}.{suffix}"
        full = c.read(name)
        got = c.read(name, expert_slices(suffix, full.shape, Ranks(**ranks)), device=device)
        assert got.device.type == device
        assert torch.equal(got.cpu(), shard_expert_tensor(suffix, full, Ranks(**ranks))), suffix


@pytest.mark.parametrize("prefix", [PLANTED, DUAL])
def test_native_only_bf16_copies_bit_identical(ckpts, prefix, device):
    # load-time dequantization == what --bf16 materialize stored, bit for bit (planted edges: +-inf too)
    dual = ConvertedCheckpoint(ckpts["dual"]).load_experts(prefix, device=device)
    derived = ConvertedCheckpoint(ckpts["derive"]).load_experts(
        prefix, device=device, ranks=Ranks(tp_rank=1, tp_size=2)
    )
    assert derived.storage == "native_only" and derived.has_native and derived.has_bf16
    for stored, got, suffix in (
        (dual.w13_bf16, derived.w13_bf16, "w13_weight_bf16"),
        (dual.w2_bf16, derived.w2_bf16, "w2_weight_bf16"),
    ):
        want = shard_expert_tensor(suffix, stored, Ranks(tp_rank=1, tp_size=2))
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), suffix
    again = bf16_copies(dual.w13, dual.w13_scale, dual.w2, dual.w2_scale)
    assert torch.equal(again[0].view(torch.int16), dual.w13_bf16.view(torch.int16))
    assert torch.equal(again[1].view(torch.int16), dual.w2_bf16.view(torch.int16))


def test_load_storages(ckpts):
    c = ConvertedCheckpoint(ckpts["dual"])
    w = c.load_experts(BF16_ONLY)
    assert w.storage == "bf16_only" and w.has_bf16 and not w.has_native
    w = c.load_experts(DUAL, ranks=Ranks(ep_rank=1, ep_size=2))  # EP runs BF16 only: FP8 not even read
    assert w.has_bf16 and not w.has_native and w.first_expert == 2 and w.num_experts == 4 and w.local_experts == 2
    w = ConvertedCheckpoint(ckpts["derive"]).load_experts(DUAL, ranks=Ranks(ep_rank=0, ep_size=2))
    assert w.has_bf16 and not w.has_native and w.first_expert == 0


@pytest.mark.parametrize("kind", ["dual", "derive"])
def test_an_empty_bf16_band_loads_no_bf16(ckpts, kind, monkeypatch):
    """native-only serving (band (0, NEVER)): the BF16 copies are neither read (dual) nor derived (derive)."""
    from mxconvert.format import NEVER

    c = ConvertedCheckpoint(ckpts[kind])
    read = []
    monkeypatch.setattr(c, "read", lambda name, *a, real=c.read, **k: read.append(name) or real(name, *a, **k))
    derived = []
    monkeypatch.setattr(loader, "bf16_copies", lambda *a: derived.append(1) or bf16_copies(*a))
    layer = loader.load_moe_layer(c, DUAL, bands=(0, NEVER))
    assert layer.weights.w13_bf16 is None and layer.weights.w2_bf16 is None and layer.weights.w13 is not None
    assert not [n for n in read if n.endswith("_bf16")] and not derived
