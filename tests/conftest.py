"""Tests run from the source tree: the repo root (for mxconvert), scripts/ (the generator) and tests/ (shared
helpers) on sys.path; the GPU marker; the loopback Hub."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "scripts"), os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)


import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu`: the one GPU marker; without a CUDA GPU such tests are skipped, saying so."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run it through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A loopback Hub (tests/hub_server.py) that huggingface_hub talks to, as alice, with an empty cache."""
    from hub_server import HubServer
    from huggingface_hub import constants

    with HubServer() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)  # read at import: HF_ENDPOINT alone is too late
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")  # fmt: skip
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # regular + LFS uploads; xet needs a CAS server
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
        monkeypatch.setenv("HF_TOKEN", "hf_alice")
        yield server
