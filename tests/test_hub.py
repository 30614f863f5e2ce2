"""mxconvert.hub.push: the real huggingface_hub client against the loopback Hub (tests/hub_server.py),
on a real tiny conversion. No network: everything goes to 127.0.0.1."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import constants
from make_tiny_checkpoint import make_tiny_checkpoint

import mxconvert.hub as hub_module
from mxconvert.cli import main
from mxconvert.convert import convert
from mxconvert.errors import MxconvertError
from mxconvert.hub import check_file_sizes, push
from mxconvert.verify import verify

REPO = "alice/tiny-mi300x"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("push")
    out = root / "out"
    convert(model_dir=str(make_tiny_checkpoint(root / "src")), out_dir=str(out), progress=False, max_shard_size="600KB")
    return out


@pytest.fixture
def out(converted, tmp_path) -> Path:
    """A copy that a test may change."""
    return Path(shutil.copytree(converted, tmp_path / "out"))


def _local(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _pushed(out: Path, repo: str = REPO) -> dict[str, bytes]:
    """What a push of OUT_DIR to `repo` leaves there: every file as it is, but the card naming the repo and
    the manifest naming that card."""
    from mxconvert.hub import card_for_repo

    return _local(out) | card_for_repo(out, repo)


def _lfs_names(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.suffix == ".safetensors"]


def test_push_uploads_every_file_and_the_manifest_last(converted, hub, capsys):
    url = push(out_dir=converted, repo_id=REPO)
    remote = hub.files(REPO)
    assert remote.pop(".gitattributes")
    assert remote == _pushed(converted)  # every file, byte for byte (the card names the repo)
    assert REPO.encode() in remote["README.md"] and remote["README.md"] != (converted / "README.md").read_bytes()
    repo = hub.repos[REPO]
    assert repo["owner"] == "alice" and not repo["private"]
    assert url == f"{hub.endpoint}/{REPO}/commit/{repo['branches']['main']}"
    last = repo["commits"][repo["branches"]["main"]]
    before = repo["commits"][last["parent"]]["files"]
    assert "mxconvert.json" not in before and set(before) | {"mxconvert.json"} == set(last["files"])
    assert hub.count("PUT", "^/lfs/") == len(_lfs_names(converted))  # shards went by LFS
    assert hub.count("POST", "validate-yaml") >= 1  # the card passed the Hub's metadata check
    said = capsys.readouterr().out
    assert f"Uploading {len(remote)} files" in said and "skipped" not in said


def test_rerun_uploads_nothing(converted, hub, capsys):
    push(out_dir=converted, repo_id=REPO)
    hub.requests.clear()
    url = push(out_dir=converted, repo_id=REPO)
    assert url == f"{hub.endpoint}/{REPO}"
    assert hub.count("POST", "preupload|commit|lfs") == 0 and hub.count("PUT") == 0
    n = len(_local(converted))
    assert f"Nothing to upload: all {n} files are already on {REPO}" in capsys.readouterr().out


def test_resume_uploads_only_what_is_missing(converted, hub, capsys):
    """An earlier push left half the shards and a stale config: those shards are skipped, the rest sent."""
    local = _pushed(converted)
    shards = sorted(_lfs_names(converted))
    kept = shards[: len(shards) // 2]
    hub.add_repo(REPO, owner="alice")
    hub.put_files(REPO, {**{n: local[n] for n in kept}, "config.json": b"{}"})
    hub.requests.clear()
    push(out_dir=converted, repo_id=REPO)
    assert {k: v for k, v in hub.files(REPO).items() if k != ".gitattributes"} == local
    assert hub.count("PUT", "^/lfs/") == len(shards) - len(kept)
    assert (
        f"{len(kept)} of {len(local)} files are already on {REPO} at main with the same sha256: skipped"
        in capsys.readouterr().out
    )


def test_failed_commit_then_rerun_completes_without_resending(converted, hub):
    hub.add_repo(REPO, owner="alice")
    hub.put_files(REPO, {"README.md": _pushed(converted)["README.md"]})  # the card is there: the shards commit first
    hub.fail("POST", r"/commit/main$", 500)
    with pytest.raises(MxconvertError) as err:
        push(out_dir=converted, repo_id=REPO)
    message = str(err.value)
    assert "\n" not in message and "500" in message and "run the same command again" in message
    assert set(hub.files(REPO)) == {".gitattributes", "README.md"}  # nothing more committed
    sent = hub.count("PUT", "^/lfs/")
    assert sent == len(_lfs_names(converted))
    push(out_dir=converted, repo_id=REPO)
    assert hub.count("PUT", "^/lfs/") == sent  # the stored LFS bytes were not sent again
    assert {k: v for k, v in hub.files(REPO).items() if k != ".gitattributes"} == _pushed(converted)


def test_failed_lfs_upload_is_retried(converted, hub):
    hub.fail("PUT", r"^/lfs/", 500)
    push(out_dir=converted, repo_id=REPO)
    assert hub.count("PUT", "^/lfs/") == len(_lfs_names(converted)) + 1
    assert {k: v for k, v in hub.files(REPO).items() if k != ".gitattributes"} == _pushed(converted)


def test_revision_branch_created_and_resumed(converted, hub, capsys):
    url = push(out_dir=converted, repo_id=REPO, revision="mi300x-v1", commit_message="MI300X build")
    repo = hub.repos[REPO]
    assert set(hub.files(REPO, "main")) == {".gitattributes"}
    assert {k: v for k, v in hub.files(REPO, "mi300x-v1").items() if k != ".gitattributes"} == _pushed(converted)
    assert repo["commits"][repo["branches"]["mi300x-v1"]]["message"] == "MI300X build (manifest)"
    assert url.endswith(repo["branches"]["mi300x-v1"])
    assert push(out_dir=converted, repo_id=REPO, revision="mi300x-v1") == f"{hub.endpoint}/{REPO}/tree/mi300x-v1"
    assert "Nothing to upload" in capsys.readouterr().out


def test_a_bare_name_goes_to_the_token_owner(converted, hub):
    url = push(out_dir=converted, repo_id="solo")
    assert url.startswith(f"{hub.endpoint}/alice/solo/commit/")
    assert {k: v for k, v in hub.files("alice/solo").items() if k != ".gitattributes"} == _pushed(
        converted, "alice/solo"
    )


def test_create_pr_puts_everything_in_one_pull_request(converted, hub):
    url = push(out_dir=converted, repo_id=REPO, create_pr=True)
    assert url == f"{hub.endpoint}/{REPO}/discussions/1"
    assert set(hub.files(REPO, "main")) == {".gitattributes"}
    assert set(hub.repos[REPO]["branches"]) == {"main", "refs/pr/1"}  # the manifest followed into the same PR
    assert {k: v for k, v in hub.files(REPO, "refs/pr/1").items() if k != ".gitattributes"} == _pushed(converted)


def test_create_pr_with_a_revision_is_refused_before_any_request(converted, hub):
    with pytest.raises(MxconvertError, match="--create-pr: opens a pull request against main"):
        push(out_dir=converted, repo_id=REPO, create_pr=True, revision="dev")
    assert hub.requests == []


def test_private_repo(converted, hub):
    push(out_dir=converted, repo_id=REPO, private=True)
    assert hub.repos[REPO]["private"]
    hub.add_repo("alice/public", owner="alice")
    with pytest.raises(MxconvertError, match="exists and is public, but --private was asked"):
        push(out_dir=converted, repo_id="alice/public", private=True)
    assert set(hub.files("alice/public")) == {".gitattributes"}


def test_unfinished_conversion_never_reaches_the_hub(out, hub):
    shard = sorted(_lfs_names(out))[0]
    data = bytearray((out / shard).read_bytes())
    data[-1] ^= 1  # same size, other bytes: only the sha256 can tell
    (out / shard).write_bytes(bytes(data))
    with pytest.raises(MxconvertError, match="sha256"):
        push(out_dir=out, repo_id=REPO)
    (out / "mxconvert.json").unlink()
    with pytest.raises(MxconvertError, match="not a finished conversion"):
        push(out_dir=out, repo_id=REPO)
    assert hub.requests == []


def test_file_over_the_hub_limit_is_named(out, hub, monkeypatch):
    sizes = {n: (out / n).stat().st_size for n in _lfs_names(out)}
    biggest = sorted(n for n in sizes if sizes[n] == max(sizes.values()))
    monkeypatch.setattr(hub_module, "HUB_FILE_LIMIT", max(sizes.values()) - 1)
    with pytest.raises(MxconvertError) as err:
        push(out_dir=out, repo_id=REPO)
    more = f" (so are {len(biggest) - 1} more: {', '.join(biggest[1:4])}" if len(biggest) > 1 else ""
    assert str(err.value).startswith(
        f"{out / biggest[0]}: is {sizes[biggest[0]]} bytes, over the Hub's limit of "
        f"{sizes[biggest[0]] - 1} bytes per file{more}"
    )
    assert hub.requests == []


def test_check_file_sizes_at_the_real_limit(tmp_path):
    check_file_sizes(out_dir=tmp_path, sizes={"a.safetensors": 50 * 10**9}, limit=hub_module.HUB_FILE_LIMIT)
    with pytest.raises(MxconvertError) as err:
        check_file_sizes(
            out_dir=tmp_path,
            sizes={"a.safetensors": 1, "b.safetensors": 50 * 10**9 + 1},
            limit=hub_module.HUB_FILE_LIMIT,
        )
    assert str(err.value) == (
        f"{tmp_path / 'b.safetensors'}: is 50.00 GB, over the Hub's limit of 50.00 GB per file. "
        "Convert again with a smaller --max-shard-size, e.g. 5GB."
    )


def test_files_outside_the_manifest_stop_the_push(out, hub):
    (out / "notes.txt").write_text("mine")  # verify refuses a directory that is not exactly the conversion
    with pytest.raises(MxconvertError, match=r"notes.txt: is not in the manifest"):
        push(out_dir=out, repo_id=REPO)
    assert REPO not in hub.repos


def test_remote_files_of_an_older_conversion_are_reported_and_kept(converted, hub, capsys):
    hub.add_repo(REPO, owner="alice")
    hub.put_files(REPO, {"model-00001-of-00099.safetensors": b"\0old shard"})
    push(out_dir=converted, repo_id=REPO)
    assert hub.files(REPO)["model-00001-of-00099.safetensors"] == b"\0old shard"
    assert (
        f"On {REPO} at main but not in this conversion, left in place: model-00001-of-00099.safetensors"
        in capsys.readouterr().out
    )


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no token", "push: no Hugging Face token. Pass --token, set HF_TOKEN, or run `hf auth login`"),
        ("bad token", f"{REPO}: the Hub refused the token (401)"),
        ("other's repo", "bob/model: this token may not write there (403)"),
        ("other's namespace", "bob/new: this token may not write there (403)"),
        (
            "rate limit",
            f"{REPO}: the Hub is rate-limiting this account (429). Wait 30 seconds, then run the same command",
        ),
        ("network down", "cannot be reached"),
        ("card refused", "README.md: the Hub rejects its metadata"),
    ],
)
def test_errors_are_one_line_with_what_to_do(converted, hub, monkeypatch, case, expected):
    repo_id, token = REPO, None
    if case == "no token":
        monkeypatch.delenv("HF_TOKEN")
    elif case == "bad token":
        token = "hf_wrong"
    elif case == "other's repo":
        hub.add_repo("bob/model", owner="bob")
        repo_id = "bob/model"
    elif case == "other's namespace":
        repo_id = "bob/new"
    elif case == "rate limit":
        hub.fail("POST", "/api/repos/create", 429, headers={"Retry-After": "30"})
    elif case == "card refused":
        hub.fail("POST", "/api/validate-yaml", 400)
    elif case == "network down":
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(MxconvertError) as err:
        push(out_dir=converted, repo_id=repo_id, token=token)
    message = str(err.value)
    assert expected in message and "\n" not in message
    assert message.endswith(".") and len(message) < 300
    assert hub.count("PUT") == 0 and hub.count("POST", "/commit/") == 0


def test_cli_push_through_click(converted, hub):
    runner = CliRunner()
    ok = runner.invoke(main, ["push", str(converted), REPO, "--revision", "v1", "--commit-message", "mine"])
    assert ok.exit_code == 0, ok.output
    assert f"Uploading {len(_local(converted))} files" in ok.output
    assert hub.repos[REPO]["commits"][hub.repos[REPO]["branches"]["v1"]]["message"] == "mine (manifest)"
    refused = runner.invoke(main, ["push", str(converted), "bob/new"])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert refused.output.strip().splitlines()[-1].startswith("Error: bob/new: this token may not write there (403)")


def test_cli_push_in_a_fresh_process_reads_hf_endpoint(converted, hub, tmp_path):
    """A real subprocess: huggingface_hub reads HF_ENDPOINT and HF_HUB_DISABLE_XET at import, as for a user."""
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": "hf_alice",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    run = subprocess.run(
        [sys.executable, "-m", "mxconvert.cli", "push", str(converted), REPO, "--private"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert hub.repos[REPO]["private"]
    assert {k: v for k, v in hub.files(REPO).items() if k != ".gitattributes"} == _pushed(converted)
    again = subprocess.run(
        [sys.executable, "-m", "mxconvert.cli", "push", str(converted), REPO],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0 and "Nothing to upload" in again.stdout


def test_convert_with_push_to_hub(hub, tmp_path):
    src, out = make_tiny_checkpoint(tmp_path / "src", mtp=False), tmp_path / "out"
    result = CliRunner().invoke(main, [str(src), str(out), "--bf16", "derive", "--push-to-hub", REPO, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert {k: v for k, v in hub.files(REPO).items() if k != ".gitattributes"} == _pushed(out)


# --push-to-hub: checked before converting; a failed push leaves a finished conversion and the line to resume


@pytest.fixture
def tiny(tmp_path):
    return make_tiny_checkpoint(tmp_path / "src", seed=2)


@pytest.mark.parametrize(
    "setup,repo,match",
    [
        (lambda hub, mp: mp.delenv("HF_TOKEN"), REPO, r"--push-to-hub: no Hugging Face token"),
        (lambda hub, mp: mp.setenv("HF_TOKEN", "hf_nobody"), REPO, r"the Hub refused the token \(401\)"),
        (lambda hub, mp: hub.roles.update(hf_alice="read"), REPO, r"this token is read-only"),
        (lambda hub, mp: None, "bob/model", r"the token of alice may not write under bob"),
        (lambda hub, mp: hub.add_repo(REPO, owner="alice"), REPO, r"exists and is public, but --private was asked"),
    ],
    ids=["no_token", "bad_token", "read_only", "other_namespace", "public_but_private_asked"],
)
def test_push_target_is_checked_before_converting(hub, tiny, tmp_path, monkeypatch, setup, repo, match):
    setup(hub, monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(MxconvertError, match=match):
        convert(model_dir=str(tiny), out_dir=str(out), progress=False, push_to_hub=repo, private=True)
    assert not out.exists()  # refused before a byte was converted


def test_a_failed_push_after_converting_says_how_to_resume(hub, tiny, tmp_path):
    out = tmp_path / "out"
    hub.fail("POST", r"/commit/", 500, times=20)
    with pytest.raises(MxconvertError) as e:
        convert(model_dir=str(tiny), out_dir=str(out), progress=False, push_to_hub=REPO, revision="v1")
    message = str(e.value)
    assert "the conversion in" in message and "is finished and verified; only the push failed" in message
    assert message.endswith(f"the push with: mxconvert push {out} {REPO} --revision v1.")
    hub.faults.clear()
    push(out_dir=out, repo_id=REPO, revision="v1")
    assert "mxconvert.json" in hub.files(REPO, "v1")


def test_the_card_names_the_repo_it_is_converted_for(hub, tiny, tmp_path):
    out = tmp_path / "out"
    convert(model_dir=str(tiny), out_dir=str(out), progress=False, push_to_hub="mine")  # a bare name: alice's
    card = hub.files("alice/mine")["README.md"].decode()
    assert "hf download alice/mine --local-dir mine" in card  # converted for that repo: named, no placeholder


def test_the_pushed_card_names_the_repo_and_a_download_verifies(converted, hub, tmp_path):
    before = _local(converted)
    push(out_dir=converted, repo_id=REPO)
    assert _local(converted) == before  # OUT_DIR stays as the converter wrote it
    download = tmp_path / "download"
    download.mkdir()
    for name, data in hub.files(REPO).items():
        if name != ".gitattributes":
            (download / name).write_bytes(data)
    assert f"hf download {REPO}".encode() in (download / "README.md").read_bytes()
    verify(out_dir=download)  # the Hub's manifest names the Hub's card
    push(out_dir=converted, repo_id=REPO)  # and a second push finds everything there
    assert "README.md" in hub.files(REPO)
