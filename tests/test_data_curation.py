"""Curation: duplicate removal, length filter, and the `finetune data stats` report."""

from __future__ import annotations

import json

from finetune.cli import main
from finetune.data.build import build_datasets
from finetune.recipe.schema import DataSpec

from conftest import write_rows

ROWS = [
    {"instruction": "Name a primary colour.", "output": "Red."},
    {"instruction": "Name a primary colour.", "output": "Red."},  # exact repeat
    {"instruction": "name a PRIMARY colour", "output": "red"},  # repeat once normalized
    {"instruction": "Name a secondary colour.", "output": "Green."},
    {"instruction": "Say hi.", "output": "Hi."},
]


def test_exact_and_normalized_dedup_keep_the_first_and_name_the_rest(tmp_path, tokenizer):
    path = write_rows(tmp_path / "rows.json", ROWS)
    exact = build_datasets(DataSpec(path=str(path), dedup="exact"), tokenizer, 0).report
    assert exact.train_rows == 4 and exact.duplicate_rows == [f"{path}: row 2"]
    normalized = build_datasets(DataSpec(path=str(path), dedup="normalized"), tokenizer, 0).report
    assert normalized.train_rows == 3 and normalized.duplicate_rows == [f"{path}: row 2", f"{path}: row 3"]
    assert build_datasets(DataSpec(path=str(path)), tokenizer, 0).report.train_rows == 5


def test_eval_rows_that_repeat_training_rows_are_dropped(tmp_path, tokenizer):
    train = write_rows(tmp_path / "train.json", ROWS[:1] + ROWS[3:])
    held_out = write_rows(tmp_path / "eval.json", ROWS[1:3])
    spec = DataSpec(path=str(train), eval_path=str(held_out), dedup="normalized")
    data = build_datasets(spec, tokenizer, 0)
    assert data.eval == [] and len(data.report.duplicate_rows) == 2


def test_min_tokens_drops_short_samples_and_says_why(tmp_path, tokenizer):
    path = write_rows(tmp_path / "rows.json", ROWS)
    lengths = sorted(len(s.input_ids) for s in build_datasets(DataSpec(path=str(path)), tokenizer, 0).train)
    report = build_datasets(DataSpec(path=str(path), min_tokens=lengths[-1]), tokenizer, 0).report
    assert report.train_rows == lengths.count(lengths[-1])
    assert all(d["reason"].endswith(f"tokens < data.min_tokens {lengths[-1]}") for d in report.dropped_rows)


def test_data_stats_reports_counts_masks_and_a_histogram(write_recipe, tmp_path, capsys):
    path = write_rows(tmp_path / "rows.json", ROWS)
    assert main(["data", "stats", str(write_recipe()), f"data.path={path}", "data.dedup=normalized"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "rows read          5" in out and "samples            3 train, 0 eval" in out
    assert "duplicates removed 2" in out
    masked = next(line for line in out if line.startswith("tokens  "))
    assert "trained" in masked and "masked" in masked
    histogram = out[out.index("tokens per sample") + 1 :]
    assert sum(int(line.split()[1]) for line in histogram) == 3
    assert json.loads(path.read_text()) == ROWS  # the source file is untouched


def test_bad_rows_can_be_skipped_and_are_then_listed(tmp_path, tokenizer):
    path = write_rows(tmp_path / "rows.json", [*ROWS, {"instruction": "no output"}, {"output": "no instruction"}])
    report = build_datasets(DataSpec(path=str(path), on_bad_row="skip"), tokenizer, 0).report
    assert report.train_rows == 5
    assert report.dropped_rows == [
        {"row": f"{path}: row 6", "reason": "skipped (data.on_bad_row): 'output' is missing"},
        {"row": f"{path}: row 7", "reason": "skipped (data.on_bad_row): 'instruction' is missing"},
    ]
