"""Alpaca rows -> tokens: exact templates, masks decided on segments, bad rows named, truncation reported."""

from __future__ import annotations

import json

import pytest

from finetune.data.build import build_datasets, split_holdout
from finetune.data.formats.alpaca import format_prompt, to_conversation
from finetune.data.sources import read_rows
from finetune.data.tokenize import tokenize_conversations
from finetune.errors import DataError
from finetune.recipe.schema import DataSpec

from conftest import SAMPLE_DATA, write_rows

STANFORD_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nName the colour.\n\n### Input:\nThe sky at noon\n\n### Response:"
)
STANFORD_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nName the colour.\n\n### Response:"
)


def test_prompt_templates_are_stanford_alpacas_exactly():
    assert format_prompt("Name the colour.", "The sky at noon") == STANFORD_WITH_INPUT
    assert format_prompt("Name the colour.") == STANFORD_NO_INPUT
    assert format_prompt("Name the colour.", "") == STANFORD_NO_INPUT


@pytest.mark.parametrize("row_input", ["", "The sky at noon"], ids=["no-input", "with-input"])
def test_prompt_is_masked_and_response_plus_eos_trained(tokenizer, row_input):
    row = {"instruction": "Name the colour.", "input": row_input, "output": "Blue, 42 times."}
    [sample], dropped = tokenize_conversations([to_conversation(row, "r")], tokenizer, 512)
    prompt_ids = tokenizer(format_prompt(row["instruction"], row_input)).input_ids  # what inference feeds
    response_ids = tokenizer(row["output"], add_special_tokens=False).input_ids
    assert not dropped
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert sample.input_ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert sample.completion_mask == [0] * len(prompt_ids) + [1] * (len(response_ids) + 1)
    assert tokenizer.decode(response_ids) == row["output"]


def test_train_on_prompt_trains_every_token(tokenizer):
    row = {"instruction": "Say hi.", "output": "Hi."}
    [sample], _ = tokenize_conversations([to_conversation(row, "r", train_on_prompt=True)], tokenizer, 512)
    assert all(sample.completion_mask)


def test_pad_token_is_not_eos(tokenizer):
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token == tokenizer.unk_token


def test_bad_rows_are_all_reported_by_file_and_row(tmp_path, tokenizer):
    path = write_rows(
        tmp_path / "bad.json",
        [
            {"instruction": "ok", "output": "fine"},
            {"instruction": "no output"},
            {"instruction": "x", "output": 3},
            {"instruction": "x", "output": "   "},
            ["not", "an", "object"],
        ],
    )
    with pytest.raises(DataError) as raised:
        build_datasets(DataSpec(path=str(path)), tokenizer, seed=0)
    assert str(raised.value).splitlines() == [
        f"{path}: row 2: 'output' is missing",
        f"{path}: row 3: 'output' must be a string, got int",
        f"{path}: row 4: 'output' is empty",
        f"{path}: row 5: expected an object with 'instruction' and 'output', got list",
    ]


def test_jsonl_rows_are_named_by_line_and_invalid_json_by_line_and_column(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n')
    with pytest.raises(DataError, match=rf"^{path}:3: 'output' is missing$"):
        build_datasets(DataSpec(path=str(path)), tokenizer, seed=0)
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": }\n')
    with pytest.raises(DataError, match=rf"^{path}:2:32: invalid JSON: Expecting value$"):
        read_rows(str(path))


def test_json_list_syntax_error_and_non_utf8_are_located(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"instruction": "a",\n  "output": "b",}\n]')
    with pytest.raises(DataError, match=rf"^{broken}:3:17: invalid JSON: Expecting property name"):
        read_rows(str(broken))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(DataError, match=rf"^{latin}:2: not UTF-8 \(byte 0xe9"):
        read_rows(str(latin))


def test_json_file_holding_json_lines_is_read(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    assert read_rows(str(path)).refs == [f"{path}:1", f"{path}:2"]


def test_truncation_keeps_the_start_and_reports_rows_without_response(tokenizer):
    long_answer = {"instruction": "Count.", "output": " ".join(str(i) for i in range(200))}
    long_prompt = {"instruction": "word " * 300, "output": "short"}
    convs = [to_conversation(long_answer, "row 1"), to_conversation(long_prompt, "row 2")]
    limit = len(tokenizer(format_prompt("Count.")).input_ids) + 10
    samples, dropped = tokenize_conversations(convs, tokenizer, max_seq_len=limit, overlong="truncate")
    [sample] = samples
    assert len(sample.input_ids) == limit and sample.truncated
    assert sample.input_ids[-1] != tokenizer.eos_token_id  # a cut response does not teach stopping
    assert sum(sample.completion_mask) == 10
    assert [d.row for d in dropped] == ["row 2"]
    assert "no response token left" in dropped[0].reason


def test_overlong_drop_and_error_policies(tokenizer):
    convs = [to_conversation({"instruction": "Count.", "output": "1 2 3 " * 50}, "data.json: row 9")]
    samples, dropped = tokenize_conversations(convs, tokenizer, max_seq_len=32, overlong="drop")
    assert samples == [] and dropped[0].row == "data.json: row 9"
    with pytest.raises(DataError, match=r"^data.json: row 9: \d+ tokens, longer than data.max_seq_len=32$"):
        tokenize_conversations(convs, tokenizer, max_seq_len=32, overlong="error")


def test_sample_data_builds_with_eval_split_and_report(tokenizer):
    spec = DataSpec(path=str(SAMPLE_DATA), eval_fraction=0.1, max_seq_len=512)
    data = build_datasets(spec, tokenizer, seed=3)
    report = data.report
    assert report.rows_read == 120
    assert report.train_rows + report.eval_rows + len(report.dropped_rows) == 120
    assert report.eval_rows == 12
    assert report.trained_tokens == sum(sum(s.completion_mask) for s in data.train)
    assert {s.row for s in data.train}.isdisjoint({s.row for s in data.eval})
    again = build_datasets(spec, tokenizer, seed=3)
    assert again.report.fingerprint == report.fingerprint
    other = build_datasets(spec, tokenizer, seed=4)
    assert other.report.fingerprint != report.fingerprint


def test_holdout_split_is_seeded_disjoint_and_complete():
    items = list(range(100))
    train, eval_ = split_holdout(items, 0.05, seed=1)
    assert len(eval_) == 5 and sorted(train + eval_) == items
    assert split_holdout(items, 0.05, seed=1) == (train, eval_)
    assert split_holdout(items, 0.0, seed=1) == (items, [])
    assert len(split_holdout([1, 2], 0.01, seed=0)[1]) == 1


def test_eval_path_is_used_as_the_eval_split(tmp_path, tokenizer):
    rows = json.loads(SAMPLE_DATA.read_text())
    write_rows(tmp_path / "train.json", rows[:10])
    write_rows(tmp_path / "eval.json", rows[10:13])
    spec = DataSpec(path=str(tmp_path / "train.json"), eval_path=str(tmp_path / "eval.json"))
    data = build_datasets(spec, tokenizer, seed=0)
    assert (len(data.train), len(data.eval)) == (10, 3)
    assert data.eval[0].row == f"{tmp_path / 'eval.json'}: row 1"


def test_a_dataset_folder_is_read_through_datasets_load_dataset(tmp_path, tokenizer):
    rows = json.loads(SAMPLE_DATA.read_text())[:6]
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    source = read_rows(str(folder), split="train")
    assert source.rows == rows
    assert source.refs[2] == f"{folder} [train]: row 3"
    data = build_datasets(DataSpec(path=str(folder)), tokenizer, seed=0)
    assert data.report.train_rows == 6 and data.report.source_sha256
