"""Packed and padding-free batches: every sample's loss equals its loss when run alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finetune.data.build import build_datasets
from finetune.model.load import load_model, load_tokenizer
from finetune.recipe.load import load_recipe
from finetune.run_folder import RunDir
from finetune.train.trainer import build_trainer


def token_losses(model, input_ids, labels, position_ids=None) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=input_ids, position_ids=position_ids).logits
    return F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="none")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("packing", ["padding_free", "bfd"])
def test_each_packed_sample_has_its_solo_loss(packing, attention, write_recipe, tmp_path):
    recipe = load_recipe(
        write_recipe(model={"attn_implementation": attention}, data={"packing": packing, "max_seq_len": 256})
    )
    tokenizer = load_tokenizer(recipe.model)
    data = build_datasets(recipe.data, tokenizer, seed=0)
    model = load_model(recipe.model, None, device="cpu", tokenizer=tokenizer).eval()
    trainer = build_trainer(model, tokenizer, data.train, [], recipe, RunDir(tmp_path / "run"), device="cpu")
    batch = next(iter(trainer.get_train_dataloader()))

    input_ids, labels, position_ids = batch["input_ids"][:1], batch["labels"][:1], batch["position_ids"][:1]
    assert "attention_mask" not in batch  # no padding mask: samples are told apart by position ids only
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    assert len(starts) > 1, "the row should hold several samples"
    packed = token_losses(model, input_ids, labels, position_ids)
    bounds = [*starts, input_ids.shape[1]]
    for start, end in zip(bounds[:-1], bounds[1:], strict=False):
        solo_ids, solo_labels = input_ids[:, start:end], labels[:, start:end]
        solo = token_losses(model, solo_ids, solo_labels)
        # packed[t] predicts token t+1; within this sample that is positions start .. end-2
        torch.testing.assert_close(packed[start : end - 1], solo, rtol=1e-4, atol=1e-4)
