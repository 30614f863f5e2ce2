"""Push a finished conversion to the Hugging Face Hub: verify it, create the repo (and branch), upload only
the files the Hub does not already hold, and the manifest last, so that a half-pushed repo looks unfinished.

Resuming is re-running: files already on the Hub with the manifest's size and sha256 are skipped, and
huggingface_hub does not send LFS/xet bytes that the Hub already stores.
"""

import hashlib
import json
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from . import format as fmt
from .errors import MxconvertError
from .files import sha256_file
from .hub_source import transport_errors
from .outdir import locked_for_reading
from .verify import verify

HUB_FILE_LIMIT = 50 * 1000**3  # the Hub refuses a file over 50 GB
PATHS_INFO_BATCH = 100  # paths per paths-info request
REGULAR_FILE_MAX = 10 * 2**20  # the Hub stores larger files through LFS/xet
RERUN = "run the same command again: files already on the Hub are skipped"


def push(
    *,
    out_dir: Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> str:
    """Upload OUT_DIR to REPO_ID and return the URL of the commit, the pull request, or the repo."""
    out_dir = Path(out_dir)
    if constants.HF_HUB_OFFLINE:
        raise MxconvertError("push", "HF_HUB_OFFLINE is set, so nothing can be uploaded", "Unset HF_HUB_OFFLINE")
    with locked_for_reading(out_dir):  # no conversion may rewrite OUT_DIR while it uploads
        return _push_locked(out_dir, repo_id, private, revision, token, commit_message, create_pr)


def _push_locked(out_dir, repo_id, private, revision, token, commit_message, create_pr) -> str:
    if create_pr and revision not in (None, "main"):
        raise MxconvertError(
            "--create-pr",
            f"opens a pull request against main, so it cannot go with --revision {revision}",
            f"Drop --create-pr to push to branch {revision}, or drop --revision",
        )
    manifest = verify(out_dir=out_dir, full=True)  # a half-finished conversion never reaches the Hub
    files = {e["name"]: (e["size"], e["sha256"]) for e in manifest["files"]}
    manifest_path = out_dir / fmt.MANIFEST_NAME
    files[fmt.MANIFEST_NAME] = (manifest_path.stat().st_size, sha256_file(manifest_path))
    check_file_sizes(out_dir=out_dir, sizes={n: size for n, (size, _) in files.items()}, limit=HUB_FILE_LIMIT)
    token = token or get_token()
    if not token:
        raise MxconvertError(
            "push",
            "no Hugging Face token",
            "Pass --token, set HF_TOKEN, or run `hf auth login` with a token that can write",
        )
    api = HfApi(token=token)
    branch = None if create_pr else revision
    try:
        return _push(
            api,
            out_dir,
            repo_id,
            files,
            private,
            branch,
            create_pr,
            commit_message or f"Upload {repo_id.split('/')[-1]} converted by mxconvert",
        )
    except MxconvertError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes one line that says what to do
        raise explain(e, repo_id=repo_id, endpoint=api.endpoint) from e


def check_push_target(*, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Before hours of converting: a token that the Hub accepts, that may write to the repo's namespace,
    and a repo that --private can be honoured for. Refuses with the same lines a push would; returns the
    full repo id (a bare name lands in the token owner's namespace)."""
    if constants.HF_HUB_OFFLINE:
        raise MxconvertError(
            "--push-to-hub", "HF_HUB_OFFLINE is set, so nothing can be uploaded", "Unset HF_HUB_OFFLINE"
        )
    token = token or get_token()
    if not token:
        raise MxconvertError(
            "--push-to-hub", "no Hugging Face token",
            "Pass --token, set HF_TOKEN, or run `hf auth login` with a token that can write",
        )  # fmt: skip
    api = HfApi(token=token)
    try:
        me = api.whoami()
        role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise MxconvertError(repo_id, "this token is read-only", "Use a token with write access (a write token)")
        owners = {me.get("name"), *(o.get("name") for o in me.get("orgs") or [])}
        namespace = repo_id.split("/")[0] if "/" in repo_id else me.get("name")
        if namespace not in owners:
            raise MxconvertError(
                repo_id, f"the token of {me.get('name')} may not write under {namespace}",
                f"Push to a namespace of yours ({', '.join(sorted(n for n in owners if n))})",
            )  # fmt: skip
        repo_id = f"{namespace}/{repo_id.split('/')[-1]}"
        try:
            info = api.repo_info(repo_id)
        except RepositoryNotFoundError:
            return repo_id  # created by the push
        if private and info.private is False:
            raise MxconvertError(
                repo_id, "exists and is public, but --private was asked",
                "Make it private in its settings on the Hub, or push without --private",
            )  # fmt: skip
        return repo_id
    except MxconvertError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes one line that says what to do
        raise explain(e, repo_id=repo_id, endpoint=api.endpoint) from None


def check_file_sizes(*, out_dir: Path, sizes: dict[str, int], limit: int) -> None:
    """Refuse before uploading anything when a file is over the Hub's per-file limit."""
    over = sorted(name for name, size in sizes.items() if size > limit)
    if over:
        more = f" (so are {len(over) - 1} more: {_names(over[1:])})" if len(over) > 1 else ""
        raise MxconvertError(
            Path(out_dir) / over[0],
            f"is {_size(sizes[over[0]])}, over the Hub's limit of {_size(limit)} per file{more}",
            "Convert again with a smaller --max-shard-size, e.g. 5GB",
        )


def _push(
    api: HfApi,
    out_dir: Path,
    repo_id: str,
    files: dict,
    private: bool,
    branch: str | None,
    create_pr: bool,
    message: str,
) -> str:
    created = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_url, repo_id = str(created), created.repo_id  # a bare name lands in the token owner's namespace
    if private and api.repo_info(repo_id).private is False:
        raise MxconvertError(
            repo_id,
            "exists and is public, but --private was asked",
            "Make it private in its settings on the Hub, or push without --private",
        )
    if branch is not None and branch != "main" and not branch.startswith("refs/"):
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    target = branch or "main"  # a new pull request starts from main
    overrides = card_for_repo(out_dir, repo_id)  # the card names the repo; the manifest follows it
    files = files | {name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in overrides.items()}
    remote = _remote_files(api, repo_id, target, sorted(files))
    missing = sorted(
        n for n, (size, sha) in files.items() if not _same(overrides.get(n, out_dir / n), size, sha, remote.get(n))
    )
    _report_strays(api, out_dir, repo_id, target, files)
    if not missing:
        _say(f"Nothing to upload: all {len(files)} files are already on {repo_id} at {target} with the same sha256.")
        return repo_url if target == "main" else f"{repo_url}/tree/{target}"
    if len(missing) < len(files):
        _say(
            f"{len(files) - len(missing)} of {len(files)} files are already on {repo_id} at {target} with the same "
            "sha256: skipped (a previous push got that far)."
        )
    nbytes = sum(files[name][0] for name in missing)
    where = "a new pull request" if create_pr else target
    _say(f"Uploading {len(missing)} files ({_size(nbytes)}) to {repo_id} at {where}.")
    pr_url = None
    body = [name for name in missing if name != fmt.MANIFEST_NAME]
    # the card first: the Hub checks its metadata, and a refusal then stops the push before any shard is sent
    for part, names in (
        (" (card)", [n for n in body if n in overrides]),
        ("", [n for n in body if n not in overrides]),
    ):
        if names:
            info = _upload(api, repo_id, out_dir, names, overrides, branch, create_pr, message + part)
            if create_pr:  # what follows goes into the same pull request
                branch, create_pr, pr_url = info.pr_revision, False, info.pr_url
    if fmt.MANIFEST_NAME in missing:  # last: without it the repo is visibly not a finished conversion
        info = _upload(
            api, repo_id, out_dir, [fmt.MANIFEST_NAME], overrides, branch, create_pr, f"{message} (manifest)"
        )
    url = pr_url or info.pr_url or info.commit_url
    _say(f"Pushed {len(missing)} files: {url}")
    return url


def _upload(api: HfApi, repo_id: str, out_dir: Path, names: list[str], overrides: dict, branch, create_pr, message):
    """One commit of these files: from OUT_DIR, or from memory where the push rewrites them (card, manifest)."""
    if not any(n in overrides for n in names):
        return api.upload_folder(
            repo_id=repo_id, folder_path=out_dir, allow_patterns=[_literal(n) for n in names], revision=branch,
            create_pr=create_pr, commit_message=message,
        )  # fmt: skip
    operations = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=overrides.get(n, str(out_dir / n))) for n in names]
    return api.create_commit(
        repo_id=repo_id, operations=operations, revision=branch, create_pr=create_pr, commit_message=message
    )


def card_for_repo(out_dir: Path, repo_id: str) -> dict[str, bytes]:
    """The card rendered for the repo it is pushed to, and the manifest that names it: {} when OUT_DIR's
    card already names that repo. OUT_DIR itself is left as the converter wrote it."""
    from huggingface_hub import ModelCard

    from .card import project_url, render_card

    manifest = json.loads((out_dir / fmt.MANIFEST_NAME).read_bytes())
    card_path, source = out_dir / fmt.CARD_NAME, manifest["source"]
    card = card_path.read_bytes()
    text = render_card(
        quant=fmt.find_quant(json.loads((out_dir / "config.json").read_bytes())),
        source=source.get("repo_id") or source.get("name", ""),
        source_repo_id=source.get("repo_id"),
        source_revision=source.get("revision"),
        source_card=card,  # it carries the source's licence fields, as the converter copied them
        options=manifest["options"],
        version=manifest["tool"]["version"],
        repo_id=repo_id,
        source_files=source["files"],
        project_url=project_url(),
    )
    data = str(ModelCard(text)).encode("utf-8")
    if data == card:
        return {}
    for entry in manifest["files"]:
        if entry["name"] == fmt.CARD_NAME:
            entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    return {fmt.CARD_NAME: data, fmt.MANIFEST_NAME: (json.dumps(manifest, indent=2) + "\n").encode()}


def _report_strays(api: HfApi, out_dir: Path, repo_id: str, target: str, files: dict) -> None:
    """Say which local files are not pushed, and which remote ones (an older conversion's shards) are left."""
    local = sorted(p.name for p in out_dir.iterdir() if p.is_file() and p.name not in files and p.name[0] != ".")
    if local:
        _say(f"Not in the manifest, so not pushed: {_names(local)}")
    siblings = api.repo_info(repo_id, revision=target).siblings or []
    stale = sorted(s.rfilename for s in siblings if s.rfilename not in files and s.rfilename != ".gitattributes")
    if stale:
        _say(
            f"On {repo_id} at {target} but not in this conversion, left in place: {_names(stale)} "
            "(delete them on the Hub if an older conversion left them)"
        )


def _names(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _size(nbytes: int) -> str:
    if nbytes >= 10**9:
        return f"{nbytes / 1e9:.2f} GB"
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 10**6 else f"{nbytes} bytes"


def _remote_files(api: HfApi, repo_id: str, revision: str, paths: list[str]) -> dict:
    """path -> RepoFile for those of `paths` present on the Hub at `revision`."""
    found = {}
    for i in range(0, len(paths), PATHS_INFO_BATCH):
        for entry in api.get_paths_info(repo_id, paths[i : i + PATHS_INFO_BATCH], revision=revision):
            if getattr(entry, "size", None) is not None:  # files only, not folders
                found[entry.path] = entry
    return found


def _same(local: Path | bytes, size: int, sha256: str, remote) -> bool:
    """The remote file is this one: its LFS sha256 equals the manifest's, or its git blob id equals ours."""
    if remote is None or remote.size != size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == sha256
    # A regular git file is small; a big one without LFS info is left to upload_folder, which skips it if unchanged.
    return size <= REGULAR_FILE_MAX and remote.blob_id == git_blob_id(local)


def git_blob_id(local: Path | bytes) -> str:
    data = local if isinstance(local, bytes) else local.read_bytes()  # a regular git file: small
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _literal(name: str) -> str:
    """A glob pattern that matches exactly `name` (upload_folder takes patterns)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _say(message: str) -> None:
    print(message, flush=True)


def explain(error: BaseException, *, repo_id: str, endpoint: str) -> MxconvertError:
    """One line for what went wrong while talking to the Hub, and what to do."""
    chain, e = [], error
    while e is not None and e not in chain:  # huggingface_hub wraps upload errors (RuntimeError from HfHubHTTPError)
        chain.append(e)
        e = e.__cause__ or e.__context__
    http = next((e for e in chain if isinstance(e, HfHubHTTPError) and e.response is not None), None)
    status = http.response.status_code if http is not None else None
    if any(isinstance(e, transport_errors()) for e in chain) and status is None:
        return MxconvertError(
            endpoint,
            f"cannot be reached ({type(chain[-1]).__name__})",
            f"Check the network (and HF_ENDPOINT), then {RERUN}",
        )
    if status == 401:
        return MxconvertError(
            repo_id, "the Hub refused the token (401)", "Pass a valid --token, set HF_TOKEN, or run `hf auth login`"
        )
    if status == 403:
        return MxconvertError(
            repo_id,
            "this token may not write there (403): the namespace belongs to someone else, or the token is read-only",
            "Push to a namespace you own, or use a token with write access to it",
        )
    if any(isinstance(e, RevisionNotFoundError) for e in chain):
        return MxconvertError(repo_id, "the branch does not exist", "Check --revision (refs/pr/N for a pull request)")
    if any(isinstance(e, RepositoryNotFoundError) for e in chain) or status == 404:
        return MxconvertError(repo_id, "not found, or not visible to this token", "Check the repo id and the token")
    if status == 429:
        wait = http.response.headers.get("Retry-After")
        return MxconvertError(
            repo_id,
            "the Hub is rate-limiting this account (429)",
            f"Wait {f'{wait} seconds' if wait else 'a few minutes'}, then {RERUN}",
        )
    if status is not None and status >= 500:
        return MxconvertError(
            repo_id, f"the Hub failed with {status} and the upload stopped", f"Wait a little, then {RERUN}"
        )
    first = str(chain[0]).strip().splitlines()
    detail = next((line for line in first if line.strip()), type(chain[0]).__name__)
    if isinstance(chain[0], ValueError) and "README.md" in str(chain[0]):  # the Hub's validate-yaml said no
        return MxconvertError(
            fmt.CARD_NAME,
            f"the Hub rejects its metadata: {' '.join(first[1:]) or detail}",
            "Report this as an mxconvert bug; the card is written by the converter",
        )
    return MxconvertError(
        repo_id,
        f"the push stopped: {detail}" + (f" ({status})" if status else ""),
        f"Fix that if it is on your side, then {RERUN}",
    )
