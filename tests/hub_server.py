"""A Hugging Face hub on 127.0.0.1 for the tests, answering what huggingface_hub 2.4, datasets 5.2 and
transformers 5.23 ask of the real one, with the real one's status codes and headers.

Model and dataset repos hold git-like commits (each a full file tree with a parent), branches and tags.
Files committed as LFS (preupload answers `lfs` for weights, parquet, GGUF and binary samples) are served
the hub's way: HEAD/GET on `resolve` answers 302 to a second server standing in for the CDN, with
X-Linked-Etag (the sha256) and X-Linked-Size; a regular file answers 200 with its git blob id as ETag.
Uploads follow the LFS protocol: batch (objects already stored get no actions) -> PUT to the storage
server -> verify -> an NDJSON commit naming `lfsFile`s. Private repos answer 401 RepoNotFound without the
token, gated ones 401 GatedRepo; a missing revision or file answers 404 with its X-Error-Code.

Not implemented: Xet storage (clients run with HF_HUB_DISABLE_XET=1), multipart LFS uploads, pull
requests, deletions of repos, tree pagination past one page, `expand=true` metadata, spaces, and
every endpoint the tests never reach (search, likes, discussions, inference).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

TOKEN = "hf_fakeTokenForTheLoopbackServer0123456789"
USER = "me"
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".parquet", ".pt", ".model", ".arrow")
LFS_MIN_SIZE = 10 * 2**20

API = re.compile(
    r"^/api/(?P<type>models|datasets)/(?P<repo>[^/]+/[^/]+)"
    r"(?:/(?P<op>revision|tree|paths-info|preupload|commit|branch|refs|tag)(?:/(?P<rev>[^/]+))?(?:/(?P<rest>.+))?)?$"
)
RESOLVE = re.compile(r"^/(?P<datasets>datasets/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
LFS_API = re.compile(r"^/(?P<datasets>datasets/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/(?P<op>batch|verify)$")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    lfs: set[str]  # paths stored as LFS objects
    parent: str | None
    message: str


@dataclass
class Repo:
    type: str  # "model" or "dataset"
    private: bool = False
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    objects: set[str] = field(default_factory=set)  # sha256 of the LFS objects stored for this repo

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision) or self.tags.get(revision) or revision
        return self.commits.get(oid)


class HubServer:
    """The hub (`url`) and its LFS storage (`storage_url`, another origin, as the real CDN is).

    `requests` records (method, path, authorized) of every call to the hub; `uploads` the sha256 of every
    object PUT to storage. LFS objects belong to a repo once verified, as on the hub: another repo holding
    the same bytes does not spare an upload. Tests seed repos with `add_repo` and `commit` and read them back directly.
    """

    def __init__(self):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.objects: dict[str, bytes] = {}  # LFS objects by sha256
        self.uploads: list[str] = []
        self.requests: list[tuple[str, str, bool]] = []
        self.lock = threading.Lock()
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), hub_handler(self))
        self.storage = ThreadingHTTPServer(("127.0.0.1", 0), storage_handler(self))
        self.url = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.storage_url = f"http://127.0.0.1:{self.storage.server_address[1]}"
        for server in (self.hub, self.storage):
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def close(self) -> None:
        for server in (self.hub, self.storage):
            server.shutdown()
            server.server_close()

    # --- seeding and reading, for the tests
    def add_repo(self, repo_id: str, *, type: str = "model", private: bool = False, gated: bool = False) -> Repo:
        repo = Repo(type, private=private, gated=gated)
        self.repos[(type, repo_id)] = repo
        self.commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, type=type)
        return repo

    def commit(
        self, repo_id: str, files: dict[str, bytes], *, type: str = "model", branch: str = "main", message: str = "c"
    ) -> str:
        """Commit `files` (added or replaced) on `branch`, made from main if new; LFS-worthy files are stored
        as LFS objects."""
        repo = self.repos[(type, repo_id)]
        if branch not in repo.branches and "main" in repo.branches:
            repo.branches[branch] = repo.branches["main"]
        lfs = {path for path, data in files.items() if is_lfs(path, data)}
        for path in lfs:
            sha = hashlib.sha256(files[path]).hexdigest()
            self.objects[sha] = files[path]
            repo.objects.add(sha)
        return self.apply(repo, branch, files, lfs, set(), message)

    def apply(self, repo: Repo, branch: str, added: dict[str, bytes], lfs: set[str], deleted: set[str], message: str):
        with self.lock:
            parent = repo.commits.get(repo.branches.get(branch, ""))
            files = {p: d for p, d in (parent.files if parent else {}).items() if p not in deleted} | added
            stored_lfs = ((parent.lfs if parent else set()) - set(added) - deleted) | lfs
            digest = hashlib.sha1(json.dumps([parent.oid if parent else None, message, len(repo.commits)]).encode())
            for path in sorted(files):
                digest.update(path.encode() + git_blob_id(files[path]).encode())
            oid = digest.hexdigest()
            repo.commits[oid] = Commit(oid, files, stored_lfs, parent.oid if parent else None, message)
            repo.branches[branch] = oid
            return oid

    def files(self, repo_id: str, revision: str = "main", *, type: str = "model") -> dict[str, bytes]:
        commit = self.repos[(type, repo_id)].resolve(revision)
        return {p: d for p, d in commit.files.items() if p != ".gitattributes"} if commit else {}

    def head(self, repo_id: str, revision: str = "main", *, type: str = "model") -> str:
        return self.repos[(type, repo_id)].resolve(revision).oid

    def lfs_paths(self, repo_id: str, revision: str = "main", *, type: str = "model") -> set[str]:
        return set(self.repos[(type, repo_id)].resolve(revision).lfs)


def is_lfs(path: str, data: bytes) -> bool:
    return path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE or b"\0" in data[:512]


def tree_entry(commit: Commit, path: str) -> dict:
    data = commit.files[path]
    entry = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
    if path in commit.lfs:
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


def folders_of(commit: Commit) -> set[str]:
    return {"/".join(p.split("/")[:i]) for p in commit.files for i in range(1, p.count("/") + 1)}


def hub_handler(hub: HubServer):
    class Handler(Reply):
        def do_HEAD(self):
            self.route()

        def do_GET(self):
            self.route()

        def do_POST(self):
            self.route()

        def route(self):
            parts = urlsplit(self.path)
            path, self.query = unquote(parts.path), parse_qs(parts.query)
            self.authorized = self.headers.get("Authorization") == f"Bearer {TOKEN}"
            hub.requests.append((self.command, path, self.authorized))
            length = int(self.headers.get("Content-Length") or 0)
            self.body = self.rfile.read(length) if length else b""
            if self.command == "POST" and path == "/api/repos/create":
                return self.create_repo(json.loads(self.body))
            if self.command == "POST" and path == "/api/validate-yaml":
                return self.json(200, {"errors": [], "warnings": []})
            if path == "/api/whoami-v2":
                return self.json(200, {"name": USER, "type": "user"}) if self.authorized else self.denied(401)
            for pattern, action in ((RESOLVE, self.resolve), (LFS_API, self.lfs), (API, self.api)):
                match = pattern.fullmatch(path)
                if match:
                    return action(match)
            return self.json(404, {"error": "Not found"})

        def denied(self, status: int):
            return self.json(status, {"error": "Invalid credentials in Authorization header"})

        def readable(self, repo_type: str, repo_id: str) -> Repo | None:
            """The repo, or None once a 401/404 has been answered as the hub answers it."""
            repo = hub.repos.get((repo_type, repo_id))
            if repo is None or (repo.private and not self.authorized):
                # the hub answers 401 without a token and 404 with one, for a missing and a private repo alike
                self.error(401 if not self.authorized else 404, "RepoNotFound", "Repository not found")
                return None
            if repo.gated and not self.authorized:
                message = f"Access to {repo_type} {repo_id} is restricted. You must be authenticated to access it."
                self.error(401, "GatedRepo", message)
                return None
            return repo

        def writable(self, repo_type: str, repo_id: str) -> Repo | None:
            if not self.authorized:
                self.denied(401)
                return None
            return self.readable(repo_type, repo_id)

        def commit_at(self, repo: Repo, revision: str) -> Commit | None:
            commit = repo.resolve(revision)
            if commit is None:
                self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return commit

        def resolve(self, match):
            repo_type = "dataset" if match["datasets"] else "model"
            repo = self.readable(repo_type, match["repo"])
            commit = repo and self.commit_at(repo, match["rev"])
            if commit is None:
                return
            name = match["file"]
            if name not in commit.files:
                return self.error(404, "EntryNotFound", f'{name} does not exist on "{match["rev"]}"')
            data = commit.files[name]
            headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{git_blob_id(data)}"'}
            if name in commit.lfs:
                sha = hashlib.sha256(data).hexdigest()
                headers |= {"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))}
                headers["Location"] = f"{hub.storage_url}/objects/{sha}?filename={quote(name)}"
                return self.send(302, b"", headers)
            return self.send(200, data, headers)

        def api(self, match):
            repo_type, repo_id, op = match["type"][:-1], match["repo"], match["op"]
            if op in ("preupload", "commit", "branch", "tag"):
                repo = self.writable(repo_type, repo_id)
            else:
                repo = self.readable(repo_type, repo_id)
            if repo is None:
                return
            if op == "refs":
                branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in repo.branches.items()]
                tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in repo.tags.items()]
                return self.json(200, {"branches": branches, "tags": tags, "converts": []})
            if op == "branch":
                return self.create_branch(repo, match["rev"])
            commit = self.commit_at(repo, match["rev"] or "main")
            if commit is None:
                return
            if op in (None, "revision"):
                return self.info(repo, repo_id, commit)
            if op == "tree":
                return self.tree(commit, match["rest"] or "")
            if op == "paths-info":
                paths = parse_qs(self.body.decode()).get("paths", [])
                found = [tree_entry(commit, p) for p in paths if p in commit.files]
                found += [{"type": "directory", "oid": "0" * 40, "path": p} for p in paths if p in folders_of(commit)]
                return self.json(200, found)
            if op == "tag":
                return self.create_tag(repo, commit, json.loads(self.body)["tag"])
            if op == "preupload":
                return self.preupload(commit, json.loads(self.body)["files"])
            if op == "commit":
                return self.create_commit(repo, repo_id, match["rev"])
            return self.json(404, {"error": "Not found"})

        def info(self, repo: Repo, repo_id: str, commit: Commit):
            siblings = [{"rfilename": p} for p in sorted(commit.files)]
            payload = {"id": repo_id, "sha": commit.oid, "private": repo.private, "gated": repo.gated and "auto"}
            return self.json(200, payload | {"siblings": siblings, "tags": [], "disabled": False})

        def tree(self, commit: Commit, under: str):
            prefix = f"{under.strip('/')}/" if under.strip("/") else ""
            if prefix and prefix[:-1] not in folders_of(commit):
                return self.error(404, "EntryNotFound", f"{under} does not exist")
            recursive = self.query.get("recursive", ["False"])[0].lower() == "true"
            inside = lambda p: p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])  # noqa: E731
            folders = [p for p in sorted(folders_of(commit)) if inside(p)]
            entries = [{"type": "directory", "oid": "0" * 40, "path": p} for p in folders]
            return self.json(200, entries + [tree_entry(commit, p) for p in sorted(commit.files) if inside(p)])

        def preupload(self, commit: Commit, files: list[dict]):
            modes = []
            for item in files:
                sample = base64.b64decode(item["sample"])
                lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] >= LFS_MIN_SIZE or b"\0" in sample
                remote = commit.files.get(item["path"])
                oid = None
                if remote is not None:
                    oid = hashlib.sha256(remote).hexdigest() if item["path"] in commit.lfs else git_blob_id(remote)
                mode = {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
                modes.append(mode | ({"oid": oid} if oid else {}))
            return self.json(200, {"files": modes, "commitOid": commit.oid})

        def create_commit(self, repo: Repo, repo_id: str, branch: str):
            if branch not in repo.branches:
                return self.error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
            added, lfs, deleted, summary = {}, set(), set(), ""
            for line in self.body.decode().splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    summary = value.get("summary", "")
                elif key == "file":
                    added[value["path"]] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    if value["oid"] not in repo.objects:
                        return self.json(422, {"error": f"LFS object {value['oid']} was never uploaded"})
                    added[value["path"]], lfs = hub.objects[value["oid"]], lfs | {value["path"]}
                elif key == "deletedFile":
                    deleted.add(value["path"])
                else:
                    return self.json(400, {"error": f"unsupported commit item {key}"})
            oid = hub.apply(repo, branch, added, lfs, deleted, summary)
            prefix = "" if repo.type == "model" else "datasets/"
            url = f"{hub.url}/{prefix}{repo_id}/commit/{oid}"
            return self.json(200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None})

        def create_branch(self, repo: Repo, branch: str):
            if branch in repo.branches:
                return self.json(409, {"error": "Reference already exists"})
            start = (json.loads(self.body or b"{}") or {}).get("startingPoint") or "main"
            commit = self.commit_at(repo, start)
            if commit is not None:
                repo.branches[branch] = commit.oid
                self.json(200, {})

        def create_tag(self, repo: Repo, commit: Commit, tag: str):
            if tag in repo.tags:
                return self.json(409, {"error": "Tag already exists"})
            repo.tags[tag] = commit.oid
            return self.json(200, {})

        def create_repo(self, payload: dict):
            if not self.authorized:
                return self.denied(401)
            repo_type = payload.get("type") or "model"
            repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
            if (repo_type, repo_id) in hub.repos:
                return self.json(409, {"error": f"You already created this {repo_type} repo", "url": repo_id})
            private = payload.get("visibility") == "private" or payload.get("private") is True
            hub.add_repo(repo_id, type=repo_type, private=private)
            return self.json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def lfs(self, match):
            repo_type = "dataset" if match["datasets"] else "model"
            repo = self.writable(repo_type, match["repo"])
            if repo is None:
                return
            payload = json.loads(self.body)
            if match["op"] == "verify":
                stored = hub.objects.get(payload["oid"])
                if stored is None or len(stored) != payload["size"]:
                    return self.json(404, {"error": f"object {payload['oid']} not found"})
                repo.objects.add(payload["oid"])
                return self.json(200, {"success": True})
            objects = []
            for item in payload["objects"]:
                entry = {"oid": item["oid"], "size": item["size"]}
                if item["oid"] not in repo.objects:  # an object the repo holds needs no upload
                    verify = f"{hub.url}/{match['datasets'] or ''}{match['repo']}.git/info/lfs/objects/verify"
                    entry["actions"] = {
                        "upload": {"href": f"{hub.storage_url}/upload/{item['oid']}"},
                        "verify": {"href": verify, "header": {}},
                    }
                objects.append(entry)
            answer = {"transfer": "basic", "objects": objects}
            return self.json(200, answer, content_type="application/vnd.git-lfs+json")

    return Handler


def storage_handler(hub: HubServer):
    class Handler(Reply):
        def do_GET(self):
            sha = urlsplit(self.path).path.removeprefix("/objects/")
            data = hub.objects.get(sha)
            if data is None:
                return self.json(404, {"error": "NoSuchKey"})
            return self.send(200, data, {"ETag": f'"{sha}"'})

        def do_HEAD(self):
            self.do_GET()

        def do_PUT(self):
            sha = urlsplit(self.path).path.removeprefix("/upload/")
            data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if hashlib.sha256(data).hexdigest() != sha:
                return self.json(400, {"error": "BadDigest"})
            hub.objects[sha] = data
            hub.uploads.append(sha)
            return self.send(200, b"", {"ETag": f'"{sha}"'})

    return Handler


class Reply(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def send(self, status: int, body: bytes, headers: dict | None = None, content_type="application/octet-stream"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def json(self, status: int, payload, content_type="application/json"):
        self.send(status, json.dumps(payload).encode(), content_type=content_type)

    def error(self, status: int, code: str, message: str):
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        self.send(status, json.dumps({"error": message}).encode(), headers, content_type="application/json")
