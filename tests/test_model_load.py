"""Model folders: the shipped tiny LLaMA, folders that cannot be loaded safely, and the pad token (from the
vocabulary; EOS is safe because labels come from each sample's completion mask, never from pad ids)."""

from __future__ import annotations

import json
import shutil

import pytest

from finetune.data.build import build_datasets
from finetune.errors import InputError
from finetune.model.load import ensure_pad_token, load_model, load_tokenizer
from finetune.recipe.load import load_recipe
from finetune.recipe.schema import ModelSpec
from finetune.run_folder import RunDir
from finetune.train.trainer import build_trainer

from conftest import REPO

SHIPPED = REPO / "data" / "tiny-llama"


def test_shipped_tiny_llama_loads_with_a_llama_style_tokenizer():
    spec = ModelSpec(name_or_path=str(SHIPPED))
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, None, device="cpu", tokenizer=tokenizer)
    config = model.config
    assert config.model_type == "llama" and config.vocab_size == len(tokenizer)
    assert config.hidden_size % 64 == 0 and config.intermediate_size % 64 == 0  # bitsandbytes 4-bit on CPU
    ids = tokenizer("Pay 1234 € now").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Pay 1234 € now"  # byte fallback: nothing lost
    pieces = tokenizer.tokenize("in 2026, 1234 items")
    assert not [p for p in pieces if sum(c.isdigit() for c in p) > 1]  # digits are split, as in LLaMA
    assert (SHIPPED / "tokenizer.model").is_file() and (SHIPPED / "model.safetensors").is_file()


def test_pickled_weights_are_refused_unless_allowed(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="has only pickled weights .*pytorch_model.bin.*allow_pickle_weights: true"):
        load_model(ModelSpec(name_or_path=str(folder)), None, device="cpu")


def test_folder_without_config_or_weights_is_a_clear_error(tiny_model_dir, tmp_path):
    no_config = tmp_path / "no_config"
    shutil.copytree(tiny_model_dir, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(InputError, match=r"has no config.json"):
        load_model(ModelSpec(name_or_path=str(no_config)), None, device="cpu")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_model_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(InputError, match=r"has no weights \(\*.safetensors\)"):
        load_model(ModelSpec(name_or_path=str(no_weights)), None, device="cpu")


def test_folder_without_tokenizer_is_a_clear_error(tiny_model_dir, tmp_path):
    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")
    with pytest.raises(InputError, match=r"^model.name_or_path: cannot load a tokenizer from"):
        load_tokenizer(ModelSpec(name_or_path=str(folder)))


def test_adapter_records_an_absolute_base_path(tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    model = load_model(ModelSpec(name_or_path=f"./{tiny_model_dir.name}"), None, device="cpu")
    assert model.config.name_or_path == str(tiny_model_dir)
    assert json.loads((tiny_model_dir / "config.json").read_text())["model_type"] == "llama"


def test_4bit_on_cpu_refuses_sizes_its_kernel_cannot_run(tiny_model_dir, tmp_path):
    from finetune.recipe.schema import QuantSpec

    folder = tmp_path / "odd"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    with pytest.raises(InputError, match=r"^quant.bits: 4-bit weights on CPU need .* has intermediate_size=96"):
        load_model(ModelSpec(name_or_path=str(folder)), QuantSpec(bits=4), device="cpu")


def test_an_unreachable_hub_id_is_a_clear_error_not_a_traceback(write_recipe, tmp_path):
    import os
    import subprocess
    import sys

    recipe = write_recipe(model={"name_or_path": "no-such-org/no-such-model"})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # no network here either way; offline makes it fail at once
    done = subprocess.run(
        [sys.executable, "-m", "finetune", "run", str(recipe)], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert done.returncode == 2
    assert done.stderr == (
        "error: model.name_or_path: no-such-org/no-such-model: offline (HF_HUB_OFFLINE=1), and not in the local "
        "cache; run once online or give a local folder\n"
    )
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_tiny_model_command_builds_the_shape_asked_for(tmp_path, capsys):
    from finetune.cli import main

    out = tmp_path / "tiny"
    args = ["tiny-model", str(out), "--corpus", str(REPO / "data" / "alpaca_sample.json"), "--layers", "3"]
    assert main([*args, "--hidden-size", "64", "--intermediate-size", "192", "--init-std", "0.02"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (3, 64, 192)
    assert config["initializer_range"] == 0.02
    model = load_model(
        ModelSpec(name_or_path=str(out)), None, device="cpu", tokenizer=load_tokenizer(ModelSpec(name_or_path=str(out)))
    )
    assert model.config.vocab_size == config["vocab_size"]


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
    unpacked_whole_rows = {"max_rows": 12, "eval_fraction": 0.0, "packing": "none", "overlong": "drop"}
    recipe = load_recipe(write_recipe(model={"name_or_path": str(folder)}, data=unpacked_whole_rows))
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


def test_a_tokenizer_larger_than_the_embeddings_is_refused(tiny_model_dir):
    spec = ModelSpec(name_or_path=str(tiny_model_dir))
    tokenizer = load_tokenizer(spec)
    tokenizer.add_tokens(["<new_token>"])
    with pytest.raises(InputError, match=r"^model.name_or_path: the tokenizer has 513 tokens but .* has 512 embedding"):
        load_model(spec, None, device="cpu", tokenizer=tokenizer)
