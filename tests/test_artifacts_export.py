"""`finetune export --format adapter` and the model card: a clean folder that loads with plain peft."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.artifacts.card import front_matter, read_front_matter
from finetune.cli import main
from finetune.recipe.schema import Recipe

from conftest import ADAPTER_EXPORT


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


@pytest.fixture(scope="module")
def lora_run(tiny_run):
    return tiny_run("lora")


def test_the_adapter_export_loads_with_plain_peft_and_gives_the_runs_logits(lora_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.eval.generate import load_trained
    from finetune.run_folder import read_recipe

    out = tmp_path / "export"
    assert main(["export", str(lora_run), "--format", "adapter", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"exported 6 files to {out}: README.md, adapter_config.json")
    assert sorted(p.name for p in out.iterdir()) == ADAPTER_EXPORT
    assert not list(tmp_path.glob(".*"))  # no temporary folder left beside it

    recipe = read_recipe(lora_run)
    config = json.loads((out / "adapter_config.json").read_text())
    base_path = config["base_model_name_or_path"]
    assert base_path == recipe.model.name_or_path and base_path.startswith("/")

    trained, tokenizer = load_trained(lora_run, recipe, device="cpu")
    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), out).eval()
    ids = AutoTokenizer.from_pretrained(out)("Give three tips for staying healthy.").input_ids
    assert torch.equal(logits(exported, ids), logits(trained, ids))
    with exported.disable_adapter():
        assert not torch.equal(logits(exported, ids), logits(trained, ids))  # the adapter matters
    assert ids == tokenizer("Give three tips for staying healthy.").input_ids


def test_the_card_describes_the_run_from_its_folder(lora_run, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(lora_run), "--format", "adapter", "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert read_front_matter(card) == {"library_name": "peft", "tags": ["finetune", "lora", "alpaca"]}
    summary = json.loads((lora_run / "summary.json").read_text())
    assert f"| last train loss | {round(summary['last_train_loss'], 4)} |" in card
    assert "| adapter.r | 8 |" in card and "| train.max_steps | 2 |" in card
    assert (lora_run / "recipe.yaml").read_text() in card
    assert "trained with finetune 0.1.0" in card
    assert (out / "recipe.yaml").read_bytes() == (lora_run / "recipe.yaml").read_bytes()


def test_front_matter_names_hub_bases_and_datasets_only():
    hub = Recipe.model_validate(
        {
            "model": {"name_or_path": "huggyllama/llama-7b"},
            "quant": {"bits": 4},
            "data": {"sources": [{"path": "tatsu-lab/alpaca"}, {"format": "goat", "goat": {"n": 10}}]},
            "output": {"dir": "runs/x"},
        }
    )
    meta = read_front_matter(front_matter(hub, "peft"))
    assert meta == {
        "library_name": "peft",
        "base_model": "huggyllama/llama-7b",
        "tags": ["finetune", "lora", "qlora", "alpaca", "goat"],
        "datasets": ["tatsu-lab/alpaca"],
    }
    local = Recipe.model_validate(
        {
            "model": {"name_or_path": "./models/llama"},
            "adapter": {"kind": "prefix"},
            "data": {"path": "data/rows.json"},
            "output": {"dir": "runs/x"},
        }
    )
    assert read_front_matter(front_matter(local, "peft")) == {
        "library_name": "peft",
        "tags": ["finetune", "prefix-tuning", "alpaca"],
    }


def test_a_non_empty_out_is_refused_and_kept_then_replaced_with_overwrite(lora_run, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["export", str(lora_run), "--format", "adapter", "--out", str(out)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: --out: {out} is not empty; pass --overwrite to replace it, or choose another folder"
    )
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main(["export", str(lora_run), "--format", "adapter", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ADAPTER_EXPORT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_refuses_to_write_over_the_run_itself(lora_run, capsys):
    before = sorted(p.name for p in (lora_run / "adapter").iterdir())
    out = lora_run / "adapter"
    assert main(["export", str(lora_run), "--format", "adapter", "--out", str(out), "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --out: {out} would overwrite the run folder's own files; choose another folder"
    )
    assert sorted(p.name for p in (lora_run / "adapter").iterdir()) == before


def test_a_full_fine_tuning_run_exports_its_whole_model(tiny_run, capsys):
    from transformers import AutoModelForCausalLM

    run = tiny_run("full", adapter={"kind": "none"})
    capsys.readouterr()  # the training run's output
    assert main(["export", str(run), "--format", "adapter"]) == 0
    out = run / "export" / "model"
    assert capsys.readouterr().out.startswith(
        "full fine-tuning run (adapter.kind: none): it has no adapter, so the whole model is exported\n"
        f"exported 7 files to {out}"
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "recipe.yaml",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert read_front_matter((out / "README.md").read_text())["library_name"] == "transformers"
    exported, trained = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(run / "model")
    assert torch.equal(logits(exported, [1, 5, 9]), logits(trained, [1, 5, 9]))


def test_export_of_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "adapter"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: not a run folder (no recipe.yaml)"
    assert not list(tmp_path.iterdir())
