"""finetune plan: predicted weights, gradients and optimizer state equal torch's tensors; verdicts and hints."""

from __future__ import annotations

import subprocess
import sys

import pytest

from finetune.cli import main
from finetune.model.shape import LLAMA1_SHAPES, read_shape
from finetune.recipe.load import load_recipe
from finetune.train.plan import GiB, largest_micro_batch, parse_size, plan_memory

from conftest import REPO

CPU_FP32 = ["model.dtype=float32", "train.precision=fp32"]


def measured(recipe):
    import torch

    from finetune.model.adapters import wrap_adapter
    from finetune.model.load import load_model
    from finetune.train.memory import measure_training_step

    torch.manual_seed(0)
    model = load_model(recipe.model, recipe.quant, device="cpu")
    model = wrap_adapter(
        model, recipe.adapter, gradient_checkpointing=False, tokenizer_source=recipe.model.name_or_path
    )
    ids = torch.randint(3, 500, (2, 32))
    return measure_training_step(model, recipe.train.optimizer, ids, full_finetune=recipe.adapter.kind == "none")


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["adapter={kind: none}"],
        ["quant.bits=4"],
        ["quant.bits=4", "quant.double_quant=false", "adapter.target_modules=[q_proj, v_proj]"],
        ["quant.bits=8"],
        ["train.optimizer=adamw_8bit"],
        ["adapter={kind: ia3}"],
        ["adapter={kind: ia3, target_modules: [q_proj, up_proj, down_proj], feedforward_modules: [up_proj]}"],
    ],
    ids=["lora", "full", "qlora-nf4-double-quant", "qlora-nf4-qv", "lora-int8", "lora-adamw-8bit", "ia3", "ia3-ff-up"],
)
def test_planned_states_match_torch_tensors(write_recipe, tiny_model_dir, overrides):
    recipe = load_recipe(write_recipe(), [*CPU_FP32, *overrides])
    plan = plan_memory(recipe, read_shape(str(tiny_model_dir)))
    real = measured(recipe)
    assert plan.states == pytest.approx(real.total, rel=0.01)
    for part, value in [
        ("base weights", real.base_weights),
        ("adapter weights", real.adapter_weights),
        ("gradients", real.gradients),
        ("optimizer state", real.optimizer_state),
    ]:
        assert plan.part(part) == pytest.approx(value, rel=0.01, abs=1024), part


def test_llama_7b_shape_has_llama_7b_parameter_count(write_recipe):
    recipe = load_recipe(write_recipe(), ["model.dtype=bfloat16", "adapter={kind: none}"])
    plan = plan_memory(recipe, LLAMA1_SHAPES["7B"])
    assert plan.part("base weights") == 2 * 6_738_415_616  # the released LLaMA-7B's parameters, 2 bytes each


def test_fsdp_shards_states_but_not_activations(write_recipe):
    recipe = load_recipe(write_recipe(), ["model.dtype=bfloat16"])
    one, four = (plan_memory(recipe, LLAMA1_SHAPES["13B"], world_size=n) for n in (1, 4))
    assert four.part("base weights") == one.part("base weights") // 4
    assert four.part("optimizer state") == one.part("optimizer state") // 4
    assert four.part("activations") == one.part("activations") and four.part("FSDP gathered layers") > 0


def test_activations_follow_checkpointing_attention_and_batch(write_recipe):
    shape = LLAMA1_SHAPES["7B"]
    plan = lambda *o: plan_memory(load_recipe(write_recipe(), list(o)), shape)  # noqa: E731
    sdpa = plan("train.gradient_checkpointing=false").part("activations")
    assert plan("train.gradient_checkpointing=false", "model.attn_implementation=eager").part("activations") > sdpa
    assert plan("train.gradient_checkpointing=true").part("activations") < sdpa / 5
    double = plan("train.gradient_checkpointing=false", "train.micro_batch_size=8").part("activations")
    assert double == 2 * sdpa


def test_qlora_65b_fits_48gib_at_micro_batch_1():
    recipe = load_recipe(REPO / "recipes" / "alpaca_qlora.yaml", ["train.micro_batch_size=1"])
    assert plan_memory(recipe, LLAMA1_SHAPES["65B"], gpu_memory=48 * GiB).fits
    assert largest_micro_batch(recipe, LLAMA1_SHAPES["65B"], world_size=1, gpu_memory=48 * GiB) == 1
    assert not plan_memory(recipe, LLAMA1_SHAPES["65B"], gpu_memory=48 * GiB, micro_batch_size=4).fits


def test_plan_command_says_what_to_change(write_recipe, capsys):
    recipe = write_recipe()
    assert main(["plan", str(recipe), "--model-params", "7B", "--gpu-memory", "16GiB"]) == 0
    out = capsys.readouterr().out
    assert "does not fit in 16.0 GiB" in out
    assert "train.gradient_checkpointing=true" in out and "quant.bits=4" in out
    assert main(["plan", str(recipe), "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory: not a memory size: 'lots'" in capsys.readouterr().err


def test_parse_size_units():
    assert parse_size("24GiB") == 24 * GiB == parse_size("24g")
    assert parse_size("80GB") == 80 * 10**9


def test_plan_imports_no_torch():
    code = (
        "import sys; from finetune.cli import main; "
        "main(['plan', 'recipes/alpaca_qlora.yaml', '--model-params', '65B', '--gpu-memory', '48GiB', "
        "'train.micro_batch_size=1']); assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "fits in 48.0 GiB" in done.stdout
