"""Crash safety and --resume: the converter as a real process, killed at several points, then resumed;
every output file must end byte-identical (sha256) to an uninterrupted run's, and no interrupted OUT_DIR
may pass `mxconvert verify`. Also a write error (ENOSPC), Ctrl-C, and the refusals of --resume.

Kill points come from the test-only hook MXCONVERT_TEST_KILL_AT=<event>:<n> (mxconvert/writer.py):
the process signals itself at the n-th event. Nothing in OUT_DIR embeds a timestamp, so whole files
(manifest and card included) are compared.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch
from click.testing import CliRunner
from make_tiny_checkpoint import make_tiny_checkpoint
from safetensors.torch import save_file

import mxconvert.outdir
from mxconvert.checkpoint import SourceCheckpoint
from mxconvert.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD, MANIFEST = "mxconvert.partial.json", "mxconvert.json"
SHARD_SIZE = ("--max-shard-size", "1.15MB")  # 8 shards of the tiny checkpoint
HYBRID = ("--bf16", "materialize", "--bf16-max-tokens", "8", "--bf16-min-tokens", "1024")  # the most to write


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="mxconvert")


def hashes(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def convert_args(source, out, *extra):
    return [str(source), str(out), *SHARD_SIZE, *HYBRID, "--no-progress", *extra]


def killed_run(source, out, at, sig="SIGKILL"):
    """The converter as a subprocess that sends itself `sig` at event `at`; returns the finished process."""
    env = {**os.environ, "PYTHONPATH": ROOT, "MXCONVERT_TEST_KILL_AT": at, "MXCONVERT_TEST_KILL_SIGNAL": sig}
    return subprocess.run(
        [sys.executable, "-m", "mxconvert.cli", *convert_args(source, out)], capture_output=True, text=True, env=env
    )


def assert_not_finished(out):
    """What an interrupted run leaves: no manifest, and `mxconvert verify` refuses it."""
    assert not (out / MANIFEST).exists()
    result = cli("verify", out)
    assert result.exit_code == 1 and "not a finished conversion" in result.output, result.output


def finished_in_record(out):
    return json.loads((out / RECORD).read_text())["finished"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("src") / "tiny", seed=7)


@pytest.fixture(scope="module")
def clean(source, tmp_path_factory):
    """An uninterrupted run's OUT_DIR."""
    out = tmp_path_factory.mktemp("clean") / "out"
    result = cli(*convert_args(source, out))
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("model-*.safetensors"))) == 8
    return out


@pytest.fixture(scope="module")
def interrupted(source, tmp_path_factory):
    """An OUT_DIR stopped by a full disk (ENOSPC from the 225th pwrite), with some shards finished."""
    out = tmp_path_factory.mktemp("enospc") / "out"
    real_pwrite, calls, lock = os.pwrite, [0], threading.Lock()

    def pwrite(fd, data, offset):
        with lock:
            calls[0] += 1
            full = calls[0] >= 225  # about half of the 8 shards finished
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "pwrite", pwrite)
        result = cli(*convert_args(source, out))
    return out, result


def resume_into_copy(interrupted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(interrupted[0], out)
    return out


@pytest.mark.parametrize(
    "at,what",
    [
        ("start:1", "early: OUT_DIR and the record made, no shard byte yet"),
        ("write:100", "mid-shard: a shard half written"),
        ("shard:2", "between shards: two finished and recorded"),
        ("config.json:1", "after the shards, while writing the small files"),
        ("mxconvert.json:1", "while writing the manifest: flushed, not yet renamed"),
    ],
)
def test_sigkill_then_resume_is_byte_identical(source, clean, tmp_path, at, what, monkeypatch):
    out = tmp_path / "out"
    proc = killed_run(source, out, at)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert_not_finished(out)
    names = {p.name for p in out.iterdir()}
    finished = finished_in_record(out)
    if at == "start:1":
        assert names - {".mxconvert.lock"} == {RECORD} and finished == {}  # a killed run leaves its lock file
    elif at == "write:100":
        assert any(n.endswith(".safetensors.partial") for n in names)
    elif at == "shard:2":
        assert len(finished) == 2 and set(finished) <= names
    else:
        assert len(finished) == 8 and f"{at.split(':')[0]}.partial" in names
    kept_inodes = {name: (out / name).stat().st_ino for name in finished}

    # a resume reads no source bytes of what it keeps: its pass-through tensors, and groups wholly kept
    read, real_read = set(), SourceCheckpoint.read

    def recording_read(self, info, *args, **kwargs):
        read.add(info.name)
        return real_read(self, info, *args, **kwargs)

    monkeypatch.setattr(SourceCheckpoint, "read", recording_read)
    result = cli(*convert_args(source, out, "--resume"))
    assert result.exit_code == 0, result.output
    kept = len(finished)
    line = rf"Wrote {8 - kept} of 8 shards \([\d.]+ GiB in all\) to \S+, kept {kept} finished before; verified\."
    assert re.fullmatch(line if kept else r"Wrote 8 shards \([\d.]+ GiB\) to \S+; verified\.", result.output.strip())
    assert hashes(out) == hashes(clean)
    assert {name: (out / name).stat().st_ino for name in finished} == kept_inodes  # kept, not rewritten
    weight_map = json.loads((clean / "model.safetensors.index.json").read_text())["weight_map"]
    kept_tensors = {name for name, shard in weight_map.items() if shard in finished}
    assert not read & {name for name in kept_tensors if ".experts." not in name}
    for group in {name.rsplit(".", 1)[0] for name in kept_tensors if name.endswith(".w13_weight_scale")}:
        if all(shard in finished for name, shard in weight_map.items() if name.startswith(group + ".")):
            assert not {name for name in read if name.startswith(group + ".")}, group
    assert cli("verify", out, "--source", source).exit_code == 0


def test_ctrl_c_says_how_to_resume(source, clean, tmp_path):
    out = tmp_path / "out"
    proc = killed_run(source, out, "write:100", sig="SIGINT")
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "Interrupted: OUT_DIR has no manifest, so it is not a finished conversion. "
        "Run the same command with --resume to go on (finished shards are kept)."
    )
    assert_not_finished(out)
    assert not list(out.glob("*.partial"))  # unfinished shards deleted on the way out
    result = cli(*convert_args(source, out, "--resume"))
    assert result.exit_code == 0, result.output
    assert hashes(out) == hashes(clean)


def test_write_error_is_one_line_and_leaves_nothing_finished(interrupted, source, clean, tmp_path):
    out, result = interrupted
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert re.fullmatch(
        "Error: " + re.escape(str(out)) + r"/model-0000\d-of-00008\.safetensors\.partial: write failed \(No space "
        r"left on device\)\. Free disk space \(or fix what the error says\), then run the same command with "
        r"--resume\.",
        result.output.strip(),
    ), result.output
    names = {p.name for p in out.iterdir()}
    assert not [n for n in names if n.endswith(".partial")]  # deleted: their space is free again
    assert not names & {"config.json", "model.safetensors.index.json", "README.md"}
    assert_not_finished(out)
    finished = finished_in_record(out)
    assert 0 < len(finished) < 8 and set(finished) == {n for n in names if n.startswith("model-")}
    out = resume_into_copy(interrupted, tmp_path)
    result = cli(*convert_args(source, out, "--resume"))
    assert result.exit_code == 0 and f"kept {len(finished)} finished before" in result.output, result.output
    assert hashes(out) == hashes(clean)


@pytest.mark.parametrize(
    "change,message",
    [
        (("--bf16", "derive"), r"--bf16: is 'derive' now but was 'materialize' in {OUT}\. "),
        (("--max-shard-size", "2MB"), r"--max-shard-size: is '2MB' now but was '1\.15MB' in {OUT}\. "),
        (("--long-context",), r"--long-context: is True now but was False in {OUT}\. "),
        (("--bf16-max-tokens", "4"), r"--bf16-max-tokens: is 4 now but was 8 in {OUT}\. "),
    ],
)
def test_resume_refuses_other_options(interrupted, source, tmp_path, change, message):
    out = resume_into_copy(interrupted, tmp_path)
    before = hashes(out)
    result = cli(*convert_args(source, out, "--resume", *change))  # a repeated option: click takes the last
    assert result.exit_code == 1, result.output
    expected = "Error: " + message.replace("{OUT}", re.escape(str(out))) + "Run the same command as the first time"
    assert re.match(expected, result.output), result.output
    assert hashes(out) == before


def _grow(shard):
    with open(shard, "ab") as f:
        f.write(b"\0" * 8)


def _extra_shard(src):
    """One more weight file, named in the index."""
    save_file({"extra.bias": torch.zeros(4)}, src / "extra.safetensors")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["extra.bias"] = "extra.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


def _new_header(shard):
    """Same size, another header: the metadata's format letter changes case."""
    raw = bytearray(shard.read_bytes())
    at = raw.index(b'"format":"pt"')
    raw[at : at + 13] = b'"format":"PT"'
    shard.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda src: _grow(src / "model-00002-of-00004.safetensors"),
         r"{SRC}/model-00002-of-00004\.safetensors: has \d+ bytes after its last tensor \(corrupt or extended\)\. "
         r"Re-download this file\."),
        (lambda src: _new_header(src / "model-00003-of-00004.safetensors"),
         r"{SRC}/model-00003-of-00004\.safetensors: has another header now \(sha256 [0-9a-f]{12}\.\.\.\) than in "
         r"the run in {OUT}\. Resume only with the same input, or pass --force\."),
        (_extra_shard,
         r"{SRC}/extra\.safetensors: is new: it was not an input of the run in {OUT}\. Resume only with the same "
         r"input, or pass --force\."),
        (lambda src: (src / "config.json").write_text((src / "config.json").read_text().replace("196608", "131072")),
         r"{SRC}/config\.json: changed since the run in {OUT}\. Run the same command as the first time, or pass "
         r"--force to start over\."),
    ],
    ids=["shard_size", "shard_header", "extra_shard", "config"],
)  # fmt: skip
def test_resume_refuses_other_input(interrupted, source, tmp_path, edit, message):
    src = tmp_path / "src"
    shutil.copytree(source, src)
    edit(src)
    out = resume_into_copy(interrupted, tmp_path)
    before = hashes(out)
    result = cli(*convert_args(src, out, "--resume"))
    assert result.exit_code == 1, result.output
    expected = message.replace("{SRC}", re.escape(str(src))).replace("{OUT}", re.escape(str(out)))
    assert re.fullmatch("Error: " + expected, result.output.strip()), result.output
    assert hashes(out) == before


def test_resume_redoes_a_finished_shard_that_changed(interrupted, source, clean, tmp_path):
    out = resume_into_copy(interrupted, tmp_path)
    finished = sorted(finished_in_record(out))
    damaged = out / finished[0]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF  # same size, other sha256
    damaged.write_bytes(bytes(data))
    (out / finished[-1]).unlink()
    # a kill between a shard's rename and its record: there under its name, but not recorded
    (out / "model-00008-of-00008.safetensors").write_bytes(b"not recorded")
    (out / "model-00007-of-00008.safetensors.partial").write_bytes(b"half")
    result = cli(*convert_args(source, out, "--resume"))
    assert result.exit_code == 0 and f"kept {len(finished) - 2} finished before" in result.output, result.output
    assert hashes(out) == hashes(clean)


def test_resume_checks_free_space_for_what_is_left(interrupted, source, tmp_path, monkeypatch):
    out = resume_into_copy(interrupted, tmp_path)
    needs = re.compile(r"needs ([\d.]+) MB of disk space but ([\d.]+) (MB|kB|B) is free")
    monkeypatch.setattr(mxconvert.outdir, "free_bytes", lambda path: 0)
    resumed = needs.search(cli(*convert_args(source, out, "--resume")).output)
    fresh = needs.search(cli(*convert_args(source, tmp_path / "fresh")).output)
    assert resumed and fresh and float(resumed[1]) < float(fresh[1])  # kept shards need no space
    between = int((float(resumed[1]) + float(fresh[1])) / 2 * 1e6)
    monkeypatch.setattr(mxconvert.outdir, "free_bytes", lambda path: between)
    assert cli(*convert_args(source, tmp_path / "fresh")).exit_code == 1
    assert not (tmp_path / "fresh").exists()
    result = cli(*convert_args(source, out, "--resume"))
    assert result.exit_code == 0, result.output


def test_resume_of_a_finished_or_missing_out_dir(source, clean, tmp_path):
    out = tmp_path / "out"
    result = cli(*convert_args(source, out, "--resume"))  # nothing to resume: a plain conversion
    assert result.exit_code == 0 and "kept" not in result.output, result.output
    assert hashes(out) == hashes(clean)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = cli(*convert_args(source, out, "--resume"))
    assert result.exit_code == 0 and result.output.startswith("Already finished: "), result.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    result = cli(*convert_args(source, out, "--resume", "--bf16", "derive"))
    assert result.exit_code == 1 and result.output.startswith("Error: --bf16: is 'derive' now but was 'materialize'")
