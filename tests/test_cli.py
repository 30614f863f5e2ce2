"""The `mxconvert` command through click's runner, and once as a real subprocess."""

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from make_tiny_checkpoint import make_tiny_checkpoint

from mxconvert import __version__
from mxconvert.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("src") / "tiny")


def run(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="mxconvert", **kwargs)


def test_convert_is_the_default_command_and_verify_accepts_it(source, tmp_path):
    out = tmp_path / "out"
    result = run(source, out, "--long-context", "--bf16-max-tokens", 4, "--bf16-min-tokens", 512, "--no-progress")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Wrote 1 shard (") and "verified" in result.output  # singular
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["experts"]["dispatch"] == {"bf16_max_tokens": 4, "bf16_min_tokens": 512}
    assert quant["experts"]["layers"]["language_model.model.layers.5.block_sparse_moe.experts"] == "bf16_only"
    result = run("verify", out, "--source", source)
    assert result.exit_code == 0, result.output
    assert "source bit-exact" in result.output


def test_dispatch_defaults_to_no_bf16_band_and_never_is_a_token_count(source, tmp_path):
    """The default bands hold no BF16 copy (FP8 only on disk, --bf16 derive); 'never' spells an open band."""
    result = run(source, tmp_path / "a", "--no-progress")
    assert result.exit_code == 0, result.output
    quant = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert quant["experts"]["dispatch"] == {"bf16_max_tokens": 0, "bf16_min_tokens": 2**30}
    assert set(quant["experts"]["layers"].values()) == {"native_only"}
    result = run(source, tmp_path / "b", "--bf16-max-tokens", 8, "--bf16-min-tokens", "Never", "--no-progress")
    assert result.exit_code == 0, result.output
    quant = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert quant["experts"]["dispatch"] == {"bf16_max_tokens": 8, "bf16_min_tokens": 2**30}
    assert "[default: never]" in " ".join(run("convert", "--help").output.split())


def test_errors_are_one_line_without_traceback(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    result = run(source, out)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "--force" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    result = run("verify", out)
    assert result.exit_code == 1 and "not a finished conversion" in result.output
    result = run(tmp_path / "nowhere", tmp_path / "o2")
    assert result.exit_code == 1 and "nowhere: does not exist" in result.output


def test_bad_option_values_are_usage_errors(source, tmp_path):
    """Exit code 2, and one `Error:` line naming the option (click's usage block dropped)."""
    for args, line in [
        (("--bf16", "sometimes"), "Error: --bf16: 'sometimes' is not one of 'materialize', 'derive'."),
        (("--max-shard-size", "lots"), "Error: --max-shard-size: 'lots' is not a size. Write it like 5GB"),
        (
            ("--bf16-max-tokens", 2048, "--bf16-min-tokens", 1024),
            "Error: --bf16-max-tokens: 2048 is not below --bf16-min-tokens 1024.",
        ),
        (("--bf16-min-tokens", 0), "Error: --bf16-min-tokens: 0 is below 1."),
        (("--bf16-min-tokens", "sometimes"), "Error: --bf16-min-tokens: 'sometimes' is not a whole number or 'never'."),
        (("--bf16-max-tokens", -1), "Error: --bf16-max-tokens: -1 is below 0."),
        (("--device", "tpu"), "Error: --device: 'tpu' is not one of 'cpu', 'cuda'."),
        (("--force", "--resume"), "Error: --force: and --resume exclude each other."),
        (
            ("--frobnicate",),
            "Error: --frobnicate: is not an option of mxconvert convert (did you mean --force or --private?).",
        ),
    ]:
        result = run(source, tmp_path / "o", *args)
        assert result.exit_code == 2 and result.output.startswith(line), (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
        assert not (tmp_path / "o").exists()
    result = run("verify")
    assert result.exit_code == 2 and result.output.startswith("Error: mxconvert verify: Missing argument 'OUT_DIR'.")
    if not torch.cuda.is_available():  # a valid value this machine cannot honour: exit 1
        result = run(source, tmp_path / "o", "--device", "cuda")
        assert result.exit_code == 1 and result.output.startswith("Error: --device: 'cuda' is not available")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run(source, blocker / "out")
    assert result.exit_code == 1 and "cannot be created" in result.output and "Traceback" not in result.output


def test_shard_count_is_plural_above_one(source, tmp_path):
    result = run(source, tmp_path / "out", "--max-shard-size", "300KB", "--no-progress")
    assert result.exit_code == 0, result.output
    count = len(list((tmp_path / "out").glob("model-*.safetensors")))
    assert count > 1 and result.output.startswith(f"Wrote {count} shards (")


def test_unknown_first_word_lists_the_commands(source, tmp_path, monkeypatch):
    """A bare word that is no command, no path here and no Hub id (owner/name) is a mistyped command."""
    monkeypatch.chdir(tmp_path)
    for word, hint in (("verfy", " Did you mean 'mxconvert verify'?"), ("frobnicate", "")):
        result = run(word, "out")
        assert result.exit_code == 2, result.output
        assert result.output == (
            f"Error: {word}: is not a command, an existing path or a Hub repo id (owner/name).{hint} "
            "Commands: convert, verify, push (run 'mxconvert --help').\n"
        )
    (tmp_path / "tiny").symlink_to(source)  # a bare word that names a directory here converts it
    result = run("tiny", "out", "--dry-run")
    assert result.exit_code == 0 and "dry run: nothing written" in result.output
    import huggingface_hub  # offline: a Hub id goes to the fetch, which refuses without the network

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = run("nobody/no-such-model-here", "out")
    assert result.exit_code == 1 and "nobody/no-such-model-here: " in result.output
    assert "is not a command" not in result.output


def test_verify_a_missing_directory(tmp_path):
    """The CLI words it as the Python API does (one MxconvertError, printed)."""
    from mxconvert.errors import MxconvertError
    from mxconvert.verify import verify

    with pytest.raises(MxconvertError) as api:
        verify(out_dir=tmp_path / "missing")
    result = run("verify", tmp_path / "missing")
    assert result.exit_code == 1
    assert result.output == f"Error: {api.value}\n"
    assert result.output.startswith(f"Error: {tmp_path / 'missing'}: does not exist. ")


def test_version_names_what_a_bug_report_needs():
    lines = run("--version").output.splitlines()
    assert lines[0] == f"mxconvert {__version__}"
    for package in ("torch", "triton", "safetensors"):
        assert any(line.startswith(f"{package} ") and "not installed" not in line for line in lines), package
    gpu = lines[-1]
    assert gpu.startswith("GPU: ") and ("none visible" in gpu) == (not torch.cuda.is_available())


def test_shell_completion(tmp_path):
    """click's completion protocol, as the scripts that README's eval line installs call it."""

    def complete(words: str) -> list[str]:
        env = {"_MXCONVERT_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
        result = run(env=env)
        assert result.exit_code == 0, result.output
        return result.output.split()

    assert complete("mxconvert ve") == ["plain,verify"]
    assert complete("mxconvert ./Mini") == ["dir,./Mini"]  # no command: a MODEL_DIR, completed as a path
    assert {"plain,--bf16", "plain,--bf16-max-tokens"} <= set(complete("mxconvert src out --bf"))
    assert "plain,--quick" in complete("mxconvert verify --q")


def test_dry_run_version_and_help(source, tmp_path):
    result = run(source, tmp_path / "o", "--dry-run")
    assert result.exit_code == 0 and "dry run: nothing written" in result.output
    assert not (tmp_path / "o").exists()
    help_text = run("--help").output
    assert "Examples:" in help_text and "verify" in help_text
    convert_help = run("convert", "--help").output
    for option in (
        "--long-context",
        "--bf16",
        "--bf16-max-tokens",
        "--bf16-min-tokens",
        "--max-shard-size",
        "--dry-run",
        "--device",
        "--force",
        "--resume",
    ):
        assert option in convert_help


def test_real_subprocess(source, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, "-m", "mxconvert", str(source), str(out), "--bf16", "derive"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "converting" not in proc.stderr  # no progress bar when stderr is not a terminal
    assert (out / "mxconvert.json").is_file()
    proc = subprocess.run(
        [sys.executable, "-m", "mxconvert", str(source), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and proc.stderr.startswith("Error: ") and "Traceback" not in proc.stderr


def test_quiet_prints_errors_only(source, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": ROOT}
    for args in ([str(source), str(out), "--quiet"], ["verify", str(out), "--source", str(source), "-q"]):
        proc = subprocess.run([sys.executable, "-m", "mxconvert", *args], capture_output=True, text=True, env=env)
        assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc
    proc = subprocess.run([sys.executable, "-m", "mxconvert", str(source), str(out), "-q"], capture_output=True,
                          text=True, env=env)  # fmt: skip
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr.startswith(f"Error: {out.resolve()}: already")
