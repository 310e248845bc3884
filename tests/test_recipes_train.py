"""Every shipped recipe trains a few steps on the tiny model of its family (via overrides), and its run folder's
adapter or model reloads with plain peft/transformers and gives the logits of the end of training, to within a
small share of how far training moved them (a reload that lost or scaled the update fails: see the last test)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from finetune.model.load import load_model, load_tokenizer
from finetune.pipeline import run
from finetune.recipe.load import load_recipe

from conftest import REPO, SAMPLE_DATA

# Every recipe for a real model (the quickstart has its own test), shrunk by overrides to the tiny model of
# its family: the file name starts with the family of its base.
RECIPES = sorted(p.name for p in (REPO / "recipes").glob("*.yaml") if p.name != "quickstart.yaml")
FAMILY_OF_PREFIX = {"llama3_": "llama3", "qwen2.5_": "qwen2", "mistral_": "mistral"}
PROMPT = torch.tensor([[1] + list(range(20, 60))])
# largest |reloaded - trained| logit error, as a share of how far training moved the logits (quantized or not)
RELOAD_SHARE = {False: 1e-3, True: 1e-2}


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


def untrained_logits(reloaded, recipe) -> torch.Tensor:
    """What the model gave before training: the adapter switched off, or the base a full run started from."""
    with torch.no_grad():
        if recipe.adapter.kind == "none":
            return AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path)(input_ids=PROMPT).logits
        with reloaded.disable_adapter():
            return reloaded(input_ids=PROMPT).logits


def assert_reproduces_training(actual, expected, untrained, recipe) -> None:
    """The reloaded artifact gives the trained logits, to well within what training changed in them.

    An absolute tolerance alone says nothing when training moved the logits by less than it; so the error is
    held against the update's own effect too: a reload that lost the update, or scaled it, is off by about
    all of it.
    """
    expected, actual = expected[:, -untrained.shape[1] :], actual[:, -untrained.shape[1] :]  # past prompt tuning's
    effect = (expected - untrained).abs().max().item()
    error = (actual - expected).abs().max().item()
    assert effect > 0, "training did not change the logits: there is nothing to check the reload against"
    assert error <= RELOAD_SHARE[recipe.quant is not None] * effect, (error, effect)
    if recipe.quant is None:  # the same float32 weights, the same sums
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def train_shrunk(name: str, model_dir, out):
    """A shipped recipe trained 3 steps on a tiny model (`model_dir`) into `out`: the run's result."""
    data = load_recipe(f"recipes/{name}").data
    sample = {"alpaca": f"data.path={SAMPLE_DATA}", "lima": f"data.path={REPO / 'data' / 'lima_sample.jsonl'}"}
    overrides = [
        f"model.name_or_path={model_dir}",
        "data.goat.n=64" if data.goat is not None else sample[data.format],
        "data.max_seq_len=512",
        "train.max_steps=3",
        "train.grad_accum=2",
        f"output.dir={out}",
    ]
    return run(load_recipe(f"recipes/{name}", overrides), echo=lambda _: None)


@pytest.fixture(scope="module")
def shrunk_runs(family_model_dir, tmp_path_factory):
    """shrunk_runs(name) -> `train_shrunk` of a shipped recipe on the tiny model of its family, trained once per
    module (the QLoRA recipe serves its own test and the two that break a copy of its adapter)."""
    done = {}

    def result(name: str):
        if name not in done:
            out = tmp_path_factory.mktemp(f"shrunk-{name.removesuffix('.yaml')}") / "run"
            with pytest.MonkeyPatch.context() as patch:
                patch.chdir(REPO)
                done[name] = train_shrunk(name, family_model_dir(family_of(name)), out)
        return done[name]

    return result


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipe_trains_and_its_artifact_reloads(name, shrunk_runs, monkeypatch):
    monkeypatch.chdir(REPO)
    result = shrunk_runs(name)
    run_dir = result.path
    recipe = load_recipe(run_dir / "recipe.yaml")  # the run folder alone says how to reload
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["tokens_seen"] > 0 and summary["trainable_params"] > 0

    reloaded = reload_artifact(run_dir, recipe)
    trained = result.model
    trained.eval(), reloaded.eval()
    with torch.no_grad():
        expected, actual = trained(input_ids=PROMPT).logits, reloaded(input_ids=PROMPT).logits
    assert_reproduces_training(actual, expected, untrained_logits(reloaded, recipe), recipe)

    greedy = {"attention_mask": torch.ones_like(PROMPT), "max_new_tokens": 5, "do_sample": False, "use_cache": True}
    with torch.no_grad():
        generated = reloaded.generate(input_ids=PROMPT, **greedy)
        assert generated.tolist() == trained.generate(input_ids=PROMPT, **greedy).tolist()


@pytest.mark.parametrize("factor", [0.0, 2.0], ids=["update dropped", "update doubled"])
def test_a_reloaded_qlora_adapter_with_a_wrong_update_fails_the_reload_check(
    factor, shrunk_runs, tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)
    result = shrunk_runs("alpaca_qlora.yaml")
    broken = shutil.copytree(result.path, tmp_path / "run")  # the shared run stays intact
    weights = broken / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({name: t * factor if "lora_B" in name else t for name, t in tensors.items()}, weights)
    recipe = load_recipe(broken / "recipe.yaml")
    reloaded = reload_artifact(broken, recipe).eval()
    trained = result.model.eval()
    with torch.no_grad():
        expected, actual = trained(input_ids=PROMPT).logits, reloaded(input_ids=PROMPT).logits
    untrained = untrained_logits(reloaded, recipe)
    with pytest.raises(AssertionError):
        assert_reproduces_training(actual, expected, untrained, recipe)
    if factor == 0:  # the absolute tolerance this check replaced takes the untrained model for the trained one
        torch.testing.assert_close(actual, expected, rtol=5e-2, atol=5e-2)
