"""`finetune run` and `finetune preview` end to end, through the CLI, on the tiny LLaMA (and the family models)."""

from __future__ import annotations

import json

import pytest
import yaml

from finetune.cli import main
from finetune.data.build import build_datasets
from finetune.model.load import load_tokenizer
from finetune.recipe.load import load_recipe
from finetune.run_folder import read_metrics

from conftest import REPO, SAMPLE_DATA


def test_run_writes_a_self_describing_folder(write_recipe, tmp_path, capsys):
    path = write_recipe(data={"eval_fraction": 0.1}, train={"max_steps": 6, "eval_steps": 3, "save_steps": 3})
    assert main(["run", str(path)]) == 0
    run = tmp_path / "run"
    assert f"run folder: {run}" in capsys.readouterr().out

    assert load_recipe(run / "recipe.yaml") == load_recipe(path)
    environment = json.loads((run / "environment.json").read_text())
    assert all(environment["packages"][name] for name in ("torch", "transformers", "peft", "trl", "accelerate"))
    assert environment["device"] == "cpu"

    recipe = load_recipe(path)
    expected = build_datasets(recipe.data, load_tokenizer(recipe.model), recipe.train.seed).report
    assert json.loads((run / "data.json").read_text())["fingerprint"] == expected.fingerprint

    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [3, 6]
    assert all("learning_rate" in m for m in metrics if "loss" in m)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert not (run / "checkpoints" / "runs").exists()

    adapter = run / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 8
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "tokenizer.json").is_file()
    assert not list(adapter.glob("model*.safetensors"))  # no base weights in the adapter folder

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 6
    assert summary["eval_loss"] == [m["eval_loss"] for m in metrics if "eval_loss" in m][-1]
    assert summary["last_train_loss"] == [m["loss"] for m in metrics if "loss" in m][-1]


def test_non_empty_output_dir_is_refused_and_left_untouched(write_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    path = write_recipe()
    assert main(["run", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: output.dir: {run} is not empty; pass --overwrite to replace it, or choose another folder"
    )
    assert [p.name for p in run.iterdir()] == ["notes.txt"]
    assert main(["run", str(path), "--overwrite", "train.max_steps=1"]) == 0
    out = capsys.readouterr().out
    assert "removed the previous contents" in out and "notes.txt" in out
    assert not (run / "notes.txt").exists() and (run / "adapter").is_dir()


def test_bad_data_fails_before_the_run_folder_is_touched(write_recipe, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x"}]))
    run = tmp_path / "run"
    run.mkdir()
    (run / "previous.txt").write_text("earlier run")
    assert main(["run", str(write_recipe(data={"path": str(bad)})), "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}: row 1: 'output' is missing"
    assert [p.name for p in run.iterdir()] == ["previous.txt"]


def test_shipped_alpaca_lora_recipe_trains_with_overrides(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    args = [
        "run",
        "recipes/alpaca_lora.yaml",
        f"model.name_or_path={tiny_model_dir}",
        f"data.path={SAMPLE_DATA}",
        "train.max_steps=1",
        f"output.dir={tmp_path / 'alpaca_lora'}",
    ]
    assert main(args) == 0
    resolved = yaml.safe_load((tmp_path / "alpaca_lora" / "recipe.yaml").read_text())
    assert resolved["train"]["grad_accum"] == 32 and resolved["train"]["gradient_checkpointing"] is True
    assert resolved["model"]["name_or_path"] == str(tiny_model_dir)
    assert json.loads((tmp_path / "alpaca_lora" / "summary.json").read_text())["steps"] == 1


@pytest.mark.slow
def test_quickstart_loss_falls(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["run", "recipes/quickstart.yaml", f"output.dir={tmp_path / 'quickstart'}"]) == 0
    summary = json.loads((tmp_path / "quickstart" / "summary.json").read_text())
    assert summary["last_train_loss"] < summary["first_train_loss"] - 1.0


def test_preview_json_marks_masked_labels(write_recipe, capsys):
    assert main(["preview", str(write_recipe()), "-n", "3", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 3
    assert {record["truncated"] for record in records} == {True, False}  # rows 1-3 at max_seq_len 256
    for record in records:
        labels, ids = record["labels"], record["input_ids"]
        assert len(labels) == len(ids) == record["tokens"]
        first_trained = next(i for i, label in enumerate(labels) if label != -100)
        assert all(label == -100 for label in labels[:first_trained])
        assert labels[first_trained:] == ids[first_trained:]
        assert record["text"].startswith("<s>")
        assert record["text"].endswith("</s>") != record["truncated"]  # a cut response has no EOS
        assert "### Response:" in record["text"]


def test_preview_text_marks_the_masked_prompt(write_recipe, capsys):
    assert main(["preview", str(write_recipe()), "-n", "1", "data.max_seq_len=1024"]) == 0
    out = capsys.readouterr().out
    header, body = out.split("\n", 1)
    assert header.startswith("--- sample 1 (") and "masked" in header and "trained" in header
    masked = body[body.index("[MASKED]") + len("[MASKED]") : body.index("[/MASKED]")]
    assert masked.startswith("<s>") and masked.endswith("### Response:")
    sample_text, footer = body.rstrip().rsplit("\n\n", 1)
    assert sample_text.split("[/MASKED]", 1)[1].endswith("</s>")
    assert footer.strip() == "120 training samples; 0 dropped, 0 truncated"


# What `finetune preview` shows of a two-turn conversation with each family's own chat template: the first
# answer as trained, then the masked text that follows it.
PREVIEW_TURN = {
    "llama3": ("It is 4.<|eot_id|>", "[MASKED]<|start_header_id|>user<|end_header_id|>\n\nAnd 3 + 3?<|eot_id|>"),
    "qwen2": ("It is 4.<|im_end|>", "[MASKED]\n<|im_start|>user\nAnd 3 + 3?<|im_end|>"),
    "mistral": (" It is 4.</s>", "[MASKED] [INST] And 3 + 3? [/INST]"),
}


@pytest.mark.parametrize("family", PREVIEW_TURN)
def test_preview_shows_each_family_template_with_its_end_of_turn_trained(
    family, family_model_dir, write_recipe, tmp_path, capsys
):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"conversations": ["What is 2 + 2?", "It is 4.", "And 3 + 3?", "That is 6."]}) + "\n")
    model = {"name_or_path": str(family_model_dir(family))}
    path = write_recipe(model=model, data={"format": "lima", "path": str(chat)})
    assert main(["preview", str(path), "-n", "1"]) == 0
    body = capsys.readouterr().out.split("\n", 1)[1]
    answer, following = PREVIEW_TURN[family]
    assert body.startswith("[MASKED]") and f"[/MASKED]{answer}{following}" in body
    bos = {"llama3": "<|begin_of_text|>", "mistral": "<s>", "qwen2": None}[family]
    assert (body.count(bos) == 1) if bos else ("<s>" not in body and "<|begin_of_text|>" not in body)


def test_half_precision_on_cpu_fails_before_anything_is_written(write_recipe, tmp_path, capsys):
    assert main(["run", str(write_recipe(train={"precision": "bf16"}))]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: train.precision: bf16 needs a GPU; this run is on CPU (use auto or fp32)"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("scheduler", ["linear", "cosine"])
def test_min_lr_is_where_the_schedule_ends(scheduler, write_recipe, tmp_path):
    path = write_recipe(train={"max_steps": 6, "lr": 1e-3, "min_lr": 1e-4, "lr_scheduler": scheduler})
    assert main(["run", str(path)]) == 0
    rates = [m["learning_rate"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "learning_rate" in m]
    assert rates == sorted(rates, reverse=True) and rates[0] == pytest.approx(1e-3)
    assert 1e-4 <= rates[-1] < 3e-4  # the step-6 rate, one step before the floor
