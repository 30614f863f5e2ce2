"""Safety and trust (issue 12): never destroy or leak what is not ours, never call wrong output verified.

Each test breaks a copy of one tiny checkpoint (or of its conversion) as a hostile or careless user
would, and checks the outcome: one clean MxconvertError and nothing lost, or an output verify accepts.
"""

import getpass
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from checkpoint_edits import (
    INDEX,
    MANIFEST,
    add_tensor,
    drop_tensors,
    edit_json,
    edit_tensors,
    read_shard,
    refresh_manifest,
    rename_tensor,
    shard_of,
    tensor_names,
    write_shard,
)
from make_tiny_checkpoint import make_tiny_checkpoint

from mxconvert import outdir
from mxconvert.convert import convert
from mxconvert.errors import MxconvertError
from mxconvert.verify import verify

LM = "language_model.model"
EXPERTS4 = f"{LM}.layers.4.block_sparse_moe.experts"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("pristine") / "src", seed=7)


@pytest.fixture
def src(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "src")


@pytest.fixture(scope="module")
def converted(pristine, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "out"
    convert(model_dir=str(pristine), out_dir=str(out), max_shard_size="1MB", progress=False)
    return out


@pytest.fixture
def out(converted, tmp_path):
    return shutil.copytree(converted, tmp_path / "out")


def run(src, out, **options):
    return convert(model_dir=str(src), out_dir=str(out), progress=False, **options)


def snapshot(root):
    """Every path under root (links not followed) with its bytes or link target."""
    found = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            found[path] = (
                os.readlink(path) if os.path.islink(path) else (None if name in dirs else open(path, "rb").read())
            )
    return found


def refused(match, fn, *args, **kwargs):
    with pytest.raises(MxconvertError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


# Data loss ------------------------------------------------------------------------------------------


def hub_cache(src, tmp_path):
    """src laid out as a Hugging Face cache repo: snapshots/<rev>/ holds links into blobs/."""
    repo = tmp_path / "hub" / "models--o--m"
    snap, blobs = repo / "snapshots" / "0123abcd", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for path in sorted(src.iterdir()):
        if path.is_file():
            blob = blobs / f"blob{len(list(blobs.iterdir()))}"
            shutil.copy(path, blob)
            (snap / path.name).symlink_to(os.path.relpath(blob, snap))
    return repo, snap, blobs


def test_hub_cache_source_converts_and_its_blobs_are_never_an_out_dir(src, tmp_path):
    repo, snap, blobs = hub_cache(src, tmp_path)
    out = tmp_path / "out"
    run(snap, out)  # links into the cache's own blobs/ are the normal case
    verify(out_dir=out, source=snap)
    before = snapshot(repo)
    for target in (blobs, repo, repo / "snapshots"):
        for force in (False, True):
            refused(r"(holds .*a file of the source|is, contains or lies inside the source)", run, snap, target,
                    force=force)  # fmt: skip
    assert snapshot(repo) == before


def test_force_refuses_a_directory_that_is_not_a_conversion(src, tmp_path):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("KEY")
    (home / "thesis.tex").write_text("years of work")
    before = snapshot(home)
    message = refused("which no mxconvert run of it wrote", run, src, home, force=True)
    assert ".ssh" in message and "thesis.tex" in message
    assert snapshot(home) == before


def test_force_replaces_only_our_files_and_says_so(src, tmp_path, capsys):
    out = tmp_path / "out"
    run(src, out)
    (out / "notes.txt").write_text("mine")
    refused(r"holds notes.txt, which no mxconvert run of it wrote", run, src, out, force=True)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (out / "config.json").unlink()
    (out / "config.json").symlink_to(victim)  # a link where our file was is not ours to follow or delete
    refused(r"holds config.json", run, src, out, force=True)
    (out / "config.json").unlink()
    shutil.copy(src / "config.json", out / "config.json")
    capsys.readouterr()
    run(src, out, force=True, long_context=True)
    assert "Replacing the conversion in" in capsys.readouterr().err and victim.read_text() == "keep"
    verify(out_dir=out, source=src)


def test_resume_deletes_only_our_leftovers_and_never_writes_through_links(src, tmp_path):
    out = tmp_path / "out"
    run(src, out)
    (out / MANIFEST).unlink()
    record = {"tool": {"version": "0"}, "options": {}, "source": {"files": []}, "shards": {}, "outputs": [],
              "finished": {}}  # fmt: skip
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"precious")
    shard = sorted(out.glob("model-*.safetensors"))[0]
    (out / (shard.name + ".partial")).symlink_to(victim)
    (out / "mxconvert.partial.json").write_text(json.dumps(record))
    refused("holds", run, src, out, resume=True)  # the record names none of those files: not ours
    assert victim.read_bytes() == b"precious"


def test_one_process_per_out_dir(src, tmp_path, converted):
    out = tmp_path / "out"
    with outdir.locked(out):
        message = refused(r"is in use by another mxconvert process \(pid \d+\)", run, src, out)
        assert f"pid {os.getpid()}" in message
        from mxconvert.hub import push

        copy = shutil.copytree(converted, tmp_path / "copy")
        with outdir.locked(copy):
            refused("is in use by another mxconvert process", push, out_dir=copy, repo_id="o/m")
    run(src, out)
    assert not (out / ".mxconvert.lock").exists()
    verify(out_dir=out, source=src)


def test_a_second_process_is_refused_while_a_conversion_runs(src, tmp_path):
    """Two real processes: the second exits with one Error line naming the first's pid, and the first
    finishes with a manifest that verify --source accepts. The first waits at its first expert group
    until the second is done (a file says go), so the overlap is certain."""
    out, go = tmp_path / "out", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "scripts")])}
    first = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time\nimport mxconvert.stream as s\nreal = s.write_group\n"
         "def held(*a, **k):\n    while not os.path.exists(sys.argv[-1]):\n        time.sleep(0.01)\n"
         "    return real(*a, **k)\ns.write_group = held\nfrom mxconvert.cli import main\n"
         "main(sys.argv[1:-1])", str(src), str(out), "--no-progress", str(go)],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while not (out / "mxconvert.partial.json").exists() and first.poll() is None:
            time.sleep(0.01)
        second = subprocess.run(
            [sys.executable, "-m", "mxconvert", str(src), str(out), "--resume"], env=env, capture_output=True, text=True
        )
    finally:
        go.touch()
    assert first.wait() == 0, first.stderr.read()
    assert second.returncode == 1 and second.stderr.strip().startswith("Error: "), second.stderr
    assert f"pid {first.pid}" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    verify(out_dir=out, source=src)


# Leaks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vocab.txt", "LICENSE", "tokenizer.json", "config.json", INDEX, "README.md"])
def test_links_out_of_the_source_are_refused_by_name(src, tmp_path, name):
    secret = tmp_path / "environ"
    secret.write_text("HF_TOKEN=hf_secret")
    (src / name).unlink(missing_ok=True)
    (src / name).symlink_to(secret)
    refused(rf"{name}: is a link to .*, outside the source directory", run, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_links_out_of_the_source_to_a_shard_are_refused(src, tmp_path):
    shard = sorted(src.glob("model-*.safetensors"))[0]
    moved = shutil.move(shard, tmp_path / shard.name)
    shard.symlink_to(moved)
    refused(rf"{shard.name}: is a link to .*, outside the source directory", run, src, tmp_path / "out")


def test_links_inside_the_source_are_followed(src, tmp_path):
    (src / "sub").mkdir()
    shutil.move(src / "tokenizer.json", src / "sub" / "tok.json")
    (src / "tokenizer.json").symlink_to("sub/tok.json")
    out = tmp_path / "out"
    run(src, out)
    assert (out / "tokenizer.json").read_bytes() == (src / "sub" / "tok.json").read_bytes()
    assert not (out / "tokenizer.json").is_symlink()
    verify(out_dir=out, source=src)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_shard_that_is_not_a_file_is_named(src, tmp_path, kind):
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    os.mkfifo(shard) if kind == "fifo" else shard.mkdir()  # a FIFO would block a plain open() forever
    what = "a FIFO" if kind == "fifo" else "a directory"
    refused(rf"{shard.name}: is {what}, not a regular file", run, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_side_file_fifo_is_refused_before_the_first_byte(src, tmp_path):
    os.mkfifo(src / "vocab.txt")
    refused(r"vocab.txt: is a FIFO, not a regular file", run, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nothing_that_leaves_the_machine_names_it(src, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_TopSecretToken123")
    out = tmp_path / "out-of-alice"
    run(src, out)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source"]["name"] == "src" and "path" not in manifest["source"]
    secrets = [str(src), str(src.resolve()), str(tmp_path), str(tmp_path.resolve()), "hf_TopSecretToken123"]
    user = getpass.getuser()
    for path in out.iterdir():
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, (path.name, secret)
        if len(user) > 3:  # short names ("root") occur by chance in tensor bytes
            assert f"/{user}/".encode() not in data, path.name


@pytest.mark.parametrize("shard", ["/etc/passwd", "../victim.safetensors", "sub/x.safetensors", "", ".."])
def test_index_names_outside_the_source_are_refused(src, tmp_path, shard):
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"SECRET-BYTES")
    edit_json(src / INDEX, lambda index: index["weight_map"].update({tensor_names(src)[0]: shard}))
    message = refused(r"model.safetensors.index.json: names .* as a shard, which is not a plain file name", run, src,
                      tmp_path / "out")  # fmt: skip
    assert "SECRET" not in message and "root:" not in message


def test_record_names_outside_out_dir_are_refused(src, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "scripts")]),
           "MXCONVERT_TEST_KILL_AT": "shard:2"}  # fmt: skip
    subprocess.run([sys.executable, "-m", "mxconvert", str(src), str(out), "--no-progress", "--max-shard-size", "1MB"],
                   env=env, capture_output=True)  # fmt: skip
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    edit_json(out / "mxconvert.partial.json", lambda r: r["finished"].update({"../victim.txt": {"size": 4,
              "sha256": "0" * 64}}))  # fmt: skip
    refused(r"mxconvert.partial.json: names '../victim.txt' as a file name", run, src, out, resume=True,
            max_shard_size="1MB")  # fmt: skip
    assert victim.read_text() == "keep"


@pytest.mark.parametrize("name", ["../victim.txt", "/etc/passwd", "a/b"])
def test_manifest_names_outside_out_dir_are_refused(out, tmp_path, name):
    (tmp_path / "victim.txt").write_text("x")
    edit_json(out / MANIFEST, lambda m: m["files"].append({"name": name, "size": 1, "sha256": "0" * 64}))
    refused(r"mxconvert.json: names .* as a file name, which is not a plain file name", verify, out_dir=out)


# Silent wrong output --------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["00", "\u0660", "0\u00b2", "+0", " 0"])
def test_expert_index_aliases_are_refused(src, tmp_path, alias):
    name = f"{EXPERTS4}.0.w1.weight"
    rename_tensor(src, name, name.replace(".0.w1.", f".{alias}.w1."))
    refused(r"lies under `experts.` but is not a routed expert tensor", run, src, tmp_path / "out")


def test_a_name_with_a_trailing_newline_is_not_an_expert_tensor(src, tmp_path):
    name = f"{EXPERTS4}.1.w1.weight"  # `$` would match before the newline and take it for expert 1's w1
    rename_tensor(src, name, name + "\n")
    message = refused(r"w1\.weight\\n: lies under `experts.` but is not a routed expert tensor", run, src,
                      tmp_path / "out")  # fmt: skip
    assert "\n" not in message  # escaped: one line


@pytest.mark.parametrize("layers", [2**31, 2**63, 10**30])
def test_an_absurd_layer_count_is_refused_at_once(src, tmp_path, layers):
    edit_json(src / "config.json", lambda c: c["text_config"].update(num_hidden_layers=layers))
    refused(rf"text_config.num_hidden_layers {layers} is larger than any model's", run, src, tmp_path / "out")


def test_two_names_for_one_expert_tensor_are_refused(src, tmp_path):
    name = f"{EXPERTS4}.3.w1.weight"
    shard = shard_of(src, name)
    header, tensors = read_shard(shard)
    add_tensor(src, shard, f"{EXPERTS4}.3.gate_proj.weight", header[name]["dtype"], header[name]["shape"],
               tensors[name])  # fmt: skip
    refused(r"are the same expert tensor under two names", run, src, tmp_path / "out")


def test_a_source_tensor_named_like_a_converted_one_is_refused(src, tmp_path):
    add_tensor(src, sorted(src.glob("model-*.safetensors"))[0], f"{EXPERTS4}.w13_weight", "U8", [4], b"\0" * 4)
    refused(r"w13_weight: lies under `experts.`", run, src, tmp_path / "out")


def test_a_missing_moe_layer_is_refused(src, tmp_path):
    drop_tensors(src, [n for n in tensor_names(src) if n.startswith(EXPERTS4 + ".")])
    refused(r"layer 4: is a MoE layer in config.json but the checkpoint has no routed experts for it", run, src,
            tmp_path / "out")  # fmt: skip


def test_experts_under_unknown_names_are_refused(src, tmp_path):
    for name in [n for n in tensor_names(src) if n.startswith(EXPERTS4 + ".")]:
        rename_tensor(src, name, name.replace(".experts.", ".routed."))
    refused(r"layer 4: is a MoE layer in config.json", run, src, tmp_path / "out")


def test_no_experts_at_all_is_refused(src, tmp_path):
    drop_tensors(src, [n for n in tensor_names(src) if ".experts." in n])
    refused(r"is a MoE layer in config.json but the checkpoint has no routed experts", run, src, tmp_path / "out")


def test_an_empty_weight_map_is_refused(src, tmp_path):
    edit_json(src / INDEX, lambda index: index.update(weight_map={}))
    refused(r"weight_map is empty", run, src, tmp_path / "out")


def test_quantization_config_only_in_text_config(src, tmp_path):
    def move(config):
        config["text_config"]["quantization_config"] = config.pop("quantization_config")

    edit_json(src / "config.json", move)
    out = tmp_path / "out"
    run(src, out)
    verify(out_dir=out, source=src)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["text_config"]["quantization_config"]["quant_method"] == "mxconvert"
    from mxconvert.runtime.loader import ConvertedCheckpoint

    assert ConvertedCheckpoint(out).layers


def test_config_edited_during_the_run_does_not_reach_the_output(src, tmp_path, monkeypatch):
    import mxconvert.convert as conv

    original = (src / "config.json").read_bytes()
    real = conv.stream_shards

    def edit_then_stream(*args, **kwargs):
        (src / "config.json").write_text(original.decode().replace('"vocab_size": 256', '"vocab_size": 999'))
        return real(*args, **kwargs)

    monkeypatch.setattr(conv, "stream_shards", edit_then_stream)
    out = tmp_path / "out"
    run(src, out)
    assert json.loads((out / "config.json").read_text())["text_config"]["vocab_size"] == 256  # as read at the start
    refused(r"config.json: differs from the source that was converted", verify, out_dir=out, source=src)
    (src / "config.json").write_bytes(original)
    verify(out_dir=out, source=src)


# verify: the whole correspondence -------------------------------------------------------------------


def first_pass_through(out):
    return next(n for n in tensor_names(out) if n.endswith("norm.weight"))


def forge_delete_tensor(out, src):
    drop_tensors(out, [first_pass_through(out)])
    edit_json(out / INDEX, lambda index: index["metadata"].update(total_size=sum(
        len(t) for s in out.glob("model-*.safetensors") for t in read_shard(s)[1].values())))  # fmt: skip


def forge_delete_layer(out, src):
    drop_tensors(out, [n for n in tensor_names(out) if n.startswith(EXPERTS4 + ".")])
    edit_json(out / "config.json", lambda c: c["quantization_config"]["experts"]["layers"].pop(EXPERTS4))
    edit_json(out / INDEX, lambda index: index["metadata"].update(total_size=sum(
        len(t) for s in out.glob("model-*.safetensors") for t in read_shard(s)[1].values())))  # fmt: skip


def forge_relabel_bf16_only(out, src):
    drop_tensors(out, [f"{EXPERTS4}.{k}" for k in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")])
    edit_json(
        out / "config.json", lambda c: c["quantization_config"]["experts"]["layers"].update({EXPERTS4: "bf16_only"})
    )
    edit_json(out / INDEX, lambda index: index["metadata"].update(total_size=sum(
        len(t) for s in out.glob("model-*.safetensors") for t in read_shard(s)[1].values())))  # fmt: skip


def forge_dtype(out, src):
    name = first_pass_through(out)
    edit_tensors(out, shard_of(out, name), lambda header, tensors: header[name].update(dtype="F16"))


def forge_shape(out, src):
    name = first_pass_through(out)
    edit_tensors(out, shard_of(out, name), lambda h, t: h[name].update(shape=[1, h[name]["shape"][0]]))


def forge_config(out, src):
    edit_json(out / "config.json", lambda c: c["text_config"].update(rope_theta=1.0))


def forge_side_file(out, src):
    (out / "tokenizer.json").write_text('{"added": "evil"}')


def forge_value_byte(out, src):
    shard = shard_of(out, f"{EXPERTS4}.w2_weight")
    header, tensors = read_shard(shard)
    data = bytearray(tensors[f"{EXPERTS4}.w2_weight"])
    data[-1] ^= 0x01
    tensors[f"{EXPERTS4}.w2_weight"] = bytes(data)
    write_shard(shard, header, tensors)


def forge_fewer_source_experts(out, src):
    """The source given to verify lacks an expert group that the output holds."""
    drop_tensors(src, [n for n in tensor_names(src) if n.startswith(f"{LM}.mtp.0.block_sparse_moe.experts.")])


FORGERIES = [forge_delete_tensor, forge_delete_layer, forge_relabel_bf16_only, forge_dtype, forge_shape,
             forge_config, forge_side_file, forge_value_byte, forge_fewer_source_experts]  # fmt: skip


@pytest.mark.parametrize("forge", FORGERIES, ids=[f.__name__ for f in FORGERIES])
def test_verify_source_catches_forgeries_with_a_consistent_manifest(out, src, forge):
    verify(out_dir=out, source=src)
    forge(out, src)
    refresh_manifest(out)  # the manifest now agrees with the forged files: only the source can tell
    with pytest.raises(MxconvertError):
        verify(out_dir=out, source=src)


@pytest.mark.parametrize("forge", FORGERIES[:-1], ids=[f.__name__ for f in FORGERIES[:-1]])
def test_verify_without_source_catches_the_same_against_the_manifest(out, src, forge):
    forge(out, src)
    with pytest.raises(MxconvertError):
        verify(out_dir=out)


def test_the_manifest_must_name_every_file(out):
    edit_json(out / MANIFEST, lambda m: m.update(files=[]))
    refused(r"files is missing or malformed", verify, out_dir=out)


def test_extra_and_missing_files_fail_verify(out, converted):
    (out / "notes.txt").write_text("x")
    refused(r"notes.txt: is not in the manifest", verify, out_dir=out)
    (out / "notes.txt").unlink()
    (out / "tokenizer.json").unlink()
    refused(r"tokenizer.json: is in the manifest but missing", verify, out_dir=out)


def test_verify_reports_progress_in_bytes(out, pristine, capsys):
    verify(out_dir=out, source=pristine, progress=True)
    verify(out_dir=out, progress=True)  # tqdm writes nothing when stderr is not a terminal: no crash either way


# Crashes where a clear error belongs ----------------------------------------------------------------


def test_zero_size_tensor_at_the_end_of_a_shard(src, tmp_path):
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    add_tensor(src, shard, "zzz.empty", "F32", [0, 4], b"")  # sorts last: ends the last output shard
    add_tensor(src, shard, "lm.empty", "BF16", [0], b"")
    out = tmp_path / "out"
    plan = run(src, out, max_shard_size="1MB").plan
    assert plan.shards[-1].tensors[-1].name == "zzz.empty"
    verify(out_dir=out, source=src)
    from safetensors import safe_open

    with safe_open(out / plan.shards[-1].name, "pt") as f:
        assert f.get_tensor("zzz.empty").shape == (0, 4)


def deep(n):
    return "[" * n + "]" * n


@pytest.mark.parametrize("where", ["config.json", INDEX, "header"])
def test_deeply_nested_json_is_a_clear_error(src, tmp_path, where):
    if where == "header":
        shard = sorted(src.glob("model-*.safetensors"))[0]
        header, tensors = read_shard(shard)
        text = json.dumps({"__metadata__": {"x": "y"}, **header}).encode()
        text = text[:-1] + b',"z":' + deep(100000).encode() + b"}"
        shard.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(tensors.values()))
    else:
        (src / where).write_text('{"a": ' + deep(100000) + "}")
    refused(r"nested deeper than 64 levels", run, src, tmp_path / "out")


@pytest.mark.parametrize(
    "name,text,match",
    [
        (INDEX, '{"weight_map": 5}', r"weight_map is not a map"),
        (INDEX, "[]", r"is not a JSON object"),
        ("config.json", "{not json", r"config.json: is not valid JSON"),
        (
            "config.json",
            '{"quantization_config": 1}',
            r"quantization_config is None format_version None, not 'mxconvert' 1",
        ),
        (MANIFEST, '{"format_version": 1}', r"tool.version is missing or malformed"),
        (MANIFEST, "[" * 5000 + "]" * 5000, r"nested deeper than 64 levels"),
    ],
)
@pytest.mark.parametrize("full", [True, False])
def test_verify_on_malformed_files_is_a_clear_error(out, name, text, match, full):
    (out / name).write_text(text)
    if name != MANIFEST:
        refresh_manifest(out)
    refused(match, verify, out_dir=out, full=full)


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r.update(finished=[]),
        lambda r: r.update(shards={"x": "big"}),
        lambda r: r.update(tool=5),
        lambda r: r["finished"].update({"model-00001-of-00008.safetensors": {"size": "1", "sha256": 0}}),
        lambda r: r.update(outputs="config.json"),
    ],
)
def test_a_hand_edited_record_is_a_clear_error(src, tmp_path, edit):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "scripts")]),
           "MXCONVERT_TEST_KILL_AT": "shard:1"}  # fmt: skip
    subprocess.run([sys.executable, "-m", "mxconvert", str(src), str(out), "--no-progress", "--max-shard-size", "1MB"],
                   env=env, capture_output=True)  # fmt: skip
    edit_json(out / "mxconvert.partial.json", edit)
    refused(r"mxconvert.partial.json: .* is missing or malformed", run, src, out, resume=True, max_shard_size="1MB")
    refused(r"mxconvert.partial.json: .* is missing or malformed, so --force cannot tell which files mxconvert wrote. "
            r"Delete that OUT_DIR yourself", run, src, out, force=True)  # fmt: skip


@pytest.mark.parametrize("size", ["9" * 400, "0.5", "0", "-1", "1e9", "5 IB"])
def test_shard_sizes_are_parsed_strictly(src, tmp_path, size):
    refused(r"--max-shard-size: .* (is not a size|is less than one byte)", run, src, tmp_path / "out",
            max_shard_size=size)  # fmt: skip


def test_planning_is_linear_in_tensors(tmp_path):
    """40k pass-through tensors in one shard plan quickly (it was quadratic: 103 s)."""
    from mxconvert.headers import TensorInfo
    from mxconvert.plan import OutputTensor, _assign_shards

    calls = []

    class Counted(OutputTensor):
        @property
        def nbytes(self):
            calls.append(1)
            return 4

    tensors = [Counted(f"t{i}", "F32", (1,), source=TensorInfo(f"t{i}", tmp_path, "F32", (1,), 0, 4)) for i in
               range(40_000)]  # fmt: skip
    shards = _assign_shards(tensors, 10**12)
    assert len(shards) == 1 and len(calls) <= 2 * len(tensors)  # each tensor's size read O(1) times


# Messages -------------------------------------------------------------------------------------------


def test_push_offline_names_the_variable(out, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from mxconvert.hub import push

    refused(r"HF_HUB_OFFLINE is set, so nothing can be uploaded. Unset HF_HUB_OFFLINE", push, out_dir=out,
            repo_id="o/m")  # fmt: skip


def test_a_mistyped_path_online_does_not_blame_hf_hub_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")  # fmt: skip
    message = refused(r"nobody/typo: is neither a local directory nor", run, "nobody/typo", tmp_path / "out")
    assert "HF_HUB_OFFLINE" not in message


@pytest.mark.parametrize("dtype", ["", "BOGUS", "f8_e4m3", "F4"])
def test_unknown_dtypes_are_refused(src, tmp_path, dtype):
    name = first_pass_through(src)
    edit_tensors(src, shard_of(src, name), lambda header, tensors: header[name].update(dtype=dtype))
    refused(rf"gives tensor {name} dtype '{dtype}', which is not a safetensors dtype", run, src, tmp_path / "out")


@pytest.mark.parametrize(
    "encode,match",
    [
        (lambda text: b"\xef\xbb\xbf" + text.encode(), r"starts with a byte-order mark"),
        (lambda text: text.encode("utf-16"), r"not UTF-8 JSON \(it looks like UTF-16\)"),
        (lambda text: text.replace("{", '{"a": 1, "a": 2, ', 1).encode(), r"key 'a' appears twice"),
        (lambda text: text.replace("1e-06", "NaN").encode(), r"NaN is not JSON"),
    ],
)
@pytest.mark.parametrize("name", ["config.json", INDEX])
def test_other_encodings_are_refused_once(src, tmp_path, name, encode, match):
    text = (src / name).read_text()
    if "NaN" in match and "1e-06" not in text:
        text = text.replace("{", '{"x": 1e-06, ', 1)
    (src / name).write_bytes(encode(text))
    refused(match, run, src, tmp_path / "out")


def test_digits_of_other_scripts_in_names(src, tmp_path):
    shard = sorted(src.glob("model-*.safetensors"))[0]
    add_tensor(src, shard, "extra.1\u00b21.weight", "U8", [2], b"\1\2")  # "²".isdigit() is true, int("²") fails
    out = tmp_path / "out"
    run(src, out)
    verify(out_dir=out, source=src)
