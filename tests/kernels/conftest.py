"""Kernel tests run on the GPU when there is one, else on the CPU under the Triton interpreter.

TRITON_INTERPRET must be set before triton is imported (triton.jit reads it when a kernel is defined).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ON_GPU = torch.cuda.is_available()


@pytest.fixture
def device():
    return "cuda" if ON_GPU else "cpu"


@pytest.fixture
def gen():
    # fresh, seeded draws per test: reproducible, never all-zero data
    return torch.Generator().manual_seed(1234)
