"""A Hub repo as a source: fetched into the Hugging Face cache for a conversion (only the files needed),
or read through its config, index and shard headers alone (HTTP range reads) for a dry run.

Every Hub failure becomes one line that says which: offline, unreachable, gated, missing repo or revision.
"""

import contextlib
import importlib
import re
from pathlib import Path

from . import format as fmt
from .checkpoint import SIDE_FILES, LocalFiles, SourceCheckpoint, is_side_file
from .errors import MxconvertError
from .headers import MAX_HEADER

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", re.ASCII)  # owner/name; "./x", "../x" are paths
HEAD_READ = 100_000  # bytes of a shard asked for first: most safetensors headers fit
SOURCE_FILES = ("config.json", fmt.INDEX_NAME, "*.safetensors", fmt.CARD_NAME, *SIDE_FILES)  # what a fetch needs


def is_hub_id(model_dir) -> bool:
    """A repo id, not an existing local path (a local directory wins when both could be meant)."""
    return not Path(model_dir).expanduser().exists() and bool(REPO_ID.fullmatch(str(model_dir)))


def open_source(model_dir: str | Path, *, headers_only: bool = False, token: str | None = None) -> SourceCheckpoint:
    """The source checkpoint: a local directory read in place, or a Hub repo id, fetched into the Hugging
    Face cache (only the files a conversion needs), or with headers_only read through its headers alone.

    Its `ident` names it without a local path (it goes into the manifest and the card): {"name"} of a
    local directory, or {"repo_id", "revision"}.
    """
    if not is_hub_id(model_dir):
        return SourceCheckpoint(LocalFiles(Path(model_dir).expanduser()))
    if headers_only:
        return SourceCheckpoint(HubFiles(str(model_dir), token=token))
    from huggingface_hub import snapshot_download  # network only when a repo id is given

    with hub_errors(str(model_dir)):
        path = Path(snapshot_download(str(model_dir), allow_patterns=list(SOURCE_FILES), token=token))
    return SourceCheckpoint(LocalFiles(path, ident={"repo_id": str(model_dir), "revision": path.name}))


@contextlib.contextmanager
def hub_errors(repo_id: str):
    """huggingface_hub's failures while reading a source repo, as one MxconvertError line each."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    neither = "is neither a local directory nor"
    try:
        yield
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise MxconvertError(
                repo_id, f"{neither} a checkpoint in the Hugging Face cache, and HF_HUB_OFFLINE is set",
                "Check the path, or unset HF_HUB_OFFLINE to download it",
            ) from None  # fmt: skip
        raise MxconvertError(
            repo_id, f"{neither} reachable on the Hub (the Hub cannot be reached: {_cause(e)})",
            "Check the path, or the network (and HF_ENDPOINT)",
        ) from None  # fmt: skip
    except GatedRepoError:
        raise MxconvertError(
            repo_id, "is a gated repo and this token has no access to it",
            "Accept its terms on the Hub with your account, then pass a token (HF_TOKEN or `hf auth login`)",
        ) from None  # fmt: skip
    except RevisionNotFoundError:
        raise MxconvertError(
            repo_id, "the revision asked for does not exist on the Hub", "Check the revision"
        ) from None
    except RepositoryNotFoundError:
        raise MxconvertError(
            repo_id, f"{neither} a Hub repo visible to this token",
            "Check the path or the repo id (a private repo needs HF_TOKEN or `hf auth login`)",
        ) from None  # fmt: skip
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        raise MxconvertError(
            repo_id, f"cannot be read from the Hub ({type(e).__name__}{f', {status}' if status else ''})",
            "Check the repo id, your network and HF_TOKEN, then run again",
        ) from None  # fmt: skip
    except HFValidationError:
        raise MxconvertError(repo_id, f"{neither} a Hub repo id", "Check the path") from None
    except transport_errors() as e:
        raise MxconvertError(repo_id, f"the Hub cannot be reached ({type(e).__name__})",
                             "Check the network (and HF_ENDPOINT), then run again") from None  # fmt: skip


def _cause(error: BaseException) -> str:
    """What stood between us and the Hub: its HTTP answer, or the connection failure."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
        response = getattr(error, "response", None)
        if getattr(response, "status_code", None) is not None:
            return f"it answered {response.status_code}"
    return type(error).__name__


def transport_errors() -> tuple[type, ...]:
    """Connection failures of whichever HTTP library this huggingface_hub uses (httpx2, httpx or requests)."""
    kinds = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            kinds.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(kinds)


class HubFiles:
    """A Hub repo's files as SourceCheckpoint reads them, without downloading a tensor byte: sizes from
    the repo's file list, config and index downloaded (small), shard headers by HTTP range reads."""

    def __init__(self, repo_id: str, *, revision: str | None = None, token: str | None = None):
        from huggingface_hub import HfApi

        self.repo_id, self.dir, self.token = repo_id, Path(repo_id), token
        self.api = HfApi(token=token)
        with hub_errors(repo_id):
            info = self.api.model_info(repo_id, revision=revision, files_metadata=True)
        self.revision = info.sha
        self.ident = {"repo_id": repo_id, "revision": info.sha}
        self.sizes = {s.rfilename: s.size for s in info.siblings or [] if s.size is not None}
        self.headers_read = 0  # bytes of shards read: headers only

    def exists(self, name: str) -> bool:
        return name in self.sizes

    def read_small(self, name: str, *, missing_fix: str = "Check the repo id") -> bytes:
        from huggingface_hub import hf_hub_download

        if name not in self.sizes:
            raise MxconvertError(self.dir / name, "is missing from the repo", missing_fix)
        with hub_errors(self.repo_id):
            path = hf_hub_download(self.repo_id, name, revision=self.revision, token=self.token)
        return Path(path).read_bytes()

    def header(self, name: str) -> tuple[bytes, int]:
        """A shard's first bytes, enough for its header, read with one or two range requests."""
        raw = self._range(name, 0, HEAD_READ)
        if len(raw) >= 8:
            length = min(int.from_bytes(raw[:8], "little"), MAX_HEADER + 1)
            if 8 + length > len(raw) and 8 + length <= self.sizes[name]:
                raw += self._range(name, len(raw), 8 + length)
        return raw, self.sizes[name]

    def _range(self, name: str, begin: int, end: int) -> bytes:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(self.repo_id, name, revision=self.revision, endpoint=self.api.endpoint)
        headers = {**build_hf_headers(token=self.token), "Range": f"bytes={begin}-{end - 1}"}
        with hub_errors(self.repo_id):
            response = get_session().get(url, headers=headers)
            hf_raise_for_status(response)
        data = response.content[: end - begin]
        self.headers_read += len(data)
        return data

    def size(self, name: str) -> int:
        return self.sizes[name]

    def side_file_names(self) -> list[str]:
        return sorted(name for name in self.sizes if "/" not in name and is_side_file(name))

    def open(self, name: str) -> int:
        raise MxconvertError(
            self.dir / name, "is on the Hub: a dry run reads no tensor bytes", "Convert without --dry-run"
        )
