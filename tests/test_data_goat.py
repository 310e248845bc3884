"""Goat arithmetic rows: every answer and every reasoning step checked with Python integers."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from finetune.data.build import build_datasets
from finetune.data.formats import goat
from finetune.data.tokenize import tokenize_conversations
from finetune.errors import InputError
from finetune.recipe.schema import DataSpec

from conftest import SAMPLE_DATA

ROWS = list(goat.generate(4000, seed=0))


def evaluate(expression: str) -> int:
    """An expression of integers, + and *, and parentheses, evaluated without eval()."""
    assert re.fullmatch(r"[\d+*() ]+", expression), expression
    expression = re.sub(r"\((.*?)\)", lambda m: str(sum(int(t) for t in m.group(1).split("+"))), expression)
    return sum(eval_product(term) for term in expression.split("+"))


def eval_product(term: str) -> int:
    result = 1
    for factor in term.split("*"):
        result *= int(factor)
    return result


def as_goat_writes_it(a: int, b: int) -> str:
    """Goat's dataset.py: `q` for an exact division, `q R r` otherwise."""
    return f"{a // b} R {a % b}" if a % b else str(a // b)


def test_every_answer_is_python_integer_arithmetic():
    for row in ROWS:
        op, a, b = goat.operation_of(row["input"])
        if op == "div":
            expected = goat.UNDEFINED if b == 0 else as_goat_writes_it(a, b)
        else:
            expected = str({"add": a + b, "sub": a - b, "mul": a * b}[op])
        assert row["answer"] == expected, row
        assert goat.parse_answer(row["output"]) == expected, row


def test_multiplication_steps_are_each_equal_to_the_product():
    multi = [row for row in ROWS if row["input"].split()[1] == "*" and "\n" in row["output"]]
    assert len(multi) > 200
    for row in multi:
        _, a, b = goat.operation_of(row["input"])
        header, *steps = row["output"].splitlines()
        assert header == f"{a} * {b}"
        assert all(evaluate(step.removeprefix("= ")) == a * b for step in steps), row["output"]
        assert steps[0].startswith(f"= {max(a, b)} * (") or len(goat.place_value_terms(min(a, b))) == 1


def test_division_steps_subtract_to_the_remainder():
    long_division = [
        row for row in ROWS if row["output"].startswith(tuple("0123456789")) and "Therefore" in row["output"]
    ]
    assert len(long_division) > 200
    for row in long_division:
        _, a, b = goat.operation_of(row["input"])
        *steps, last = row["output"].splitlines()
        left = a
        for step in steps:
            m = re.fullmatch(r"(\d+) - (\d+) \* (\d+) = (\d+) - (\d+) = (\d+)", step)
            assert m, step
            start, divisor, multiple, again, chunk, rest = map(int, m.groups())
            assert (start, again, divisor) == (left, left, b) and chunk == divisor * multiple
            assert rest == start - chunk >= 0
            left = rest
        assert left < b and last == f"Therefore, {a} / {b} = {as_goat_writes_it(a, b)}"


def test_an_exact_division_ends_in_the_quotient_alone_as_in_goat():
    assert goat.solution("div", 768, 2) == "768 / 2 = 384"
    assert goat.solution("div", 769, 2) == "769 / 2 = 384 R 1"
    assert goat.division_steps(768, 32).splitlines()[-1] == "Therefore, 768 / 32 = 24"
    assert goat.answer("div", 0, 7) == "0" and goat.answer("div", 6, 7) == "0 R 6"
    divisions = [row for row in ROWS if row["input"].split()[1] == "/" and row["answer"] != goat.UNDEFINED]
    exact = [row for row in divisions if " R " not in row["answer"]]
    assert exact and len(exact) < len(divisions)  # both forms occur
    assert not any(row["output"].endswith(" R 0") for row in ROWS)


def test_generation_is_deterministic_balanced_and_covers_digit_lengths_uniformly():
    assert list(goat.generate(50, seed=0)) == ROWS[:50]
    assert list(goat.generate(50, seed=1)) != ROWS[:50]
    assert Counter(goat.operation_of(r["input"])[0] for r in ROWS) == {op: 1000 for op in goat.OPERATIONS}
    add_lengths = Counter(goat.digits(goat.operation_of(r["input"])[1]) for r in ROWS if r["input"].split()[1] == "+")
    assert set(add_lengths) == set(range(1, 17))
    assert max(add_lengths.values()) < 2 * min(add_lengths.values())  # 1000 rows over 16 lengths, ~62 each
    assert any(goat.answer("div", a, b) == goat.UNDEFINED for a, b in (goat.operation_of(r["input"])[1:] for r in ROWS))


def test_instructions_vary_in_wording_and_spacing():
    instructions = [row["instruction"] for row in ROWS]
    assert len({re.sub(r"\d+", "N", text) for text in instructions}) > 40
    assert any(re.search(r"\d[x*+/-]\d", text) for text in instructions)  # spaces removed
    assert any(" times " in text for text in instructions) and any(" x " in text for text in instructions)


@pytest.mark.parametrize("row", ROWS[:8], ids=lambda r: r["input"])
def test_goat_sample_masks_the_question_and_trains_the_answer(row, tokenizer):
    [sample], _ = tokenize_conversations([goat.to_conversation(row, "r")], tokenizer, 4096)
    prompt_ids = tokenizer(f"{row['instruction']}\nAnswer:").input_ids
    assert sample.input_ids[: len(prompt_ids)] == prompt_ids
    assert sample.completion_mask == [0] * len(prompt_ids) + [1] * (len(sample.input_ids) - len(prompt_ids))
    assert tokenizer.decode(sample.input_ids[len(prompt_ids) : -1]) == row["output"]


def test_parse_answer_reads_the_last_line():
    assert goat.parse_answer("7 * 8 = 56") == "56"
    assert goat.parse_answer("12 - 30 = -18") == "-18"
    assert goat.parse_answer("5 / 0 is undefined: division by zero") == goat.UNDEFINED
    assert goat.parse_answer("Therefore, 768 / 32 = 24") == "24"
    assert goat.parse_answer("Therefore, 8914 / 64 = 139 R 18") == "139 R 18"
    assert goat.parse_answer("768 / 2 = 384 R 0") == "384"  # the form rows were once written in
    assert goat.parse_answer("7 / 2 = 3 R 10") == "3 R 10"
    assert goat.parse_answer("I think it is about forty") is None
    assert goat.parse_answer("") is None


def test_data_goat_command_writes_jsonl_and_refuses_to_overwrite(tmp_path, capsys):
    import json

    from finetune.cli import main

    out = tmp_path / "goat.jsonl"
    assert main(["data", "goat", "--out", str(out), "--n", "12", "--seed", "5", "--ops", "add,div"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == list(goat.generate(12, seed=5, ops=("add", "div")))
    assert main(["data", "goat", "--out", str(out), "--n", "3"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 12


def test_goat_recipe_trains_on_generated_rows(write_recipe, tmp_path):
    import json

    from finetune.cli import main

    data = tmp_path / "goat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in goat.generate(64, seed=0, ops=("add", "sub"))))
    path = write_recipe(data={"format": "goat", "path": str(data), "require_digit_split": True})
    assert main(["run", str(path), "train.max_steps=2"]) == 0
    report = json.loads((tmp_path / "run" / "data.json").read_text())
    assert report["rows_read"] == 64 and report["warnings"] == []


def test_a_tokenizer_that_merges_digits_is_flagged(tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "8914": 1, "/": 2, "64": 3, "=": 4, "139": 5, "R": 6, "18": 7}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    merging = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    problem = goat.digit_split_problem(merging)
    assert problem and "merges digits: 11 of the 11 digits" in problem and "'8914'" in problem
    assert "up to 4 digits in one token" in problem
    assert goat.digit_split_problem(tokenizer) is None  # the LLaMA-style tokenizer splits digits
    spec = DataSpec(format="goat", path=str(SAMPLE_DATA), require_digit_split=True)
    with pytest.raises(InputError, match=r"^data.require_digit_split: tokenizer .* merges digits"):
        build_datasets(spec, merging, seed=0)


def test_llama3_digit_groups_are_flagged_and_qwen2_single_digits_pass(family_model_dir):
    from finetune.model.load import load_tokenizer
    from finetune.recipe.schema import ModelSpec

    def problem(family):
        return goat.digit_split_problem(load_tokenizer(ModelSpec(name_or_path=str(family_model_dir(family)))))

    llama3 = problem("llama3")
    assert llama3 is not None and re.search(r"merges digits: \d+ of the 11 digits .* up to [23] digits in one", llama3)
    assert problem("qwen2") is None and problem("mistral") is None


def test_a_recipe_can_generate_its_goat_rows(write_recipe, tokenizer):
    from finetune.recipe.load import load_recipe

    path = write_recipe(data={"format": "goat", "path": None, "goat": {"n": 40, "seed": 7, "ops": ["mul", "div"]}})
    recipe = load_recipe(path)
    data = build_datasets(recipe.data, tokenizer, seed=0)
    assert data.report.rows_read == 40 and data.report.source == "goat generator (seed 7)"
    expected = [goat.to_conversation(row, "r") for row in goat.generate_from_spec(recipe.data.goat)]
    assert [tokenizer.decode(s.input_ids, skip_special_tokens=True) for s in data.train] == [
        tokenizer.decode(s.input_ids, skip_special_tokens=True)
        for s in tokenize_conversations(expected, tokenizer, recipe.data.max_seq_len)[0]
    ]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"format": "goat", "goat": {"n": 5}}, "data.goat: set either data.path or data.goat, not both"),
        ({"path": None, "goat": {"n": 5}}, "data.goat: generates Goat rows, so it needs data.format: goat"),
        (
            {"format": "goat", "path": None, "goat": {"div_divisor_digits": 9}},
            "data.goat.div_divisor_digits: must not exceed data.goat.div_dividend_digits",
        ),
    ],
)
def test_goat_generator_settings_are_checked(data, expected, write_recipe):
    from finetune.errors import RecipeError
    from finetune.recipe.load import load_recipe

    with pytest.raises(RecipeError) as raised:
        load_recipe(write_recipe(data=data))
    assert [expected in str(p) for p in raised.value.problems] == [True]
