"""ShareGPT conversations: trained like LIMA conversations (chat template, assistant turns trained, the rest
masked), every role spelling read, bad rows named by row and reason; preview and run read them."""

from __future__ import annotations

import json

import pytest

from finetune.cli import main
from finetune.data.build import build_datasets
from finetune.errors import DataError
from finetune.recipe.schema import DataSpec

from conftest import REPO

SAMPLE = REPO / "tests" / "sharegpt_sample.jsonl"
TURNS = [("human", "What is 2 + 2?"), ("gpt", "It is 4."), ("human", "And 3 + 3?"), ("gpt", "That is 6.")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sharegpt_row(turns, system: str | None = None) -> dict:
    head = [{"from": "system", "value": system}] if system else []
    return {"conversations": head + [{"from": who, "value": text} for who, text in turns]}


def trained_text(sample, tokenizer) -> list[str]:
    """The decoded runs of trained tokens, in order."""
    runs, current = [], []
    for token, trained in zip(sample.input_ids, sample.completion_mask, strict=True):
        if trained:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def test_sharegpt_trains_exactly_what_the_same_lima_conversation_trains(tmp_path, tokenizer):
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [sharegpt_row(TURNS, system="Be brief.")])
    messages = [{"role": "system", "content": "Be brief."}] + [
        {"role": "user" if who == "human" else "assistant", "content": text} for who, text in TURNS
    ]
    lima = write_jsonl(tmp_path / "lima.jsonl", [{"messages": messages}])
    [ours] = build_datasets(DataSpec(format="sharegpt", path=str(sharegpt)), tokenizer, 0).train
    [theirs] = build_datasets(DataSpec(format="lima", path=str(lima)), tokenizer, 0).train
    assert (ours.input_ids, ours.completion_mask) == (theirs.input_ids, theirs.completion_mask)
    runs = trained_text(ours, tokenizer)
    assert [run.strip() for run in runs] == ["It is 4.</s>", "That is 6.</s>"]  # system and user turns masked


def test_user_and_assistant_spellings_read_as_human_and_gpt(tmp_path, tokenizer):
    spelled = [("user" if who == "human" else "assistant", text) for who, text in TURNS]
    path = write_jsonl(tmp_path / "chat.jsonl", [sharegpt_row(TURNS), sharegpt_row(spelled)])
    first, second = build_datasets(DataSpec(format="sharegpt", path=str(path)), tokenizer, 0).train
    assert (first.input_ids, first.completion_mask) == (second.input_ids, second.completion_mask)


def test_bad_rows_are_named_by_row_and_reason(tmp_path, tokenizer):
    rows = [
        sharegpt_row(TURNS[:2]),
        sharegpt_row([("human", "Hi"), ("bot", "Hi there.")]),
        {"conversations": []},
        sharegpt_row([("human", "One"), ("human", "Two"), ("gpt", "Three")]),
        sharegpt_row([("human", "Question?"), ("gpt", "  ")]),
        sharegpt_row([("human", "Question?")]),
        sharegpt_row([("human", "Hi"), ("system", "Late."), ("gpt", "Hello.")]),
        {"conversations": [{"from": "human", "value": 3}]},
        {"messages": []},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as raised:
        build_datasets(DataSpec(format="sharegpt", path=str(path)), tokenizer, 0)
    assert str(raised.value).splitlines() == [
        f"{path}:2: turn 2 is from 'bot': expected human, gpt or system (or user, assistant)",
        f"{path}:3: 'conversations' must be a non-empty list of {{from, value}} turns",
        f"{path}:4: turn 2 is from 'user', expected 'assistant' (turns must alternate)",
        f"{path}:5: turn 2 (assistant) is empty",
        f"{path}:6: the last turn is from the user; a conversation must end with an assistant answer",
        f"{path}:7: a system turn may only come first",
        f"{path}:8: turn 1 must be an object with string 'from' and 'value'",
        f"{path}:9: 'conversations' is missing",
    ]


def test_bad_rows_are_skipped_when_asked(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [sharegpt_row(TURNS), {"conversations": []}, sharegpt_row(TURNS)])
    data = build_datasets(DataSpec(format="sharegpt", path=str(path), on_bad_row="skip"), tokenizer, 0)
    assert len(data.train) == 2 and [d["row"] for d in data.report.dropped_rows] == [f"{path}:2"]


def test_the_sample_file_builds_with_every_assistant_turn_trained(tokenizer):
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    samples = build_datasets(DataSpec(format="sharegpt", path=str(SAMPLE), max_seq_len=4096), tokenizer, 0).train
    assert len(samples) == len(rows)
    for row, sample in zip(rows, samples, strict=True):
        answers = [turn["value"] for turn in row["conversations"] if turn["from"] in ("gpt", "assistant")]
        runs = trained_text(sample, tokenizer)
        assert len(runs) == len(answers)
        for run, answer in zip(runs, answers, strict=True):
            assert run.strip().removesuffix("</s>").strip() == tokenizer.decode(tokenizer(answer).input_ids[1:])


def test_preview_and_run_read_sharegpt(write_recipe, tmp_path, capsys):
    recipe = write_recipe(data={"format": "sharegpt", "path": str(SAMPLE)}, adapter={"kind": "ia3"})
    assert main(["preview", str(recipe), "-n", "1", "--json"]) == 0
    sample = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    trained = [label for label in sample["labels"] if label != -100]
    assert 0 < len(trained) < len(sample["labels"]) and sample["labels"][0] == -100
    assert main(["run", str(recipe), "train.max_steps=2"]) == 0
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert data["train_rows"] == 12 and (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
