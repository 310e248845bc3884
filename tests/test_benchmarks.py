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


def test_step_memory_meter_counts_live_bytes_not_nested_sums(monkeypatch):
    """A known case: 100 MiB allocated and freed, then 50 MiB allocated: the peak is the 100 MiB."""
    import torch

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from step_memory import MiB, StepMeter

    layer = torch.nn.Linear(64, 64)
    meter = StepMeter()
    meter.start(layer, None)
    freed = torch.ones(100 * MiB, dtype=torch.uint8)
    del freed
    kept = torch.ones(50 * MiB, dtype=torch.uint8)
    meter.stop()
    (window,) = meter.steps
    assert window["resident"] == sum(p.numel() * p.element_size() for p in layer.parameters())
    assert 100 * MiB <= window["peak"] < 101 * MiB and window["largest"] == 100 * MiB
    assert kept.numel() == 50 * MiB


def test_step_memory_quick_measures_lora_with_and_without_checkpointing(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = run_quick("step_memory.py", results)
    rows = {
        tuple(cell.strip() for cell in line.split("|")[1:3]): [cell.strip() for cell in line.split("|")[3:-1]]
        for line in out.splitlines()
        if line.startswith("| ") and not line.startswith("| method")
    }
    assert set(rows) >= {("lora", "off"), ("lora", "on"), ("prefix", "on")}
    assert set(rows[("prefix", "on")]) == {"n/a"}  # the recipe refuses prefix-tuning with checkpointing
    for key in (("lora", "off"), ("lora", "on")):
        trainable, rss, resident, step, tensor_peak, largest = rows[key]
        assert int(trainable.replace(",", "")) > 0 and min(float(resident), float(step), float(largest)) > 0
        assert float(tensor_peak) < float(rss)  # the profiler's peak counts each byte once
    assert float(rows[("lora", "on")][3]) < float(rows[("lora", "off")][3])  # checkpointing keeps fewer activations
    assert "gradient checkpointing's saving on the step's peak allocation: lora " in out
    assert "## step_memory (" in results.read_text()


def test_preprocess_quick_times_cold_and_cache_hit(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = run_quick("preprocess.py", results)
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in out.splitlines()
        if line.startswith("| ") and not line.startswith("| mode")
    }
    statuses = {mode: cells[0] for mode, cells in rows.items()}
    assert statuses == {"cold, cache off": "off", "cold": "miss", "cache hit": "hit"}
    for _, n_rows, seconds, rows_per_s in rows.values():
        assert int(n_rows.replace(",", "")) > 0 and float(seconds) > 0 and float(rows_per_s.replace(",", "")) > 0
    assert len({cells[1] for cells in rows.values()}) == 1  # every mode prepared the same rows
    assert float(rows["cache hit"][2]) < float(rows["cold"][2])
    assert "x the cold rows/s" in out
    assert "## preprocess (" in results.read_text()


def test_run_race_quick_ends_with_one_run_and_one_refusal(tmp_path):
    results = tmp_path / "RESULTS.md"
    out = run_quick("run_race.py", results)
    assert "race 1: one finished run, one refusal" in out
    assert "| 1 | 1 | 0 |" in out
    assert "## run_race (two `finetune run` on one output.dir started together 1x" in results.read_text()
