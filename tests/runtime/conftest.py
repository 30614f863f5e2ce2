"""Runtime tests: tiny converted checkpoints built once per session; GPU when there is one, else the
Triton interpreter on the CPU (TRITON_INTERPRET must be set before triton is imported)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from runtime_helpers import SHAPE, build_checkpoints  # noqa: E402


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """{"src", "dual", "derive"} directories: dual/bf16_only and native_only/bf16_only conversions."""
    return build_checkpoints(tmp_path_factory.mktemp("runtime"), **SHAPE)
