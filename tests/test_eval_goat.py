"""Goat exact-match evaluation: scoring, held-out selection, and `finetune eval` on a real run folder."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from finetune.cli import main
from finetune.data.build import build_datasets, split_holdout
from finetune.data.formats import goat
from finetune.errors import InputError
from finetune.eval.goat import format_table, held_out_rows, score
from finetune.recipe.schema import DataSpec, GoatSpec


def test_reference_solutions_score_100_percent_and_wrong_ones_zero():
    rows = list(goat.generate(200, seed=3))
    perfect = score(rows, [row["output"] for row in rows], "test")
    assert perfect.accuracy == 1.0 and sum(cell.n for cell in perfect.cells) == 200
    assert {cell.op for cell in perfect.cells} == set(goat.OPERATIONS)
    wrong = score(rows, ["= 12345678901234567890"] * len(rows), "test")
    assert wrong.accuracy == 0.0 and len(wrong.mistakes) == 20
    table = format_table(perfect)
    assert table.startswith("exact match 200/200 = 100.0% on test") and "mul (*)" in table


def test_hand_made_answers_get_the_scores_counted_by_hand():
    cases = [  # input, expected answer, what a model wrote, right?
        ("48 + 55", "103", "48 + 55 = 103", True),
        ("9 - 12", "-3", "9 - 12 = 3", False),
        ("397 * 4429", "1758313", "397 * 4429\n= 1758313.", True),
        ("768 / 2", "384", "768 / 2 = 384 R 0", True),  # the older form of an exact division
        ("768 / 4", "192 R 0", "768 / 4 = 192", True),  # a row file written in that older form
        ("8914 / 64", "139 R 18", "8914 - 64 * 100 = 8914 - 6400 = 2514\nTherefore, 8914 / 64 = 139 R 17", False),
        ("8914 / 64", "139 R 18", "Therefore, 8914 / 64 = 139 R 18", True),
        ("5 / 0", goat.UNDEFINED, "5 / 0 is undefined: division by zero", True),
        ("6 / 7", "0 R 6", "6 / 7 = 0", False),
    ]
    rows = [{"input": problem, "answer": answer} for problem, answer, _, _ in cases]
    result = score(rows, [written for _, _, written, _ in cases], "hand-made")
    assert (result.n, result.correct, result.accuracy) == (9, 6, 6 / 9)
    cells = {(c.op, c.a_digits, c.b_digits): (c.correct, c.n) for c in result.cells}
    assert cells == {
        ("add", 2, 2): (1, 1),
        ("sub", 1, 2): (0, 1),
        ("mul", 3, 4): (1, 1),
        ("div", 3, 1): (2, 2),
        ("div", 4, 2): (1, 2),
        ("div", 1, 1): (1, 2),
    }
    assert [m["input"] for m in result.mistakes] == ["9 - 12", "8914 / 64", "6 / 7"]
    assert result.mistakes[2] == {"input": "6 / 7", "expected": "0 R 6", "got": "6 / 7 = 0"}
    table = format_table(result)
    assert table.startswith("exact match 6/9 = 66.7% on hand-made")
    division = table.split("div (/)")[1].split("\n\n")[0].splitlines()
    assert division[2:] == ["    1     50%      -", "    3    100%      -", "    4       -    50%"]


def write_report(built, tmp_path):
    """data.json as the run folder holds it."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps(asdict(built.report)))
    return path


def test_fresh_held_out_problems_never_appear_in_training(tmp_path):
    spec = DataSpec(format="goat", goat=GoatSpec(n=300, seed=1, ops=["add"], add_sub_digits=2))
    rows, source = held_out_rows(spec, n=50, data_report=tmp_path / "data.json")  # no eval split: not read
    train_inputs = {row["input"] for row in goat.generate_from_spec(spec.goat)}
    assert len(rows) == 50 and not train_inputs & {row["input"] for row in rows}
    assert source == "50 generated problems absent from the training rows"


def test_eval_split_rows_are_the_runs_own_held_out_rows(tokenizer, tmp_path):
    spec = DataSpec(format="goat", goat=GoatSpec(n=100, seed=2), eval_fraction=0.1)
    report = write_report(build_datasets(spec, tokenizer, seed=5), tmp_path)
    rows, source = held_out_rows(spec, n=500, data_report=report)
    assert len(rows) == 10 and source == "the run's held-out 10%"


def test_with_skipped_bad_rows_eval_scores_exactly_the_runs_held_out_problems(tokenizer, tmp_path):
    rows = list(goat.generate(400, seed=4, ops=("add",)))
    rows.insert(3, {"instruction": "What is 1 + 1?", "input": "1 + 1"})  # no output: skipped
    path = tmp_path / "goat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = DataSpec(format="goat", path=str(path), eval_fraction=0.2, on_bad_row="skip")
    built = build_datasets(spec, tokenizer, seed=3)
    assert [d["row"] for d in built.report.dropped_rows] == [f"{path}:4"]
    by_ref = dict(zip([f"{path}:{i}" for i in range(1, len(rows) + 1)], rows, strict=True))
    trained = {goat.problem_of(by_ref[sample.row]) for sample in built.train}
    held_out = [by_ref[sample.row] for sample in built.eval]

    scored, _ = held_out_rows(spec, n=10_000, data_report=write_report(built, tmp_path))
    assert scored == held_out
    assert not trained & {goat.problem_of(row) for row in scored}
    # the split re-derived from the raw rows, the bad one among them, is another split: it scores trained problems
    _, rederived = split_holdout(rows, spec.eval_fraction, seed=3, group_of=goat.problem_of)
    assert trained & {goat.problem_of(row) for row in rederived}


def test_a_run_folder_without_recorded_held_out_rows_is_refused(tmp_path):
    spec = DataSpec(format="goat", goat=GoatSpec(n=100, seed=2), eval_fraction=0.1)
    (tmp_path / "data.json").write_text(json.dumps({"source": "goat generator (seed 2)"}))
    with pytest.raises(InputError, match="records no held-out rows"):
        held_out_rows(spec, n=10, data_report=tmp_path / "data.json")


def test_a_held_out_problem_is_never_trained_on_in_another_phrasing(tokenizer, tmp_path):
    # 100 one-digit additions in 2,000 rows: every problem comes in many phrasings
    spec = DataSpec(format="goat", goat=GoatSpec(n=2000, seed=0, ops=["add"], add_sub_digits=1), eval_fraction=0.2)
    rows = list(goat.generate_from_spec(spec.goat))
    train, held = split_holdout(rows, spec.eval_fraction, seed=7, group_of=goat.problem_of)
    held_problems = {goat.problem_of(row) for row in held}
    assert len(held_problems) == 20 and len(held) > 3 * len(held_problems)
    assert not held_problems & {goat.problem_of(row) for row in train}

    built = build_datasets(spec, tokenizer, seed=7)
    scored, _ = held_out_rows(spec, n=10_000, data_report=write_report(built, tmp_path))
    assert scored == held
    assert (len(built.train), len(built.eval)) == (len(train), len(held))


def test_finetune_eval_scores_a_goat_run_and_writes_eval_json(write_recipe, tmp_path, capsys):
    recipe = write_recipe(
        data={"format": "goat", "path": None, "goat": {"n": 64, "seed": 0, "ops": ["add", "sub"], "add_sub_digits": 3}}
    )
    assert main(["run", str(recipe), "train.max_steps=2"]) == 0
    capsys.readouterr()
    tasks = {"tasks": {"my_task": {"metrics": {"acc": 0.5}}}}  # `finetune eval --tasks` results are kept
    (tmp_path / "run" / "eval.json").write_text(json.dumps(tasks))
    assert main(["eval", str(tmp_path / "run"), "--n", "24", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("eval: 24 problems from 24 generated problems absent from the training rows")
    assert "exact match" in out and "add (+)" in out
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["n"] == 24 and sum(cell["n"] for cell in result["cells"]) == 24
    assert result["tasks"] == tasks["tasks"]
    assert result["accuracy"] == result["correct"] / 24
    assert len(result["mistakes"]) == min(20, 24 - result["correct"])
    assert all(goat.parse_answer(m["got"]) != m["expected"] for m in result["mistakes"])


def test_a_recipe_can_score_exact_match_at_the_end_of_training(write_recipe, tmp_path, capsys):
    recipe = write_recipe(
        data={
            "format": "goat",
            "path": None,
            "goat": {"n": 200, "ops": ["add"], "add_sub_digits": 2},
            "eval_fraction": 0.1,
        },
        eval={"exact_match": 12, "batch_size": 5},
    )
    assert main(["run", str(recipe), "train.max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "eval: 12 problems from the run's held-out 10%" in out and "add (+)" in out
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert result["n"] == 12 and summary["exact_match"] == result["accuracy"]


def test_exact_match_is_refused_for_data_that_is_not_goat(write_recipe, capsys):
    assert main(["validate", str(write_recipe(eval={"exact_match": 10}))]) == 2
    err = capsys.readouterr().err
    assert "eval.exact_match: scores Goat arithmetic answers; this recipe's data is alpaca" in err


def test_eval_of_an_alpaca_run_is_refused(tiny_run, capsys):
    run = tiny_run("lora")  # the session's finished Alpaca run
    capsys.readouterr()
    assert main(["eval", str(run)]) == 2
    assert "scores exact match for data.format: goat runs; this run's data.format is alpaca" in capsys.readouterr().err
    assert not (run / "eval.json").exists()
