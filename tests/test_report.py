"""report.html, plots, `finetune runs` and `finetune compare` on real short runs."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from finetune.cli import main
from finetune.report import plots
from finetune.report.html import build_report
from finetune.run_folder import read_metrics, read_run

from conftest import require

PNG = b"\x89PNG\r\n\x1a\n"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def xy(line) -> tuple[list, list]:
    data = line.get_xydata()
    return list(data[:, 0]), list(data[:, 1])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """A real run with an eval split, trained to the end with the report and samples on."""
    from finetune.pipeline import run
    from finetune.recipe.load import load_recipe

    from conftest import SAMPLE_DATA

    folder = tmp_path_factory.mktemp("report")
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"""
model: {{name_or_path: {tiny_model_dir}}}
adapter: {{kind: lora, r: 8, alpha: 16, dropout: 0.0}}
data: {{format: alpaca, path: {SAMPLE_DATA}, max_seq_len: 256, eval_fraction: 0.1, packing: none}}
train: {{max_steps: 6, micro_batch_size: 4, lr: 1.0e-3, gradient_checkpointing: false, logging_steps: 1,
         eval_steps: 3, save_steps: 100}}
eval: {{samples: 2}}
output: {{dir: {folder / "run"}}}
""",
        encoding="utf-8",
    )
    return run(load_recipe(recipe), echo=lambda _: None).path


def test_the_report_is_one_offline_page_with_every_figure(finished_run):
    page = (finished_run / "report.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    assert page.count('src="data:image/png;base64,') == 3
    for section in ("Summary", "Loss", "Learning rate", "Throughput", "Sample generations", "Recipe", "Environment"):
        assert f"<h2>{section}</h2>" in page
    assert "padding share" in page and "peak memory (RSS)" in page and "transformers" in page
    for name in ("loss", "lr", "throughput"):
        assert (finished_run / "plots" / f"{name}.png").read_bytes().startswith(PNG)


def test_plots_draw_exactly_the_logged_values(finished_run):
    records = read_metrics(finished_run / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6] and len(evals) == 2

    train_line, eval_line = plots.loss_figure(records).axes[0].lines
    assert xy(train_line) == ([r["step"] for r in train], pytest.approx([r["loss"] for r in train]))
    assert xy(eval_line) == ([r["step"] for r in evals], pytest.approx([r["eval_loss"] for r in evals]))
    (lr_line,) = plots.lr_figure(records).axes[0].lines
    assert xy(lr_line)[1] == pytest.approx([r["learning_rate"] for r in train])
    (rate_line,) = plots.throughput_figure(records).axes[0].lines
    steps, rates = xy(rate_line)
    assert steps == [2, 3, 4, 5, 6] and all(rate > 0 for rate in rates)
    first, second = train[0], train[1]
    assert rates[0] == pytest.approx((second["num_tokens"] - first["num_tokens"]) / (second["time"] - first["time"]))


def test_the_summary_counts_real_and_padded_tokens_and_peak_memory(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    last = [r for r in read_metrics(finished_run / "metrics.jsonl") if "loss" in r][-1]
    assert last["step"] == summary["steps"]
    assert summary["tokens_seen"] == last["num_tokens"] and summary["tokens_processed"] >= summary["tokens_seen"]
    assert summary["padding_share"] == pytest.approx(1 - summary["tokens_seen"] / summary["tokens_processed"], abs=1e-4)
    assert 0 < summary["padding_share"] < 1  # packing: none pads rows of different lengths to the longest
    assert summary["peak_rss_mib"] > 0 and last["peak_rss_mib"] > 0


def test_sample_generations_are_the_greedy_answers_of_the_run_reloaded_with_plain_peft(finished_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data.build import build_datasets
    from finetune.recipe.load import load_recipe

    recipe = load_recipe(finished_run / "recipe.yaml")
    tokenizer = AutoTokenizer.from_pretrained(finished_run / "adapter")
    base = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path)
    model = PeftModel.from_pretrained(base, finished_run / "adapter").eval()
    held_out = build_datasets(recipe.data, tokenizer, recipe.train.seed).eval[:2]
    prompts = [s.input_ids[: s.completion_mask.index(1)] for s in held_out]
    longest_reference = max(sum(s.completion_mask) for s in held_out)  # one trained span per Alpaca sample
    expected = []
    for ids in prompts:
        with torch.no_grad():
            output = model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=min(longest_reference + 8, 96),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        expected.append(tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True))
    samples = json.loads((finished_run / "samples.json").read_text())["samples"]
    assert [sample["generated"] for sample in samples] == expected and all(expected)  # not two empty answers


def test_samples_show_held_out_prompts_next_to_their_references(finished_run):
    samples = json.loads((finished_run / "samples.json").read_text())
    data = json.loads((finished_run / "data.json").read_text())
    assert samples["source"] == "held-out rows" and len(samples["samples"]) == 2
    for sample in samples["samples"]:
        assert sample["prompt"].startswith("Below is an instruction") and sample["prompt"].endswith("### Response:")
        assert sample["reference"] and isinstance(sample["generated"], str)
        assert sample["row"] not in data["truncated_rows"]


def test_a_goat_report_shows_exact_match_as_a_heatmap(write_recipe, tmp_path):
    recipe = write_recipe(
        data={"format": "goat", "path": None, "goat": {"n": 300, "ops": ["add", "sub"], "add_sub_digits": 3}},
        eval={"exact_match": 40, "batch_size": 20},
    )
    assert main(["run", str(recipe), "train.max_steps=2"]) == 0
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    build_report(tmp_path / "run")

    assert (tmp_path / "run" / "plots" / "goat_accuracy.png").read_bytes().startswith(PNG)
    figure = plots.goat_figure(result)
    for axes, op in zip(figure.axes, ("add", "sub"), strict=False):
        shown = axes.images[0].get_array()
        rows, columns, grid = plots.accuracy_grid(result["cells"], op)
        np.testing.assert_array_equal(np.ma.filled(shown, np.nan), grid)
        for cell in (c for c in result["cells"] if c["op"] == op):
            assert grid[rows.index(cell["a_digits"]), columns.index(cell["b_digits"])] == cell["accuracy"]
    page = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert "Exact match (Goat)" in page and f"{result['accuracy']:.1%}" in page and "Worst cells" in page


def test_runs_and_compare_show_the_numbers_of_real_runs(write_recipe, tmp_path, capsys):
    runs = tmp_path / "runs"
    a = write_recipe("a.yaml", output={"dir": str(runs / "a")})
    b = write_recipe("b.yaml", adapter={"r": 4}, train={"lr": 5e-4, "max_steps": 3}, output={"dir": str(runs / "b")})
    assert main(["run", str(a)]) == 0 and main(["run", str(b)]) == 0
    shutil.copytree(runs / "b", runs / "c")
    (runs / "c" / "summary.json").unlink()  # as a run killed before it finished leaves it
    capsys.readouterr()

    assert main(["runs", str(runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "run", "method", "base", "model", "steps", "train", "loss", "eval", "loss", "exact", "match", "wall", "time",
        "status",
    ]  # fmt: skip
    table = {line.split()[0]: line.split() for line in lines[1:]}
    for name in ("a", "b"):
        run = read_run(runs / name)
        summary = json.loads((runs / name / "summary.json").read_text())
        assert table[name][1] == "lora" and table[name][3] == str(summary["steps"])
        assert table[name][4] == f"{summary['last_train_loss']:.4f}" and table[name][-1] == "finished"
        assert run.last("loss") == summary["last_train_loss"]
    assert table["a"][3] == "4" and table["b"][3] == "3" and table["c"][-1] == "interrupted"

    png = tmp_path / "compare.png"
    assert main(["compare", str(runs / "a"), str(runs / "b"), "--out", str(png)]) == 0
    out = capsys.readouterr().out
    differing = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:-1]}
    assert differing == {"adapter.r": ["8", "4"], "train.lr": ["0.001", "0.0005"], "train.max_steps": ["4", "3"]}
    assert png.read_bytes().startswith(PNG)
    lines = (
        plots.compare_figure([("a", read_run(runs / "a").metrics), ("b", read_run(runs / "b").metrics)]).axes[0].lines
    )
    assert [xy(line)[1] for line in lines] == [
        pytest.approx([r["loss"] for r in read_run(runs / name).metrics if "loss" in r]) for name in ("a", "b")
    ]


def test_report_of_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run folder (no recipe.yaml)" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


@pytest.mark.browser
def test_the_report_renders_in_a_headless_browser(finished_run, tmp_path):
    from PIL import Image

    require(CHROMIUM is not None, "Debian's chromium is not installed (apt-get install chromium)")

    shot = tmp_path / "report.png"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1100,2600"]
    page = (finished_run / "report.html").as_uri()
    subprocess.run([*command, f"--screenshot={shot}", page], check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("L")
    assert image.size == (1100, 2600)
    # drawn rows (text, axes, curves) all the way down the first screens, not a blank or error page
    rows = np.asarray(image) < 200
    assert rows[:1300].any(axis=1).mean() > 0.3 and rows[1300:].any(axis=1).mean() > 0.3


@pytest.mark.parametrize("ci", ["true", ""])
def test_a_missing_optional_tool_skips_the_test_but_fails_it_under_ci(ci, monkeypatch):
    monkeypatch.setenv("CI", ci)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome, match="chromium is not installed"):
        require(False, "chromium is not installed")
    require(True, "chromium is not installed")  # present: the test goes on
