"""Training for real on the tiny LLaMA: what trains, what stays frozen, and that the adapter reloads."""

from __future__ import annotations

import pytest
import torch

from finetune.data.build import build_datasets
from finetune.model.adapters import count_parameters, wrap_adapter
from finetune.model.load import load_model, load_tokenizer
from finetune.pipeline import save_adapter
from finetune.recipe.load import load_recipe
from finetune.train.run_dir import RunDir
from finetune.train.trainer import build_trainer

VARIANTS = {
    "lora": {},
    "rslora": {"adapter": {"use_rslora": True}},
    "dora": {"adapter": {"use_dora": True}},
    "qlora-nf4": {"quant": {"bits": 4, "type": "nf4", "double_quant": True}},
    "int8-lora": {"quant": {"bits": 8}},
}


def frozen_and_trainable(model) -> tuple[dict, dict]:
    frozen, trainable = {}, {}
    for name, param in model.named_parameters():
        (trainable if param.requires_grad else frozen)[name] = param.detach().clone()
    return frozen, trainable


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_training_changes_every_adapter_weight_and_no_base_weight(variant, write_recipe, tmp_path):
    recipe = load_recipe(write_recipe(**VARIANTS[variant], train={"max_steps": 3, "lr": 1e-2}))
    tokenizer = load_tokenizer(recipe.model)
    data = build_datasets(recipe.data, tokenizer, seed=0)
    model = load_model(recipe.model, recipe.quant, device="cpu", tokenizer=tokenizer)
    model = wrap_adapter(model, recipe.adapter, gradient_checkpointing=False)
    frozen_before, trainable_before = frozen_and_trainable(model)
    assert trainable_before and all("lora_" in name for name in trainable_before)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total

    run = RunDir(tmp_path / "run")
    run.create()
    trainer = build_trainer(model, tokenizer, data.train, [], recipe, run, device="cpu")
    trainer.train()

    frozen_after, trainable_after = frozen_and_trainable(model)
    unchanged = [n for n in trainable_before if torch.equal(trainable_before[n], trainable_after[n])]
    changed_frozen = [n for n in frozen_before if not torch.equal(frozen_before[n], frozen_after[n])]
    assert not unchanged, f"adapter weights that did not train: {unchanged}"
    assert not changed_frozen, f"frozen weights that changed: {changed_frozen}"

    # The saved adapter, loaded by plain peft on a freshly loaded base, gives the same logits.
    from peft import PeftModel

    save_adapter(model, tokenizer, run.adapter)
    reloaded = PeftModel.from_pretrained(
        load_model(recipe.model, recipe.quant, device="cpu", tokenizer=tokenizer), run.adapter
    )
    saved = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert all(torch.equal(saved[n], p.float()) for n, p in model.named_parameters() if "lora_" in n)
    batch = torch.tensor([data.train[0].input_ids[:48]])
    model.eval(), reloaded.eval()
    with torch.no_grad():
        trained_logits = model(input_ids=batch).logits
        reloaded_logits = reloaded(input_ids=batch).logits
        with reloaded.disable_adapter():
            base_logits = reloaded(input_ids=batch).logits
    # SFTTrainer keeps a quantized model's adapter in bf16 (QLoRA's recipe); peft reloads it in fp32, so
    # the same weights give logits equal only to bf16 precision.
    tolerance = 5e-2 if recipe.quant else 1e-4
    torch.testing.assert_close(reloaded_logits, trained_logits, rtol=tolerance, atol=tolerance)
    assert not torch.allclose(base_logits, trained_logits, atol=1e-3)
