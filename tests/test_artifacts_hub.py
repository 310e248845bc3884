"""`finetune push` against a hub server that runs in the test, on 127.0.0.1: the adapter goes up with our
card, comes back down with huggingface_hub and gives the run's logits; the token is never written."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch

from finetune.artifacts.card import read_front_matter
from finetune.artifacts.hub import refuse_base_weights
from finetune.errors import FinetuneError

from conftest import ADAPTER_EXPORT, REPO

FAKE_TOKEN = "hf_fakeTokenForTheLoopbackServer0123456789"
REPO_PATH = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit|branch)/(?P<rev>[^/]+)$")
RESOLVE_PATH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class FakeHub:
    """The few hub endpoints that create_repo, create_branch, upload_folder and hf_hub_download use.

    Files are committed inline (preupload answers "regular" for every file, so there is no LFS or Xet
    transfer); every request is recorded with whether it carried the token.
    """

    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.commits: dict[tuple[str, str], str] = {}
        self.requests: list[tuple[str, str, bool]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def reply(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None):
                data = body if body is not None else json.dumps(payload or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if body is None else "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def record(self) -> str:
                path = urlsplit(self.path).path
                authorized = self.headers.get("Authorization") == f"Bearer {FAKE_TOKEN}"
                hub.requests.append((self.command, path, authorized))
                return path

            def do_POST(self):
                path = self.record()
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Authorization") != f"Bearer {FAKE_TOKEN}":
                    return self.reply(401, {"error": "Invalid credentials"})
                if path == "/api/repos/create":
                    return self.create_repo(json.loads(body))
                if path == "/api/validate-yaml":
                    return self.reply(200, {"errors": [], "warnings": []})
                match = REPO_PATH.match(path)
                if not match or match["repo"] not in hub.repos:
                    return self.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                branches = hub.repos[match["repo"]]["branches"]
                revision = unquote(match["rev"])
                if match["op"] == "branch":
                    if revision in branches:
                        return self.reply(409, {"error": "Branch already exists"})
                    branches[revision] = dict(branches["main"])
                    return self.reply(200, {})
                if revision not in branches:
                    return self.reply(404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
                if match["op"] == "preupload":
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self.reply(200, {"files": modes})
                return self.commit(match["repo"], revision, body)

            def create_repo(self, payload: dict):
                repo_id = f"{payload['organization']}/{payload['name']}"
                if repo_id in hub.repos:
                    return self.reply(409, {"error": "You already created this model repo"})
                private = payload.get("visibility") == "private"
                hub.repos[repo_id] = {"private": private, "branches": {"main": {}}}
                return self.reply(200, {"url": f"{hub.url}/{repo_id}"})

            def commit(self, repo_id: str, revision: str, body: bytes):
                files = hub.repos[repo_id]["branches"][revision]
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        assert item["value"]["encoding"] == "base64"
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] != "header":
                        return self.reply(400, {"error": f"unsupported commit item {item['key']}"})
                oid = hashlib.sha1(json.dumps(sorted(files)).encode() + b"".join(files.values())).hexdigest()
                hub.commits[(repo_id, revision)] = oid
                url = f"{hub.url}/{repo_id}/commit/{oid}"
                return self.reply(200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None})

            def do_HEAD(self):
                self.resolve()

            def do_GET(self):
                self.resolve()

            def resolve(self):
                match = RESOLVE_PATH.match(self.record())
                repo = hub.repos.get(match["repo"]) if match else None
                revision = unquote(match["rev"]) if match else None
                files = repo["branches"].get(revision) if repo else None
                if files is None or unquote(match["file"]) not in files:
                    return self.reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                data = files[unquote(match["file"])]
                headers = {
                    "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                    "X-Repo-Commit": hub.commits[(match["repo"], revision)],
                }
                return self.reply(200, headers=headers, body=data)

        return Handler


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture(scope="module")
def lora_run(tiny_run):
    return tiny_run("lora")


def push(run: Path, hub: FakeHub, home: Path, *args: str, token: str | None = FAKE_TOKEN):
    """`finetune push` in a fresh process: HF_ENDPOINT is read before huggingface_hub is imported."""
    env = {
        k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "HUGGING")) and "PROXY" not in k.upper()
    }
    env |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1", "NO_PROXY": "127.0.0.1"}
    env |= {"HF_HUB_DISABLE_TELEMETRY": "1"} | ({"HF_TOKEN": token} if token else {})
    command = [sys.executable, "-m", "finetune", "push", str(run), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)


def download(hub: FakeHub, repo_id: str, files: list[str], revision: str, cache: Path) -> Path:
    from huggingface_hub import hf_hub_download

    paths = [
        hf_hub_download(repo_id, name, revision=revision, endpoint=hub.url, token=FAKE_TOKEN, cache_dir=cache)
        for name in files
    ]
    assert len({Path(path).parent for path in paths}) == 1
    return Path(paths[0]).parent


def files_holding(text: str, *folders: Path) -> list[Path]:
    return [
        path
        for folder in folders
        for path in folder.rglob("*")
        if path.is_file() and text.encode() in path.read_bytes()
    ]


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_a_pushed_adapter_downloads_and_gives_the_runs_logits(lora_run, hub, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.eval.generate import load_trained
    from finetune.run_folder import read_recipe

    home = tmp_path / "hf-home"
    done = push(lora_run, hub, home, "--repo-id", "me/tiny-adapter", "--revision", "dev", "--private")
    assert done.returncode == 0, done.stderr
    commit = hub.commits[("me/tiny-adapter", "dev")]
    assert done.stdout.splitlines()[0] == f"adapter of {lora_run} -> me/tiny-adapter (branch dev):"
    assert done.stdout.splitlines()[-1] == f"pushed: {hub.url}/me/tiny-adapter/commit/{commit}"
    repo = hub.repos["me/tiny-adapter"]
    assert repo["private"] and sorted(repo["branches"]["dev"]) == ADAPTER_EXPORT and not repo["branches"]["main"]
    assert hub.requests == [
        ("POST", "/api/repos/create", True),
        ("POST", "/api/models/me/tiny-adapter/branch/dev", True),
        ("POST", "/api/validate-yaml", True),  # once when the folder is read, once before the commit
        ("POST", "/api/validate-yaml", True),
        ("POST", "/api/models/me/tiny-adapter/preupload/dev", True),
        ("POST", "/api/models/me/tiny-adapter/commit/dev", True),
    ]

    snapshot = download(hub, "me/tiny-adapter", ADAPTER_EXPORT, "dev", tmp_path / "cache")
    card = (snapshot / "README.md").read_text()
    assert read_front_matter(card) == {"library_name": "peft", "tags": ["finetune", "lora", "alpaca"]}
    recipe = read_recipe(lora_run)
    config = json.loads((snapshot / "adapter_config.json").read_text())
    downloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), snapshot
    )
    trained, tokenizer = load_trained(lora_run, recipe, device="cpu")
    ids = tokenizer("Give three tips for staying healthy.").input_ids
    assert torch.equal(logits(downloaded.eval(), ids), logits(trained, ids))

    assert FAKE_TOKEN not in done.stdout + done.stderr
    assert not files_holding(FAKE_TOKEN, lora_run.parent, home, tmp_path / "cache")


def test_a_dry_run_lists_the_files_and_sends_nothing(lora_run, hub, tmp_path):
    from finetune.artifacts.export import export_adapter

    done = push(lora_run, hub, tmp_path / "hf-home", "--repo-id", "me/tiny-adapter", "--dry-run", token=None)
    assert done.returncode == 0, done.stderr
    assert hub.requests == []
    exported = export_adapter(lora_run, tmp_path / "export").path
    listed = [line.split()[0] for line in done.stdout.splitlines()[1:-2]]
    assert listed == ADAPTER_EXPORT
    assert f"{len(ADAPTER_EXPORT)} files" in done.stdout.splitlines()[-2]
    for line in done.stdout.splitlines()[1:-2]:
        name, size, unit = line.split()
        expected = (exported / name).stat().st_size
        assert size == (str(expected) if unit == "B" else f"{expected / 1e3:.1f}"), line
    assert done.stdout.splitlines()[-1] == "dry run: nothing uploaded"


def test_a_push_without_a_token_says_how_to_log_in(lora_run, hub, tmp_path):
    done = push(lora_run, hub, tmp_path / "hf-home", "--repo-id", "me/tiny-adapter", token=None)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: no Hugging Face token: set HF_TOKEN to a write token, or log in once with `hf auth login` "
        "(--dry-run needs none)"
    )
    assert hub.requests == []


def test_base_weights_never_go_up_with_an_adapter(lora_run, hub, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    (run / "adapter" / "model.safetensors").write_bytes(b"base weights")
    (run / "adapter" / "pytorch_model.bin").write_bytes(b"pickled weights")
    done = push(run, hub, tmp_path / "hf-home", "--repo-id", "me/tiny-adapter", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()[1:-2]] == ADAPTER_EXPORT

    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "model-00001-of-00002.safetensors").write_bytes(b"x")
    with pytest.raises(FinetuneError, match=r"^refusing to upload model weights with an adapter: model-00001"):
        refuse_base_weights(staged)


def test_a_merged_push_uploads_the_merged_folder_with_a_transformers_card(lora_run, hub, tmp_path):
    from transformers import AutoModelForCausalLM

    from finetune.eval.generate import load_trained
    from finetune.run_folder import read_recipe

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    done = push(run, hub, tmp_path / "hf-home", "--repo-id", "me/tiny-merged", "--merged")
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"error: {run}: has no merged model (merged/config.json); run `finetune merge {run}` first"
    )

    model, tokenizer = load_trained(run, read_recipe(run), device="cpu")
    model.merge_and_unload().save_pretrained(run / "merged")
    tokenizer.save_pretrained(run / "merged")
    done = push(run, hub, tmp_path / "hf-home", "--repo-id", "me/tiny-merged", "--merged")
    assert done.returncode == 0, done.stderr
    files = sorted(hub.repos["me/tiny-merged"]["branches"]["main"])
    assert files == sorted(
        ["README.md", "config.json", "generation_config.json", "model.safetensors", "recipe.yaml"]
        + ["tokenizer.json", "tokenizer_config.json"]
    )
    snapshot = download(hub, "me/tiny-merged", files, "main", tmp_path / "cache")
    assert read_front_matter((snapshot / "README.md").read_text())["library_name"] == "transformers"
    ids = tokenizer("Name a colour.").input_ids
    merged = AutoModelForCausalLM.from_pretrained(snapshot)
    assert torch.allclose(logits(merged, ids), logits(model, ids), atol=1e-5)
