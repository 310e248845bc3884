"""One writer per folder: commands started together on one folder, with real processes. One of them writes, the
others are refused at once (exit 2, naming the holder), and the folder that was written is intact; a claim
left by a killed process is taken over, one from another host only with --force-unlock."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.cli import main
from finetune.errors import InputError
from finetune.lock import CLAIM_NAME, Holder, claim, claim_file, read_holder
from finetune.run_folder import read_metrics
from finetune.train.callbacks import HANG_AT_SAVE_ENV
from finetune.train.checkpoints import COMPLETE_MARKER

from conftest import REPO

HOST = socket.gethostname()
SINCE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"


def start(*args: str, **env: str) -> subprocess.Popen:
    """`finetune ARGS` in a child process."""
    return subprocess.Popen(
        [sys.executable, "-m", "finetune", *args],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


def in_use(where: str, pid: int, command: str) -> str:
    """The refusal of a command whose folder a running process of this host holds (a regular expression)."""
    return (
        f"error: {re.escape(where)} is in use by pid {pid} on {re.escape(HOST)} \\({re.escape(command)}, since "
        f"{SINCE}\\); wait for it to end, or stop it first"
    )


def race(*args: str) -> tuple[int, tuple[int, str, str]]:
    """Start `finetune ARGS` twice at once: (pid of the one that succeeded, (exit code, out, err) of the other).
    Fails unless exactly one succeeded."""
    processes = [start(*args), start(*args)]
    outcomes = {process.pid: finish(process) for process in processes}
    winners = [pid for pid, (code, _, _) in outcomes.items() if code == 0]
    assert len(winners) == 1, outcomes
    (other,) = (outcome for pid, outcome in outcomes.items() if pid != winners[0])
    return winners[0], other


def assert_intact(run: Path, steps: int) -> None:
    """One metrics record per step, the summary of the finished run, the adapter, nothing half-written."""
    logged = [record["step"] for record in read_metrics(run / "metrics.jsonl") if "loss" in record]
    assert logged == list(range(1, steps + 1))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == steps
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert [p.name for p in run.rglob("*") if p.name.endswith(".partial") or "claim" in p.name] == []


def write_claim(file: Path, **fields) -> Holder:
    """A claim file as another process would have left it (by default: this host, a pid that no longer runs)."""
    holder = dataclasses.replace(Holder.this_process(), **fields)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(dataclasses.asdict(holder)))
    return holder


def ended_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# A process that claims FOLDER at the time given (so that all start together), holds the claim until 5 s
# later (so that one started late is refused too) and prints whether it got it.
CLAIMER = """
import sys, time
from finetune.errors import InputError
from finetune.lock import claim
at = float(sys.argv[2])
time.sleep(max(0.0, at - time.time()))
try:
    held = claim(sys.argv[1], subject="output.dir", echo=lambda _: None)
except InputError:
    print("refused")
else:
    time.sleep(max(0.0, at + 5 - time.time()))
    held.release()
    print("claimed")
"""


def test_of_processes_claiming_one_folder_at_the_same_instant_exactly_one_gets_it(tmp_path):
    for attempt in range(3):
        folder = tmp_path / f"run{attempt}"
        at = str(time.time() + 1.5)  # every process has started (and imported) by then
        processes = [
            subprocess.Popen([sys.executable, "-c", CLAIMER, str(folder), at], stdout=subprocess.PIPE, text=True)
            for _ in range(6)
        ]
        results = sorted(process.communicate(timeout=60)[0].strip() for process in processes)
        assert results == ["claimed"] + ["refused"] * 5, results
        # released: no claim file is left, nor any draft of one (the folder itself stays if a process that
        # lost the race made it, and is empty)
        assert not folder.exists() or list(folder.iterdir()) == []


# What guarded a run folder before the claim: the emptiness check, then (after building data and loading the
# model) the first write.
CHECKER = """
import os, sys, time
from pathlib import Path
from finetune.errors import InputError
from finetune.run_folder import RunDir
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    RunDir.claim(sys.argv[1], overwrite=False)
except InputError:
    print("refused")
else:
    time.sleep(0.5)
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    (Path(sys.argv[1]) / f"written-by-{os.getpid()}").touch()
    print("claimed")
"""


def test_without_the_claim_processes_started_together_all_pass_the_emptiness_check(tmp_path):
    # the race the claim closes, hit by the same start as above
    folder = tmp_path / "run"
    at = str(time.time() + 1.5)
    processes = [
        subprocess.Popen([sys.executable, "-c", CHECKER, str(folder), at], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    assert sorted(process.communicate(timeout=60)[0].strip() for process in processes) == ["claimed"] * 3
    assert len(list(folder.iterdir())) == 3  # three writers in one folder


# One race here: the claim's own race is run 3 x 6 times above, and this one again by test_benchmarks.py
# (benchmarks/run_race.py --quick; its full run repeats it 20 times)
@pytest.mark.slow
def test_two_runs_started_together_leave_one_finished_run_and_one_refusal(write_recipe, tmp_path):
    recipe = write_recipe(train={"max_steps": 3})
    run = tmp_path / "run"
    winner, (code, _, err) = race("run", str(recipe))
    assert code == 2 and "Traceback" not in err
    assert re.fullmatch(in_use(f"output.dir: {run}", winner, f"finetune run {recipe}"), last_line(err)), err
    assert_intact(run, 3)


@pytest.mark.slow
def test_two_merges_started_together_write_one_merged_folder(tiny_run):
    run = tiny_run("merge-race")
    winner, (code, _, err) = race("merge", str(run))
    assert code == 2 and "Traceback" not in err
    assert re.fullmatch(in_use(f"--out: {run / 'merged'}", winner, f"finetune merge {run}"), last_line(err)), err
    assert (run / "merged" / "config.json").is_file() and list((run / "merged").glob("*.safetensors"))
    assert sorted(p.name for p in run.iterdir() if "merged" in p.name or "claim" in p.name) == ["merged"]


@pytest.mark.slow
def test_resume_during_the_run_is_refused_and_a_killed_runs_claim_is_taken_over(write_recipe, tmp_path, capsys):
    recipe = write_recipe(train={"max_steps": 6, "save_steps": 2})
    run = tmp_path / "run"
    training = start("run", str(recipe), **{HANG_AT_SAVE_ENV: "4"})  # stays in the save of checkpoint-4
    deadline = time.time() + 300
    while not (run / "checkpoints" / "checkpoint-4" / "trainer_state.json").is_file():
        assert training.poll() is None and time.time() < deadline, training.communicate()
        time.sleep(0.05)

    code, _, err = finish(start("run", str(run), "--resume"))
    assert code == 2, err
    assert re.fullmatch(in_use(f"output.dir: {run}", training.pid, f"finetune run {recipe}"), last_line(err)), err

    training.kill()  # SIGKILL: nothing is released, the claim file stays
    training.wait()
    holder = read_holder(run / CLAIM_NAME)
    assert holder is not None and holder.pid == training.pid
    assert main(["run", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    notice = (
        f"note: output.dir: {run}: taking over the claim of pid {training.pid} on {HOST} (finetune run {recipe}, "
        f"since {holder.started}), which is no longer running"
    )
    assert notice in out.splitlines(), out
    assert "resume: continuing" in out and (run / "checkpoints" / "checkpoint-4" / COMPLETE_MARKER).is_file()
    assert_intact(run, 6)


@pytest.mark.slow
def test_a_claim_from_another_host_is_taken_over_only_with_force_unlock(write_recipe, tmp_path, capsys):
    recipe = write_recipe()
    run = tmp_path / "run"
    holder = write_claim(run / CLAIM_NAME, host="elsewhere", command="finetune run other.yaml")
    described = f"pid {holder.pid} on elsewhere (finetune run other.yaml, since {holder.started})"

    assert main(["run", str(recipe)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: output.dir: {run} is claimed by {described}, a process on another machine that this one cannot "
        "check; if it has ended, pass --force-unlock to take the claim over"
    )
    assert read_holder(run / CLAIM_NAME) == holder and [p.name for p in run.iterdir()] == [CLAIM_NAME]

    assert main(["run", str(recipe), "--force-unlock"]) == 0
    out = capsys.readouterr().out
    assert f"note: --force-unlock: output.dir: {run}: taking over the claim of {described}" in out.splitlines()
    assert_intact(run, 4)


def test_a_claim_whose_pid_now_names_another_process_is_taken_over(tmp_path, capsys):
    # pid 1 runs, but it is not the process that wrote the claim: that one started at another time
    write_claim(tmp_path / CLAIM_NAME, pid=1, process_start=10**12)
    with claim(tmp_path, subject="output.dir") as held:
        assert read_holder(tmp_path / CLAIM_NAME) == held.holder and held.holder.pid == os.getpid()
    assert capsys.readouterr().out.endswith(", which is no longer running\n")
    assert list(tmp_path.iterdir()) == []


def test_a_claim_from_before_a_reboot_is_taken_over(tmp_path, capsys):
    if Holder.this_process().boot_id is None:
        pytest.skip("no /proc/sys/kernel/random/boot_id here to tell a reboot")
    write_claim(tmp_path / CLAIM_NAME, pid=os.getpid(), boot_id="an-earlier-boot")
    with claim(tmp_path, subject="output.dir"):
        pass
    assert "which is no longer running" in capsys.readouterr().out


def test_a_claim_of_a_running_process_is_refused_even_without_its_lock(tmp_path):
    # as on a file system without flock: the record alone says that its process (pid 1) still runs
    holder = write_claim(tmp_path / CLAIM_NAME, pid=1, process_start=None, boot_id=None)
    with pytest.raises(InputError, match=re.escape(f"is in use by pid 1 on {HOST}")):
        claim(tmp_path, subject="output.dir")
    assert read_holder(tmp_path / CLAIM_NAME) == holder


def test_a_claim_of_an_ended_process_is_taken_over_and_released(tmp_path, capsys):
    folder = tmp_path / "new" / "run"
    write_claim(claim_file(folder, beside=True), pid=ended_pid())
    with claim(folder, subject="--out", beside=True) as held:
        assert held.file == tmp_path / "new" / ".run.claim" and read_holder(held.file).pid == os.getpid()
        with pytest.raises(InputError, match="is in use by pid"):  # a second claim, even by this process
            claim(folder, subject="--out", beside=True)
    assert capsys.readouterr().out.startswith(f"note: --out: {folder}: taking over the claim of pid ")
    assert list((tmp_path / "new").iterdir()) == []


def test_the_processes_a_command_launches_write_under_its_claim(tmp_path, monkeypatch):
    with claim(tmp_path, subject="output.dir") as held:
        monkeypatch.setenv(*held.environment().popitem())
        inherited = claim(tmp_path, subject="output.dir")
        inherited.release()  # only the claim's holder releases it
        assert read_holder(held.file) == held.holder
        monkeypatch.setenv("FINETUNE_CLAIM", "another-token")
        with pytest.raises(InputError, match="is in use by pid"):
            claim(tmp_path, subject="output.dir")
    assert not held.file.exists()
