"""finetune merge --base dequantized: a QLoRA adapter folded into the 4-bit weights it trained against gives
back the quantized model as trained, where the merge into the original 16-bit weights is off by the base's
quantization error; the check holds each merge to its promise and fails one that breaks it."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from finetune.artifacts.merge import merge_run
from finetune.artifacts.verify import check_merged
from finetune.cli import main
from finetune.errors import FinetuneError
from finetune.recipe.load import load_recipe

pytestmark = pytest.mark.slow

PROMPT = torch.tensor([[1, *range(20, 84)]])  # held out: the check scores training samples


@pytest.fixture(scope="module")
def qlora_run(tiny_run):
    return tiny_run("qlora-nf4", quant={"bits": 4, "type": "nf4"}, adapter={"target_modules": "all-linear"})


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPT).logits[0].float()


def largest(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def references(qlora_run) -> dict[str, torch.Tensor]:
    """Logits on PROMPT of the models a QLoRA run is about, built with plain transformers, peft and bitsandbytes:
    the base quantized as the recipe's 4-bit defaults say (NF4, double quantization, float32 compute on CPU),
    with and without the adapter, and the 16-bit base with and without it."""
    base_path = load_recipe(qlora_run / "recipe.yaml").model.name_or_path
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    found = {}
    for name, quantized in (("quantized", {"quantization_config": config, "device_map": {"": "cpu"}}), ("16-bit", {})):
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, **quantized)
        found[f"{name} base"] = logits(base)
        found[name] = logits(PeftModel.from_pretrained(base, qlora_run / "adapter").eval())
    return found


@pytest.fixture(scope="module")
def merges(qlora_run, tmp_path_factory):
    """(folder, printed output) of the run merged each way, through the command line, in float32."""
    out = tmp_path_factory.mktemp("merges")
    done = {}
    for base in ("dequantized", "original"):
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            assert main(["merge", str(qlora_run), "--base", base, "--out", str(out / base)]) == 0
        done[base] = (out / base, printed.getvalue())
    return done


def test_the_dequantized_merge_is_the_quantized_model_as_trained(merges, references):
    quantization_error = largest(references["16-bit base"], references["quantized base"])
    effect = largest(references["quantized"], references["quantized base"])
    assert effect > 0.1 and quantization_error > 0.1  # both models are far enough apart for the ratios to mean much
    errors = {}
    for base, (folder, _) in merges.items():
        config = json.loads((folder / "config.json").read_text())
        assert "quantization_config" not in config and config["dtype"] == "float32"
        merged = logits(AutoModelForCausalLM.from_pretrained(folder))  # plain transformers, no peft or bnb
        errors[base] = {name: largest(merged, references[name]) for name in ("quantized", "16-bit")}
    # the original merge is the adapter on the 16-bit base, off the trained model by the base's quantization error
    assert errors["original"]["16-bit"] < 1e-4 * effect
    assert quantization_error / 4 < errors["original"]["quantized"] < 4 * quantization_error
    # the dequantized merge is the trained model, up to float32 sums, and carries that error against the 16-bit one
    assert errors["dequantized"]["quantized"] < 1e-4 * effect
    assert errors["dequantized"]["quantized"] < errors["original"]["quantized"] / 1000
    assert quantization_error / 4 < errors["dequantized"]["16-bit"] < 4 * quantization_error
    print(f"quantization error {quantization_error:.3g}, adapter effect {effect:.3g}, merged vs each: {errors}")


def test_both_merges_print_and_keep_both_errors(merges):
    dequantized, original = (json.loads((merges[b][0] / "merge.json").read_text()) for b in ("dequantized", "original"))
    assert dequantized["base_weights"] == "dequantized" and original["base_weights"] == "original"
    assert dequantized["quant"]["bits"] == 4 and dequantized["dtype"] == "float32"
    held, other = dequantized["check"], original["check"]
    assert held["reference"] == "quantized model" and other["reference"] == "adapter model"
    for check in (held, other):
        assert check["max_logit_difference"] <= check["tolerance"] < 0.2 * check["adapter_effect"]
    assert held["max_logit_difference"] == held["max_logit_difference_vs_quantized_model"]
    assert other["max_logit_difference"] == other["max_logit_difference_vs_adapter_on_16bit_base"]
    # each merge is far from the model the other one keeps: the quantization error, seen from both sides
    assert held["max_logit_difference_vs_adapter_on_16bit_base"] > 1000 * held["max_logit_difference"]
    assert other["max_logit_difference_vs_quantized_model"] > 1000 * other["max_logit_difference"]
    printed = merges["dequantized"][1]
    assert "dequantizing the run's 14 4-bit Linear weights" in printed
    assert "max |merged - quantized model| logit difference" in printed
    assert (
        f"vs the quantized model as trained {held['max_logit_difference_vs_quantized_model']:.3g}, "
        f"vs the adapter on the 16-bit base {held['max_logit_difference_vs_adapter_on_16bit_base']:.3g}"
    ) in printed
    printed = merges["original"][1]
    assert "max |merged - adapter| logit difference" in printed and "--base dequantized merges into" in printed
    assert f"vs the quantized model as trained {other['max_logit_difference_vs_quantized_model']:.3g}" in printed


def check_as_dequantized(folder, run_dir):
    recipe = load_recipe(run_dir / "recipe.yaml")
    return check_merged(folder, run_dir / "adapter", recipe, "float32", "cpu", print, base_weights="dequantized")


def test_the_dequantized_check_fails_the_original_weights_and_a_dropped_update(merges, qlora_run, tmp_path):
    with pytest.raises(FinetuneError, match="merge check failed: .* from the quantized model's by "):
        check_as_dequantized(merges["original"][0], qlora_run)

    broken = tmp_path / "run"
    shutil.copytree(qlora_run, broken)
    weights = broken / "adapter" / "adapter_model.safetensors"
    save_file({name: t * 0 if "lora_B" in name else t for name, t in load_file(weights).items()}, weights)
    dropped = merge_run(broken, out=tmp_path / "dropped", base_weights="dequantized", verify=False, echo=print).path
    assert json.loads((dropped / "merge.json").read_text())["check"] is None  # unchecked, and the record says so
    with pytest.raises(FinetuneError, match=r"\(\d+% of how far the adapter moves the quantized base's logits"):
        check_as_dequantized(dropped, qlora_run)


def test_a_gguf_export_with_base_dequantized_converts_the_dequantized_merge(qlora_run, merges, tmp_path):
    """`export --format gguf --base dequantized` writes the weights of the dequantized merge (to f16 rounding),
    not those of the original merge, which differ by the base's quantization error."""
    import gguf
    import numpy as np

    out = tmp_path / "model.gguf"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(qlora_run), "--format", "gguf", "--base", "dequantized", "--out", str(out)]) == 0
    stored = {t.name: t for t in gguf.GGUFReader(out).tensors}["blk.0.ffn_down.weight"].data.astype(np.float32)
    name = "model.layers.0.mlp.down_proj.weight"
    merged = {base: load_file(folder / "model.safetensors")[name].numpy() for base, (folder, _) in merges.items()}
    f16 = {base: weight.astype(np.float16).astype(np.float32) for base, weight in merged.items()}
    assert np.array_equal(stored, f16["dequantized"])
    assert np.abs(stored - f16["original"]).max() > 100 * np.abs(merged["dequantized"] - f16["dequantized"]).max()
