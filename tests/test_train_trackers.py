"""output.trackers: W&B and MLflow runs hold what metrics.jsonl holds, read back with each tracker's own reader,
offline, with the recipe as their config and the run folder linked both ways."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from finetune.cli import main
from finetune.recipe.load import load_recipe
from finetune.run_folder import RunDir, read_metrics
from finetune.train.trackers import tracking

from conftest import REPO

TRACKERS = ["tensorboard", "wandb", "mlflow"]


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No W&B login, no tracker settings of the user's, nothing to reach: W&B must choose offline mode itself.
    The W&B host is a closed local port, so an attempt to upload would fail at once instead of reaching out."""
    home = tmp_path_factory.mktemp("tracker-home")
    with pytest.MonkeyPatch.context() as env:
        for name in [name for name in os.environ if name.startswith(("WANDB_", "MLFLOW_"))]:
            env.delenv(name)
        env.setenv("NETRC", str(home / "no-netrc"))
        env.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            env.setenv(name, str(home / name.lower()))
        env.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        env.setenv("DO_NOT_TRACK", "true")
        yield env


@pytest.fixture(scope="module")
def tracked_run(offline, tmp_path_factory, tiny_model_dir):
    """A 3-step run (eval at step 2) logging to all three trackers, through the CLI."""
    import importlib.util

    import yaml

    from conftest import SAMPLE_DATA, require

    installed = all(importlib.util.find_spec(name) for name in ("wandb", "mlflow"))
    require(installed, "wandb and mlflow-skinny are not installed (pip install -e '.[test]')")

    folder = tmp_path_factory.mktemp("tracked")
    recipe = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"format": "alpaca", "path": str(SAMPLE_DATA), "max_seq_len": 256, "max_rows": 40},
        "train": {"max_steps": 3, "micro_batch_size": 4, "grad_accum": 1, "lr": 1e-2, "logging_steps": 1},
        "eval": {"samples": 0},
        "output": {"dir": str(folder / "run"), "report": False, "trackers": TRACKERS},
    }
    recipe["data"]["eval_fraction"] = 0.2
    recipe["train"] |= {"eval_steps": 2, "gradient_checkpointing": False}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    assert main(["run", str(path)]) == 0
    return folder / "run"


# --- readers: each tracker's own files, read with its own code ---------------------------------------------


def read_wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (run-ID.wandb): leveldb log blocks of wandb's protobuf Records,
    every checksum verified (wandb 0.31 writes the file from its Go core and ships no Python reader)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B transaction log"
    records, pending, position, block = [], b"", 7, 32768
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a record header is padding
            position += block - position % block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if (checksum, length, kind) == (0, 0, 0):
            break
        body = data[position + 7 : position + 7 + length]
        assert zlib.crc32(body, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad checksum at byte {position}"
        position += 7 + length
        pending += body
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_wandb_records(path: Path, wait_s: float = 30) -> list:
    """`read_wandb_records` once the log ends with the run's exit record: wandb's core process may still be
    writing it when `finish()` has returned."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            records = read_wandb_records(path)
        except AssertionError:  # a record half written
            records = []
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        time.sleep(0.1)
    return read_wandb_records(path)


def item_key(item) -> str:
    """W&B stores a key with a slash (train/loss) as its parts."""
    return item.key or "/".join(item.nested_key)


def wandb_history(records) -> list[dict]:
    return [
        {item_key(item): json.loads(item.value_json) for item in record.history.item}
        for record in records
        if record.WhichOneof("record_type") == "history"
    ]


def wandb_config(records) -> dict:
    config = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        config |= {item_key(item): json.loads(item.value_json) for item in updates}
    return config


def wandb_log_of(run: Path) -> Path:
    [log] = Path(json.loads((run / "trackers.json").read_text())["wandb"]["local"]).glob("run-*.wandb")
    return log


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 reads its file store only when told to
        client = MlflowClient(uri)
        client.search_experiments()  # the store is made (and kept by MLflow) while allowed
    return client


def train_losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run / "metrics.jsonl") if "loss" in m}


def assert_same_losses(expected: dict[int, float], found: dict[int, float], tracker: str) -> None:
    assert found == pytest.approx(expected, rel=1e-6) and sorted(found) == sorted(expected), (
        f"{tracker} holds train losses {found}, metrics.jsonl {expected}"
    )


# --- tests ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_each_tracker_holds_the_train_losses_of_metrics_jsonl(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    expected = train_losses(tracked_run)
    assert sorted(expected) == [1, 2, 3]
    trackers = json.loads((tracked_run / "trackers.json").read_text())

    history = wandb_history(finished_wandb_records(wandb_log_of(tracked_run)))
    assert_same_losses(expected, {r["train/global_step"]: r["train/loss"] for r in history if "train/loss" in r}, "W&B")
    assert [r["train/global_step"] for r in history if "eval/loss" in r] == [2, 3]

    client = mlflow_client(trackers["mlflow"]["tracking_uri"])
    mlflow_losses = {m.step: m.value for m in client.get_metric_history(trackers["mlflow"]["id"], "loss")}
    assert_same_losses(expected, mlflow_losses, "MLflow")
    assert client.get_run(trackers["mlflow"]["id"]).info.status == "FINISHED"

    events = EventAccumulator(str(tracked_run / "tensorboard"))
    events.Reload()
    assert_same_losses(expected, {e.step: e.value for e in events.Scalars("train/loss")}, "TensorBoard")


@pytest.mark.slow
def test_the_loss_comparison_fails_on_a_shifted_history_and_the_reader_on_a_damaged_log(tracked_run, tmp_path):
    expected = train_losses(tracked_run)
    with pytest.raises(AssertionError, match="W&B holds train losses"):
        assert_same_losses(expected, {step + 1: loss for step, loss in expected.items()}, "W&B")
    with pytest.raises(AssertionError, match="W&B holds train losses"):
        assert_same_losses(expected, {step: loss * 1.01 for step, loss in expected.items()}, "W&B")
    damaged = tmp_path / "run-damaged.wandb"
    data = bytearray(wandb_log_of(tracked_run).read_bytes())
    data[7 + 7] ^= 0xFF  # the first byte of the first record (after the file and record headers)
    damaged.write_bytes(bytes(data))
    with pytest.raises(AssertionError, match="bad checksum"):
        read_wandb_records(damaged)


@pytest.mark.slow
def test_the_tracker_runs_hold_the_recipe_and_the_run_folder_names_them(tracked_run):
    recipe = load_recipe(tracked_run / "recipe.yaml")
    folder = str(tracked_run.absolute())
    trackers = json.loads((tracked_run / "trackers.json").read_text())

    wandb = trackers["wandb"]
    assert wandb["mode"] == "offline" and wandb["url"] is None and wandb["project"] == "finetune"
    local = Path(wandb["local"])
    assert local.parent == tracked_run / "wandb" and local.name.startswith("offline-run-")
    records = finished_wandb_records(wandb_log_of(tracked_run))
    [run_record] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_record.run_id == wandb["id"] and run_record.display_name == tracked_run.name
    config = wandb_config(records)
    assert config["run_folder"] == folder
    assert config["train.lr"] == recipe.train.lr and config["adapter.r"] == recipe.adapter.r
    assert config["output.trackers"] == TRACKERS and config["data.path"] == recipe.data.path
    assert (local / "files" / "recipe.yaml").read_text() == (tracked_run / "recipe.yaml").read_text()

    mlflow = trackers["mlflow"]
    assert mlflow["tracking_uri"] == (tracked_run / "mlruns").absolute().as_uri() and mlflow["url"] is None
    client = mlflow_client(mlflow["tracking_uri"])
    run = client.get_run(mlflow["id"])
    assert run.info.run_name == tracked_run.name
    assert client.get_experiment(run.info.experiment_id).name == "finetune"
    assert run.data.tags["finetune.run_folder"] == folder
    assert run.data.params["train.lr"] == str(recipe.train.lr) and run.data.params["adapter.r"] == str(recipe.adapter.r)
    assert "recipe.yaml" in [artifact.path for artifact in client.list_artifacts(mlflow["id"])]
    # the run's MLflow settings went with it: the next run in this process does not log into this store
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_ALLOW_FILE_STORE" not in os.environ


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_tracker_runs(tracked_run, tmp_path):
    import shutil

    import mlflow

    copy = tmp_path / "run"
    shutil.copytree(tracked_run, copy)
    first = json.loads((copy / "trackers.json").read_text())
    # a moved run folder takes its MLflow store along: the copy continues the runs in its own
    recipe = load_recipe(copy / "recipe.yaml", [f"output.dir={copy}"])
    lines = []
    with tracking(recipe, RunDir(copy), resumed_from="checkpoint-2", echo=lines.append):
        mlflow.log_metrics({"loss": 0.5}, step=3)
    second = json.loads((copy / "trackers.json").read_text())

    assert second["wandb"]["id"] == first["wandb"]["id"] and second["mlflow"]["id"] == first["mlflow"]["id"]
    assert second["wandb"]["attempts"] == [first["wandb"]["local"], second["wandb"]["local"]]
    [log] = Path(second["wandb"]["local"]).glob(f"run-{first['wandb']['id']}.wandb")
    assert wandb_config(finished_wandb_records(log))["resumed_from"] == "checkpoint-2"
    assert second["mlflow"]["tracking_uri"] == (copy / "mlruns").absolute().as_uri()
    run = mlflow_client(second["mlflow"]["tracking_uri"]).get_run(first["mlflow"]["id"])
    assert run.data.tags["finetune.resumed_from"] == "checkpoint-2" and run.info.status == "FINISHED"
    assert not any("cannot be continued" in line for line in lines)


@pytest.mark.slow
def test_a_resumed_run_whose_mlflow_store_is_gone_says_that_it_starts_a_new_run(tracked_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(tracked_run, copy)
    shutil.rmtree(copy / "mlruns")
    first = json.loads((copy / "trackers.json").read_text())["mlflow"]["id"]
    recipe = load_recipe(copy / "recipe.yaml", [f"output.dir={copy}", "output.trackers=[mlflow]"])
    lines = []
    with tracking(recipe, RunDir(copy), resumed_from="checkpoint-2", echo=lines.append):
        pass
    trackers = json.loads((copy / "trackers.json").read_text())
    assert trackers["mlflow"]["id"] != first
    assert f"mlflow: run {first} of trackers.json cannot be continued here; a new run follows" in lines
    assert trackers["wandb"]["id"]  # dropped from output.trackers, still named


def test_every_tracker_of_the_schema_is_attached_by_transformers_or_by_the_trainer():
    from typing import get_args

    from finetune.recipe.schema import Tracker
    from finetune.train.trackers import tracker_integrations

    names = list(get_args(Tracker))
    # TensorBoard is build_trainer's own callback; every other name must be one report_to knows
    assert tracker_integrations(names) == [name for name in names if name != "tensorboard"]
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    assert set(tracker_integrations(names)) <= set(INTEGRATION_TO_CALLBACK)


def test_a_tracker_whose_package_is_missing_is_refused_before_anything_loads(write_recipe, tmp_path):
    blocker = tmp_path / "hide-wandb"
    blocker.mkdir()
    # an import hook, as if wandb were not installed (the library itself stays untouched); it still lets
    # transformers see a wandb spec, whose absence it does not expect to be an error
    (blocker / "sitecustomize.py").write_text(
        "import importlib.abc, importlib.util, sys\n"
        "class HideWandb(importlib.abc.MetaPathFinder, importlib.abc.Loader):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'wandb':\n"
        "            return importlib.util.spec_from_loader(name, self)\n"
        "    def exec_module(self, module):\n"
        "        raise ModuleNotFoundError(f'No module named {module.__name__!r}', name=module.__name__)\n"
        "sys.meta_path.insert(0, HideWandb())\n"
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("earlier run")
    path = write_recipe(output={"trackers": ["tensorboard", "wandb"]})
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-m", "finetune", "run", str(path), "--overwrite"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: output.trackers: wandb needs the wandb package: pip install 'finetune[wandb]'"
    )
    assert "trainable params" not in done.stdout  # no model was loaded
    assert [p.name for p in run.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_training_that_fails_ends_the_tracker_runs_as_failed(tracked_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(tracked_run, copy, ignore=shutil.ignore_patterns("wandb", "mlruns", "trackers.json"))
    recipe = load_recipe(copy / "recipe.yaml", [f"output.dir={copy}"])
    with pytest.raises(RuntimeError, match="out of memory"):
        with tracking(recipe, RunDir(copy), resumed_from=None, echo=lambda _: None):
            raise RuntimeError("out of memory")
    trackers = json.loads((copy / "trackers.json").read_text())
    [exit_record] = [
        r.exit for r in finished_wandb_records(wandb_log_of(copy)) if r.WhichOneof("record_type") == "exit"
    ]
    assert exit_record.exit_code == 1
    run = mlflow_client(trackers["mlflow"]["tracking_uri"]).get_run(trackers["mlflow"]["id"])
    assert run.info.status == "FAILED"
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_ALLOW_FILE_STORE" not in os.environ


def test_wandb_counts_as_logged_in_with_a_key_or_a_netrc_entry_for_its_host(tmp_path, monkeypatch):
    from finetune.train.trackers import wandb_logged_in

    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert not wandb_logged_in()  # no file
    netrc.write_text("machine example.com login user password secret\n")
    assert not wandb_logged_in()  # an entry for another host
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")  # as `wandb login` writes
    assert wandb_logged_in()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert not wandb_logged_in()  # a W&B server of one's own needs its own entry
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_logged_in()
