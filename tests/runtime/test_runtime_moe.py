"""MoELayer against a float64 reference from the ORIGINAL MXFP8 source: every dispatch branch, each
storage, TP slices summed over ranks, EP; the router and the bands table."""

import pytest
import torch
from runtime_helpers import BF16_ONLY, DUAL, PLANTED, SHAPE, inputs, reference64, rel_err, source_experts

from mxconvert import format as fmt
from mxconvert.format import NEVER
from mxconvert.kernels.config import fp8_format
from mxconvert.kernels.moe import capture_cuda_graph, moe_experts_reference
from mxconvert.runtime import moe as runtime_moe
from mxconvert.runtime.bands import bands_for
from mxconvert.runtime.loader import ConvertedCheckpoint, load_moe_layer
from mxconvert.runtime.router import route
from mxconvert.runtime.sharding import ONE_RANK, Ranks

ON_GPU = torch.cuda.is_available()
BANDS = (2, 6)  # BF16 at T <= 2 and T >= 6, native between
# Tolerances against float64 (relative Frobenius error over the batch):
TOL = {
    "bf16": 1e-2,  # BF16 GEMM1 output and activation, as stored between the kernels; BF16 result
    "w8a16": 1e-2,  # the same: FP8 weights dequantized exactly in registers
    "w8a8": 0.15,  # MXFP8 activations into both GEMMs (~0.1 measured in the kernel tests)
}


@pytest.fixture(scope="module")
def source(ckpts):
    return {p: source_experts(ckpts["src"], p) for p in (DUAL, BF16_ONLY)}


@pytest.mark.parametrize("native_mode", ["w8a16", "w8a8"])
def test_dispatch_branches_vs_source(ckpts, source, native_mode, device):
    layer = load_moe_layer(
        ConvertedCheckpoint(ckpts["dual"]), DUAL, device=device, bands=BANDS, native_mode=native_mode
    )
    assert layer.native and layer.weights.has_native and layer.weights.has_bf16
    for t, path in ((1, "bf16"), (2, "bf16"), (3, native_mode), (5, native_mode), (6, "bf16"), (9, "bf16")):
        if native_mode == "w8a8" and path == "bf16" and t not in (2, 6):
            continue  # the BF16 branches once; both band edges in each run
        assert layer.path_for(t) == path
        x, w, ids = inputs(t, seed=t, device=device)
        out = layer(x, w, ids)
        assert layer.last_path == path and out.shape == x.shape and out.dtype == torch.bfloat16
        ref = reference64(x, w, ids, *source[DUAL])
        assert rel_err(out, ref) < TOL[path], (t, path)
        if path == "w8a8":  # tighter: against the reference that quantizes activations the same way
            w13, w2 = (v.float().to(device) for v in source[DUAL])
            quant = moe_experts_reference(x, w, ids, w13=w13, w2=w2, fp8_format=fp8_format(device))
            assert rel_err(out, quant) < 2e-2


def test_native_only_equals_dual(ckpts, device):
    # same bytes, same kernels: bit-identical outputs on every path
    dual = load_moe_layer(ConvertedCheckpoint(ckpts["dual"]), DUAL, device=device, bands=BANDS)
    derived = load_moe_layer(ConvertedCheckpoint(ckpts["derive"]), DUAL, device=device, bands=BANDS)
    assert derived.weights.storage == "native_only"
    for t in (1, 4):
        x, w, ids = inputs(t, seed=10 + t, device=device)
        a, b = dual(x, w, ids), derived(x, w, ids)
        assert dual.last_path == derived.last_path and torch.equal(a, b)


def test_bf16_only_layer(ckpts, source, device):
    layer = load_moe_layer(ConvertedCheckpoint(ckpts["derive"]), BF16_ONLY, device=device, bands=BANDS)
    assert not layer.native and layer.weights.w13 is None and layer.path_for(4) == "bf16"
    x, w, ids = inputs(4, seed=3, device=device)
    assert rel_err(layer(x, w, ids), reference64(x, w, ids, *source[BF16_ONLY])) < TOL["bf16"]
    assert layer.last_path == "bf16"


def test_empty_band_frees_fp8(ckpts, device):
    layer = load_moe_layer(ConvertedCheckpoint(ckpts["dual"]), DUAL, device=device, bands=(8, 9))
    assert not layer.native and layer.weights.w13 is None and layer.weights.w2_scale is None


def _native_weights(c, prefix, device):
    """The FP8 tensors of one group read as they are on disk (no BF16 derived), like a native_only load."""
    got = {sfx: c.read(f"{prefix}.{sfx}", device=device) for sfx in fmt.NATIVE_TENSORS}
    return runtime_moe.ExpertWeights(
        got["w13_weight"], got["w13_weight_scale"], got["w2_weight"], got["w2_weight_scale"], None, None,
        storage=fmt.NATIVE_ONLY,
    )  # fmt: skip


def test_empty_bf16_band_allocates_no_bf16(ckpts, source, device, monkeypatch):
    # --bf16 derive and an empty BF16 band: the layer derives nothing, holds FP8 + scales only, runs native
    w = _native_weights(ConvertedCheckpoint(ckpts["derive"]), DUAL, device)
    fp8_bytes = w.nbytes()
    monkeypatch.setattr(runtime_moe, "bf16_copies", lambda *a: pytest.fail("BF16 copies derived"))
    before = torch.cuda.memory_allocated() if ON_GPU else 0
    layer = runtime_moe.MoELayer(w, bf16_max_tokens=0, bf16_min_tokens=NEVER, native_mode="w8a16")
    assert not layer.uses_bf16 and not layer.weights.has_bf16 and layer.resident_bytes() == fp8_bytes
    if ON_GPU:
        assert torch.cuda.memory_allocated() == before
    for t in (1, 3, 9):
        assert layer.path_for(t) == "w8a16"
        x, wt, ids = inputs(t, seed=50 + t, device=device)
        assert rel_err(layer(x, wt, ids), reference64(x, wt, ids, *source[DUAL])) < TOL["w8a16"]


def test_empty_bf16_band_drops_given_bf16(ckpts, device):
    # a dual layer with an empty BF16 band keeps its FP8 tensors and lets the BF16 copies go
    layer = load_moe_layer(ConvertedCheckpoint(ckpts["dual"]), DUAL, device=device, bands=(0, NEVER))
    w = layer.weights
    assert layer.native and w.w13_bf16 is None and w.w2_bf16 is None and w.has_native
    assert layer.resident_bytes() == sum(t.nbytes for t in (w.w13, w.w13_scale, w.w2, w.w2_scale))
    assert layer.path_for(1) == layer.path_for(1 << 20) == layer.native_mode


def test_needs_bf16():
    assert not runtime_moe.needs_bf16(0, NEVER)
    assert runtime_moe.needs_bf16(0, 4096) and runtime_moe.needs_bf16(8, NEVER)
    assert runtime_moe.needs_bf16(0, NEVER, storage=fmt.BF16_ONLY)
    assert runtime_moe.needs_bf16(0, NEVER, expert_parallel=True)


@pytest.mark.parametrize("native_mode", ["w8a16", "w8a8"])  # W8A8's BF16-dot rows use the same routes
def test_large_scale_bytes_take_the_exact_route(ckpts, device, native_mode):
    # the planted layer holds scale byte 253, past what the one-multiply NVIDIA routes decode (143)
    c = ConvertedCheckpoint(ckpts["dual"])
    layer = load_moe_layer(c, PLANTED, device=device, bands=BANDS, native_mode=native_mode)
    assert layer.native and layer.dequant == "fp32"
    assert load_moe_layer(c, DUAL, device=device, bands=BANDS, native_mode=native_mode).dequant == "auto"


@pytest.mark.parametrize("t", [1, 4])  # BF16 and native
def test_tp_ranks_sum_to_whole(ckpts, source, t, device):
    c = ConvertedCheckpoint(ckpts["dual"])
    whole = load_moe_layer(c, DUAL, device=device, bands=BANDS)
    ranks = [load_moe_layer(c, DUAL, device=device, bands=BANDS, ranks=Ranks(tp_rank=r, tp_size=2)) for r in range(2)]
    assert ranks[0].weights.w13.shape == (4, 64, 128) and ranks[1].weights.w2_scale.shape == (4, 1, 128)
    x, w, ids = inputs(t, seed=20 + t, device=device)
    parts = [r(x, w, ids) for r in ranks]
    assert ranks[0].last_path == whole.path_for(t)
    total = parts[0].float() + parts[1].float()  # the all-reduce
    assert rel_err(total, whole(x, w, ids)) < 1e-2  # each partial is rounded to BF16 once
    assert rel_err(total, reference64(x, w, ids, *source[DUAL])) < TOL[whole.last_path]


@pytest.mark.parametrize("ep_size", [2, 4])
def test_expert_parallel(ckpts, source, ep_size, device):
    c = ConvertedCheckpoint(ckpts["derive"])  # native_only on disk: BF16 derived, FP8 dropped
    ranks = [
        load_moe_layer(c, DUAL, device=device, bands=BANDS, ranks=Ranks(ep_rank=r, ep_size=ep_size))
        for r in range(ep_size)
    ]
    assert all(r.expert_parallel and not r.native and r.weights.w13 is None for r in ranks)
    x, w, ids = inputs(4, seed=5, device=device)  # T 4 would be native: EP takes BF16
    total = sum(r(x, w, ids).float() for r in ranks)
    assert ranks[-1].last_path == "bf16"
    assert rel_err(total, reference64(x, w, ids, *source[DUAL])) < TOL["bf16"]
    # every token routed to the last rank's experts only: the others contribute exactly zero
    ids1 = torch.tensor([[3, 2], [3, 2], [3, 2]], dtype=torch.int32, device=device)[:, : 4 // ep_size]
    w1 = torch.full(ids1.shape, 1.0, device=device)
    for r in ranks[:-1]:
        assert torch.count_nonzero(r(x[:3], w1, ids1)) == 0
    assert rel_err(ranks[-1](x[:3], w1, ids1), reference64(x[:3], w1, ids1, *source[DUAL])) < TOL["bf16"]


def test_reference_fallback(ckpts, source, device):
    # where Triton cannot run, the kernels' torch reference (forced here)
    layer = load_moe_layer(ConvertedCheckpoint(ckpts["dual"]), DUAL, device=device, bands=BANDS)
    layer.triton = False
    for t in (1, 4, 5):
        x, w, ids = inputs(t, seed=30 + t, device=device)
        assert rel_err(layer(x, w, ids), reference64(x, w, ids, *source[DUAL])) < TOL[layer.last_path]


def test_router():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0], [3.0, 0.0, 0.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])  # picks expert 3 without weighing it by the bias
    w, ids = route(logits, bias, top_k=2)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.tolist() == [[3, 2], [3, 0]]
    s = torch.sigmoid(logits)
    want0 = torch.stack([s[0, 3], s[0, 2]]) / (s[0, 3] + s[0, 2]) * 2.0
    assert torch.allclose(w[0], want0) and torch.allclose(w.sum(1), torch.full((2,), 2.0))
    w, ids = route(logits, torch.zeros(4), top_k=1, routed_scaling_factor=1.0)
    assert ids.flatten().tolist() == [2, 0] and torch.equal(w, torch.ones(2, 1))


def test_bands_for(device):
    table = {"Some GPU": {"bf16_max_tokens": 4, "bf16_min_tokens": 512}}
    assert bands_for("cpu", default=(8, 1024), table=table) == (8, 1024)
    if ON_GPU:
        name = torch.cuda.get_device_name()
        assert bands_for("cuda", default=(8, 1024), table={name: table["Some GPU"]}) == (4, 512)
        # a checkpoint without a BF16 band keeps none: the table moves bands, it adds no BF16 copies
        assert bands_for("cuda", default=(0, NEVER), table={name: table["Some GPU"]}) == (0, NEVER)


def test_default_conversion_loads_fp8_alone(tmp_path, device):
    """The converter's defaults (--bf16 derive, no BF16 band): a loaded layer holds FP8 and scales only,
    on every device (a device's measured bands do not add BF16 copies), and runs native at every T."""
    from make_tiny_checkpoint import make_tiny_checkpoint

    from mxconvert.convert import convert

    src = make_tiny_checkpoint(tmp_path / "src", mtp=False, num_shards=1, **SHAPE)
    convert(model_dir=str(src), out_dir=str(tmp_path / "out"), progress=False)
    layer = load_moe_layer(ConvertedCheckpoint(tmp_path / "out"), DUAL, device=device)
    w = layer.weights
    assert w.storage == fmt.NATIVE_ONLY and w.w13_bf16 is None and w.w2_bf16 is None
    assert layer.resident_bytes() == sum(t.nbytes for t in (w.w13, w.w13_scale, w.w2, w.w2_scale))
    assert {layer.path_for(t) for t in (1, 8, 4096, 1 << 20)} == {layer.native_mode}


@pytest.mark.gpu
@pytest.mark.parametrize("ep", [False, True])
def test_cuda_graph_replay(ckpts, ep):
    # no host sync in forward, EP's id mapping included: capture once, rewrite routing, replay
    c = ConvertedCheckpoint(ckpts["dual"])
    layer = load_moe_layer(c, DUAL, device="cuda", bands=BANDS, ranks=Ranks(ep_rank=1, ep_size=2) if ep else ONE_RANK)
    x, w, ids = inputs(4, seed=40, device="cuda")
    graph, out = capture_cuda_graph(lambda: layer(x, w, ids))
    x2, w2, ids2 = inputs(4, seed=41, device="cuda")
    x.copy_(x2), w.copy_(w2), ids.copy_(ids2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, layer(x2, w2, ids2))


def test_the_layer_leaves_the_callers_weights_alone(ckpts):
    """MoELayer trims and derives on its own copy of ExpertWeights: the caller's object keeps what it had."""

    w = ConvertedCheckpoint(ckpts["dual"]).load_experts(DUAL)
    before = {k: getattr(w, k) for k in ("w13", "w13_scale", "w2", "w2_scale", "w13_bf16", "w2_bf16")}
    layer = runtime_moe.MoELayer(w, bf16_max_tokens=0, bf16_min_tokens=NEVER)  # drops the BF16 copies it keeps
    assert layer.weights.w13_bf16 is None and w.w13_bf16 is not None
    assert all(getattr(w, k) is t for k, t in before.items())
