"""Two `finetune run` processes started together on one output.dir, N times: each race must end with one
finished run folder and one refusal (exit 2 naming the winner's pid), the folder intact.

    python benchmarks/run_race.py            # 20 races
    python benchmarks/run_race.py --quick    # 1 race, for the test that keeps this script working

Trains the shipped tiny LLaMA (data/tiny-llama) for 3 steps per race. Prints one line per race and a table
(races, good outcomes, wall time), and writes the table into benchmarks/RESULTS.md (or --results FILE) with
the date, machine and versions. Exits 1 if any race ended otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from results import RESULTS, machine_line, write_section

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


def write_recipe(folder: Path) -> Path:
    recipe = {
        "model": {"name_or_path": str(REPO / "data" / "tiny-llama")},
        "adapter": {"kind": "lora", "r": 4, "dropout": 0.0},
        "data": {"path": str(REPO / "data" / "alpaca_sample.json"), "max_seq_len": 128, "max_rows": 32},
        "train": {"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 1, "logging_steps": 1},
        "eval": {"samples": 0},
        "output": {"dir": str(folder / "run"), "report": False, "tensorboard": False},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def race(folder: Path) -> str | None:
    """One race in `folder`; None when it ended as it must, else what went wrong."""
    recipe, run = write_recipe(folder), folder / "run"
    command = [sys.executable, "-m", "finetune", "run", str(recipe)]
    processes = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    processes.append(subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outcomes = {p.pid: (p.communicate()[1], p.returncode) for p in processes}
    codes = sorted(code for _, code in outcomes.values())
    if codes != [0, 2]:
        return f"exit codes {codes}"
    winner = next(pid for pid, (_, code) in outcomes.items() if code == 0)
    refusal = next(err for err, code in outcomes.values() if code == 2).strip().splitlines()[-1]
    expected = (
        f"error: output.dir: {re.escape(str(run))} is in use by pid {winner} on {re.escape(socket.gethostname())} "
        rf"\(finetune run {re.escape(str(recipe))}, since [\d-]+ [\d:]+ UTC\); wait for it to end, or stop it first"
    )
    if not re.fullmatch(expected, refusal):
        return f"refused with: {refusal}"
    return folder_problem(run)


def folder_problem(run: Path) -> str | None:
    """What is wrong with the winner's run folder: records per step, summary, leftovers."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    steps = [record["step"] for record in records if "loss" in record]
    if steps != list(range(1, STEPS + 1)):
        return f"metrics.jsonl logs steps {steps}"
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    if (summary["status"], summary["steps"]) != ("finished", STEPS):
        return f"summary.json says {summary['status']} after {summary['steps']} steps"
    leftovers = [p.name for p in run.rglob("*") if p.name.endswith(".partial") or "claim" in p.name]
    return f"left behind: {leftovers}" if leftovers else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 race")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    races = 1 if args.quick else 20
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    problems, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="run-race-") as scratch:
        for number in range(1, races + 1):
            folder = Path(scratch) / f"race-{number}"
            folder.mkdir()
            problem = race(folder)
            print(f"race {number}: {problem or 'one finished run, one refusal'}", flush=True)
            problems += [problem] if problem else []
    wall = time.perf_counter() - started

    table = "\n".join(
        [
            "| races | one finished run and one refusal | otherwise | wall s | s per race |",
            "|---|---|---|---|---|",
            f"| {races} | {races - len(problems)} | {len(problems)} | {wall:.0f} | {wall / races:.1f} |",
        ]
    )
    print(table)
    header = (
        f"## run_race (two `finetune run` on one output.dir started together {races}x, {STEPS} steps each; "
        "`python benchmarks/run_race.py`)\n\n"
    )
    write_section(args.results, "run_race", header + machine_line("torch", "transformers") + "\n\n" + table + "\n")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
