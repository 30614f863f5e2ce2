"""The tiny-checkpoint generator writes the input of docs/FORMAT.md: names, dtypes, shapes, shards, planted bytes."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from make_tiny_checkpoint import EDGE_FP8, EDGE_SCALE, NOT_COPIED, make_tiny_checkpoint, planted_bytes
from safetensors import safe_open

LM = "language_model.model"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_tiny_checkpoint.py"


def headers(root: Path) -> dict[str, tuple[str, dict]]:
    """name -> (file name, safetensors header entry), read straight from the files."""
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        for name, entry in header.items():
            assert name not in out, f"{name} in two files"
            out[name] = (f.name, entry)
    return out


def tensor_bytes(root: Path, file: str, name: str) -> torch.Tensor:
    with safe_open(root / file, "pt") as f:
        t = f.get_tensor(name)
    return t.view(torch.uint8) if t.element_size() == 1 else t


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


def test_same_seed_gives_identical_files_and_another_seed_differs(tiny, tmp_path):
    again = file_bytes(make_tiny_checkpoint(tmp_path / "a", seed=0))
    assert again == file_bytes(tiny)
    other = file_bytes(make_tiny_checkpoint(tmp_path / "b", seed=1))
    assert other.keys() == again.keys()
    assert all(other[k] != again[k] for k in again if k.endswith(".safetensors"))


def test_tensor_values_do_not_depend_on_the_shard_layout(tiny, tmp_path):
    single = make_tiny_checkpoint(tmp_path / "one", seed=0, num_shards=1)
    assert not (single / "model.safetensors.index.json").exists()
    h1, h4 = headers(single), headers(tiny)
    assert set(h1) == set(h4) and {f for f, _ in h1.values()} == {"model.safetensors"}
    for name in list(h4)[::7]:
        assert torch.equal(tensor_bytes(single, "model.safetensors", name), tensor_bytes(tiny, h4[name][0], name))


def test_config_follows_the_minimax_schema(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["model_type"] == "minimax_m3_vl"
    assert cfg["architectures"] == ["MiniMaxM3SparseForConditionalGeneration"]  # vLLM 0.33's registry name
    assert cfg["quantization_config"] == {
        "quant_method": "mxfp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [1, 32],
        "ignored_layers": cfg["quantization_config"]["ignored_layers"],
    }
    assert f"{LM}.layers.3.block_sparse_moe.gate" in cfg["quantization_config"]["ignored_layers"]
    t = cfg["text_config"]
    assert t["model_type"] == "minimax_m3_text"
    assert (t["hidden_size"], t["intermediate_size"], t["num_local_experts"], t["num_experts_per_tok"]) == (
        160,
        96,
        8,
        2,
    )
    assert t["hidden_size"] % 128 != 0
    assert (t["swiglu_alpha"], t["swiglu_beta"], t["swiglu_limit"], t["routed_scaling_factor"]) == (
        1.702,
        1.0,
        7.0,
        2.0,
    )
    assert t["scoring_func"] == "sigmoid" and t["first_k_dense_replace"] == 3
    assert t["mlp_layer_types"] == ["dense"] * 3 + ["sparse"] * 4 and t["num_hidden_layers"] == 7
    # what vLLM's MiniMaxM3TextConfig and model read: MoE layers, shared expert count, per-head q/k norm
    assert t["moe_layer_freq"] == [0] * 3 + [1] * 4 and t["n_shared_experts"] == 1 and t["use_routing_bias"]
    assert (t["use_qk_norm"], t["qk_norm_type"]) == (True, "per_head")
    assert t["sparse_attention_config"]["use_sparse_attention"] is False
    v = cfg["vision_config"]
    assert {"img_token_compression_config", "patch_size", "num_channels", "layer_norm_eps"} <= set(v)


def test_text_only_is_the_vl_decoder_at_the_top(tiny, tmp_path):
    """text_only (MiniMaxM3SparseForCausalLM) holds the VL checkpoint's decoder tensors, shapes and text
    config, without the `language_model.` prefix and without the vision tower."""
    text = make_tiny_checkpoint(tmp_path / "t", text_only=True)
    ht, hv = headers(text), headers(tiny)
    shape = {n: (e["dtype"], e["shape"]) for n, (_, e) in ht.items()}
    decoder = {n.removeprefix("language_model."): (e["dtype"], e["shape"]) for n, (_, e) in hv.items()}
    assert shape == {n: v for n, v in decoder.items() if n.startswith(("model.", "lm_head."))}
    assert set(decoder) - set(shape) and all(
        n.startswith(("vision_tower.", "multi_modal_projector.", "patch_merge_mlp.")) for n in set(decoder) - set(shape)
    )
    cfg_t = json.loads((text / "config.json").read_text())
    cfg_v = json.loads((tiny / "config.json").read_text())
    assert cfg_t["architectures"] == ["MiniMaxM3SparseForCausalLM"]
    assert {k: v for k, v in cfg_t.items() if k != "quantization_config"} == cfg_v["text_config"]
    ignored_t, ignored_v = (c["quantization_config"]["ignored_layers"] for c in (cfg_t, cfg_v))
    assert ["language_model." + n for n in ignored_t] == [n for n in ignored_v if n.startswith("language_model.")]
    for name, row, col, byte in planted_bytes(text_only=True):
        assert int(tensor_bytes(text, ht[name][0], name)[row, col]) == byte


def test_names_dtypes_and_shapes(tiny):
    h = headers(tiny)
    H, I, E, Q, KV, D, HD = 160, 96, 8, 128, 64, 192, 32

    def has(name, dtype, shape):
        assert name in h, name
        assert (h[name][1]["dtype"], h[name][1]["shape"]) == (dtype, list(shape)), name

    def mx(name, out, inp):
        has(f"{name}.weight", "F8_E4M3", (out, inp))
        has(f"{name}.weight_scale_inv", "U8", (out, inp // 32))

    for L in range(7):
        p = f"{LM}.layers.{L}"
        for proj, out, inp in (("q_proj", Q, H), ("k_proj", KV, H), ("v_proj", KV, H), ("o_proj", H, Q)):
            mx(f"{p}.self_attn.{proj}", out, inp)
        has(f"{p}.self_attn.q_norm.weight", "BF16", (HD,)), has(f"{p}.self_attn.k_norm.weight", "BF16", (HD,))
        has(f"{p}.input_layernorm.weight", "BF16", (H,))
        has(f"{p}.post_attention_layernorm.weight", "BF16", (H,))
        moe = f"{p}.block_sparse_moe"
        if L < 3:
            mx(f"{p}.mlp.gate_proj", D, H), mx(f"{p}.mlp.up_proj", D, H), mx(f"{p}.mlp.down_proj", H, D)
            assert not any(n.startswith(moe) for n in h)
            continue
        assert not any(n.startswith(f"{p}.mlp.") for n in h)
        has(f"{moe}.gate.weight", "BF16", (E, H))
        has(f"{moe}.e_score_correction_bias", "F32", (E,))
        mx(f"{moe}.shared_experts.gate_proj", I, H), mx(f"{moe}.shared_experts.down_proj", H, I)  # I * 1 shared
        for e in range(E):
            mx(f"{moe}.experts.{e}.w1", I, H), mx(f"{moe}.experts.{e}.w3", I, H), mx(f"{moe}.experts.{e}.w2", H, I)
        assert sum(f"{moe}.experts." in n for n in h) == E * 6
    for e in range(E):  # the MTP module's experts live outside layers.{L}
        mx(f"{LM}.mtp.0.block_sparse_moe.experts.{e}.w1", I, H)
        mx(f"{LM}.mtp.0.block_sparse_moe.experts.{e}.w2", H, I)
    for name in (f"{LM}.embed_tokens.weight", "language_model.lm_head.weight"):
        has(name, "BF16", (256, H))
    has(f"{LM}.norm.weight", "BF16", (H,))
    # vLLM's vision tower (patches, pre-norm, 1 layer of 16), projector, patch merger: loader names, BF16
    vt = "vision_tower.vision_model"
    has(f"{vt}.embeddings.patch_embedding.weight", "BF16", (32, 3, 2, 2, 2))
    has(f"{vt}.encoder.layers.0.self_attn.q_proj.bias", "BF16", (32,))
    has(f"{vt}.encoder.layers.0.mlp.fc1.weight", "BF16", (64, 32))
    has("multi_modal_projector.linear_1.weight", "BF16", (H, 32))
    has("patch_merge_mlp.linear_1.weight", "BF16", (H, 4 * H))
    other = [n for n in h if not n.startswith(LM + ".") and n != "language_model.lm_head.weight"]
    assert len(other) == 1 + 2 + 16 + 4 + 4 and all(h[n][1]["dtype"] == "BF16" for n in other)


def test_index_and_shard_spread(tiny):
    h = headers(tiny)
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {n: f for n, (f, _) in sorted(h.items())}
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(e["data_offsets"][1] - e["data_offsets"][0] for _, e in h.values())
    assert sorted({f for f, _ in h.values()}) == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    p = f"{LM}.layers.3.block_sparse_moe.experts"
    assert len({h[n][0] for n in h if n.startswith(p + ".")}) == 4
    assert any(len({h[n][0] for n in h if n.startswith(f"{p}.{e}.")}) > 1 for e in range(8))


def test_planted_bytes_are_where_documented(tiny):
    h = headers(tiny)
    plants = planted_bytes()
    assert sorted(b for n, _, _, b in plants if n.endswith(".weight")) == sorted(EDGE_FP8 * 2)
    assert sorted(b for n, _, _, b in plants if n.endswith("_scale_inv")) == sorted(EDGE_SCALE * 2)
    for name, row, col, byte in plants:
        assert name.startswith(f"{LM}.layers.3.block_sparse_moe.experts.")
        assert int(tensor_bytes(tiny, h[name][0], name)[row, col]) == byte, (name, row, col)
    # the last expert's down row H-1 pairs the edge values with scale 253 (BF16 overflow case)
    assert (f"{LM}.layers.3.block_sparse_moe.experts.7.w2.weight_scale_inv", 159, 2, 253) in plants


def test_random_bytes_are_valid_and_in_range(tiny):
    h = headers(tiny)
    planted = {(n, r, c) for n, r, c, _ in planted_bytes()}
    seen = torch.zeros(256, dtype=torch.bool)
    for name, (f, e) in h.items():
        if e["dtype"] == "F8_E4M3":
            t = tensor_bytes(tiny, f, name)
            assert not ((t & 0x7F) == 0x7F).any(), name
            seen[t.flatten().long()] = True
        elif e["dtype"] == "U8":
            t = tensor_bytes(tiny, f, name).clone()
            for n, r, c in planted:
                if n == name:
                    t[r, c] = 124
            assert int(t.min()) >= 120 and int(t.max()) <= 127, name
    assert int(seen.sum()) == 254  # every finite E4M3FN code occurs


def test_side_files(tiny):
    card = (tiny / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "mit" and front["library_name"] == "transformers"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        json.loads((tiny / name).read_text())
    assert (tiny / "chat_template.jinja").read_text().startswith("{%")
    compile((tiny / "modeling_minimax_m3.py").read_text(), "modeling_minimax_m3.py", "exec")
    assert (tiny / NOT_COPIED).is_file()


def test_compressed_and_hf_naming(tmp_path):
    c = make_tiny_checkpoint(tmp_path / "c", naming="compressed", mtp=False, num_shards=2)
    q = json.loads((c / "config.json").read_text())["quantization_config"]
    assert (q["quant_method"], q["format"]) == ("compressed-tensors", "mxfp8-quantized")
    hc = headers(c)
    assert not any(n.endswith("weight_scale_inv") for n in hc) and not any(".mtp." in n for n in hc)
    assert hc[f"{LM}.layers.3.block_sparse_moe.experts.0.w1.weight_scale"][1]["shape"] == [96, 5]
    for name, row, col, byte in planted_bytes(naming="compressed"):
        assert int(tensor_bytes(c, hc[name][0], name)[row, col]) == byte

    f = make_tiny_checkpoint(tmp_path / "f", naming="hf", num_shards=3)
    hf = headers(f)
    p = f"{LM}.layers.4.block_sparse_moe.experts.5"
    assert hf[f"{p}.gate_proj.weight"][1]["shape"] == [96, 160] and hf[f"{p}.down_proj.weight"][1]["shape"] == [160, 96]
    assert not any(".w1." in n or ".w2." in n for n in hf)
    for name, row, col, byte in planted_bytes(naming="hf"):
        assert int(tensor_bytes(f, hf[name][0], name)[row, col]) == byte


def test_poison_plants_invalid_bytes_and_rejects_unknown_names(tmp_path):
    w = f"{LM}.layers.4.block_sparse_moe.experts.2.w3.weight"
    s = f"{LM}.layers.5.block_sparse_moe.experts.0.w2.weight_scale_inv"
    root = make_tiny_checkpoint(tmp_path / "p", num_shards=1, poison=[(w, 0x7F), (s, 255)])
    assert int(tensor_bytes(root, "model.safetensors", w)[-1, -1]) == 0x7F
    assert int(tensor_bytes(root, "model.safetensors", s)[-1, -1]) == 255
    with pytest.raises(ValueError, match="poison"):
        make_tiny_checkpoint(tmp_path / "q", poison=[("no.such.weight", 0x7F)])


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="multiples of 32"):
        make_tiny_checkpoint(tmp_path, hidden_size=150)


def test_command_line_matches_the_function(tiny, tmp_path):
    """--edge-bytes writes the function's default (the tests' kind); no flag writes demo=True."""
    for flags, want in (
        (["--edge-bytes"], tiny),
        ([], make_tiny_checkpoint(tmp_path / "demo", seed=0, num_shards=2, demo=True)),
    ):
        out = tmp_path / f"cli{len(flags)}"
        run = subprocess.run(
            [sys.executable, str(SCRIPT), str(out), "--seed", "0", *flags] + ([] if flags else ["--num-shards", "2"]),
            capture_output=True,
            text=True,
            check=True,
        )
        assert run.stdout.strip() == str(out)
        assert file_bytes(out) == file_bytes(want)
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "x"), "--fp8-values", "mxfp8"], capture_output=True, text=True
    )
    assert run.returncode == 2 and "--fp8-values needs --edge-bytes" in run.stderr


def test_demo_weights_are_mxfp8_quantized_gaussians_without_planted_bytes(tmp_path):
    demo = make_tiny_checkpoint(tmp_path / "d", demo=True, num_shards=1)
    h = headers(demo)
    plants = planted_bytes()
    found = [int(tensor_bytes(demo, h[n][0], n)[r, c]) for n, r, c, _ in plants]
    assert sum(f == b for f, (_, _, _, b) in zip(found, plants)) < len(plants) // 4  # not planted
    w = f"{LM}.layers.3.block_sparse_moe.experts.0.w1"
    values = tensor_bytes(demo, "model.safetensors", f"{w}.weight")  # [I, H]
    scales = tensor_bytes(demo, "model.safetensors", f"{w}.weight_scale_inv")  # [I, H/32]
    x = values.view(torch.float8_e4m3fn).float().view(96, 5, 32) * torch.exp2(scales.float() - 127)[..., None]
    assert 0.015 < x.std().item() < 0.025  # N(0, 0.02), quantized
    block_max = values.view(torch.float8_e4m3fn).float().abs().view(96, 5, 32).amax(-1)
    assert block_max.min() >= 224 and block_max.max() <= 448  # each block's maximum at the top of E4M3FN
    assert not ((values & 0x7F) == 0x7F).any()
    with pytest.raises(ValueError, match="demo draws its own"):
        make_tiny_checkpoint(tmp_path / "e", demo=True, fp8_values="mxfp8")


@pytest.mark.parametrize("demo", [True, False])
def test_demo_forward_is_finite_and_the_edge_kind_overflows(tmp_path, demo):
    """The runtime on the first MoE layer with ordinary inputs (N(0, 1) hidden states, its own router):
    finite and close to the float64 reference from the source on the demo kind; not finite on the edge
    kind, whose planted scale 253 sits in that layer."""
    from mxconvert.convert import convert
    from mxconvert.runtime.loader import ConvertedCheckpoint, load_moe_layer
    from mxconvert.runtime.reference import reference64, source_experts
    from mxconvert.runtime.router import route

    src = make_tiny_checkpoint(tmp_path / "src", demo=demo, num_shards=1, mtp=False, num_hidden_layers=4)
    convert(model_dir=str(src), out_dir=str(tmp_path / "out"), progress=False, bf16_max_tokens=8, bf16_min_tokens=1024)
    ckpt = ConvertedCheckpoint(tmp_path / "out")
    prefix = f"{LM}.layers.3.block_sparse_moe.experts"
    layer = load_moe_layer(ckpt, prefix, native_mode="w8a8")
    gate = ckpt.read(f"{LM}.layers.3.block_sparse_moe.gate.weight").float()
    bias = ckpt.read(f"{LM}.layers.3.block_sparse_moe.e_score_correction_bias")
    w13, w2 = source_experts(src, prefix)
    hidden = torch.randn(16, 160, generator=torch.Generator().manual_seed(0)).bfloat16()
    for t, path, bound in ((1, "bf16", 1e-2), (16, "w8a8", 0.15)):
        weights, ids = route(hidden[:t].float() @ gate.T, bias, top_k=2)
        out = layer(hidden[:t], weights, ids)
        assert layer.last_path == path
        if not demo:
            assert not torch.isfinite(out).all()
            continue
        ref = reference64(hidden[:t], weights, ids, w13, w2, ckpt.activation)
        assert torch.isfinite(out).all() and 0.01 < ref.abs().max() < 10
        assert ((out.double() - ref).norm() / ref.norm()).item() < bound


def test_demo_script_passes_on_the_demo_kind_and_flags_the_edge_kind(tmp_path):
    """scripts/demo_moe.py, as the README's main job runs it (fewer batch sizes): exit 0 with finite
    outputs on the default checkpoint (every batch native: no BF16 band); exit 1, flagged, on the edge
    kind's first MoE layer."""
    from mxconvert.convert import convert

    demo = Path(__file__).resolve().parents[1] / "scripts" / "demo_moe.py"
    for kind, flags in (("demo", []), ("edge", ["--edge-bytes"])):
        src, out = tmp_path / kind, tmp_path / f"{kind}-out"
        subprocess.run([sys.executable, str(SCRIPT), str(src), "--num-hidden-layers", "5", *flags], check=True)
        convert(model_dir=str(src), out_dir=str(out), progress=False)
        command = [sys.executable, str(demo), str(out), "--source", str(src), "--tokens", "1,9"]
        run = subprocess.run(command, capture_output=True, text=True)
        rows = [line.split(" | ") for line in run.stdout.splitlines() if line.startswith(("| 1 |", "| 9 |"))]
        paths = [r[1] for r in rows]
        assert paths in (["w8a8", "w8a8"], ["w8a16", "w8a16"]), run.stdout + run.stderr  # native: by device
        if kind == "demo":
            assert run.returncode == 0 and all(0.01 < float(r[2]) < 10 for r in rows), run.stdout
        else:
            assert run.returncode == 1 and "TOO LARGE" in run.stdout, run.stdout
