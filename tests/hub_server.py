"""A local stand-in for the Hugging Face Hub, speaking enough of its HTTP protocol for `huggingface_hub` clients.

Model and dataset repos (`namespace/name` ids) live in memory. Pushing goes through the same calls as on the Hub
(create repo, preupload, the git LFS batch API with a basic PUT transfer, NDJSON commits) and so does downloading
(repo info, tree listings, `resolve` with the headers `hf_hub_download` relies on). Xet storage is not offered:
clients must run with `HF_HUB_DISABLE_XET=1`, which `hub_env` sets along with the endpoint.

huggingface_hub reads its settings when imported, so clients are best run in subprocesses:

    subprocess.run([sys.executable, "client.py"], env=hub_env(local_hub), check=True)

Test modules get the `local_hub` fixture with `pytest_plugins = ["hub_server"]`; as they also import this module,
pytest is told not to rewrite it (PYTEST_DONT_REWRITE), which would only warn: it holds no assertions.
"""

import base64
import hashlib
import json
import os
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatch
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

# The Hub stores files in LFS when they are large or when .gitattributes tracks their type (as a new repo's does).
LFS_THRESHOLD = 10 * 1000 * 1000
LFS_PATTERNS = ("*.bin", "*.ckpt", "*.h5", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.pt", "*.pth", "*.safetensors")
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS).encode()
REPO_KINDS = {"models": "model", "datasets": "dataset"}  # URL segment -> repo type
URL_PREFIXES = {"model": "", "dataset": "datasets/"}  # repo type -> prefix of its web, resolve and git URLs
DUMMY_TOKEN = "hf_local_hub_dummy_token"


def hub_env(endpoint: str, hf_home: str | os.PathLike | None = None) -> dict[str, str]:
    """`os.environ` for a client process of the hub at `endpoint`: online, no Xet, no telemetry, a dummy token.

    Offline switches (HF_HUB_OFFLINE, and the TRANSFORMERS_ / HF_DATASETS_ ones) are turned off; progress bars too.

    `hf_home` (HF_HOME) keeps the client's caches (hub downloads, transformers modules) out of the user's home.
    """
    library_offline_switches = ("TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    env = {key: value for key, value in os.environ.items() if key not in library_offline_switches}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_XET="1",
        HF_TOKEN=DUMMY_TOKEN,
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    if hf_home is not None:
        env["HF_HOME"] = str(hf_home)
    return env


def git_oid(content: bytes) -> str:
    """The git blob id of `content`: the ETag of a regular file on the Hub."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def upload_mode(path: str, size: int) -> str:
    """The upload mode: "lfs" for large files and for the types that LFS_PATTERNS track, "regular" for the rest."""
    tracked = any(fnmatch(PurePosixPath(path).name, pattern) for pattern in LFS_PATTERNS)
    return "lfs" if tracked or size >= LFS_THRESHOLD else "regular"


def now() -> str:
    """The current time in the Hub's date format."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Blob:
    """The content of a file in a commit, stored in git or, through a pointer file, in LFS."""

    content: bytes
    lfs: bool

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @cached_property
    def pointer(self) -> bytes:
        """The LFS pointer file that git holds in place of an LFS file."""
        return b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n" % (
            self.sha256.encode(),
            len(self.content),
        )

    @cached_property
    def oid(self) -> str:
        """The git blob id (of the pointer file, for LFS files)."""
        return git_oid(self.pointer if self.lfs else self.content)

    @property
    def etag(self) -> str:
        """The id that clients compare and cache files by: sha256 for LFS files, the git blob id otherwise."""
        return self.sha256 if self.lfs else self.oid

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "oid": self.oid, "size": len(self.content), "path": path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.content), "pointerSize": len(self.pointer)}
        return entry

    def sibling(self, path: str) -> dict:
        entry = {"rfilename": path, "size": len(self.content), "blobId": self.oid}
        if self.lfs:
            entry["lfs"] = {"sha256": self.sha256, "size": len(self.content), "pointerSize": len(self.pointer)}
        return entry


@dataclass
class Commit:
    oid: str
    date: str
    files: dict[str, Blob]

    def folders(self) -> set[str]:
        return {str(parent) for path in self.files for parent in PurePosixPath(path).parents if str(parent) != "."}

    def folder_entry(self, path: str) -> dict:
        inside = sorted((name, blob.oid) for name, blob in self.files.items() if name.startswith(f"{path}/"))
        listing = "".join(f"{name} {oid}\n" for name, oid in inside)
        return {"type": "directory", "oid": git_oid(listing.encode()), "size": 0, "path": path}

    def entry(self, path: str) -> dict | None:
        """The tree entry of a file or folder, None if there is none at `path`."""
        if path in self.files:
            return self.files[path].tree_entry(path)
        return self.folder_entry(path) if path in self.folders() else None


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    created_at: str = field(default_factory=now)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content, uploaded for this repo

    def __post_init__(self) -> None:
        self.add_commit("main", {".gitattributes": Blob(GITATTRIBUTES, lfs=False)})

    def add_commit(self, branch: str, files: dict[str, Blob]) -> Commit:
        """Make `files` the new head of `branch`, under a fresh commit id."""
        commit = Commit(oid=secrets.token_hex(20), date=now(), files=files)
        self.commits[commit.oid] = commit
        self.branches[branch] = commit.oid
        return commit

    def revision(self, revision: str) -> Commit:
        """The commit a branch name or commit id points to."""
        oid = self.branches.get(revision, revision)
        if oid not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]

    def branch_head(self, branch: str) -> Commit:
        """The latest commit of a branch, the only kind of revision that commits go to."""
        if branch not in self.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        return self.commits[self.branches[branch]]

    def info(self, commit: Commit) -> dict:
        """What GET /api/{models,datasets}/{id}[/revision/{rev}] answers."""
        return {
            "id": self.repo_id,
            "author": self.repo_id.split("/")[0],
            "sha": commit.oid,
            "createdAt": self.created_at,
            "lastModified": commit.date,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [blob.sibling(path) for path, blob in sorted(commit.files.items())],
        }


class HubError(Exception):
    """An error answer: HTTP status, message, and the X-Error-Code that huggingface_hub maps to its exceptions."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class LocalHub(ThreadingHTTPServer):
    """An HTTP server holding the repos; `endpoint` is what clients take as HF_ENDPOINT."""

    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), HubRequestHandler)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.Lock()  # held while changing repos

    @property
    def endpoint(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


API = r"/api/(?P<kind>models|datasets)/(?P<repo_id>[^/]+/[^/]+)"
GIT = r"/(?:(?P<kind>datasets)/)?(?P<repo_id>[^/]+/[^/]+)"
ROUTES = [  # (method, path pattern, handler name); HEAD requests take the GET routes
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", API + r"(?:/revision/(?P<revision>[^/]+))?", "repo_info"),
    ("GET", API + r"/tree/(?P<revision>[^/]+)(?:/(?P<path>.+))?", "list_tree"),
    ("POST", API + r"/paths-info/(?P<revision>[^/]+)", "paths_info"),
    ("POST", API + r"/preupload/(?P<revision>[^/]+)", "preupload"),
    ("POST", API + r"/commit/(?P<revision>[^/]+)", "commit"),
    ("POST", GIT + r"\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", GIT + r"\.git/info/lfs/objects/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
    ("POST", GIT + r"\.git/info/lfs/objects/verify", "lfs_verify"),
    ("GET", GIT + r"/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve"),
]
COMPILED_ROUTES = [(method, re.compile(pattern), name) for method, pattern, name in ROUTES]


class HubRequestHandler(BaseHTTPRequestHandler):
    """Routes each request to the method named in ROUTES, called with the unquoted path groups as arguments.

    Path groups `kind` and `repo_id` are replaced by `repo`, the Repo they name.
    """

    server: LocalHub
    query: dict[str, list[str]]  # of the request being handled
    body: bytes

    def do_GET(self) -> None:
        self.dispatch()

    def do_HEAD(self) -> None:
        self.dispatch()

    def do_POST(self) -> None:
        self.dispatch()

    def do_PUT(self) -> None:
        self.dispatch()

    def log_message(self, format: str, *args) -> None:
        """Stay quiet: tests read their clients' output, not the server's."""

    def dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        method = "GET" if self.command == "HEAD" else self.command
        try:
            for route_method, pattern, name in COMPILED_ROUTES:
                match = pattern.fullmatch(url.path)
                if match and route_method == method:
                    arguments = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    if "repo_id" in arguments:
                        arguments["repo"] = self.find_repo(arguments.pop("kind", "models"), arguments.pop("repo_id"))
                    getattr(self, name)(**arguments)
                    return
            raise HubError(404, f"No route for {self.command} {url.path} on this local hub")
        except HubError as error:
            headers = dict(error.headers)
            if error.code:
                headers["X-Error-Code"] = error.code
            headers["X-Error-Message"] = error.message
            self.send_json({"error": error.message}, error.status, headers)
        except (KeyError, TypeError, ValueError) as error:  # a 400, not a dropped connection that clients retry
            self.send_json({"error": f"Malformed request: {error!r}"}, 400)

    def find_repo(self, kind: str, repo_id: str) -> Repo:
        repo = self.server.repos.get((REPO_KINDS[kind], repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def send_bytes(self, content: bytes, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": "application/octet-stream", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    def send_json(self, payload: object, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(json.dumps(payload).encode(), status, {"Content-Type": "application/json", **(headers or {})})

    def repo_url(self, repo: Repo) -> str:
        return f"{self.server.endpoint}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    # Repos

    def create_repo(self) -> None:
        payload = json.loads(self.body)
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"This local hub holds model and dataset repos, not {repo_type} repos")
        if not payload.get("organization"):
            raise HubError(400, "This local hub has no user namespace: create repos as `namespace/name`")
        repo = Repo(repo_type, f"{payload['organization']}/{payload['name']}")
        with self.server.lock:
            exists = (repo_type, repo.repo_id) in self.server.repos
            self.server.repos.setdefault((repo_type, repo.repo_id), repo)
        if exists:  # with exist_ok=True, the client reads the url of this answer
            error = f"You already created this {repo_type} repo"
            self.send_json({"error": error, "url": self.repo_url(repo)}, 409, {"X-Error-Message": error})
        else:
            self.send_json({"url": self.repo_url(repo), "name": repo.repo_id, "id": repo.repo_id})

    def validate_yaml(self) -> None:
        """README.md metadata is accepted as it is."""
        self.send_json({"errors": [], "warnings": []})

    def repo_info(self, repo: Repo, revision: str = "main") -> None:
        self.send_json(repo.info(repo.revision(revision)))

    def list_tree(self, repo: Repo, revision: str, path: str = "") -> None:
        """The files and folders in folder `path`, or under it at any depth with ?recursive=true."""
        commit = repo.revision(revision)
        folders = commit.folders()
        if path and path not in folders:
            raise HubError(404, f"{path} is not a folder at {revision}", "EntryNotFound")
        recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{path}/" if path else ""
        below = [name for name in sorted(folders | set(commit.files)) if name.startswith(prefix)]
        if not recursive:
            below = [name for name in below if "/" not in name.removeprefix(prefix)]
        self.send_json([commit.entry(name) for name in below])

    def paths_info(self, repo: Repo, revision: str) -> None:
        """Tree entries of the form-posted `paths` that exist at `revision`."""
        commit = repo.revision(revision)
        paths = parse_qs(self.body.decode()).get("paths", [])
        self.send_json([entry for path in paths if (entry := commit.entry(path)) is not None])

    # Pushing: preupload, LFS transfers, commit

    def preupload(self, repo: Repo, revision: str) -> None:
        """Tell the client, per file, whether it goes in the commit payload ("regular") or through LFS."""
        commit = repo.branch_head(revision)
        answers = []
        for file in json.loads(self.body)["files"]:
            path, mode = file["path"], upload_mode(file["path"], file["size"])
            answer = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            if path in commit.files:  # lets the client skip unchanged files
                answer["oid"] = commit.files[path].etag
            answers.append(answer)
        self.send_json({"files": answers, "commitOid": commit.oid})

    def lfs_batch(self, repo: Repo) -> None:
        """Upload instructions: a PUT to this server for each object the repo does not have yet."""
        payload = json.loads(self.body)
        if payload.get("operation") != "upload":
            raise HubError(400, "This local hub's LFS batch API only handles uploads")
        objects = []
        for item in payload["objects"]:
            answer = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in repo.lfs_objects:
                objects_url = f"{self.repo_url(repo)}.git/info/lfs/objects"
                answer["actions"] = {
                    "upload": {"href": f"{objects_url}/{item['oid']}"},
                    "verify": {"href": f"{objects_url}/verify"},
                }
            objects.append(answer)
        headers = {"Content-Type": "application/vnd.git-lfs+json"}
        self.send_bytes(json.dumps({"transfer": "basic", "objects": objects}).encode(), headers=headers)

    def lfs_upload(self, repo: Repo, oid: str) -> None:
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"The uploaded content does not hash to its oid {oid}")
        with self.server.lock:
            repo.lfs_objects[oid] = self.body
        self.send_bytes(b"")

    def lfs_verify(self, repo: Repo) -> None:
        payload = json.loads(self.body)
        content = repo.lfs_objects.get(payload["oid"])
        if content is None or len(content) != payload["size"]:
            raise HubError(404, f"LFS object {payload['oid']} of size {payload['size']} was not uploaded")
        self.send_json({"oid": payload["oid"], "size": payload["size"]})

    def commit(self, repo: Repo, revision: str) -> None:
        """Apply an NDJSON commit: a header line, then file / lfsFile / deletedFile / deletedFolder lines."""
        if "create_pr" in self.query:
            raise HubError(400, "This local hub has no pull requests")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "A commit starts with its header line")
        header, *operations = lines
        with self.server.lock:
            head = repo.branch_head(revision)
            parent = header["value"].get("parentCommit")
            if parent and not head.oid.startswith(parent):
                raise HubError(412, f"The branch {revision} is at {head.oid}, not at the parent commit {parent}")
            files = dict(head.files)
            for operation in operations:
                apply_operation(files, operation["key"], operation["value"], repo.lfs_objects)
            commit = repo.add_commit(revision, files)
        self.send_json({"commitUrl": f"{self.repo_url(repo)}/commit/{commit.oid}", "commitOid": commit.oid})

    # Downloading

    def resolve(self, repo: Repo, revision: str, path: str) -> None:
        """A file's content, with the metadata headers `hf_hub_download` reads from its HEAD request."""
        commit = repo.revision(revision)
        headers = {"X-Repo-Commit": commit.oid}
        blob = commit.files.get(path)
        if blob is None:  # the commit header lets clients cache that the file does not exist
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
        headers["ETag"] = f'"{blob.etag}"'
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.content))})
        self.send_bytes(blob.content, headers=headers)


def apply_operation(files: dict[str, Blob], key: str, value: dict, lfs_objects: dict[str, bytes]) -> None:
    """Apply one commit operation to the `files` of the commit being built."""
    path = value["path"]
    if key == "file":
        files[path] = Blob(base64.b64decode(value["content"]), lfs=False)
    elif key == "lfsFile":
        if value["oid"] not in lfs_objects:
            raise HubError(422, f"LFS object {value['oid']} for {path} was never uploaded")
        files[path] = Blob(lfs_objects[value["oid"]], lfs=True)
    elif key == "deletedFile":
        if files.pop(path, None) is None:
            raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
    elif key == "deletedFolder":
        inside = [name for name in files if name.startswith(path.rstrip("/") + "/")]
        if not inside:
            raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
        for name in inside:
            del files[name]
    else:
        raise HubError(400, f"Unknown commit operation {key!r}")


@pytest.fixture
def local_hub() -> Iterator[str]:
    """A fresh LocalHub serving on a free port of 127.0.0.1 for the test; yields its endpoint URL."""
    hub = LocalHub()
    thread = threading.Thread(target=hub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield hub.endpoint
    finally:
        hub.shutdown()
        hub.server_close()
        thread.join()
