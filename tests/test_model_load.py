"""Model folders: the shipped tiny LLaMA, and folders that cannot be loaded safely."""

from __future__ import annotations

import json
import shutil

import pytest

from finetune.errors import InputError
from finetune.model.load import load_model, load_tokenizer
from finetune.recipe.schema import ModelSpec

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
