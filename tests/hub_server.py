"""A Hugging Face Hub stand-in on 127.0.0.1, for tests: what huggingface_hub's create_repo, create_branch,
repo_info, get_paths_info, upload_folder (regular and LFS "basic" transfer, no xet) and ModelCard.validate call.

Repos live in memory: branches point at commits, a commit maps paths to files, LFS bytes are kept by sha256.
Tokens map to users; a user writes only to its own namespace. `fail()` plants one-off HTTP errors, and
`requests` records every call, so tests can count what was sent.
"""

import base64
import fnmatch
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.zip")  # the Hub's default .gitattributes
LFS_SIZE = 10 * 2**20  # larger files go to LFS whatever their name
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
RELATIONS = {"adapter", "merge", "quantized", "finetune"}
# The Hub's licence ids (https://huggingface.co/docs/hub/repositories-licenses), those a test may meet.
LICENSES = {
    "apache-2.0",
    "mit",
    "other",
    "unknown",
    "openrail",
    "cc-by-4.0",
    "cc-by-nc-4.0",
    "cc-by-sa-4.0",
    "bsd-3-clause",
    "gpl-3.0",
    "agpl-3.0",
    "lgpl-3.0",
    "mpl-2.0",
    "llama3",
    "gemma",
    "cc0-1.0",
}
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def card_errors(content: str) -> list[str]:
    """The Hub's model-card metadata checks that our cards exercise; an empty list means valid."""
    match = re.match(r"^\s*---\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", content, re.S)
    if not match:
        return []
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as e:
        return [f"YAML does not parse: {e}"]
    if not isinstance(meta, dict):
        return ["metadata must be a mapping"]
    errors = []
    base = meta.get("base_model")
    bases = base if isinstance(base, list) else [base] if base is not None else []
    errors += [f"base_model {b!r} is not a repo id" for b in bases if not (isinstance(b, str) and REPO_ID.match(b))]
    if "base_model_relation" in meta:
        if meta["base_model_relation"] not in RELATIONS:
            errors.append(f"base_model_relation must be one of {sorted(RELATIONS)}")
        if not bases:
            errors.append("base_model_relation needs base_model")
    if "license" in meta and meta["license"] not in LICENSES:
        errors.append(f"license {meta['license']!r} is not a known licence id")
    if ("license_name" in meta or "license_link" in meta) and meta.get("license") != "other":
        errors.append("license_name and license_link go with license: other")
    if "license_name" in meta and not re.match(r"^[a-z0-9.-]+$", str(meta["license_name"])):
        errors.append("license_name must be lowercase letters, digits, '-' and '.'")
    tags = meta.get("tags", [])
    if not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        errors.append("tags must be a list of strings")
    for key in ("library_name", "pipeline_tag"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f"{key} must be a string")
    return errors


class HubServer:
    """Start with `with HubServer() as hub:`; `hub.endpoint` is the URL to give huggingface_hub."""

    def __init__(self, users: dict[str, str] | None = None):
        self.users = users if users is not None else {"hf_alice": "alice", "hf_bob": "bob"}
        self.repos: dict[str, dict] = {}  # repo id -> {"owner", "private", "branches": {name: oid}, "commits"}
        self.lfs: dict[str, bytes] = {}  # sha256 -> bytes
        self.requests: list[tuple[str, str]] = []
        self.served: list[tuple[str, int]] = []  # (file, bytes sent) of each download or range read
        self.roles: dict[str, str] = {}  # token -> "read" (default "write")
        self.faults: list[dict] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- for tests
    def fail(
        self,
        method: str,
        path: str,
        status: int,
        *,
        times: int = 1,
        message: str = "planted fault",
        headers: dict | None = None,
    ) -> None:
        """The next `times` requests whose path matches the regex `path` get `status` instead of an answer."""
        self.faults.append(
            {
                "method": method,
                "path": re.compile(path),
                "status": status,
                "times": times,
                "message": message,
                "headers": headers or {},
            }
        )

    def count(self, method: str, path: str = "") -> int:
        return sum(1 for m, p in self.requests if m == method and re.search(path, p))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        tree = repo["commits"][repo["branches"][revision]]["files"]
        return {path: self.lfs[f["lfs"]] if f["lfs"] else f["content"] for path, f in tree.items()}

    def add_repo(self, repo_id: str, *, owner: str, private: bool = False) -> None:
        init = {
            "files": {".gitattributes": {"content": GITATTRIBUTES, "lfs": None, "size": len(GITATTRIBUTES)}},
            "parent": None,
            "message": "initial commit",
        }
        oid = hashlib.sha1(repo_id.encode()).hexdigest()
        self.repos[repo_id] = {"owner": owner, "private": private, "branches": {"main": oid}, "commits": {oid: init}}

    def put_files(self, repo_id: str, files: dict[str, bytes], revision: str = "main") -> None:
        """Commit files directly, as an earlier, interrupted push would have left them."""
        ops = []
        for path, data in files.items():
            if self._is_lfs(path, len(data), data[:512]):
                oid = hashlib.sha256(data).hexdigest()
                self.lfs[oid] = data
                ops.append(("lfsFile", {"path": path, "oid": oid, "size": len(data)}))
            else:
                ops.append(("file", {"path": path, "content": base64.b64encode(data).decode()}))
        self._commit(self.repos[repo_id], revision, ops, "put_files")

    # ---- model
    @staticmethod
    def _is_lfs(path: str, size: int, sample: bytes) -> bool:
        return (
            size >= LFS_SIZE
            or b"\0" in sample
            or any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)
        )

    def _commit(self, repo: dict, branch: str, ops: list, message: str) -> str:
        parent = repo["branches"][branch]
        files = dict(repo["commits"][parent]["files"])
        for key, value in ops:
            if key == "file":
                content = base64.b64decode(value["content"])
                files[value["path"]] = {"content": content, "lfs": None, "size": len(content)}
            elif key == "lfsFile":
                files[value["path"]] = {"content": None, "lfs": value["oid"], "size": value["size"]}
            elif key == "deletedFile":
                files.pop(value["path"], None)
        oid = hashlib.sha1(json.dumps([parent, message, sorted(files), len(repo["commits"])]).encode()).hexdigest()
        repo["commits"][oid] = {"files": files, "parent": parent, "message": message}
        repo["branches"][branch] = oid
        return oid

    def _entry(self, path: str, f: dict) -> dict:
        if f["lfs"] is None:
            return {"type": "file", "path": path, "size": f["size"], "oid": git_blob_id(f["content"])}
        pointer = lfs_pointer(f["lfs"], f["size"])
        return {
            "type": "file",
            "path": path,
            "size": f["size"],
            "oid": git_blob_id(pointer),
            "lfs": {"oid": f["lfs"], "size": f["size"], "pointerSize": len(pointer)},
        }


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, payload: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.payload = payload if payload is not None else {"error": message}


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

        def do_PUT(self):
            self._serve("PUT")

        def do_HEAD(self):
            self._serve("HEAD")

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while (size := int(self.rfile.readline().strip(), 16)) > 0:
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reply(self, status: int, payload, headers: dict | None = None) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _serve(self, method: str) -> None:
            url = urlsplit(self.path)
            body = self._body()
            with hub.lock:
                hub.requests.append((method, url.path))
                for fault in hub.faults:
                    if fault["times"] > 0 and fault["method"] == method and fault["path"].search(url.path):
                        fault["times"] -= 1
                        headers = {"X-Error-Message": fault["message"], **fault["headers"]}
                        return self._reply(fault["status"], {"error": fault["message"]}, headers)
                try:
                    m = re.match(rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", url.path)
                    if m and method in ("GET", "HEAD"):
                        return self.resolve(method, unquote(m["repo"]), unquote(m["rev"]), unquote(m["path"]))
                    for route_method, pattern, fn in ROUTES:
                        m = re.match(pattern, url.path)
                        if m and route_method == method:
                            args = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                            return self._reply(200, fn(self, body=body, query=parse_qs(url.query), **args))
                    raise HubError(404, f"no route for {method} {url.path}")
                except HubError as e:
                    headers = {"X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {})}
                    self._reply(e.status, e.payload, headers)

        # ---- auth and lookup
        def user(self, required: bool = True) -> str | None:
            auth = self.headers.get("Authorization", "")
            token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
            if token is None:
                if required:
                    raise HubError(401, "Authorization header is required")
                return None
            if token not in hub.users:
                raise HubError(401, "Invalid credentials in Authorization header")
            return hub.users[token]

        def repo(self, repo_id: str, *, write: bool = False) -> dict:
            user = self.user(required=write)
            repo = hub.repos.get(repo_id)
            if repo is None or (repo["private"] and repo["owner"] != user):
                raise HubError(404, "Repository not found", "RepoNotFound")
            if write and repo["owner"] != user:
                raise HubError(403, f"You don't have the rights to write to {repo_id}")
            return repo

        def branch(self, repo: dict, revision: str) -> str:
            if revision not in repo["branches"]:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return revision

        # ---- downloads: what hf_hub_download and a header range read ask for
        def resolve(self, method: str, repo_id: str, rev: str, path: str) -> None:
            r = self.repo(repo_id)
            if r.get("gated") and self.user(required=False) not in r.get("granted", ()):
                raise HubError(403, f"Access to model {repo_id} is restricted", "GatedRepo")
            oid = r["branches"].get(rev) or (rev if rev in r["commits"] else None)
            if oid is None:
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            f = r["commits"][oid]["files"].get(path)
            if f is None:
                raise HubError(404, f"{path} does not exist", "EntryNotFound")
            data = hub.lfs[f["lfs"]] if f["lfs"] else f["content"]
            etag = f["lfs"] or git_blob_id(data)
            headers = {"ETag": f'"{etag}"', "X-Repo-Commit": oid, "Accept-Ranges": "bytes"}
            status, body = 200, data
            ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if ranged:
                begin = int(ranged[1])
                end = min(int(ranged[2]) if ranged[2] else len(data) - 1, len(data) - 1)
                status, body = 206, data[begin : end + 1]
                headers["Content-Range"] = f"bytes {begin}-{end}/{len(data)}"
            hub.served.append((path, len(body)))
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if method == "GET":
                self.wfile.write(body)

        def whoami(self, body, query):
            user = self.user()
            token = self.headers["Authorization"][len("Bearer ") :]
            role = hub.roles.get(token, "write")
            return {"type": "user", "name": user, "orgs": [], "auth": {"accessToken": {"role": role}}}

        # ---- endpoints
        def create_repo(self, body, query):
            user, payload = self.user(), json.loads(body)
            namespace = payload.get("organization") or user
            repo_id = f"{namespace}/{payload['name']}"
            if repo_id in hub.repos:
                message = "You already created this model repo"
                raise HubError(409, message, payload={"error": message, "url": f"{hub.endpoint}/{repo_id}"})
            if namespace != user:
                raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace}")
            hub.add_repo(repo_id, owner=user, private=payload.get("visibility") == "private")
            return {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id}

        def repo_info(self, body, query, repo, rev="main"):
            r = self.repo(repo)
            if r.get("gated") and self.user(required=False) not in r.get("granted", ()):
                raise HubError(403, f"Access to model {repo} is restricted", "GatedRepo")
            oid = r["branches"][self.branch(r, rev)]
            files = r["commits"][oid]["files"]
            return {
                "id": repo,
                "sha": oid,
                "private": r["private"],
                "author": r["owner"],
                "siblings": [{"rfilename": p, "size": f["size"]} for p, f in sorted(files.items())],
            }

        def tree(self, body, query, repo, rev, path=""):
            r = self.repo(repo)
            oid = r["branches"].get(rev) or (rev if rev in r["commits"] else None)
            if oid is None:
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            files = r["commits"][oid]["files"]
            return [hub._entry(p, f) for p, f in sorted(files.items()) if p.startswith(path)]

        def refs(self, body, query, repo):
            r = self.repo(repo)
            return {
                "branches": [
                    {"name": b, "ref": f"refs/heads/{b}", "targetCommit": o} for b, o in r["branches"].items()
                ],
                "tags": [],
                "converts": [],
            }

        def create_branch(self, body, query, repo, rev):
            r = self.repo(repo, write=True)
            if rev in r["branches"]:
                raise HubError(409, f"Reference refs/heads/{rev} already exists")
            start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
            r["branches"][rev] = r["branches"][self.branch(r, start)]
            return {}

        def paths_info(self, body, query, repo, rev):
            r = self.repo(repo)
            files = r["commits"][r["branches"][self.branch(r, rev)]]["files"]
            paths = parse_qs(body.decode()).get("paths", [])
            return [hub._entry(p, files[p]) for p in paths if p in files]

        def preupload(self, body, query, repo, rev):
            r = self.repo(repo, write=True)
            files = r["commits"][r["branches"][self.branch(r, rev)]]["files"] if "create_pr" not in query else {}
            out = []
            for f in json.loads(body)["files"]:
                lfs = hub._is_lfs(f["path"], f["size"], base64.b64decode(f["sample"]))
                remote = files.get(f["path"])
                oid = None if remote is None else remote["lfs"] or git_blob_id(remote["content"])
                out.append(
                    {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
                )
            return {"files": out}

        def lfs_batch(self, body, query, repo):
            self.repo(repo, write=True)
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.lfs:  # no actions: the bytes are already stored
                    entry["actions"] = {
                        "upload": {"href": f"{hub.endpoint}/lfs/{obj['oid']}"},
                        "verify": {"href": f"{hub.endpoint}/lfs/{obj['oid']}/verify"},
                    }
                objects.append(entry)
            return {"transfer": "basic", "objects": objects}

        def lfs_put(self, body, query, oid):
            if hashlib.sha256(body).hexdigest() != oid:
                raise HubError(400, "uploaded bytes do not match the oid")
            hub.lfs[oid] = body
            return {}

        def lfs_verify(self, body, query, oid):
            want = json.loads(body)
            if oid not in hub.lfs or len(hub.lfs[oid]) != want["size"]:
                raise HubError(404, "object not found")
            return {}

        def commit(self, body, query, repo, rev):
            r = self.repo(repo, write=True)
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = lines[0]["value"]
            ops = [(line["key"], line["value"]) for line in lines[1:]]
            for key, value in ops:
                if key == "lfsFile" and value["oid"] not in hub.lfs:
                    raise HubError(400, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                if key == "file" and value["path"] == "README.md":
                    if errors := card_errors(base64.b64decode(value["content"]).decode()):
                        raise HubError(400, "; ".join(errors))
            branch = self.branch(r, rev)
            pr_url = None
            if query.get("create_pr") == ["1"]:
                number = sum(1 for b in r["branches"] if b.startswith("refs/pr/")) + 1
                pr_branch = f"refs/pr/{number}"
                r["branches"][pr_branch] = r["branches"][branch]
                branch, pr_url = pr_branch, f"{hub.endpoint}/{repo}/discussions/{number}"
            oid = hub._commit(r, branch, ops, header["summary"])
            return {"commitUrl": f"{hub.endpoint}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": pr_url}

        def validate_yaml(self, body, query):
            errors = card_errors(json.loads(body)["content"])
            if errors:
                raise HubError(400, "Invalid metadata", payload={"errors": [{"message": e} for e in errors]})
            return {"errors": [], "warnings": []}

    ROUTES = [
        ("POST", r"^/api/repos/create$", Handler.create_repo),
        ("GET", rf"^/api/models/{REPO}(?:/revision/(?P<rev>.+))?$", Handler.repo_info),
        ("GET", rf"^/api/models/{REPO}/refs$", Handler.refs),
        ("GET", rf"^/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$", Handler.tree),
        ("POST", rf"^/api/models/{REPO}/branch/(?P<rev>.+)$", Handler.create_branch),
        ("POST", rf"^/api/models/{REPO}/paths-info/(?P<rev>.+)$", Handler.paths_info),
        ("POST", rf"^/api/models/{REPO}/preupload/(?P<rev>.+)$", Handler.preupload),
        ("POST", rf"^/api/models/{REPO}/commit/(?P<rev>.+)$", Handler.commit),
        ("POST", rf"^/{REPO}\.git/info/lfs/objects/batch$", Handler.lfs_batch),
        ("PUT", r"^/lfs/(?P<oid>[0-9a-f]{64})$", Handler.lfs_put),
        ("POST", r"^/lfs/(?P<oid>[0-9a-f]{64})/verify$", Handler.lfs_verify),
        ("POST", r"^/api/validate-yaml$", Handler.validate_yaml),
        ("GET", r"^/api/whoami-v2$", Handler.whoami),
    ]
    return Handler
