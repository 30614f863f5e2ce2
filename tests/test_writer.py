"""The streaming safetensors writer: any write order gives a valid file and its true sha256."""

import hashlib
import random

import torch
from safetensors import safe_open

from mxconvert.plan import OutputTensor
from mxconvert.writer import ShardWriter


def test_out_of_order_writes_give_a_valid_file_and_its_sha256(tmp_path):
    tensors = [
        OutputTensor("a.weight", "U8", (6, 40)),
        OutputTensor("b.empty", "BF16", (0, 3)),
        OutputTensor("c.weight", "BF16", (5, 16)),
        OutputTensor("d.bias", "F32", (7,)),
    ]
    data = {
        "a.weight": torch.randint(0, 256, (6, 40), dtype=torch.uint8),
        "b.empty": torch.empty(0, 3, dtype=torch.bfloat16),
        "c.weight": torch.randn(5, 16).to(torch.bfloat16),
        "d.bias": torch.randn(7),
    }
    pieces = []  # (name, byte offset, rows) in row-sized pieces, shuffled
    for name, t in data.items():
        row_bytes = t[0].numel() * t.element_size() if len(t) else 0
        pieces += [(name, r * row_bytes, t[r : r + 1]) for r in range(len(t))] or [(name, 0, t)]
    random.Random(0).shuffle(pieces)
    path = tmp_path / "model-00001-of-00001.safetensors"
    writer = ShardWriter(path, tensors)
    for name, offset, piece in pieces:
        writer.remaining -= writer.write(name, offset, piece)
    assert not path.exists()  # only the temporary name until finished
    name, sha = writer.finish()
    assert name == path.name and sha == hashlib.sha256(path.read_bytes()).hexdigest()
    with safe_open(path, "pt") as f:
        assert list(f.keys()) == sorted(data)
        for key, t in data.items():
            assert torch.equal(f.get_tensor(key), t)
