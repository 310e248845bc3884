"""Shared fixtures: tiny models of each family with their own tokenizers, built once per session, and recipe
writers."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from finetune.model.tiny import FAMILIES  # noqa: F401 (the tests' list of families; names only, no torch)

REPO = Path(__file__).resolve().parents[1]


def _private_hub_environment() -> None:
    """No test reads or fills the user's hub cache, login, endpoint or offline setting: huggingface_hub
    reads them once, when first imported, so they are set here, before any test imports it. Xet is off
    because the suite's hub server (tests/hub_server.py) speaks LFS only."""
    for name in [name for name in os.environ if name.startswith("HF_") or name == "TRANSFORMERS_OFFLINE"]:
        del os.environ[name]
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="finetune-tests-hf-home-")
    atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
    os.environ |= {"HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


_private_hub_environment()
SAMPLE_DATA = REPO / "data" / "alpaca_sample.json"
# what `finetune export --format adapter` writes for a LoRA run on the tiny LLaMA
ADAPTER_EXPORT = [
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "recipe.yaml",
    "tokenizer.json",
    "tokenizer_config.json",
]


def require(available: bool, missing: str) -> None:
    """Skip a test whose optional tool (llama.cpp, a browser) is missing; under CI=true fail instead, since
    .ci/run installs every one, and a tool that broke there must not pass as a skip."""
    if available:
        return
    if os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail(f"CI=true and {missing}", pytrace=False)
    pytest.skip(missing)


@pytest.fixture(scope="session", autouse=True)
def private_data_cache(tmp_path_factory):
    """Tokenized-data cache in a temporary folder, so tests neither read nor fill the user's cache."""
    import os

    folder = tmp_path_factory.mktemp("data-cache")
    previous = os.environ.get("FINETUNE_CACHE_DIR")
    os.environ["FINETUNE_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["FINETUNE_CACHE_DIR"]
    else:
        os.environ["FINETUNE_CACHE_DIR"] = previous


def _sample_texts() -> list[str]:
    rows = json.loads(SAMPLE_DATA.read_text(encoding="utf-8"))
    return [value for row in rows for value in row.values() if value]


@pytest.fixture(scope="session")
def family_model_dir(tmp_path_factory, tiny_model_dir):
    """family_model_dir(family) -> folder of a tiny random model of `family` (llama, llama3, mistral, qwen2)
    with its own tokenizer kind, built once per session; `llama` is `tiny_model_dir`."""
    from finetune.model.tiny import TinyShape, build_tiny

    built: dict[str, Path] = {"llama": tiny_model_dir}
    shape = TinyShape(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
    )

    def folder(family: str) -> Path:
        if family not in built:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            built[family] = build_tiny(family, out, _sample_texts(), seed=0, shape=shape)
        return built[family]

    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder that `from_pretrained` loads: config, safetensors weights, tokenizer (built from a seed)."""
    from finetune.model.tiny import TinyShape, build_tiny_llama

    shape = TinyShape(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
    )
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), _sample_texts(), seed=0, shape=shape)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from finetune.model.load import load_tokenizer
    from finetune.recipe.schema import ModelSpec

    return load_tokenizer(ModelSpec(name_or_path=str(tiny_model_dir)))


@pytest.fixture
def write_recipe(tmp_path, tiny_model_dir):
    """write_recipe(**sections) -> path of a recipe on the tiny model and the sample data, sections merged in
    (a key given as None is removed; a section given as None is removed)."""

    def write(name: str = "recipe.yaml", **sections) -> Path:
        recipe = {
            "model": {"name_or_path": str(tiny_model_dir)},
            "adapter": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"format": "alpaca", "path": str(SAMPLE_DATA), "max_seq_len": 256},
            "train": {
                "max_steps": 4,
                "micro_batch_size": 4,
                "grad_accum": 1,
                "lr": 1e-3,
                "gradient_checkpointing": False,
                "logging_steps": 1,
                "save_steps": 100,
            },
            "eval": {"samples": 0},  # report and samples cost seconds; their own tests turn them on
            "output": {"dir": str(tmp_path / "run"), "report": False},
        }
        for section, values in sections.items():
            if values is None:
                recipe.pop(section, None)
            elif section == "adapter" and values.get("kind", "lora") != "lora":
                recipe[section] = values  # LoRA's keys do not apply to other kinds
            else:  # a key given as None is removed
                merged = {**recipe.get(section, {}), **values}
                recipe[section] = {key: value for key, value in merged.items() if value is not None}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        return path

    return write


def write_rows(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """tiny_run(name, **sections) -> a finished run folder of 2 steps on the tiny LLaMA, trained once per
    session for each name (sections as for write_recipe: merged into the defaults, a key given as None
    removed, the adapter replaced)."""
    from finetune.pipeline import run
    from finetune.recipe.load import load_recipe

    done: dict[str, Path] = {}

    def train(name: str, **sections) -> Path:
        if name in done:
            return done[name]
        folder = tmp_path_factory.mktemp(f"run-{name}")
        recipe = {
            "model": {"name_or_path": str(tiny_model_dir)},
            "adapter": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"format": "alpaca", "path": str(SAMPLE_DATA), "max_seq_len": 128, "max_rows": 16},
            "train": {
                "max_steps": 2,
                "micro_batch_size": 4,
                "grad_accum": 1,
                "lr": 1e-2,
                "logging_steps": 1,
                "gradient_checkpointing": False,
            },
            "eval": {"samples": 0},
            "output": {"dir": str(folder / "run"), "report": False},
        }
        for section, values in sections.items():
            replace = section == "adapter" and values.get("kind", "lora") != "lora"
            merged = values if replace else {**recipe.get(section, {}), **values}
            recipe[section] = {key: value for key, value in merged.items() if value is not None}
        path = folder / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        done[name] = run(load_recipe(path), echo=lambda _: None).path
        return done[name]

    return train


@pytest.fixture(scope="session")
def bf16_model_dir(tmp_path_factory, family_model_dir):
    """bf16_model_dir(family) -> `family_model_dir(family)` stored in bfloat16, as released checkpoints are.
    Qwen2's q/k/v biases (zero at init) are drawn at random first, so that a bias lost on the way shows."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    built: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if family not in built:
            source, out = family_model_dir(family), tmp_path_factory.mktemp(f"bf16-{family}")
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
            generator = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                        param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            model.to(torch.bfloat16).save_pretrained(out)
            for path in source.iterdir():
                if path.is_file() and not path.name.startswith(("model", "config")):
                    shutil.copy(path, out / path.name)  # tokenizer files, generation config
            built[family] = out
        return built[family]

    return folder


@pytest.fixture(scope="session")
def family_lora_run(tmp_path_factory, bf16_model_dir):
    """family_lora_run(family, **adapter) -> a finished LoRA run (3 steps at a high learning rate, every linear
    layer) on `bf16_model_dir(family)`, trained once per session for each family and adapter settings."""
    from finetune.pipeline import run
    from finetune.recipe.load import load_recipe

    done: dict[str, Path] = {}

    def train(family: str, **adapter) -> Path:
        key = f"{family}-{'-'.join(f'{k}={v}' for k, v in sorted(adapter.items()))}"
        if key not in done:
            folder = tmp_path_factory.mktemp(f"lora-{family}")
            recipe = {
                "model": {"name_or_path": str(bf16_model_dir(family))},
                "adapter": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0, **adapter},
                "data": {"format": "alpaca", "path": str(SAMPLE_DATA), "max_seq_len": 128, "max_rows": 16},
                "train": {
                    "max_steps": 3,
                    "micro_batch_size": 4,
                    "grad_accum": 1,
                    "lr": 2e-2,
                    "gradient_checkpointing": False,
                },
                "eval": {"samples": 0},
                "output": {"dir": str(folder / "run"), "report": False},
            }
            (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
            done[key] = run(load_recipe(folder / "recipe.yaml"), echo=lambda _: None).path
        return done[key]

    return train
