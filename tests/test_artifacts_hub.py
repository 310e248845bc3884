"""`finetune push` against the suite's hub server on 127.0.0.1 (tests/hub_server.py), with the unmodified
huggingface_hub: adapters, merged and whole models go up by the LFS protocol with our card, come back
down and give the run's logits; the headline chain runs from a hub model and data set to a pushed
merged model; the token is never written."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.artifacts.card import read_front_matter
from finetune.artifacts.hub import refuse_base_weights
from finetune.cli import main
from finetune.errors import FinetuneError

from conftest import ADAPTER_EXPORT, REPO
from hub_repos import ALPACA_ID, MODEL_ID, client_env, serve_test_repos
from hub_server import TOKEN, HubServer


@pytest.fixture
def hub():
    server = serve_test_repos(HubServer())
    yield server
    server.close()


@pytest.fixture
def as_client(hub, monkeypatch):
    """This process as a client of `hub` holding the token (what the server accepts for writes)."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return hub


@pytest.fixture(scope="module")
def lora_run(tiny_run):
    return tiny_run("lora")


def finetune(*args: str, env: dict) -> subprocess.CompletedProcess:
    """`finetune ARGS` in a fresh process: HF_ENDPOINT is read before huggingface_hub is imported."""
    command = [sys.executable, "-m", "finetune", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)


def push_here(capsys, run: Path, *args: str) -> list[str]:
    """`finetune push` in this process (the hub is the `as_client` one); its output lines."""
    capsys.readouterr()
    code = main(["push", str(run), *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.splitlines()


def download(hub: HubServer, repo_id: str, files: list[str], revision: str, cache: Path) -> Path:
    from huggingface_hub import hf_hub_download

    paths = [
        hf_hub_download(repo_id, name, revision=revision, endpoint=hub.url, token=TOKEN, cache_dir=cache)
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


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Run by a fresh process: what was pushed, downloaded through HF_ENDPOINT, against the run folder's own model.
FRESH_DOWNLOAD = """
import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.eval.generate import load_trained
from finetune.run_folder import read_trained_recipe

run, adapter_repo, merged_repo, base = Path(sys.argv[1]), *sys.argv[2:5]
tokenizer = AutoTokenizer.from_pretrained(merged_repo)
ids = torch.tensor([tokenizer("Give three tips for staying healthy.").input_ids])
models = {
    "merged": AutoModelForCausalLM.from_pretrained(merged_repo, dtype=torch.float32),
    "adapter": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter_repo),
    "base": AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
}
trained = load_trained(run, read_trained_recipe(run), device="cpu")[0]
with torch.no_grad():
    reference = trained(input_ids=ids).logits
    diffs = {name: (model.eval()(input_ids=ids).logits - reference).abs().max().item()
             for name, model in models.items()}
print(json.dumps(diffs))
"""


def test_the_headline_chain_from_a_hub_model_and_data_set_to_pushed_models(hub, as_client, tmp_path, capsys):
    """run (hub model + hub data) -> merge -> push adapter -> push --merged -> a fresh process downloads both."""
    run = tmp_path / "run"
    sizes = ["train.max_steps=2", "train.micro_batch_size=4", "train.grad_accum=1", "data.max_seq_len=128"]
    sizes += ["data.max_rows=40", "output.report=false", "output.trackers=[]", f"output.dir={run}"]
    args = ["recipes/alpaca_lora.yaml", f"model.name_or_path={MODEL_ID}", f"data.path={ALPACA_ID}", *sizes]
    home = tmp_path / "hf-home"
    done = finetune("run", *args, env=client_env(hub, home, token=None))
    assert done.returncode == 0, done.stderr
    assert (run / "adapter" / "adapter_model.safetensors").is_file()

    assert main(["merge", str(run), "--dtype", "float32"]) == 0  # the bf16 base merged exactly, for the 1e-4 below
    merged = run / "merged"
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]  # as the hub base

    push_here(capsys, run, "--repo-id", "me/x")
    lines = push_here(capsys, run, "--repo-id", "me/x-merged", "--merged")
    assert sorted(hub.files("me/x")) == ADAPTER_EXPORT
    pushed = hub.files("me/x-merged")
    assert sorted(pushed) == sorted(
        [*shards, "model.safetensors.index.json", "config.json", "generation_config.json", "README.md"]
        + ["recipe.yaml", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "merge.json"]
    )
    assert hub.lfs_paths("me/x-merged") == {*shards, "tokenizer.model"}  # weights went by LFS, not inline
    assert {sha256(merged / shard) for shard in shards} <= set(hub.uploads)
    assert read_front_matter(pushed["README.md"].decode())["base_model"] == MODEL_ID
    assert lines[-1] == f"pushed: {hub.url}/me/x-merged/commit/{hub.head('me/x-merged')}"

    script = tmp_path / "fresh.py"
    script.write_text(FRESH_DOWNLOAD)
    fresh = subprocess.run(
        [sys.executable, str(script), str(run), "me/x", "me/x-merged", MODEL_ID],
        env=client_env(hub, tmp_path / "fresh-home") | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fresh.returncode == 0, fresh.stderr
    diffs = json.loads(fresh.stdout.splitlines()[-1])
    assert diffs["adapter"] == 0.0 and diffs["merged"] < 1e-4 < diffs["base"], diffs


def test_a_pushed_adapter_goes_up_by_lfs_and_gives_the_runs_logits(lora_run, hub, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.eval.generate import load_trained
    from finetune.run_folder import read_recipe

    home = tmp_path / "hf-home"
    args = ["--repo-id", "me/tiny-adapter", "--revision", "dev", "--private"]
    done = finetune("push", str(lora_run), *args, env=client_env(hub, home))
    assert done.returncode == 0, done.stderr
    commit = hub.head("me/tiny-adapter", "dev")
    assert done.stdout.splitlines()[0] == f"adapter of {lora_run} -> me/tiny-adapter (branch dev):"
    assert done.stdout.splitlines()[-1] == f"pushed: {hub.url}/me/tiny-adapter/commit/{commit}"
    repo = hub.repos[("model", "me/tiny-adapter")]
    assert repo.private and sorted(hub.files("me/tiny-adapter", "dev")) == ADAPTER_EXPORT
    assert not hub.files("me/tiny-adapter", "main")
    assert hub.lfs_paths("me/tiny-adapter", "dev") == {"adapter_model.safetensors"}
    assert hub.uploads == [sha256(lora_run / "adapter" / "adapter_model.safetensors")]
    assert [(method, path) for method, path, _ in hub.requests] == [
        ("POST", "/api/repos/create"),
        ("POST", "/api/models/me/tiny-adapter/branch/dev"),
        ("POST", "/api/validate-yaml"),  # once when the folder is read, once before the commit
        ("POST", "/api/validate-yaml"),
        ("POST", "/api/models/me/tiny-adapter/preupload/dev"),
        ("POST", "/me/tiny-adapter.git/info/lfs/objects/batch"),
        ("POST", "/me/tiny-adapter.git/info/lfs/objects/verify"),
        ("POST", "/api/models/me/tiny-adapter/commit/dev"),
    ]
    assert all(authorized for _, _, authorized in hub.requests)

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

    assert TOKEN not in done.stdout + done.stderr
    assert not files_holding(TOKEN, lora_run.parent, home, tmp_path / "cache")


def test_pushing_an_unchanged_folder_again_uploads_nothing(lora_run, as_client, tmp_path, capsys):
    push_here(capsys, lora_run, "--repo-id", "me/again")
    head, uploads, commits = hub_state(as_client, "me/again")
    assert uploads == 1 and commits == 2  # the repo's first commit, then the push

    lines = push_here(capsys, lora_run, "--repo-id", "me/again")
    assert hub_state(as_client, "me/again") == (head, uploads, commits)  # no object sent, no commit made
    assert lines[-1] == f"pushed: {as_client.url}/me/again/commit/{head}"

    changed = tmp_path / "run"
    shutil.copytree(lora_run, changed)
    summary = json.loads((changed / "summary.json").read_text())
    (changed / "summary.json").write_text(json.dumps(summary | {"eval_loss": 1.5}))  # the card changes, not weights
    push_here(capsys, changed, "--repo-id", "me/again")
    new_head, new_uploads, new_commits = hub_state(as_client, "me/again")
    assert (new_uploads, new_commits) == (uploads, commits + 1) and new_head != head
    assert "| eval loss | 1.5 |" in as_client.files("me/again")["README.md"].decode()


def hub_state(hub: HubServer, repo_id: str) -> tuple[str, int, int]:
    """(head commit of main, LFS objects uploaded so far, commits in the repo)."""
    return hub.head(repo_id), len(hub.uploads), len(hub.repos[("model", repo_id)].commits)


def test_a_full_fine_tuning_run_pushes_its_whole_model(tiny_run, as_client, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run = tiny_run("full", adapter={"kind": "none"})
    lines = push_here(capsys, run, "--repo-id", "me/tiny-full")
    assert lines[0] == f"whole model (full fine-tuning) of {run} -> me/tiny-full (branch main):"
    files = sorted(as_client.files("me/tiny-full"))
    assert "model.safetensors" in files and "adapter_config.json" not in files
    assert "model.safetensors" in as_client.lfs_paths("me/tiny-full")
    snapshot = download(as_client, "me/tiny-full", files, "main", tmp_path / "cache")
    assert read_front_matter((snapshot / "README.md").read_text())["library_name"] == "transformers"
    ids = [1, 5, 9, 13, 17]
    pushed = AutoModelForCausalLM.from_pretrained(snapshot)
    assert torch.equal(logits(pushed, ids), logits(AutoModelForCausalLM.from_pretrained(run / "model"), ids))


def test_a_gguf_file_goes_up_only_with_gguf_and_its_card_says_how_to_run_it(lora_run, as_client, tmp_path, capsys):
    from finetune.artifacts.gguf import export_gguf

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    gguf = export_gguf(run, echo=lambda _: None)
    lines = push_here(capsys, run, "--repo-id", "me/tiny-adapter")
    assert sorted(as_client.files("me/tiny-adapter")) == ADAPTER_EXPORT
    assert lines[-2] == (
        f"not uploaded: {gguf.name}: a GGUF file is a whole model, pushed on its own with "
        f"`finetune push {run} --repo-id NAME --gguf`"
    )

    lines = push_here(capsys, run, "--repo-id", "me/tiny-gguf", "--gguf")
    assert lines[0] == f"GGUF model of {run} -> me/tiny-gguf (branch main):"
    files = as_client.files("me/tiny-gguf")
    assert sorted(files) == ["README.md", gguf.name, "recipe.yaml"]
    assert files[gguf.name] == gguf.read_bytes() and as_client.lfs_paths("me/tiny-gguf") == {gguf.name}
    card = files["README.md"].decode()
    assert read_front_matter(card) == {"library_name": "gguf", "tags": ["finetune", "lora", "alpaca", "gguf"]}
    assert f"llama-cli --hf-repo THIS_REPO --hf-file {gguf.name} -n 256 -e -p " in card
    assert "### Instruction:\\nGive three tips for staying healthy." in card  # the template it trained with


def test_a_gguf_push_without_a_gguf_file_says_how_to_make_one(lora_run, capsys):
    assert main(["push", str(lora_run), "--repo-id", "me/x", "--gguf", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {lora_run}: has no GGUF file (model-TYPE.gguf); run `finetune export {lora_run} --format gguf` first"
    )


def test_a_dry_run_lists_the_files_and_sends_nothing(lora_run, hub, tmp_path):
    from finetune.artifacts.export import export_adapter

    env = client_env(hub, tmp_path / "hf-home", token=None)
    done = finetune("push", str(lora_run), "--repo-id", "me/tiny-adapter", "--dry-run", env=env)
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
    env = client_env(hub, tmp_path / "hf-home", token=None)
    done = finetune("push", str(lora_run), "--repo-id", "me/tiny-adapter", env=env)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: no Hugging Face token: set HF_TOKEN to a write token, or log in once with `hf auth login` "
        "(--dry-run needs none)"
    )
    assert hub.requests == []


def test_base_weights_never_go_up_with_an_adapter(lora_run, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    (run / "adapter" / "model.safetensors").write_bytes(b"base weights")
    (run / "adapter" / "pytorch_model.bin").write_bytes(b"pickled weights")
    lines = push_here(capsys, run, "--repo-id", "me/tiny-adapter", "--dry-run")
    assert [line.split()[0] for line in lines[1:-2]] == ADAPTER_EXPORT

    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "model-00001-of-00002.safetensors").write_bytes(b"x")
    with pytest.raises(FinetuneError, match=r"^refusing to upload model weights with an adapter: model-00001"):
        refuse_base_weights(staged)
    (staged / "model-00001-of-00002.safetensors").unlink()
    (staged / "model-f16.gguf").write_bytes(b"GGUF")
    with pytest.raises(FinetuneError, match=r"^refusing to upload model weights with an adapter: model-f16.gguf"):
        refuse_base_weights(staged)


def test_a_merged_push_needs_finetune_merge_first(lora_run, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    assert main(["push", str(run), "--repo-id", "me/tiny-merged", "--merged", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {run}: has no merged model (merged/config.json); run `finetune merge {run}` first"
    )
