"""Benchmark scripts keep working: each runs in its --quick form and writes its RESULTS.md section."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import REPO

# what a script runs with when a test below asks `scripts` for it; by default its smoke run
ARGUMENTS = {"gpu_check.py": ["--cpu-smoke"]}


@pytest.fixture(autouse=True)
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))


def run_quick(script: str, results) -> str:
    """stdout of `python benchmarks/SCRIPT --quick --results RESULTS`, run from the repository root."""
    command = [sys.executable, f"benchmarks/{script}", "--quick", "--results", str(results)]
    return subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True).stdout


def script_of(item: pytest.Item) -> str | None:
    """The script a test is parametrized with, if any."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("script") if callspec else None


@pytest.fixture(scope="module")
def scripts(request, tmp_path_factory):
    """scripts(script) -> (stdout, RESULTS.md) of `python benchmarks/SCRIPT --quick --results RESULTS.md` (or
    its ARGUMENTS), run from the repository root; fails with its stderr unless it exited 0.

    The scripts of the tests selected in this module start when the first of them asks, two at a time, in the
    tests' order: each is a chain of processes that spend most of their time importing torch on one core, so
    that two of them keep a 2-core machine busy."""
    wanted = [script_of(item) for item in request.session.items if item.module is request.module and script_of(item)]
    folder = tmp_path_factory.mktemp("benchmarks")

    def run(script: str) -> tuple[subprocess.CompletedProcess, Path]:
        results = folder / script.removesuffix(".py") / "RESULTS.md"
        results.parent.mkdir()
        arguments = ARGUMENTS.get(script, ["--quick", "--results", str(results)])
        command = [sys.executable, f"benchmarks/{script}", *arguments]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True), results

    pool = ThreadPoolExecutor(max_workers=2)
    started = {script: pool.submit(run, script) for script in dict.fromkeys(wanted)}

    def output(script: str) -> tuple[str, Path]:
        done, results = started[script].result()
        assert done.returncode == 0, done.stderr
        return done.stdout, results

    yield output
    pool.shutdown(cancel_futures=True)


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


@pytest.mark.parametrize("script", ["methods.py"])
def test_methods_quick_reports_each_method(script, scripts):
    out, results = scripts(script)
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"lora", "prompt"}
    for name in ("lora", "prompt"):
        lr, trainable, rss, tokens_per_s, first, last, eval_loss = (cell.strip() for cell in rows[name])
        assert int(trainable.replace(",", "")) > 0 and float(rss) > 0 and float(tokens_per_s) > 0
        assert min(float(first), float(last), float(eval_loss)) > 0
    assert "## methods (3 steps" in results.read_text()


def table_cells(out: str, header: str) -> dict[str, list[str]]:
    """Rows of the markdown table whose header row starts with `| header |`, by first cell."""
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = {}
    for line in lines[first + 2 :]:
        if not line.startswith("| "):
            break
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        rows[cells[0] if header == "setup" else " / ".join(cells[:2])] = cells[1:] if header == "setup" else cells[2:]
    return rows


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


@pytest.mark.parametrize("script", ["train_throughput.py"])
def test_train_throughput_quick_compares_against_both_baselines(script, scripts):
    out, results = scripts(script)
    rows = table_cells(out, "setup")
    assert list(rows) == ["finetune", "trl defaults", "alpaca-lora"]
    figures = {}
    for name, cells in rows.items():
        real, trained, padding, seconds, median, spread, relative, eval_loss = cells
        slowest, fastest = (float(x) for x in spread.split("-"))
        assert slowest <= number(median) <= fastest  # a median of the rounds lies within their spread
        assert 0 < number(trained) <= number(real) and number(eval_loss) > 0
        figures[name] = (number(median), number(relative), number(padding))
    ours = figures["finetune"][0]
    for median, relative, _ in figures.values():
        assert abs(relative - median / ours) < 0.01  # the x finetune column is the medians' ratio
    assert figures["finetune"][2] == 0 and figures["trl defaults"][2] > 0  # padding-free vs padded batches
    for baseline in ("trl defaults", "alpaca-lora"):
        stated = out.split(f"- finetune / {baseline}: ")[1].split("x")[0]
        assert abs(float(stated) - ours / figures[baseline][0]) < 0.01  # the ratio line matches the table
    text = results.read_text()
    assert "median of 2 interleaved rounds" in text and "## train_throughput, tiny model (2 steps" in text


def test_train_window_counts_real_and_trained_tokens_of_padded_and_padding_free_batches():
    """Hand-made batches: padding is told by attention_mask; a padding-free row has none and no padding."""
    import torch
    from train_window import CountingCollator

    padded = {
        "input_ids": torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, 6, 7, -100], [-100, 6, -100, -100]]),
    }
    padding_free = {
        "input_ids": torch.tensor([[5, 6, 7, 5, 6]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1]]),
        "labels": torch.tensor([[-100, 6, 7, -100, 6]]),
    }
    for batch, (processed, real, trained) in ((padded, (8, 5, 3)), (padding_free, (5, 5, 3))):
        counter = CountingCollator(lambda features, batch=batch: batch)
        counter([])  # not counting yet: outside the training window
        counter.counting = True
        counter([])
        assert (counter.processed, counter.real, counter.trained) == (processed, real, trained)


@pytest.mark.parametrize("script", ["vocab_memory.py"])
def test_vocab_memory_quick_compares_peaks_with_trl(script, scripts):
    out, results = scripts(script)
    rows = table_cells(out, "vocabulary")
    assert set(rows) == {"8,192 / trl padding_free", "8,192 / finetune", "8,192 / finetune, TRL's loss head"}
    trl = rows["8,192 / trl padding_free"]
    for cells in rows.values():
        resident, peak, largest, relative, tokens_per_s, speed = (number(c) for c in cells)
        assert abs(relative - peak / number(trl[1])) < 0.01 and abs(speed - tokens_per_s / number(trl[4])) < 0.01
        assert 0 < largest <= peak
    ours = rows["8,192 / finetune"]
    # TRL's head allocates 32,768-wide tiles whatever the vocabulary; finetune's tiles stay within 32 MiB
    assert number(ours[2]) <= 32 < number(trl[2])
    stated = out.split("finetune's step peak is ")[1].split("x")[0]
    assert abs(float(stated) - number(ours[1]) / number(trl[1])) < 0.01
    assert "## vocab_memory (" in results.read_text()


@pytest.mark.parametrize("script", ["plan_accuracy.py"])
def test_plan_accuracy_quick_compares_prediction_with_tensors(script, scripts):
    out, results = scripts(script)
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| data/tiny-llama")]
    assert {row[1].strip() for row in rows} == {"lora", "full", "qlora nf4"}
    assert all(abs(float(row[4]) - 1) < 0.02 for row in rows)
    assert "## plan_accuracy" in results.read_text()


@pytest.mark.parametrize("script", ["merge_memory.py"])
def test_merge_memory_quick_measures_both_merges(script, scripts):
    out, results = scripts(script)
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


@pytest.mark.parametrize("script", ["step_memory.py"])
def test_step_memory_quick_measures_lora_with_and_without_checkpointing(script, scripts):
    out, results = scripts(script)
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


@pytest.mark.parametrize("script", ["preprocess.py"])
def test_preprocess_quick_times_cold_and_cache_hit(script, scripts):
    out, results = scripts(script)
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


def test_gpu_check_without_cuda_says_so_and_exits_0():
    import torch

    assert not torch.cuda.is_available()  # this suite runs on CPU; the GPU run is `python benchmarks/gpu_check.py`
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py"], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.startswith("gpu_check needs CUDA, and this machine has none: nothing was run.")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["gpu_check.py"])
def test_gpu_check_cpu_smoke_runs_every_check_and_resumes_to_the_same_adapter(script, scripts):
    out, _ = scripts(script)
    table = ([c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| "))
    rows = {cells[0]: cells[1:] for cells in table}
    checks = ["lora", "qlora nf4", "qlora nf4, paged_adamw_32bit", "cpu_ddp, 1 process", "merge on cpu"]
    assert [name for name in rows if name != "check" and not name.startswith("---")] == checks
    assert all(rows[name][0] == "ok" for name in checks)
    for name in checks[:3]:
        assert float(rows[name][1]) > 0 and float(rows[name][3]) > 0  # tokens/s and the plan's figure
    resumed = rows["cpu_ddp, 1 process"][-1]
    assert "resumed from checkpoint-2: max /resumed - uninterrupted/ 0.00e+00" in resumed
    assert rows["merge on cpu"][-1].startswith("check: ")  # the merge's own logits check ran and passed


@pytest.mark.parametrize("script", ["run_race.py"])
def test_run_race_quick_ends_with_one_run_and_one_refusal(script, scripts):
    out, results = scripts(script)
    assert "race 1: one finished run, one refusal" in out
    assert "| 1 | 1 | 0 |" in out
    assert "## run_race (two `finetune run` on one output.dir started together 1x" in results.read_text()
