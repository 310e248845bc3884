"""finetune plan: predicted weights, gradients and optimizer state equal torch's tensors; verdicts and hints."""

from __future__ import annotations

import subprocess
import sys

import pytest

from finetune.cli import main
from finetune.model.shape import KNOWN_SHAPES, LLAMA1_SHAPES, read_shape, shape_from_config
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


# Parameter totals the model cards publish (safetensors metadata of the released weights).
PUBLISHED_PARAMETERS = {
    "Llama-3.1-8B": 8_030_261_248,
    "Llama-3.1-70B": 70_553_706_496,
    "Llama-3.2-1B": 1_235_814_400,
    "Llama-3.2-3B": 3_212_749_824,
    "Mistral-7B": 7_241_732_096,
    "Qwen2.5-7B": 7_615_616_512,
}


@pytest.mark.parametrize("name", PUBLISHED_PARAMETERS)
def test_known_shapes_have_the_published_parameter_totals(name, write_recipe):
    assert KNOWN_SHAPES[name].parameters == PUBLISHED_PARAMETERS[name]
    recipe = load_recipe(write_recipe(), ["model.dtype=bfloat16", "adapter={kind: none}"])
    assert plan_memory(recipe, KNOWN_SHAPES[name]).part("base weights") == 2 * PUBLISHED_PARAMETERS[name]


def test_published_config_files_read_as_the_known_shapes():
    llama31_8b = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "rope_theta": 500000.0, "max_position_embeddings": 131072, "eos_token_id": 128001,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    }  # fmt: skip
    qwen25_7b = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "vocab_size": 152064, "tie_word_embeddings": False, "rope_theta": 1000000.0, "sliding_window": 131072,
        "use_sliding_window": False, "max_window_layers": 28,
    }  # fmt: skip
    mistral_7b = {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 32000, "sliding_window": 4096, "tie_word_embeddings": False, "rope_theta": 10000.0,
    }  # fmt: skip
    assert shape_from_config(llama31_8b, "Llama-3.1-8B") == KNOWN_SHAPES["Llama-3.1-8B"]
    assert shape_from_config(qwen25_7b, "Qwen2.5-7B") == KNOWN_SHAPES["Qwen2.5-7B"]
    assert shape_from_config(mistral_7b, "Mistral-7B") == KNOWN_SHAPES["Mistral-7B"]


@pytest.mark.parametrize("family", ["llama", "llama3", "mistral", "qwen2"])
def test_each_family_config_gives_its_models_parameter_count(family, family_model_dir):
    import dataclasses

    from transformers import AutoModelForCausalLM

    shape = read_shape(str(family_model_dir(family)))
    model = AutoModelForCausalLM.from_pretrained(family_model_dir(family))
    assert shape.parameters == sum(p.numel() for p in model.parameters())  # a tied matrix is one parameter
    if family == "qwen2":  # what the q/k/v biases and the tie are worth: miss either and the count is off
        assert dataclasses.replace(shape, qkv_bias=False).parameters != shape.parameters
        assert dataclasses.replace(shape, tied_embeddings=False).parameters != shape.parameters


@pytest.mark.parametrize("overrides", [[], ["adapter={kind: none}"]], ids=["lora", "full"])
def test_planned_states_match_torch_tensors_on_qwen2(family_model_dir, write_recipe, overrides):
    folder = str(family_model_dir("qwen2"))
    recipe = load_recipe(write_recipe(model={"name_or_path": folder}), [*CPU_FP32, *overrides])
    plan = plan_memory(recipe, read_shape(folder))
    real = measured(recipe)
    for part, value in [("base weights", real.base_weights), ("gradients", real.gradients)]:
        assert plan.part(part) == pytest.approx(value, rel=0.001, abs=64), part


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
    """The QLoRA paper's claim, with whole logits; the chunked loss's tiles leave room for a second sample."""
    path = REPO / "recipes" / "alpaca_qlora.yaml"
    recipe = load_recipe(path, ["train.micro_batch_size=1"])
    whole = load_recipe(path, ["train.micro_batch_size=1", "train.loss_chunk_mib=null"])
    for plan_recipe, largest in ((whole, 1), (recipe, 2)):
        assert plan_memory(plan_recipe, LLAMA1_SHAPES["65B"], gpu_memory=48 * GiB).fits
        assert largest_micro_batch(plan_recipe, LLAMA1_SHAPES["65B"], world_size=1, gpu_memory=48 * GiB) == largest
        assert not plan_memory(plan_recipe, LLAMA1_SHAPES["65B"], gpu_memory=48 * GiB, micro_batch_size=4).fits
    tiles = plan_memory(recipe, LLAMA1_SHAPES["65B"]).parts
    logits = {part.name: part.bytes for part in tiles}["logits"]
    # one tile of the sample's tokens x 8,192 entries: its bf16 matmul output, float32 logits and exponentials
    assert logits == recipe.data.max_seq_len * 8192 * (2 + 4 + 4)


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


def test_plan_command_knows_todays_bases(capsys):
    recipe = str(REPO / "recipes" / "alpaca_qlora.yaml")
    assert main(["plan", recipe, "--model-params", "Llama-3.1-8B", "--gpu-memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "Llama-3.1-8B shape" in out and "128,256 vocab" in out
