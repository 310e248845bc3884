"""Benchmark scripts keep working: each runs in its --quick form and writes its RESULTS.md section."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def run_quick(script: str, results) -> str:
    """stdout of `python benchmarks/SCRIPT --quick --results RESULTS`, run from the repository root."""
    command = [sys.executable, f"benchmarks/{script}", "--quick", "--results", str(results)]
    return subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True).stdout


def test_cli_latency_quick_writes_one_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## other (2026-01-01)\n\nkept\n")
    for _ in range(2):
        out = run_quick("cli_latency.py", results)
    rows = [line for line in out.splitlines() if line.startswith("| `finetune")]
    assert len(rows) == 3
    assert all(float(row.split("|")[2]) > 0 for row in rows)
    text = results.read_text()
    assert text.count("## cli_latency") == 1 and "## other (2026-01-01)\n\nkept" in text


def test_methods_quick_reports_each_method(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = run_quick("methods.py", results)
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"lora", "prompt"}
    for name in ("lora", "prompt"):
        lr, trainable, rss, tokens_per_s, first, last, eval_loss = (cell.strip() for cell in rows[name])
        assert int(trainable.replace(",", "")) > 0 and float(rss) > 0 and float(tokens_per_s) > 0
        assert min(float(first), float(last), float(eval_loss)) > 0
    assert "## methods (3 steps" in results.read_text()


def test_train_throughput_quick_compares_against_both_baselines(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = run_quick("train_throughput.py", results)
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"finetune", "trl defaults", "alpaca-lora"}
    for name in ("finetune", "trl defaults", "alpaca-lora"):
        real, padding, seconds, tokens_per_s, ratio, eval_loss = (cell.strip() for cell in rows[name])
        assert int(real.replace(",", "")) > 0 and 0 <= float(padding.rstrip("%")) < 100
        assert float(seconds) > 0 and float(tokens_per_s) > 0 and float(eval_loss) > 0
    assert rows["finetune"][4].strip() == "1.00"
    assert "x trl defaults" in out and "x alpaca-lora" in out
    assert "## train_throughput (3 steps" in results.read_text()


def test_plan_accuracy_quick_compares_prediction_with_tensors(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = run_quick("plan_accuracy.py", results)
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| data/tiny-llama")]
    assert {row[1].strip() for row in rows} == {"lora", "full", "qlora nf4"}
    assert all(abs(float(row[4]) - 1) < 0.02 for row in rows)
    assert "## plan_accuracy" in results.read_text()


def test_merge_memory_quick_measures_both_merges(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = run_quick("merge_memory.py", results)
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"baseline", "finetune merge --no-verify", "peft merge_and_unload"}
    assert all(float(rows[name][0]) > 0 and float(rows[name][-1]) > 0 for name in rows if name != "process")
    difference = out.split("the two merges' weights differ by at most ")[1].split()[0]
    assert float(difference) < 1e-5  # both merges wrote the same weights
    assert "## merge_memory (" in results.read_text()
