"""A Hub repo as a source, against the loopback Hub: the dry run reads headers alone, and each Hub
failure gets its own line."""

import pytest
from make_tiny_checkpoint import make_tiny_checkpoint

from mxconvert.convert import convert
from mxconvert.errors import MxconvertError

REPO = "MiniMaxAI/Tiny-M3-MXFP8"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("hubsrc") / "src", seed=11)


def publish(hub, source, repo=REPO, **flags):
    hub.add_repo(repo, owner="minimax")
    hub.repos[repo].update(flags)
    hub.put_files(repo, {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()})


def test_dry_run_of_a_hub_id_reads_headers_only(hub, source, tmp_path):
    publish(hub, source)
    hub.served.clear()
    plan = convert(model_dir=REPO, out_dir=str(tmp_path / "out"), dry_run=True)
    local = convert(model_dir=str(source), out_dir=str(tmp_path / "out"), dry_run=True)
    sizes = {p.name: p.stat().st_size for p in source.iterdir() if p.is_file()}
    served: dict[str, int] = {}
    for name, n in hub.served:
        served[name] = served.get(name, 0) + n
    shards = [n for n in sizes if n.endswith(".safetensors")]
    for name in shards:  # a range read of the header: never the tensor bytes
        assert 0 < served.get(name, 0) < sizes[name] // 2, (name, served.get(name), sizes[name])
    assert set(served) <= {*shards, "config.json", "model.safetensors.index.json", "README.md", "tokenizer.json",
                           "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                           "modeling_minimax_m3.py"}  # fmt: skip
    report, mine = plan.report, local.report
    assert report["output_bytes"] == mine["output_bytes"] and report["input_bytes"] == mine["input_bytes"]
    assert report["output_by_storage"] == mine["output_by_storage"]
    assert report["revision"] == hub.repos[REPO]["branches"]["main"]
    assert report["header_bytes_read"] == sum(served[n] for n in shards)
    assert [d["what"] for d in report["disks"]] == ["Hugging Face cache (download)", "OUT_DIR"]
    assert not (tmp_path / "out").exists()


def test_dry_run_of_a_long_header_takes_a_second_read(hub, source, tmp_path, monkeypatch):
    import mxconvert.hub_source as hs

    monkeypatch.setattr(hs, "HEAD_READ", 64)  # smaller than every header: the rest comes in a second request
    publish(hub, source)
    plan = convert(model_dir=REPO, out_dir=str(tmp_path / "out"), dry_run=True)
    assert plan.report["tensors_in"] == convert(model_dir=str(source), out_dir=str(tmp_path / "o"),
                                                dry_run=True).report["tensors_in"]  # fmt: skip


def test_a_gated_repo_says_so(hub, source, tmp_path):
    publish(hub, source, gated=True)
    with pytest.raises(MxconvertError, match="is a gated repo and this token has no access to it"):
        convert(model_dir=REPO, out_dir=str(tmp_path / "out"), dry_run=True)
    with pytest.raises(MxconvertError, match="is a gated repo"):
        convert(model_dir=REPO, out_dir=str(tmp_path / "out"), progress=False)


def test_a_missing_repo_says_so(hub, tmp_path):
    for dry_run in (True, False):
        with pytest.raises(MxconvertError, match="is neither a local directory nor a Hub repo visible to this token"):
            convert(model_dir="nobody/nothing", out_dir=str(tmp_path / "out"), dry_run=dry_run, progress=False)


def test_an_unreachable_hub_says_so(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub.httpd.shutdown()
    hub.httpd.server_close()
    for dry_run in (True, False):
        with pytest.raises(MxconvertError, match="the Hub cannot be reached") as e:
            convert(model_dir="o/m", out_dir=str(tmp_path / "out"), dry_run=dry_run, progress=False)
        assert "HF_HUB_OFFLINE" not in str(e.value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MxconvertError, match="HF_HUB_OFFLINE is set"):
        convert(model_dir="o/m", out_dir=str(tmp_path / "out"), progress=False)


def test_a_hub_conversion_matches_the_local_one(hub, source, tmp_path):
    from mxconvert.verify import verify

    publish(hub, source)
    out = tmp_path / "out"
    convert(model_dir=REPO, out_dir=str(out), progress=False)
    verify(out_dir=out, source=source)  # the same bytes as converting the local copy
