"""Every adaptation method trains for real on the tiny LLaMA: exactly the right weights train, the
frozen ones do not move, and the trained model generates with its KV cache."""

from __future__ import annotations

import pytest
import torch

from finetune.data.build import build_datasets
from finetune.model.adapters import count_parameters, wrap_adapter
from finetune.model.load import load_model, load_tokenizer, resolve_source
from finetune.recipe.load import load_recipe
from finetune.run_folder import RunDir
from finetune.train.trainer import build_trainer

METHODS = {
    "lora": {},
    "rslora": {"adapter": {"use_rslora": True}},
    "dora": {"adapter": {"use_dora": True}},
    "qlora-nf4": {"quant": {"bits": 4, "type": "nf4", "double_quant": True}},
    "qlora-fp4": {"quant": {"bits": 4, "type": "fp4", "double_quant": False}},
    "int8-lora": {"quant": {"bits": 8}},
    "prefix": {"adapter": {"kind": "prefix", "num_virtual_tokens": 8}},
    "prefix-projection": {"adapter": {"kind": "prefix", "num_virtual_tokens": 8, "prefix_projection": True}},
    "prefix-4bit": {"adapter": {"kind": "prefix", "num_virtual_tokens": 8}, "quant": {"bits": 4}},
    "prompt-text-init": {"adapter": {"kind": "prompt", "num_virtual_tokens": 8, "init_text": "Answer the request"}},
    "ia3": {"adapter": {"kind": "ia3"}},
    "full": {"adapter": {"kind": "none"}},
}
TRAINABLE_NAME = {"lora": "lora_", "prefix": "prompt_encoder", "prompt": "prompt_encoder", "ia3": "ia3_l"}


def snapshot(model) -> tuple[dict, dict]:
    """(frozen, trainable) weights by name; 4-bit weights are compared dequantized."""
    from bitsandbytes.functional import dequantize_4bit

    frozen, trainable = {}, {}
    for name, param in model.named_parameters():
        if param.__class__.__name__ == "Params4bit":
            value = dequantize_4bit(param.data, param.quant_state).clone()
        else:
            value = param.detach().clone()
        (trainable if param.requires_grad else frozen)[name] = value
    return frozen, trainable


def train_method(overrides: dict, write_recipe, tmp_path):
    recipe = load_recipe(write_recipe(**overrides))
    tokenizer = load_tokenizer(recipe.model)
    data = build_datasets(recipe.data, tokenizer, seed=0)
    model = load_model(recipe.model, recipe.quant, device="cpu", tokenizer=tokenizer)
    model = wrap_adapter(
        model,
        recipe.adapter,
        gradient_checkpointing=recipe.gradient_checkpointing,
        tokenizer_source=resolve_source(recipe.model.name_or_path),
    )
    before = snapshot(model)
    run = RunDir(tmp_path / "run")
    run.create()
    build_trainer(model, tokenizer, data.train, [], recipe, run, device="cpu").train()
    return recipe, model, tokenizer, data, before


@pytest.mark.parametrize("method", METHODS, ids=list(METHODS))
def test_method_trains_exactly_its_weights(method, write_recipe, tmp_path):
    overrides = METHODS[method]
    kind = overrides.get("adapter", {}).get("kind", "lora")
    recipe, model, tokenizer, data, (frozen_before, trainable_before) = train_method(overrides, write_recipe, tmp_path)
    trainable, total = count_parameters(model)
    print(f"{method}: {trainable:,} trainable of {total:,}")
    if kind == "none":
        assert not frozen_before and trainable == total
    else:
        assert all(TRAINABLE_NAME[kind] in name for name in trainable_before)
        assert (trainable, total) == model.get_nb_trainable_parameters()  # peft's own count

    frozen_after, trainable_after = snapshot(model)
    unchanged = [n for n in trainable_before if torch.equal(trainable_before[n], trainable_after[n])]
    moved = [n for n in frozen_before if not torch.equal(frozen_before[n], frozen_after[n])]
    assert not unchanged, f"weights that should train but did not: {unchanged}"
    assert not moved, f"frozen weights that changed: {moved}"

    prompt = torch.tensor([data.train[0].input_ids[:16]])
    model.eval()
    with torch.no_grad():
        generated = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False, use_cache=True
        )
        # the reference: each next token the argmax of a full forward pass, no cache
        expected = prompt
        for _ in range(4):
            next_token = model(input_ids=expected).logits[0, -1].argmax()
            expected = torch.cat([expected, next_token.view(1, 1)], dim=1)
            if next_token.item() == tokenizer.eos_token_id:
                break
    assert generated.tolist() == expected.tolist()
