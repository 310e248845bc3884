"""A model, tokenizer and data set read from a hub: the suite's server on 127.0.0.1 (tests/hub_server.py),
reached by the unmodified huggingface_hub, transformers and datasets through HF_ENDPOINT. Revisions
resolve to commits that the run folder records; the data cache follows the dataset's commit; --resume
refuses a run whose inputs moved; a second run works offline from the cache."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.errors import InputError

from conftest import REPO
from hub_repos import (
    ALPACA_ID,
    LIMA_ID,
    MODEL_ID,
    TOKENIZER_FILES,
    alpaca_files,
    client_env,
    model_files,
    sample_rows,
    serve_test_repos,
)
from hub_server import HubServer


@pytest.fixture(scope="module")
def hub():
    """The test repos, and a branch v2 of the model whose weights differ from main's."""
    server = serve_test_repos(HubServer())
    files = model_files()
    shard = "model-00001-of-00002.safetensors"
    server.commit(MODEL_ID, {shard: scaled(files[shard], 0.5)}, branch="v2", message="Halve the first shard")
    yield server
    server.close()


def scaled(shard: bytes, factor: float) -> bytes:
    from safetensors.torch import load, save

    return save({name: tensor * factor for name, tensor in load(shard).items()}, metadata={"format": "pt"})


def finetune(*args: str, env: dict) -> subprocess.CompletedProcess:
    """`finetune ARGS` in a fresh process, as a user runs it: huggingface_hub reads HF_ENDPOINT at import."""
    command = [sys.executable, "-m", "finetune", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)


def run_args(output: Path, *overrides: str) -> list[str]:
    sizes = ["train.max_steps=2", "train.micro_batch_size=4", "train.grad_accum=1", "train.save_steps=1"]
    sizes += ["data.max_seq_len=128", "data.max_rows=40", "output.report=false", "output.tensorboard=false"]
    model = f"model.name_or_path={MODEL_ID}"
    return ["run", "recipes/alpaca_lora.yaml", model, *overrides, *sizes, f"output.dir={output}"]


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """The HF_HOME of the processes of this module: the online runs fill it, the offline one reads it."""
    return tmp_path_factory.mktemp("hf-home")


@pytest.fixture(scope="module")
def pinned_run(hub, home, tmp_path_factory) -> Path:
    """A run on the model's branch v2 and the data set at a commit, with a checkpoint at each step."""
    run = tmp_path_factory.mktemp("pinned") / "run"
    data_commit = hub.head(ALPACA_ID, type="dataset")
    args = run_args(run, "model.revision=v2", f"data.path={ALPACA_ID}", f"data.revision={data_commit}")
    done = finetune(*args, env=client_env(hub, home, token=None))
    assert done.returncode == 0, done.stderr
    return run


def test_a_run_records_the_commits_its_revisions_resolved_to(pinned_run, hub):
    v2, main = hub.head(MODEL_ID, "v2"), hub.head(MODEL_ID, "main")
    assert v2 != main
    inputs = read_json(pinned_run / "environment.json")["hub_inputs"]
    assert inputs == {role: {"repo_id": MODEL_ID, "revision": "v2", "commit": v2} for role in ("model", "tokenizer")}
    data_commit = hub.head(ALPACA_ID, type="dataset")
    report = read_json(pinned_run / "data.json")
    assert report["hub_inputs"] == [{"repo_id": ALPACA_ID, "revision": data_commit, "commit": data_commit}]
    assert report["rows_read"] == 40 and report["source"] == ALPACA_ID
    adapter_config = read_json(pinned_run / "adapter" / "adapter_config.json")
    assert adapter_config["base_model_name_or_path"] == MODEL_ID  # the hub id, not this machine's cache folder


def test_a_second_run_works_offline_from_the_local_cache(pinned_run, hub, home, tmp_path):
    data_commit = hub.head(ALPACA_ID, type="dataset")
    args = run_args(tmp_path / "run", "model.revision=v2", f"data.path={ALPACA_ID}", f"data.revision={data_commit}")
    asked = len(hub.requests)
    done = finetune(*args, env=client_env(hub, home, token=None, offline=True))
    assert done.returncode == 0, done.stderr
    assert hub.requests[asked:] == []  # nothing reached the hub
    for name in ("environment.json", "data.json"):
        assert read_json(tmp_path / "run" / name)["hub_inputs"] == read_json(pinned_run / name)["hub_inputs"]
    offline, online = read_json(tmp_path / "run" / "data.json"), read_json(pinned_run / "data.json")
    assert offline["cache"] == "hit" and offline["fingerprint"] == online["fingerprint"]


def test_the_data_cache_follows_the_datasets_commit(hub, tokenizer, tmp_path, monkeypatch):
    from finetune.data.build import build_datasets
    from finetune.recipe.schema import DataSpec

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    first = hub.head(ALPACA_ID, type="dataset")
    spec = DataSpec(path=ALPACA_ID, max_seq_len=128)
    built = build_datasets(spec, tokenizer, seed=0).report
    assert (built.cache, built.hub_inputs[0]["commit"]) == ("miss", first)
    assert build_datasets(spec, tokenizer, seed=0).report.cache == "hit"

    hub.commit(ALPACA_ID, alpaca_files(sample_rows()[:60]), type="dataset", message="Keep 60 rows")
    moved = build_datasets(spec, tokenizer, seed=0).report
    assert moved.cache == "miss" and moved.rows_read == 60 and moved.hub_inputs[0]["commit"] != first
    pinned = build_datasets(spec.model_copy(update={"revision": first}), tokenizer, seed=0).report
    assert pinned.cache == "hit" and pinned.fingerprint == built.fingerprint and pinned.rows_read == 120


def test_preview_fetches_the_tokenizer_and_never_the_weights(hub, monkeypatch, capsys):
    from finetune.cli import main

    hub.add_repo("test-org/tiny-llama-copy")  # never fetched by another test of this session
    hub.commit("test-org/tiny-llama-copy", hub.files(MODEL_ID), message="Copy")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.chdir(REPO)
    asked = len(hub.requests)
    args = ["recipes/alpaca_lora.yaml", "model.name_or_path=test-org/tiny-llama-copy", f"data.path={ALPACA_ID}"]
    assert main(["preview", *args, "-n", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["input_ids"]
    fetched = [path.rsplit("/", 1)[-1] for method, path, _ in hub.requests[asked:] if "/resolve/" in path]
    assert "tokenizer.json" in fetched and not [name for name in fetched if name.endswith(".safetensors")]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the weights are not in the cache
    assert main(["run", *args, "train.max_steps=1", f"output.dir={REPO / 'never-written'}"]) == 2
    commit = hub.head("test-org/tiny-llama-copy")  # the tokenizer's, which the weights are fetched at
    assert capsys.readouterr().err.strip() == (
        f"error: model.name_or_path: test-org/tiny-llama-copy at commit {commit}: offline (HF_HUB_OFFLINE=1), and "
        "not in the local cache; run once online or give a local folder"
    )
    assert not (REPO / "never-written").exists()


def test_lima_conversations_are_read_from_json_lines_and_its_script_never_downloaded(hub, monkeypatch):
    from finetune.data.sources import read_rows

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    train = read_rows(LIMA_ID, split="train")
    assert len(train.rows) == 11 and len(train.rows[0]["conversations"]) == 4
    assert train.refs[0] == f"{LIMA_ID} [train]: row 1"
    assert train.hub == {"repo_id": LIMA_ID, "revision": None, "commit": hub.head(LIMA_ID, type="dataset")}
    assert len(read_rows(LIMA_ID, split="test").rows) == 1
    assert not [path for _, path, _ in hub.requests if path.endswith("lima.py")]

    tagged = hub.head(LIMA_ID, type="dataset")
    hub.repos[("dataset", LIMA_ID)].tags["v1.0"] = tagged
    shrunk = {"train.jsonl": b'{"conversations": ["Hi", "Hello"], "source": "test"}\n'}
    hub.commit(LIMA_ID, shrunk, type="dataset", message="Keep one conversation")
    assert len(read_rows(LIMA_ID, split="train").rows) == 1
    at_tag = read_rows(LIMA_ID, split="train", revision="v1.0")
    assert len(at_tag.rows) == 11 and at_tag.hub == {"repo_id": LIMA_ID, "revision": "v1.0", "commit": tagged}


def test_resume_refuses_a_run_whose_hub_inputs_moved(pinned_run, hub, tmp_path, monkeypatch, capsys):
    from finetune.cli import main
    from finetune.run_folder import RunDir, read_trained_recipe
    from finetune.train.resume import check_same_hub_inputs

    interrupted = tmp_path / "interrupted"
    shutil.copytree(pinned_run, interrupted)
    (interrupted / "summary.json").unlink()  # as a run killed after its last checkpoint leaves it
    stored = read_json(interrupted / "environment.json")["hub_inputs"]
    data = read_json(interrupted / "data.json")["hub_inputs"]
    check_same_hub_inputs(RunDir(interrupted), stored, data)  # unmoved: no objection

    before = hub.head(MODEL_ID, "v2")
    hub.commit(MODEL_ID, {"README.md": b"# moved on\n"}, branch="v2", message="Move v2")
    after = hub.head(MODEL_ID, "v2")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    capsys.readouterr()
    assert main(["run", str(interrupted), "--resume"]) == 2
    moved = [f"{role} {MODEL_ID} (v2) was at commit {before}, now {after}" for role in ("model", "tokenizer")]
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --resume: hub inputs moved since the interrupted run: {'; '.join(moved)}; a resumed run must train "
        "on what the interrupted one read (start a new run in another output.dir)"
    )
    assert "summary.json" not in {path.name for path in interrupted.iterdir()}
    assert read_trained_recipe(interrupted).model.revision == before  # merge, eval, generate: what it trained on
    with pytest.raises(InputError, match=r"^--resume: hub inputs moved since the interrupted run: dataset "):
        check_same_hub_inputs(RunDir(interrupted), stored, [dict(data[0], commit="0" * 40)])


def test_a_separate_tokenizer_repo_has_its_own_revision_and_is_reloaded_at_the_commit_trained_on(
    pinned_run, hub, tmp_path, monkeypatch
):
    """model.revision names a branch of the model repo; a tokenizer repo without that branch is read at
    model.tokenizer_revision, and merge, eval and generate reload both repos at the commits the run read."""
    import yaml

    from finetune.model.load import fetch_tokenizer
    from finetune.recipe.schema import ModelSpec
    from finetune.run_folder import read_trained_recipe

    tokenizer_id = "test-org/tiny-llama-tokenizer"
    hub.add_repo(tokenizer_id)
    hub.commit(tokenizer_id, {name: hub.files(MODEL_ID)[name] for name in TOKENIZER_FILES}, message="Tokenizer")
    trained_tokenizer = hub.head(tokenizer_id)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    spec = ModelSpec(name_or_path=MODEL_ID, tokenizer=tokenizer_id, revision="v2")
    with pytest.raises(InputError, match="no revision 'v2'"):  # model.revision alone cannot name both
        fetch_tokenizer(spec)
    spec = spec.model_copy(update={"tokenizer_revision": "main"})
    assert fetch_tokenizer(spec).commit == trained_tokenizer

    # the run folder of such a run: its recipe names the tokenizer repo, environment.json what was read
    run = tmp_path / "run"
    shutil.copytree(pinned_run, run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"] |= {"tokenizer": tokenizer_id, "tokenizer_revision": "main"}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    environment = read_json(run / "environment.json")
    environment["hub_inputs"]["tokenizer"] = {"repo_id": tokenizer_id, "revision": "main", "commit": trained_tokenizer}
    (run / "environment.json").write_text(json.dumps(environment))

    hub.commit(tokenizer_id, {"README.md": b"# moved on\n"}, message="Move main")
    hub.commit(MODEL_ID, {"README.md": b"# moved on\n"}, branch="v2", message="Move v2 again")
    pinned = read_trained_recipe(run).model
    assert pinned.revision == environment["hub_inputs"]["model"]["commit"] != hub.head(MODEL_ID, "v2")
    assert pinned.tokenizer_revision == trained_tokenizer != hub.head(tokenizer_id)
    assert fetch_tokenizer(pinned).commit == trained_tokenizer
