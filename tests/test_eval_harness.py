"""`finetune eval RUN --tasks`: lm-evaluation-harness tasks defined in a local folder, run on a real run folder
with the network off, and checked against scores computed here from the model's own logits."""

from __future__ import annotations

import copy
import json
import math
import shutil
import socket
import sys

import pytest
import torch
import yaml

from finetune.cli import main
from finetune.data.formats import goat
from finetune.data.templates import LIMA
from finetune.errors import InputError
from finetune.eval.harness import TaskRequest, applies_chat_template, format_task_table, task_entries
from finetune.recipe.load import load_recipe
from finetune.recipe.schema import GoatSpec

from conftest import REPO, require

ROWS = 12
LIMIT = 10  # the first 10 rows of each task are scored


@pytest.fixture
def needs_lm_eval():
    try:
        import lm_eval  # noqa: F401

        available = True
    except ImportError:
        available = False
    require(available, "lm_eval is not installed: pip install 'finetune[lm-eval]'")


@pytest.fixture
def offline(monkeypatch) -> list:
    """The hub libraries are told they are offline, and every connection attempt is recorded and refused."""
    attempts = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError("no network in this test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def goat_rows() -> list[dict]:
    """Goat problems as lm_eval documents: the prompt as Goat runs see it, the answer, and three choices."""
    spec = GoatSpec(n=ROWS, seed=11, ops=["add", "sub"], add_sub_digits=3)
    docs = []
    for i, row in enumerate(goat.generate_from_spec(spec)):
        answer = int(row["answer"])
        wrong = [str(answer + 1), str(answer - 10)]
        choices = wrong[: i % 3] + [str(answer)] + wrong[i % 3 :]
        question = goat.format_prompt(row["instruction"])
        docs.append({"question": question, "answer": str(answer), "choices": choices, "gold": i % 3})
    return docs


@pytest.fixture
def task_dir(tmp_path, needs_lm_eval) -> tuple:
    """(folder, rows): a multiple-choice task (acc) and a loglikelihood task (perplexity, acc) on the same rows."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    rows = goat_rows()
    (folder / "goat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / "goat.jsonl")}},
        "test_split": "test",
        "doc_to_text": "{{question}}",
    }
    tasks = {
        "goat_choice": {
            "output_type": "multiple_choice",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{gold}}",
            "metric_list": [{"metric": "acc"}],
        },
        "goat_answer": {
            "output_type": "loglikelihood",
            "doc_to_target": " {{answer}}",  # a loglikelihood target gets no delimiter: it brings its space
            "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}],
        },
    }
    for name, config in tasks.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **common, **config}), encoding="utf-8")
    return folder, rows


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A copy of a finished LoRA run (2 steps at lr 1e-2), so that what eval writes stays in this test."""
    return shutil.copytree(tiny_run("lora"), tmp_path / "run")


def load_adapter_model(run, tiny_model_dir):
    """The run's model loaded with plain transformers + peft, not through finetune."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, run / "adapter").eval(), AutoTokenizer.from_pretrained(run / "adapter")


def continuation_scores(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """(summed log-probability of `continuation` after `context`, whether greedy decoding would write it):
    the continuation's tokens are those the whole text adds to the context's (BOS first, as the tokenizer adds)."""
    whole = tokenizer(context + continuation).input_ids
    start = len(tokenizer(context).input_ids)
    with torch.no_grad():
        log_probs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
    positions = range(start, len(whole))
    total = sum(log_probs[i - 1, whole[i]].item() for i in positions)
    return total, all(log_probs[i - 1].argmax().item() == whole[i] for i in positions)


def expected_scores(model, tokenizer, rows: list[dict]) -> dict:
    """The tasks' metrics computed from the model's logits: the choice with the largest summed log-probability,
    and exp(-mean log-probability) of the answers, each after a space."""
    correct, answers = 0, []
    for row in rows:
        scores = [continuation_scores(model, tokenizer, row["question"], " " + c)[0] for c in row["choices"]]
        correct += row["choices"][scores.index(max(scores))] == row["answer"]
        answers.append(continuation_scores(model, tokenizer, row["question"], " " + row["answer"]))
    return {
        "choice_acc": correct / len(rows),
        "perplexity": math.exp(-sum(total for total, _ in answers) / len(rows)),
        "answer_acc": sum(greedy for _, greedy in answers) / len(rows),
    }


@pytest.mark.slow
def test_task_scores_are_the_models_own_and_not_the_bases(run_copy, task_dir, tiny_model_dir, offline, capsys):
    folder, rows = task_dir
    before = {"task": "goat_exact_match", "accuracy": 0.5, "n": 2, "correct": 1, "source": "earlier", "cells": []}
    (run_copy / "eval.json").write_text(json.dumps(before))
    args = ["eval", str(run_copy), "--tasks", "goat_choice,goat_answer", "--include-path", str(folder)]
    assert main([*args, "--limit", str(LIMIT), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert offline == []

    written = json.loads((run_copy / "eval.json").read_text())
    assert {key: written[key] for key in before} == before  # Goat exact match is kept
    choice, answer = written["tasks"]["goat_choice"], written["tasks"]["goat_answer"]
    assert (choice["samples"], choice["samples_total"], choice["limit"]) == (LIMIT, ROWS, LIMIT)
    assert choice["config_source"] == str(folder / "goat_choice.yaml") and len(choice["config_sha256"]) == 64
    assert (choice["model"], choice["chat_template"], choice["num_fewshot"]) == ("adapter", False, 0)
    assert choice["stderr"]["acc"] > 0 or choice["metrics"]["acc"] in (0, 1)

    model, tokenizer = load_adapter_model(run_copy, tiny_model_dir)
    expected = expected_scores(model, tokenizer, rows[:LIMIT])
    assert choice["metrics"]["acc"] == expected["choice_acc"]
    assert answer["metrics"]["acc"] == expected["answer_acc"]
    assert answer["metrics"]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert f"goat_answer  perplexity  {answer['metrics']['perplexity']:.4g}" in out
    # the comparison tells the run's model from its base: the adapter moved the answers' likelihood
    with model.disable_adapter():
        base = expected_scores(model, tokenizer, rows[:LIMIT])
    assert base["perplexity"] != pytest.approx(answer["metrics"]["perplexity"], rel=1e-3)

    assert main(["report", str(run_copy)]) == 0
    page = (run_copy / "report.html").read_text(encoding="utf-8")
    assert "Benchmark tasks (lm-evaluation-harness)" in page
    assert f"<td>goat_answer</td><td>perplexity</td><td>{answer['metrics']['perplexity']:.4g}</td>" in page

    # with a chat template saved beside the adapter, --chat-template on sends the rows through it
    (run_copy / "adapter" / "chat_template.jinja").write_text(LIMA, encoding="utf-8")
    args = ["eval", str(run_copy), "--tasks", "goat_answer", "--include-path", str(folder), "--chat-template", "on"]
    assert main([*args, "--limit", str(LIMIT)]) == 0
    chat = json.loads((run_copy / "eval.json").read_text())["tasks"]["goat_answer"]
    assert chat["chat_template"] is True
    assert chat["metrics"]["perplexity"] != pytest.approx(answer["metrics"]["perplexity"], rel=1e-3)


@pytest.mark.slow
def test_the_merged_model_scores_as_the_adapter_does(run_copy, task_dir, tiny_model_dir, offline):
    folder, rows = task_dir
    assert main(["merge", str(run_copy), "--no-verify"]) == 0
    args = ["eval", str(run_copy), "--tasks", "goat_answer", "--include-path", str(folder), "--model", "merged"]
    assert main(args) == 0
    entry = json.loads((run_copy / "eval.json").read_text())["tasks"]["goat_answer"]
    assert entry["model"] == "merged" and entry["samples"] == ROWS
    expected = expected_scores(*load_adapter_model(run_copy, tiny_model_dir), rows)
    assert entry["metrics"]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)
    assert offline == []
    assert main(["report", str(run_copy)]) == 0  # an eval.json with tasks and no Goat exact match
    page = (run_copy / "report.html").read_text(encoding="utf-8")
    assert "<td>goat_answer</td><td>perplexity</td>" in page and "Exact match (Goat)" not in page


def test_without_lm_eval_the_command_names_the_extra_before_reading_anything(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets when it is not installed
    assert main(["eval", str(tmp_path), "--tasks", "anything"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: finetune eval --tasks needs lm-evaluation-harness: pip install 'finetune[lm-eval]'"
    )
    assert list(tmp_path.iterdir()) == []


def test_the_chat_template_is_applied_by_default_only_to_runs_that_trained_through_one(write_recipe, tokenizer):
    alpaca = load_recipe(write_recipe("alpaca.yaml"))
    lima = load_recipe(write_recipe("lima.yaml", data={"format": "lima", "path": str(REPO / "data/lima_sample.jsonl")}))
    with_template = copy.copy(tokenizer)
    with_template.chat_template = LIMA
    assert applies_chat_template("auto", lima, with_template) is True
    assert applies_chat_template("auto", alpaca, with_template) is False
    assert applies_chat_template("on", alpaca, with_template) is True
    assert applies_chat_template("off", lima, with_template) is False
    assert tokenizer.chat_template is None and applies_chat_template("auto", lima, tokenizer) is False
    with pytest.raises(InputError, match="^--chat-template on: the model's tokenizer has no chat template$"):
        applies_chat_template("on", alpaca, tokenizer)


def test_entries_name_filtered_metrics_and_keep_missing_stderr_as_null():
    results = {  # the shape of lm_eval's results for a generation task under two filters, and its group
        "results": {
            "arith": {
                "alias": "arith",
                "exact_match,strict-match": 0.25,
                "exact_match_stderr,strict-match": 0.125,
                "exact_match,flexible-extract": 0.5,
                "exact_match_stderr,flexible-extract": "N/A",
            },
            "maths": {"alias": "maths", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": "N/A"},
        },
        "n-samples": {"arith": {"original": 40, "effective": 8}},
        "n-shot": {"arith": 0},
        "configs": {"arith": {"task": "arith", "metadata": {"config_source": "/tasks/arith.yaml"}}},
    }
    entries = task_entries(results, TaskRequest(tasks=("maths",), limit=8), chat=False, version="0.4.13")
    assert entries["arith"]["metrics"] == {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.5}
    assert entries["arith"]["stderr"] == {"exact_match,strict-match": 0.125, "exact_match,flexible-extract": None}
    assert (entries["arith"]["samples"], entries["arith"]["samples_total"]) == (8, 40)
    assert entries["arith"]["config_source"] == "/tasks/arith.yaml" and entries["maths"]["config_sha256"] is None
    five_shot = results["configs"]["arith"] | {"num_fewshot": 5}
    changed = results | {"configs": {"arith": five_shot}}
    assert (
        task_entries(changed, TaskRequest(tasks=("arith",)), chat=False, version="0.4.13")["arith"]["config_sha256"]
        != entries["arith"]["config_sha256"]
    )
    assert format_task_table(entries).splitlines() == [
        "task   metric                        value  stderr  samples",
        "arith  exact_match,strict-match      0.25   0.125   8",
        "arith  exact_match,flexible-extract  0.5    -       8",
        "maths  exact_match,strict-match      0.25   -       -",
    ]
