"""Padding with EOS is safe: labels come from each sample's completion mask, never from pad ids."""

from __future__ import annotations

import json
import shutil

import pytest

from finetune.data.build import build_datasets
from finetune.model.load import ensure_pad_token, load_model, load_tokenizer
from finetune.recipe.load import load_recipe
from finetune.train.run_dir import RunDir
from finetune.train.trainer import build_trainer


def qwen_base_folder(family_model_dir, tmp_path):
    """The tiny Qwen2 with the tokenizer Qwen2.5's base models ship: EOS and pad are both <|endoftext|>."""
    folder = tmp_path / "qwen2-base"
    shutil.copytree(family_model_dir("qwen2"), folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return folder


def test_every_sample_ends_with_a_trained_eos_when_pad_is_eos(family_model_dir, write_recipe, tmp_path):
    folder = qwen_base_folder(family_model_dir, tmp_path)
    data = {"max_rows": 12, "eval_fraction": 0.0, "packing": "none", "overlong": "drop"}
    recipe = load_recipe(write_recipe(model={"name_or_path": str(folder)}, data=data))
    tokenizer = load_tokenizer(recipe.model)
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    data = build_datasets(recipe.data, tokenizer, seed=0)
    model = load_model(recipe.model, None, device="cpu", tokenizer=tokenizer)
    trainer = build_trainer(model, tokenizer, data.train, [], recipe, RunDir(tmp_path / "run"), device="cpu")
    ends = {tuple(s.input_ids): len(s.input_ids) - 1 for s in data.train}
    checked = padded_eos_inputs = 0
    for batch in trainer.get_train_dataloader():
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
            length = int(mask.sum())
            end = ends[tuple(ids[:length].tolist())]
            assert end == length - 1 and ids[end] == eos and labels[end] == eos  # the sample's EOS is trained
            assert (labels[length:] == -100).all()  # padding is not
            padded_eos_inputs += int((ids[length:] == eos).sum())
            checked += 1
            # What masking labels by pad id (a common collator shortcut) would do here: no EOS left to learn.
            assert eos not in labels.masked_fill(ids == tokenizer.pad_token_id, -100)
    assert checked == len(data.train) and padded_eos_inputs > 0  # rows of unequal length were padded with EOS


def test_a_tokenizer_with_no_pad_unk_or_reserved_token_pads_with_eos():
    from transformers import PreTrainedTokenizerFast

    from finetune.model.tiny_tokenizers import LLAMA3_SPLIT, train_byte_level_bpe

    backend = train_byte_level_bpe(["one two three four", "five six seven"] * 4, 300, LLAMA3_SPLIT)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    size = len(tokenizer)
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "</s>" and len(tokenizer) == size


def test_a_tokenizer_larger_than_the_embeddings_is_refused(tiny_model_dir, tmp_path):
    from finetune.errors import InputError
    from finetune.recipe.schema import ModelSpec

    spec = ModelSpec(name_or_path=str(tiny_model_dir))
    tokenizer = load_tokenizer(spec)
    tokenizer.add_tokens(["<new_token>"])
    with pytest.raises(InputError, match=r"^model.name_or_path: the tokenizer has 513 tokens but .* has 512 embedding"):
        load_model(spec, None, device="cpu", tokenizer=tokenizer)
