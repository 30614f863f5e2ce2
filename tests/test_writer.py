"""The streaming safetensors writer: any write order gives a valid file and its true sha256; a failed write
leaves nothing behind."""

import errno
import hashlib
import json
import os
import random

import pytest
import torch
from safetensors import safe_open

from mxconvert.errors import MxconvertError
from mxconvert.files import write_atomic, write_json_atomic
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


def _failing_pwrite(monkeypatch, after):
    """os.pwrite that reports a full disk from call `after` on."""
    real, calls = os.pwrite, [0]

    def pwrite(fd, data, offset):
        calls[0] += 1
        if calls[0] >= after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)


@pytest.mark.parametrize("after", [1, 2], ids=["header", "data"])
def test_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, monkeypatch, after):
    path = tmp_path / "model-00001-of-00001.safetensors"
    tensors = [OutputTensor("a.weight", "U8", (4, 32))]
    _failing_pwrite(monkeypatch, after)
    with pytest.raises(MxconvertError) as caught:
        writer = ShardWriter(path, tensors)
        try:
            writer.write("a.weight", 0, torch.zeros(4, 32, dtype=torch.uint8))
        except MxconvertError:
            writer.abort()
            raise
    assert str(caught.value) == (
        f"{path}.partial: write failed (No space left on device). Free disk space (or fix what the error says), "
        "then run the same command with --resume."
    )
    assert list(tmp_path.iterdir()) == []  # neither the temporary file nor the final name


def test_write_atomic_replaces_whole_files_only(tmp_path):
    path = tmp_path / "config.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2} and [p.name for p in tmp_path.iterdir()] == ["config.json"]
    with pytest.raises(MxconvertError, match=r"nowhere/config\.json: write failed \(No such file or directory\)"):
        write_atomic(tmp_path / "nowhere" / "config.json", b"{}")
