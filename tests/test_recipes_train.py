"""Every shipped recipe trains a few steps on the tiny model of its family (via overrides), and its run folder's
adapter or model reloads with plain peft/transformers and gives the logits of the end of training."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from finetune.model.load import load_model, load_tokenizer
from finetune.pipeline import run
from finetune.recipe.load import load_recipe

from conftest import REPO, SAMPLE_DATA

# Every recipe for a real model (the quickstart has its own test), shrunk by overrides to the tiny model of
# its family: the file name starts with the family of its base.
RECIPES = sorted(p.name for p in (REPO / "recipes").glob("*.yaml") if p.name != "quickstart.yaml")
FAMILY_OF_PREFIX = {"llama3_": "llama3", "qwen2.5_": "qwen2", "mistral_": "mistral"}


def family_of(recipe_name: str) -> str:
    return next((family for prefix, family in FAMILY_OF_PREFIX.items() if recipe_name.startswith(prefix)), "llama")


def reload_artifact(run_dir, recipe):
    """The trained model as a user would load it from the run folder alone."""
    if recipe.adapter.kind == "none":
        return AutoModelForCausalLM.from_pretrained(run_dir / "model")
    tokenizer = load_tokenizer(recipe.model)
    if recipe.quant is None:
        base = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path)
    else:
        base = load_model(recipe.model, recipe.quant, device="cpu", tokenizer=tokenizer)
    return PeftModel.from_pretrained(base, run_dir / "adapter")


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipe_trains_and_its_artifact_reloads(name, family_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    data = load_recipe(f"recipes/{name}").data
    sample = {"alpaca": f"data.path={SAMPLE_DATA}", "lima": f"data.path={REPO / 'data' / 'lima_sample.jsonl'}"}
    overrides = [
        f"model.name_or_path={family_model_dir(family_of(name))}",
        "data.goat.n=64" if data.goat is not None else sample[data.format],
        "data.max_seq_len=512",
        "train.max_steps=3",
        "train.grad_accum=2",
        f"output.dir={tmp_path / 'run'}",
    ]
    result = run(load_recipe(f"recipes/{name}", overrides), echo=lambda _: None)
    run_dir = result.path
    recipe = load_recipe(run_dir / "recipe.yaml")  # the run folder alone says how to reload
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tokens_seen"] > 0 and summary["trainable_params"] > 0

    reloaded = reload_artifact(run_dir, recipe)
    trained = result.model
    trained.eval(), reloaded.eval()
    prompt = torch.tensor([[1] + list(range(20, 60))])
    with torch.no_grad():
        expected, actual = trained(input_ids=prompt).logits, reloaded(input_ids=prompt).logits
    # SFTTrainer keeps a quantized model's adapter in bf16; peft reloads it in fp32.
    tolerance = 5e-2 if recipe.quant else 1e-5
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)

    with torch.no_grad():
        generated = reloaded.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False, use_cache=True
        )
    assert generated.shape[1] > prompt.shape[1]
