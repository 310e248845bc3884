"""Killed, half-saved and Ctrl-C'd runs resume to exactly the weights and losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from finetune.cli import main
from finetune.errors import InputError
from finetune.lock import CLAIM_NAME
from finetune.run_folder import RunDir, read_metrics
from finetune.train.callbacks import HANG_AT_SAVE_ENV
from finetune.train.checkpoints import COMPLETE_MARKER
from finetune.train.resume import truncate_metrics

from conftest import REPO, SAMPLE_DATA

MAX_STEPS = 8  # checkpoints at steps 3 and 6


def recipe_for(tiny_model_dir: Path, folder: Path, run: Path, **changes) -> Path:
    """The recipe of these runs, `changes` merged into its train section (a key given as None is removed)."""
    train = {
        "max_steps": MAX_STEPS,
        "micro_batch_size": 2,
        "grad_accum": 2,
        "lr": 1e-3,
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "save_steps": 3,
        "save_total_limit": None,
        **changes,
    }
    recipe = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"format": "alpaca", "path": str(SAMPLE_DATA), "max_seq_len": 128},
        "train": {key: value for key, value in train.items() if key not in changes or value is not None},
        "eval": {"samples": 0},
        "output": {"dir": str(run), "report": False, "trackers": []},
    }
    path = folder / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> Path:
    """The same recipe, trained without interruption."""
    folder = tmp_path_factory.mktemp("reference")
    assert main(["run", str(recipe_for(tiny_model_dir, folder, folder / "run"))]) == 0
    return folder / "run"


def start(recipe: Path, *args: str, max_file_bytes: int | None = None, **env) -> subprocess.Popen:
    """`finetune run RECIPE ARGS` in a child process; `max_file_bytes` makes larger writes fail as on a full disk."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.Popen(
        [sys.executable, "-m", "finetune", "run", str(recipe), *args],
        cwd=REPO,
        env={**os.environ, **env},
        preexec_fn=limit_file_size if max_file_bytes else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before the condition held:\n{process.stderr.read()}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


def logged_steps(run: Path) -> set[int]:
    try:
        return {record["step"] for record in read_metrics(run / "metrics.jsonl")}
    except ValueError:  # a line being written
        return set()


def losses(run: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in read_metrics(run / "metrics.jsonl") if "loss" in record}


def assert_same_result(run: Path, reference: Path) -> None:
    """Bit-identical adapter weights (CPU training is deterministic) and the same loss at every step."""
    trained, expected = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (run, reference))
    assert trained.keys() == expected.keys()
    for name in expected:
        assert trained[name].equal(expected[name]), name
    assert losses(run) == losses(reference)
    assert sorted(losses(run)) == list(range(1, MAX_STEPS + 1))  # one record per step: no duplicates
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == MAX_STEPS


@pytest.fixture(scope="module")
def killed(tiny_model_dir, tmp_path_factory) -> Path:
    """A run of the reference's recipe SIGKILLed after checkpoint-3, with steps after it logged (those records
    must not be kept twice); each test resumes a copy of it."""
    folder = tmp_path_factory.mktemp("killed")
    run = folder / "run"
    process = start(recipe_for(tiny_model_dir, folder, run))
    wait_for(
        lambda: (run / "checkpoints" / "checkpoint-3" / COMPLETE_MARKER).is_file() and 4 in logged_steps(run), process
    )
    process.kill()
    process.wait()
    return run


def test_sigkill_mid_training_resumes_to_the_uninterrupted_result(killed, tmp_path, reference, capsys):
    run = shutil.copytree(killed, tmp_path / "run")
    assert not (run / "adapter").exists()

    assert main(["run", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resume: continuing" in out and "metrics record(s) after step" in out
    assert_same_result(run, reference)
    assert json.loads((run / "summary.json").read_text())["resumed_from"].startswith("checkpoint-")


def test_kill_during_a_save_resumes_from_the_previous_checkpoint(tiny_model_dir, tmp_path, reference, capsys):
    run = tmp_path / "run"
    recipe = recipe_for(tiny_model_dir, tmp_path, run)
    process = start(recipe, **{HANG_AT_SAVE_ENV: "6"})  # checkpoint-6 is written but never marked complete
    unfinished = run / "checkpoints" / "checkpoint-6"
    wait_for(lambda: (unfinished / "trainer_state.json").is_file(), process)
    process.kill()
    process.wait()
    assert not (unfinished / COMPLETE_MARKER).exists()

    assert main(["run", str(recipe), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resume: continuing" in out and "from checkpoint-3" in out
    assert "resume: ignoring checkpoint-6 (incomplete: the run stopped while saving it); removed" in out
    assert_same_result(run, reference)
    assert (unfinished / COMPLETE_MARKER).is_file()  # saved again, completely, by the resumed run


def test_sigint_saves_a_checkpoint_and_says_how_to_resume(tiny_model_dir, tmp_path, reference):
    run = tmp_path / "run"
    process = start(recipe_for(tiny_model_dir, tmp_path, run))
    wait_for(lambda: (run / "checkpoints" / "checkpoint-3" / COMPLETE_MARKER).is_file(), process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130
    summary = json.loads((run / "summary.json").read_text())
    step = summary["steps"]
    assert summary["status"] == "interrupted" and 3 <= step < MAX_STEPS
    assert err.rstrip().endswith(
        f"interrupted at step {step}: checkpoint saved to {run / 'checkpoints' / f'checkpoint-{step}'}\n"
        f"resume with: finetune run {run} --resume"
    )
    assert "Traceback" not in err
    assert (run / "checkpoints" / f"checkpoint-{step}" / COMPLETE_MARKER).is_file()
    assert max(logged_steps(run)) == step
    assert not (run / CLAIM_NAME).exists()  # released on Ctrl-C: the resume below takes no claim over

    assert main(["run", str(run), "--resume"]) == 0
    assert_same_result(run, reference)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(killed, tmp_path, reference):
    run = shutil.copytree(killed, tmp_path / "run")
    # resumed where no file may grow past 100 kB: checkpoint-6's optimizer state (~150 kB) cannot be written
    process = start(run, "--resume", "data.cache=false", max_file_bytes=100_000)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1 and "Traceback" not in err, err
    assert re.fullmatch(
        rf"error: writing {re.escape(str(run / 'checkpoints' / 'checkpoint-6'))} failed at step 6 \(\w+: "
        r".+\); files may not grow past 100,000 bytes here \(ulimit -f\); the newest complete checkpoint, "
        r"checkpoint-3, is intact; once "
        rf"there is room, resume with: finetune run {re.escape(str(run))} --resume",
        err[err.rindex("error: ") :].splitlines()[0],  # the progress bar leaves no newline before it
    ), err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 6
    assert not (run / "checkpoints" / "checkpoint-6" / COMPLETE_MARKER).exists()
    assert (run / "checkpoints" / "checkpoint-3" / COMPLETE_MARKER).is_file()

    assert main(["run", str(run), "--resume"]) == 0
    assert_same_result(run, reference)


@pytest.mark.parametrize(
    "batch, changed",
    [
        # grad_accum = 512 / (2 x 128) = 2, as the reference recipe gives it; 2048 would make it 8
        ({"grad_accum": None, "tokens_per_update": 512}, ["train.tokens_per_update=2048"]),
        ({"micro_batch_size": "auto", "gpu_memory": "0.755GiB"}, ["train.gpu_memory=0.76GiB"]),  # auto: 3, then 7
    ],
    ids=["tokens_per_update", "auto"],
)
def test_a_recipe_with_planned_batches_resumes_from_its_file(tiny_model_dir, tmp_path, batch, changed, capsys):
    """`finetune run RECIPE --resume` where the recipe leaves batch numbers to the planner: they resolve to
    the numbers the run folder's recipe.yaml recorded, and other numbers are still refused."""
    uninterrupted = tmp_path / "uninterrupted"
    assert main(["run", str(recipe_for(tiny_model_dir, tmp_path, uninterrupted, **batch))]) == 0
    run = tmp_path / "run"
    recipe = recipe_for(tiny_model_dir, tmp_path, run, **batch)
    process = start(recipe)
    wait_for(
        lambda: (run / "checkpoints" / "checkpoint-3" / COMPLETE_MARKER).is_file() and 4 in logged_steps(run), process
    )
    process.kill()
    process.wait()
    recorded = yaml.safe_load((run / "recipe.yaml").read_text())["train"]
    assert isinstance(recorded["micro_batch_size"], int) and recorded["tokens_per_update"] is None

    assert main(["run", str(recipe), "--resume", *changed]) == 2
    assert "--resume: the recipe differs from" in capsys.readouterr().err
    assert main(["run", str(recipe), "--resume"]) == 0
    assert "resume: continuing" in capsys.readouterr().out
    assert_same_result(run, uninterrupted)
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"] == recorded


def test_resume_refuses_a_recipe_that_trains_differently(reference, capsys):
    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    assert main(["run", str(reference), "--resume", "train.lr=0.01", "adapter.r=4", "eval.samples=2"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {reference}: the run has finished; there is nothing to resume")
    (reference / "summary.json").rename(reference / "summary.keep")
    try:
        assert main(["run", str(reference), "--resume", "train.lr=0.01", "adapter.r=4", "eval.samples=2"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"error: --resume: the recipe differs from {reference / 'recipe.yaml'} in adapter.r, train.lr; a resumed "
            "run must train as the interrupted one did (start a new run in another output.dir to change them)"
        )
    finally:
        (reference / "summary.keep").rename(reference / "summary.json")
    assert {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()} == before


def test_resume_needs_a_complete_checkpoint(write_recipe, tmp_path, capsys):
    recipe = write_recipe()
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--resume"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {run}: not a run folder (no recipe.yaml); nothing to resume"
    run.mkdir()
    (run / "recipe.yaml").write_text((recipe).read_text())
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # a save that never finished
    assert main(["run", str(recipe), "--resume"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {run}: no complete checkpoint under checkpoints/ to resume from; run again with --overwrite to "
        "start over"
    )
    assert main(["run", str(recipe), "--resume", "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2}\n{"step": 2, "loss": 1}\n{"step": 3, "loss": 0.5}\n{"step": 3, "lo')
    assert truncate_metrics(path, 2) == 2
    assert read_metrics(path) == [{"step": 1, "loss": 2}, {"step": 2, "loss": 1}]


def test_too_little_free_space_is_refused_before_anything_is_written(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(InputError) as raised:
        run.check_free_space(2**62)
    assert re.fullmatch(
        rf"output.dir: {re.escape(str(run.path))} has [\d.]+ GiB free; the run needs about 4294967296.0 GiB for its "
        "checkpoints and final weights. Free some space or choose another output.dir",
        str(raised.value),
    )
    assert not run.path.exists()
