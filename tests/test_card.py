"""The model card: Hub metadata that huggingface_hub's ModelCard loads strictly and the Hub's checks accept
(offline, through ModelCard.validate against the loopback Hub), licence copied from the source, and text:
what is inside (from the output config), how to serve it, what was tested, provenance, licence."""

import getpass
import json
import re
from pathlib import Path

import huggingface_hub
import pytest
from hub_server import HubServer, card_errors
from huggingface_hub import ModelCard

from mxconvert import format as fmt
from mxconvert.card import LIBRARY_NAME, TAGS, input_fingerprint, render_card, write_model_card

OPTIONS = {
    "long_context": False,
    "bf16": "materialize",
    "bf16_max_tokens": 8,
    "bf16_min_tokens": 1024,
    "max_shard_size": "5GB",
}
SOURCE_CARD = """---
license: other
license_name: minimax-model-license
license_link: LICENSE
library_name: transformers
pipeline_tag: text-generation
tags: [minimax]
---
# MiniMax-M3
"""
EXPERTS = "language_model.model.layers.{}.block_sparse_moe.experts"
MTP = "language_model.model.mtp.0.block_sparse_moe.experts"
SOURCE_FILES = [  # as SourceCheckpoint.fingerprint() gives them: weight files by header, the rest whole
    {"name": "model-00002-of-00002.safetensors", "size": 4000, "header_sha256": "b" * 64},
    {"name": "model-00001-of-00002.safetensors", "size": 5000, "header_sha256": "a" * 64},
    {"name": "config.json", "size": 100, "sha256": "c" * 64},
]


def quant_config(options: dict) -> dict:
    """The output config's quantization_config for MoE layers 3-11 and an MTP group, as convert writes it."""
    layers = {}
    for prefix, layer in [(EXPERTS.format(L), L) for L in range(3, 12)] + [(MTP, None)]:
        if options["long_context"] and layer is not None and layer % 5 == 0:
            layers[prefix] = fmt.BF16_ONLY
        else:
            layers[prefix] = fmt.NATIVE_ONLY if options["bf16"] == "derive" else fmt.DUAL
    return fmt.quantization_config(
        source={"quant_method": "mxfp8"},
        layers=layers,
        bf16_max_tokens=options["bf16_max_tokens"],
        bf16_min_tokens=options["bf16_min_tokens"],
        activation={"alpha": 1.702, "beta": 1.0, "limit": 7.0},
        version="9.8.7",
    )


class _ToLoopback:
    """A session that sends huggingface.co requests to the loopback Hub: huggingface_hub 1.x posts card
    checks to a hard-coded https://huggingface.co, 2.x to constants.ENDPOINT."""

    def __init__(self, session, endpoint: str):
        self._session, self._endpoint = session, endpoint

    def post(self, url: str, *args, **kwargs):
        return self._session.post(url.replace("https://huggingface.co", self._endpoint), *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._session, name)


@pytest.fixture
def hub(monkeypatch):
    with HubServer() as server:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.endpoint)
        get_session = huggingface_hub.repocard.get_session
        monkeypatch.setattr(
            huggingface_hub.repocard, "get_session", lambda: _ToLoopback(get_session(), server.endpoint)
        )
        yield server


def _write(tmp_path: Path, source_card: str | None = SOURCE_CARD, **kw) -> Path:
    card = None
    if source_card is not None:
        card = tmp_path / "source.md"
        card.write_text(source_card)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    quant = {"quantization_config": quant_config(kw.get("options", OPTIONS))}
    config = {"text_config": quant} if kw.pop("nested", False) else quant  # where convert found the source's
    (out / "config.json").write_text(json.dumps(config))
    args = dict(
        out_dir=out,
        source="MiniMaxAI/MiniMax-M3",
        source_repo_id="MiniMaxAI/MiniMax-M3",
        source_revision="0123abcd",
        source_card=card,
        options=OPTIONS,
        version="9.8.7",
    )
    return write_model_card(**{**args, **kw})


def test_card_metadata_is_valid_for_the_hub(tmp_path, hub):
    path = _write(tmp_path)
    assert path == tmp_path / "out" / "README.md"
    card = ModelCard.load(path)  # strict: metadata errors raise
    data = card.data.to_dict()
    assert data["base_model"] == "MiniMaxAI/MiniMax-M3"
    assert data["base_model_relation"] == "quantized"
    assert data["tags"] == TAGS and data["library_name"] == LIBRARY_NAME
    assert (data["license"], data["license_name"]) == ("other", "minimax-model-license")
    # the source's relative link would point into our repo, where LICENSE is missing
    assert data["license_link"] == "https://huggingface.co/MiniMaxAI/MiniMax-M3/blob/0123abcd/LICENSE"
    assert data["pipeline_tag"] == "text-generation"
    assert "minimax" not in data["tags"]  # the source's own tags describe the source, not this format
    assert card_errors(path.read_text()) == []
    card.validate()  # huggingface_hub's own check, posted to the loopback Hub


def test_card_text_says_what_is_inside_and_how_to_serve(tmp_path):
    text = _write(tmp_path, options={**OPTIONS, "long_context": True, "bf16_max_tokens": 16}).read_text()
    body = text.split("\n---\n", 1)[1]
    for needed in (
        "mxconvert format v1",
        "mxconvert 9.8.7",
        "`0123abcd`",
        "0x80",
        "+1",
        "[E, K/32, N]",
        "FNUZ",
        "T <= 16 or T >= 1024",
        "swigluoai (alpha 1.702, beta 1.0, limit 7.0)",
        "vLLM 0.33.0",
        "mxconvert.runtime",
        "mxconvert.json",
        "What was tested where",
        "No MI300X was available",
    ):
        assert needed in body, needed
    # storage per expert group, from the config: layers 5 and 10 BF16 only, the MTP group by name
    assert "| `bf16_only` | 2: layers 5, 10 |" in body
    assert f"| `dual` | 8: layers 3-4, 6-9, 11; `{MTP}` |" in body
    assert "| FP8 values, packed scales and exact BF16 copies |" in body
    for stale in ("THIS_REPO_ID", "being built", "pip install mxconvert\n", "OUT_DIR"):
        assert stale not in body, stale
    for key, value in (
        ("long_context", "true"),
        ("bf16", '"materialize"'),
        ("bf16_max_tokens", "16"),
        ("bf16_min_tokens", "1024"),
        ("max_shard_size", '"5GB"'),
    ):
        assert f"| `{key}` | `{value}` |" in body
    assert "| `native_only` |" not in body
    derive = _write(tmp_path, options={**OPTIONS, "bf16": "derive"}).read_text()
    assert "| `native_only` | 10: layers 3-11; " in derive and "| `bf16_only` |" not in derive


def _commands(text: str) -> list[str]:
    return [line for block in re.findall(r"```shell\n(.*?)```", text, re.S) for line in block.splitlines()]


def test_serving_commands_use_the_target_repo_id_when_known(tmp_path):
    known = _commands(_write(tmp_path, repo_id="my-org/MiniMax-M3-MI300X").read_text())
    assert known[1:] == [
        "hf download my-org/MiniMax-M3-MI300X --local-dir MiniMax-M3-MI300X",
        "cd MiniMax-M3-MI300X",
        'mxconvert verify "$PWD"',
        'vllm serve "$PWD" --tensor-parallel-size 8      # add --enable-expert-parallel for expert parallelism',
    ]
    assert known[0] == "pip install '.[vllm]'  # in a clone of mxconvert"  # not on PyPI; no address known
    unknown = _commands(_write(tmp_path).read_text())
    assert not any("hf download" in line for line in unknown) and 'mxconvert verify "$PWD"' in unknown
    assert not any(re.search(r"<[A-Za-z_ ]+>|[A-Z_]{6,}", line) for line in unknown)  # no placeholder to fill


def test_install_line_uses_the_project_url_when_the_package_names_one(tmp_path):
    args = dict(
        quant=quant_config(OPTIONS), source="x", source_repo_id=None, source_revision=None, source_card=None,
        options=OPTIONS, version="1.0",
    )  # fmt: skip
    text = render_card(**args, project_url="https://example.org/mxconvert.git")
    assert _commands(text)[0] == "pip install 'mxconvert[vllm] @ git+https://example.org/mxconvert.git'"
    assert "not on PyPI" in render_card(**args, project_url=None)


def test_provenance_has_the_input_fingerprint_and_no_local_details(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    text = _write(
        tmp_path,
        source=str(tmp_path / "models" / "MiniMax-M3-local"),
        source_repo_id=None,
        source_revision=None,
        source_files=SOURCE_FILES,
    ).read_text()
    digest = input_fingerprint(SOURCE_FILES)
    assert digest == input_fingerprint(SOURCE_FILES[::-1])  # file order does not matter
    assert f"sha256 `{digest}` over 3 input files (9,100 bytes): 2 weight files by name" in text
    changed = [{**SOURCE_FILES[0], "header_sha256": "c" * 64}, SOURCE_FILES[1]]
    assert input_fingerprint(changed) != digest
    assert "`MiniMax-M3-local` (a local directory)" in text
    for private in (str(tmp_path), "hf_secret_token_value", f"/{getpass.getuser()}/"):
        assert private not in text, private


def test_licence_and_attribution(tmp_path):
    text = _write(tmp_path).read_text()
    licence = text.split("## Licence and attribution", 1)[1]
    assert "`minimax-model-license`" in licence
    assert "(https://huggingface.co/MiniMaxAI/MiniMax-M3/blob/0123abcd/LICENSE)" in licence
    assert '"Built with MiniMax M3"' in licence
    other = _write(tmp_path, source_card="---\nlicense: apache-2.0\n---\n# x\n", source_repo_id="a/b").read_text()
    assert "`apache-2.0`" in other and "Built with MiniMax" not in other
    none = _write(tmp_path, source_card=None, source_repo_id="a/b").read_text()
    assert "names none that could be read" in none and "Built with MiniMax" not in none
    unread = _write(tmp_path, source_card=None, source_repo_id="MiniMaxAI/MiniMax-M3-MXFP8").read_text()
    assert "Built with MiniMax M3" in unread  # MiniMax's repo, licence unread: the attribution still shown
    mit = _write(tmp_path, source_card="---\nlicense: mit\n---\n", source_repo_id="MiniMaxAI/x").read_text()
    assert "`mit`" in mit and "Built with MiniMax" not in mit


def test_local_source_has_no_base_model(tmp_path, hub):
    path = _write(
        tmp_path,
        source="/home/someone/models/MiniMax-M3-local",
        source_repo_id=None,
        source_revision=None,
        source_card=None,
    )
    data = ModelCard.load(path).data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data and "license" not in data
    text = path.read_text()
    assert "`MiniMax-M3-local` (a local directory), no revision recorded" in text
    assert "/home/someone" not in text  # a local path stays private
    ModelCard.load(path).validate()


@pytest.mark.parametrize(
    "source_card, license",
    [
        ("---\nlicense: apache-2.0\n---\n# x\n", "apache-2.0"),
        ("# no front matter at all\n", None),
        ("---\nlicense: [unclosed\n---\n# x\n", None),  # YAML that does not parse: noted in the text instead
    ],
)
def test_source_licence_copied_when_readable(tmp_path, source_card, license):
    path = _write(tmp_path, source_card=source_card)
    data = ModelCard.load(path).data.to_dict()
    assert data.get("license") == license
    assert ("could not be read" in path.read_text()) == (source_card.startswith("---") and license is None)
    assert card_errors(path.read_text()) == []


def test_card_replaces_an_old_one_atomically(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("old")
    _write(tmp_path, nested=True)
    assert (out / "README.md").read_text().startswith("---\n") and "| `dual` | 10: " in (out / "README.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json"]  # no temporary file left


@pytest.mark.parametrize(
    "front, error",
    [
        ("base_model_relation: quantized", "needs base_model"),
        ("base_model: not a repo\nbase_model_relation: quantized", "not a repo id"),
        ("base_model: a/b\nbase_model_relation: shrunk", "base_model_relation must be"),
        ("license: made-up", "not a known licence"),
        ("license: mit\nlicense_name: x", "go with license: other"),
        ("library_name: [a, b]", "library_name must be a string"),
    ],
)
def test_hub_checks_reject_bad_metadata(hub, front, error):
    """The loopback Hub's checks can fail, so the acceptance above means something."""
    text = f"---\n{front}\n---\n# x\n"
    assert any(error in e for e in card_errors(text))
    with pytest.raises(ValueError):
        ModelCard(text).validate()


def test_a_conversion_writes_a_card_that_matches_its_manifest(tmp_path):
    """Through convert(): the card's fingerprint is the manifest's, its storage table the config's, and
    nothing names the machine it ran on."""
    from make_tiny_checkpoint import make_tiny_checkpoint

    from mxconvert.convert import convert

    src = make_tiny_checkpoint(tmp_path / "src", demo=True, num_shards=2, num_hidden_layers=6)
    convert(model_dir=str(src), out_dir=str(tmp_path / "out"), long_context=True, progress=False)
    text = (tmp_path / "out" / "README.md").read_text()
    manifest = json.loads((tmp_path / "out" / "mxconvert.json").read_text())
    assert f"sha256 `{input_fingerprint(manifest['source']['files'])}`" in text
    assert "| `bf16_only` | 1: layers 5 |" in text and "| `native_only` | 3: layers 3-4; " in text  # + the MTP group
    assert str(tmp_path) not in text and "`src` (a local directory)" in text
