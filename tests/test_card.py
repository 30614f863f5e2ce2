"""The model card: Hub metadata that huggingface_hub's ModelCard loads strictly and the Hub's checks accept
(offline, through ModelCard.validate against the loopback Hub), licence copied from the source, and text."""

from pathlib import Path

import huggingface_hub
import pytest
from hub_server import HubServer, card_errors
from huggingface_hub import ModelCard

from mxconvert.card import LIBRARY_NAME, TAGS, write_model_card

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


def test_card_text_says_what_was_done_and_how_to_load(tmp_path):
    text = _write(tmp_path, options={**OPTIONS, "long_context": True, "bf16_max_tokens": 16}).read_text()
    body = text.split("\n---\n", 1)[1]
    for needed in (
        "mxconvert 9.8.7",
        "`0123abcd`",
        "0x80",
        "+1",
        "[E, K/32, N]",
        "FNUZ",
        "bf16_only",
        "T <= 16 or T >= 1024",
        "vllm serve OUT_DIR",
        "mxconvert.runtime",
        "mxconvert.json",
    ):
        assert needed in body, needed
    for key, value in (
        ("long_context", "true"),
        ("bf16", '"materialize"'),
        ("bf16_max_tokens", "16"),
        ("bf16_min_tokens", "1024"),
        ("max_shard_size", '"5GB"'),
    ):
        assert f"| `{key}` | `{value}` |" in body
    assert "`native_only`" not in body
    derive = _write(tmp_path, options={**OPTIONS, "bf16": "derive"}).read_text()
    assert "`native_only`" in derive and "bf16_only" not in derive.split("## How it was made")[0]


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
    assert "`MiniMax-M3-local` (a local directory)" in text and "revision not recorded" in text
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
    _write(tmp_path)
    assert (out / "README.md").read_text().startswith("---\n")
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]  # no temporary file left


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
