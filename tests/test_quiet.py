"""`merge`, `export` and `generate` keep the libraries' progress bars and deprecation warnings off the
terminal, and print their own progress."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

NOISE = ("Loading weights", "Writing model shards", "Warning", "deprecated", "it/s]")
BAR_LABELS = ("merge: folding", "export gguf: writing tensors", "generate: answering")


def as_a_user_runs_it() -> dict[str, str]:
    """The test environment with the libraries' progress bars on, as in a user's shell (conftest turns them
    off for the rest of the suite), so that what these tests find quiet was quietened by finetune itself."""
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    env.pop("FINETUNE_PROGRESS", None)
    return env


def run_together(*commands: list[str], cwd) -> list[subprocess.CompletedProcess]:
    """Each `finetune COMMAND` in a child process of its own, as a user runs it, all started at once (they are
    independent, and so share the machine's cores); each must succeed."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "finetune", *command],
            cwd=cwd,
            env=as_a_user_runs_it(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    done = [
        subprocess.CompletedProcess(p.args, p.returncode, *output) for p, output in zip(processes, outputs, strict=True)
    ]
    for finished in done:
        assert finished.returncode == 0, finished.stderr
    return done


def test_merge_export_and_generate_print_only_their_own_progress(tiny_run, tmp_path):
    run = tiny_run("lora")
    merged, exported, generated = run_together(
        ["merge", str(run), "--out", str(tmp_path / "merged")],
        ["export", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf")],
        ["generate", str(run), "--prompt", "Name a color.", "--max-new-tokens", "4"],
        cwd=tmp_path,
    )
    for done in (merged, exported, generated):
        assert not [word for word in NOISE if word in done.stderr], done.stderr
        # finetune's own bars (tests/test_progress.py shows them on a terminal) stay off a pipe
        assert "\r" not in done.stderr + done.stdout and not [bar for bar in BAR_LABELS if bar in done.stderr]
    assert "merged model (float32, 1 shard) written to" in merged.stdout
    assert "GGUF (" in exported.stdout and generated.stdout.strip()


def test_the_same_steps_without_the_quieting_are_noisy(tiny_model_dir, tmp_path):
    """What the test above would see: loading and saving a model prints both bars and a FutureWarning."""
    code = (
        "from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r}); "
        "m.is_gradient_checkpointing; "
        f"m.save_pretrained({str(tmp_path / 'copy')!r})"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=as_a_user_runs_it(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "Loading weights" in done.stderr and "Writing model shards" in done.stderr and "deprecated" in done.stderr
