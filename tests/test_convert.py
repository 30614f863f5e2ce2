"""The converter against docs/FORMAT.md, bit for bit, read back with the safetensors library (not our reader).

Shape legend: E experts, H hidden, I expert intermediate, G = K // 32.
"""

import hashlib
import json
import re

import pytest
import torch
import yaml
from make_tiny_checkpoint import NOT_COPIED, make_tiny_checkpoint, planted_bytes
from safetensors import safe_open

from mxconvert import __version__, layout
from mxconvert.convert import convert
from mxconvert.errors import MxconvertError
from mxconvert.verify import verify

E, H, I = 8, 160, 96
PROJ = {"minimax": ("w1", "w3", "w2"), "hf": ("gate_proj", "up_proj", "down_proj"), "compressed": ("w1", "w3", "w2")}


def load_all(directory):
    """name -> tensor (uint8 view for FP8 and scales), across every shard of a directory."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                out[name] = t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz) else t
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("src") / "tiny", seed=3)


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """Three conversions of one source: default (--bf16 derive), --long-context, --bf16 materialize."""
    outs = {}
    for label, opts in {"default": {}, "long": {"long_context": True}, "materialize": {"bf16": "materialize"}}.items():
        out = tmp_path_factory.mktemp(label) / "out"
        convert(model_dir=str(source), out_dir=str(out), max_shard_size="1MB", progress=False, **opts)
        outs[label] = out
    return outs


def expected_storage(prefix, label):
    m = re.match(r"language_model\.model\.layers\.(\d+)\.", prefix)
    if label == "long" and m and int(m[1]) % 5 == 0:
        return "bf16_only"
    return "dual" if label == "materialize" else "native_only"


@pytest.mark.parametrize("label", ["default", "long", "materialize"])
def test_every_format_rule_bit_exact(source, converted, label):
    out, src, got = converted[label], load_all(source), load_all(converted[label])
    config = json.loads((out / "config.json").read_text())
    quant = config["quantization_config"]
    layers = quant["experts"]["layers"]
    prefixes = sorted({n.rsplit(".experts.", 1)[0] + ".experts" for n in src if ".experts." in n})
    assert sorted(layers) == prefixes and len(prefixes) == 5  # 4 decoder layers + the MTP group
    for prefix in prefixes:
        storage = expected_storage(prefix, label)
        assert layers[prefix] == storage
        gate, up, down = PROJ["minimax"]
        s = lambda e, p, k: src[f"{prefix}.{e}.{p}.{k}"]  # noqa: E731
        fn_w13 = torch.stack([torch.cat([s(e, gate, "weight"), s(e, up, "weight")]) for e in range(E)])  # [E, 2I, H]
        fn_s13 = torch.stack(
            [torch.cat([s(e, gate, "weight_scale_inv"), s(e, up, "weight_scale_inv")]) for e in range(E)]
        )
        fn_w2 = torch.stack([s(e, down, "weight") for e in range(E)])  # [E, H, I]
        fn_s2 = torch.stack([s(e, down, "weight_scale_inv") for e in range(E)])  # [E, H, I/32]
        names = {k for k in got if k.startswith(prefix + ".")}
        native = {f"{prefix}.{k}" for k in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")}
        bf16 = {f"{prefix}.w13_weight_bf16", f"{prefix}.w2_weight_bf16"}
        assert names == {"dual": native | bf16, "native_only": native, "bf16_only": bf16}[storage]
        for stack, fn_w, fn_s in (("w13", fn_w13, fn_s13), ("w2", fn_w2, fn_s2)):
            want_w = fn_w.masked_fill(fn_w == 0x80, 0)  # FN -0 -> FNUZ +0; every other byte kept
            want_s = (fn_s + 1).transpose(1, 2)  # +1, packed [E, G, N]
            exact = layout.dequantize(fn_w, fn_s, fnuz=False)
            if f"{prefix}.{stack}_weight" in got:
                w, sc = got[f"{prefix}.{stack}_weight"], got[f"{prefix}.{stack}_weight_scale"]
                assert torch.equal(w, want_w) and torch.equal(sc, want_s)
                assert not ((w & 0x7F) == 0x7F).any()
                assert torch.equal(layout.dequantize(w, sc.transpose(1, 2), fnuz=True), exact)
            if f"{prefix}.{stack}_weight_bf16" in got:
                b = got[f"{prefix}.{stack}_weight_bf16"]
                assert b.dtype == torch.bfloat16 and b.shape == fn_w.shape
                rounded = layout.dequantize(want_w, fn_s + 1, fnuz=True).to(torch.bfloat16)
                assert torch.equal(b.view(torch.int16), rounded.view(torch.int16))
    # every other tensor byte for byte, under its own name; no expert tensor left behind
    passed = {n for n in src if ".experts." not in n}
    for name in passed:
        assert torch.equal(got[name].view(torch.uint8), src[name].view(torch.uint8)), name
    assert set(got) - passed == {n for n in got if any(n.startswith(p + ".") for p in layers)}


def test_planted_edge_bytes_survive(source, converted):
    got = load_all(converted["materialize"])
    prefix = "language_model.model.layers.3.block_sparse_moe.experts"
    w13, w2 = got[f"{prefix}.w13_weight"], got[f"{prefix}.w2_weight"]
    s13, s2 = got[f"{prefix}.w13_weight_scale"], got[f"{prefix}.w2_weight_scale"]
    for name, row, col, byte in planted_bytes():
        e, proj, kind = re.match(r".*\.experts\.(\d+)\.(\w+)\.(\w+)$", name).groups()
        e = int(e)
        if kind == "weight":
            out = w2[e, row, col] if proj == "w2" else w13[e, row + (I if proj == "w3" else 0), col]
            assert int(out) == (0 if byte == 0x80 else byte)
        else:
            out = s2[e, col, row] if proj == "w2" else s13[e, col, row + (I if proj == "w3" else 0)]
            assert int(out) == byte + 1
    last_row = got[f"{prefix}.w2_weight_bf16"][E - 1, H - 1].float()
    assert torch.isinf(last_row[-17:]).sum() == 2  # 448 and -448 under scale 253: beyond BF16's range


def test_index_config_card_manifest_and_side_files(source, converted):
    out = converted["default"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert list(weight_map) == sorted(weight_map)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and set(weight_map.values()) == {p.name for p in shards}
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", p.name) for p in shards)
    tensors = load_all(out)
    assert set(weight_map) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:  # under --max-shard-size unless one tensor is larger
        with safe_open(shard, "pt") as f:
            sizes = [f.get_slice(n).get_shape() for n in f.keys()]
        assert len(sizes) == 1 or shard.stat().st_size <= 1_000_000 + 20_000

    config, src_config = (json.loads((d / "config.json").read_text()) for d in (out, source))
    quant = config.pop("quantization_config")
    src_quant = src_config.pop("quantization_config")
    assert config == src_config  # everything else unchanged
    assert quant["quant_method"] == "mxconvert" and quant["format_version"] == 1
    assert quant["source_quantization_config"] == src_quant
    experts = quant["experts"]
    assert {k: experts[k] for k in ("value_dtype", "scale_dtype", "block_size", "scale_layout")} == {
        "value_dtype": "float8_e4m3fnuz",
        "scale_dtype": "e8m0",
        "block_size": 32,
        "scale_layout": "expert_kblock_n",
    }
    assert experts["dispatch"] == {"bf16_max_tokens": 0, "bf16_min_tokens": 2**30}  # the empty BF16 band
    assert experts["activation"] == {"kind": "swigluoai", "alpha": 1.702, "beta": 1.0, "limit": 7.0}
    assert quant["producer"] == {"name": "mxconvert", "version": __version__}

    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in meta  # a local source has no repo id to name
    assert {"mxfp8", "fp8", "fnuz", "mi300x", "moe"} <= set(meta["tags"]) and meta["license"] == "mit"
    assert __version__ in card and "derive" in card and "no BF16 band" in card

    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "modeling_minimax_m3.py",
    ):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert not (out / NOT_COPIED).exists() and not (out / NOT_COPIED.split("/")[0]).exists()
    assert not list(out.glob("*.partial"))

    manifest = json.loads((out / "mxconvert.json").read_text())
    files = {f["name"]: f for f in manifest["files"]}
    assert set(files) == {p.name for p in out.iterdir()} - {"mxconvert.json"}
    for name, f in files.items():
        data = (out / name).read_bytes()
        assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    inputs = {f["name"]: f for f in manifest["source"]["files"]}
    assert {n for n, f in inputs.items() if "header_sha256" in f} == {p.name for p in source.glob("*.safetensors")}
    for name in ("config.json", "model.safetensors.index.json", "README.md", "tokenizer.json"):  # read once, hashed
        assert inputs[name]["sha256"] == hashlib.sha256((source / name).read_bytes()).hexdigest()
    assert manifest["options"]["bf16"] == "derive" and manifest["tool"]["version"] == __version__


@pytest.mark.parametrize("naming", ["hf", "compressed"])
def test_other_namings_give_the_same_layout(tmp_path, naming, converted):
    src = make_tiny_checkpoint(tmp_path / "src", seed=3, naming=naming)
    out = tmp_path / "out"
    convert(model_dir=str(src), out_dir=str(out), max_shard_size="1MB", progress=False)
    verify(out_dir=out, source=src)  # bit for bit against the source, named its own way
    a, b = load_all(out), load_all(converted["default"])
    layout_of = lambda tensors: {n: (t.dtype, t.shape) for n, t in tensors.items() if ".experts." in n}  # noqa: E731
    assert layout_of(a) == layout_of(b) and len(layout_of(a)) == 5 * 4  # native_only: FP8 and scales


def test_single_file_source_and_verify_with_source(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "src", num_shards=1, mtp=False)
    out = tmp_path / "out"
    convert(model_dir=str(src), out_dir=str(out), progress=False)
    assert len(list(out.glob("*.safetensors"))) == 1
    verify(out_dir=out, source=src, full=True)


def test_verify_catches_a_changed_byte_and_a_missing_manifest(converted, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(converted["default"], out)
    verify(out_dir=out)
    shard = sorted(out.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    verify(out_dir=out, full=False)  # the cheap part reads no data
    with pytest.raises(MxconvertError, match="sha256 differs"):
        verify(out_dir=out)
    (out / "mxconvert.json").unlink()
    with pytest.raises(MxconvertError, match="not a finished conversion"):
        verify(out_dir=out, full=False)


@pytest.mark.parametrize(
    "poison,match",
    [
        ("language_model.model.layers.4.block_sparse_moe.experts.2.w3.weight", "value byte 0x7F"),
        ("language_model.model.layers.4.block_sparse_moe.experts.5.w2.weight_scale_inv", "scale byte 254"),
    ],
)
def test_bad_source_bytes_name_the_tensor_and_leave_no_finished_output(tmp_path, poison, match):
    byte = 0x7F if poison.endswith(".weight") else 254
    src = make_tiny_checkpoint(tmp_path / "src", poison=((poison, byte),))
    out = tmp_path / "out"
    with pytest.raises(MxconvertError, match=re.escape(poison) + ".*" + match):
        convert(model_dir=str(src), out_dir=str(out), progress=False)
    assert not (out / "mxconvert.json").exists()
    with pytest.raises(MxconvertError):
        verify(out_dir=out, full=False)


def test_missing_expert_is_refused_before_writing(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "src", num_shards=1)
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    del tensors["language_model.model.layers.4.block_sparse_moe.experts.6.w2.weight"]
    save_file(tensors, src / "model.safetensors")
    out = tmp_path / "out"
    with pytest.raises(MxconvertError, match=r"experts\.6: down weight is missing"):
        convert(model_dir=str(src), out_dir=str(out), progress=False)
    assert not out.exists()


def test_out_dir_rules(source, tmp_path):
    with pytest.raises(MxconvertError, match="outside MODEL_DIR"):
        convert(model_dir=str(source), out_dir=str(source / "out"), progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(MxconvertError, match="--force"):
        convert(model_dir=str(source), out_dir=str(out), progress=False)
    with pytest.raises(MxconvertError, match="holds keep.txt, which no mxconvert run of it wrote"):
        convert(model_dir=str(source), out_dir=str(out), force=True, progress=False)  # not ours: refused
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    convert(model_dir=str(source), out_dir=str(out), progress=False)
    convert(model_dir=str(source), out_dir=str(out), force=True, long_context=True, progress=False)  # ours: replaced
    assert json.loads((out / "mxconvert.json").read_text())["options"]["long_context"] is True
    verify(out_dir=out, source=source)


def test_dry_run_writes_nothing(source, tmp_path):
    from mxconvert.dryrun import render

    out = tmp_path / "out"
    plan = convert(model_dir=str(source), out_dir=str(out), dry_run=True, long_context=True)
    assert not out.exists()
    text = render(plan.report)
    assert "language_model.model.layers.5.block_sparse_moe.experts" in text and "bf16_only" in text
    assert "estimated peak memory" in text and f"{len(plan.plan.tensors)} tensors" in text
    real = tmp_path / "real"
    convert(model_dir=str(source), out_dir=str(real), long_context=True, progress=False)
    written = sum(p.stat().st_size for p in real.iterdir() if p.name not in ("mxconvert.json", "README.md"))
    card = (real / "README.md").stat().st_size
    assert plan.report["output_bytes"] - 64 * 1024 == written  # exact, but for the card's allowance
    assert card < 64 * 1024


def test_dry_run_says_what_does_not_fit(source, tmp_path, monkeypatch):
    import mxconvert.outdir
    from mxconvert.dryrun import render

    monkeypatch.setattr(mxconvert.outdir, "free_bytes", lambda path: 1000)
    plan = convert(model_dir=str(source), out_dir=str(tmp_path / "out"), dry_run=True)
    (disk,) = plan.report["disks"]
    assert disk["what"] == "OUT_DIR" and not disk["fits"] and disk["needed_bytes"] == plan.report["output_bytes"]
    assert "OUT_DIR: needs" in render(plan.report) and "DOES NOT FIT" in render(plan.report)


def test_hub_source_is_named_in_card_and_manifest(source, tmp_path, hub):
    hub.add_repo("MiniMaxAI/MiniMax-M3-MXFP8", owner="minimax")
    hub.put_files("MiniMaxAI/MiniMax-M3-MXFP8", {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()})
    revision = hub.repos["MiniMaxAI/MiniMax-M3-MXFP8"]["branches"]["main"]
    out = tmp_path / "out"
    convert(model_dir="MiniMaxAI/MiniMax-M3-MXFP8", out_dir=str(out), bf16="derive", progress=False)
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "MiniMaxAI/MiniMax-M3-MXFP8" and meta["base_model_relation"] == "quantized"
    assert revision in card and "derive" in card
    manifest = json.loads((out / "mxconvert.json").read_text())
    assert manifest["source"]["repo_id"] == "MiniMaxAI/MiniMax-M3-MXFP8" and manifest["source"]["revision"] == revision
    assert not any(str(tmp_path) in json.dumps(f) for f in manifest["source"]["files"])  # no cache path


def test_offline_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(MxconvertError, match="HF_HUB_OFFLINE is set"):
        convert(model_dir="nobody/not-a-model", out_dir=str(tmp_path / "out"), progress=False)


@pytest.mark.gpu
def test_bf16_copies_on_the_gpu_are_bit_identical(source, converted, tmp_path):
    out = tmp_path / "out"
    convert(model_dir=str(source), out_dir=str(out), max_shard_size="1MB", device="cuda", progress=False)
    for cpu_shard in sorted(converted["default"].glob("*.safetensors")):
        assert (out / cpu_shard.name).read_bytes() == cpu_shard.read_bytes()


def test_index_and_shards_that_disagree_are_refused(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "src")
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "language_model.model.layers.0.input_layernorm.weight"
    index["weight_map"][name + ".missing"] = index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    with pytest.raises(MxconvertError, match=r"\.missing: is in model\.safetensors\.index\.json under .* but not"):
        convert(model_dir=str(src), out_dir=str(tmp_path / "out"), progress=False)
    del index["weight_map"][name + ".missing"], index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    with pytest.raises(MxconvertError, match=re.escape(name) + r": is in model-0000\d-of-00004\.safetensors but not"):
        convert(model_dir=str(src), out_dir=str(tmp_path / "out"), progress=False)
