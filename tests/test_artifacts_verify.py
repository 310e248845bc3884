"""The merge check compares its error with the adapter's own effect: a right merge passes far below it, and
merges that dropped the update or scaled it wrongly fail, in float32 and in bfloat16."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.artifacts.merge import merge_run
from finetune.artifacts.verify import RELATIVE_TOLERANCE, check_merged, sample_ids
from finetune.errors import FinetuneError
from finetune.recipe.load import load_recipe

pytestmark = pytest.mark.slow

PROMPT = torch.tensor([[1, *range(20, 80)]])


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    """A LoRA run whose adapter moves the logits by less than bfloat16 rounding of the largest logit."""
    return tiny_run("small-update", train={"lr": 2e-4, "max_steps": 2})


def logits(model, ids=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def adapter_and_base_logits(run_dir, dtype=torch.float32, samples=None) -> tuple:
    """With plain transformers and peft, independent of the code under test: on PROMPT, or a list per sample."""
    base_path = load_recipe(run_dir / "recipe.yaml").model.name_or_path
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype), run_dir / "adapter")
    model.eval()
    if samples is None:
        with model.disable_adapter():
            base = logits(model)
        return logits(model), base
    with model.disable_adapter():
        base = [logits(model, torch.tensor([ids])) for ids in samples]
    return [logits(model, torch.tensor([ids])) for ids in samples], base


def check(merged, run_dir, dtype_name: str):
    return check_merged(merged, run_dir / "adapter", load_recipe(run_dir / "recipe.yaml"), dtype_name, "cpu", print)


def merge_scaled_update(run_dir, tmp_path, factor: float, dtype_name: str = "float32"):
    """The run's adapter with every LoRA B multiplied by `factor`, merged unchecked: a merge that got the update's
    scale wrong (0: dropped it)."""
    broken = tmp_path / "broken-run"
    shutil.copytree(run_dir, broken)
    weights = broken / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    scaled = [name for name in tensors if "lora_B" in name]
    assert scaled
    save_file({name: t * factor if name in scaled else t for name, t in tensors.items()}, weights)
    return merge_run(broken, out=tmp_path / "merged", dtype=dtype_name, verify=False, echo=print).path


def test_a_right_merge_passes_with_its_error_far_below_the_adapters_effect(run_dir, tmp_path):
    result = merge_run(run_dir, out=tmp_path / "merged", dtype="float32", echo=print)
    adapter, base = adapter_and_base_logits(run_dir)
    effect = (adapter - base).abs().max().item()
    merged = logits(AutoModelForCausalLM.from_pretrained(result.path))
    assert result.max_diff <= result.tolerance < 0.2 * effect
    assert (merged - adapter).abs().max().item() < 1e-3 * effect  # on a prompt the check never saw


@pytest.mark.parametrize("factor", [0.0, 0.5, 2.0], ids=["dropped", "halved", "doubled"])
def test_a_merge_with_the_update_dropped_or_wrongly_scaled_fails_the_check(run_dir, tmp_path, factor):
    merged = merge_scaled_update(run_dir, tmp_path, factor)
    with pytest.raises(FinetuneError, match="merge check failed: ") as failed:
        check(merged, run_dir, "float32")
    # off by about |factor - 1| of the adapter's effect (logits are not linear in B, hence the margin)
    share = int(re.search(r"\((\d+)% of how far the adapter moves the base's logits", str(failed.value)).group(1))
    assert 0.7 * abs(factor - 1) <= share / 100 <= 1.3 * abs(factor - 1)


def test_a_bfloat16_merge_that_dropped_the_update_fails_where_rounding_alone_would_allow_it(run_dir, tmp_path):
    recipe = load_recipe(run_dir / "recipe.yaml")
    samples = sample_ids(recipe, AutoTokenizer.from_pretrained(run_dir / "adapter"), print)  # what the check reads
    adapter, base = adapter_and_base_logits(run_dir, torch.bfloat16, samples)
    effect = max((a - b).abs().max().item() for a, b in zip(adapter, base, strict=True))
    scale = max(a.abs().max().item() for a in adapter)
    # the dtype's rounding tolerance alone is larger than the whole update: it could not tell a dropped one
    assert 0 < effect < RELATIVE_TOLERANCE["bfloat16"] * max(1.0, scale)
    merged = merge_scaled_update(run_dir, tmp_path, 0.0, "bfloat16")
    with pytest.raises(FinetuneError, match=r"\(100% of how far the adapter moves the base's logits"):
        check(merged, run_dir, "bfloat16")
