"""finetune merge: shard-by-shard LoRA and (IA)^3 merges equal the adapter model, for every LoRA variant, and
for each family from a bf16 base."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.artifacts.merge import merge_run
from finetune.artifacts.shards import tensor_infos
from finetune.artifacts.verify import merge_tolerance
from finetune.cli import main
from finetune.model.methods.lora import Adapter
from finetune.pipeline import run
from finetune.recipe.load import load_recipe

pytestmark = pytest.mark.slow


def train(write_recipe, **sections):
    """Train a few steps at a high learning rate, so LoRA's B (zero at init) moves well away from zero."""
    sections["train"] = {"lr": 2e-2, "max_steps": 3, **sections.get("train", {})}
    return run(load_recipe(write_recipe(**sections)), echo=lambda _: None).path


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapter_and_base_logits(run_dir, base_dir, ids):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base_logits = logits(base, ids)
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    return logits(model, ids), base_logits


def prompt_ids(run_dir):
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    text = "Below is an instruction that describes a task.\n\n### Instruction:\nName three colors.\n\n### Response:\n"
    return torch.tensor([[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]])


def assert_merged_equals_adapter(run_dir, base_dir, merged_dir):
    ids = prompt_ids(run_dir)
    merged = logits(AutoModelForCausalLM.from_pretrained(merged_dir), ids)
    adapter, base = adapter_and_base_logits(run_dir, base_dir, ids)
    assert torch.allclose(merged, adapter, atol=1e-4, rtol=0), (merged - adapter).abs().max()
    assert (merged - base).abs().max() > 1e-2  # the adapter changed the model, and the merge kept that


@pytest.mark.parametrize(
    "adapter",
    [
        {"use_dora": True},
        {"use_rslora": True, "modules_to_save": ["lm_head"]},
    ],
    ids=["dora", "rslora+modules_to_save"],
)
def test_merge_equals_adapter(write_recipe, tiny_model_dir, adapter, capsys):
    run_dir = train(write_recipe, adapter={"target_modules": "all-linear", **adapter})
    result = merge_run(run_dir)
    assert result.path == run_dir / "merged" and result.dtype == "float32"
    assert result.max_diff <= result.tolerance
    assert_merged_equals_adapter(run_dir, tiny_model_dir, run_dir / "merged")
    assert "max |merged - adapter| logit difference" in capsys.readouterr().out
    assert not (run_dir / "merged.partial").exists()


def test_qlora_merges_into_the_16bit_base(write_recipe, tiny_model_dir, capsys):
    run_dir = train(write_recipe, quant={"bits": 4, "type": "nf4"})
    assert main(["merge", str(run_dir), "--out", str(run_dir / "m")]) == 0
    out = capsys.readouterr().out
    assert "trained on a 4-bit quantized base" in out and "16-bit base weights" in out
    config = json.loads((run_dir / "m" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert_merged_equals_adapter(run_dir, tiny_model_dir, run_dir / "m")


def test_sharded_base_gives_sharded_merge(write_recipe, tiny_model_dir, tmp_path):
    base = tmp_path / "sharded-base"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(base, max_shard_size="60KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(tiny_model_dir / name, base / name)
    assert len(list(base.glob("model-*.safetensors"))) > 2
    run_dir = train(write_recipe, model={"name_or_path": str(base)}, adapter={"target_modules": ["q_proj", "v_proj"]})
    assert main(["merge", str(run_dir)]) == 0

    merged = run_dir / "merged"
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == sorted(p.name for p in merged.glob("model-*.safetensors")) and len(files) > 2
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base_index["weight_map"])
    data_bytes = sum((merged / f).stat().st_size - _header_bytes(merged / f) for f in files)
    assert index["metadata"]["total_size"] == data_bytes
    assert (merged / "tokenizer.model").is_file()
    assert_merged_equals_adapter(run_dir, base, merged)

    assert main(["merge", str(run_dir), "--dtype", "bfloat16", "--out", str(tmp_path / "bf16")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")  # dtype from config.json
    assert model.dtype == torch.bfloat16
    ids = prompt_ids(run_dir)
    adapter, untrained = adapter_and_base_logits(run_dir, base, ids)
    # bfloat16 rounding, held against the adapter's own effect: a merge without the update is off by all of it
    assert (logits(model, ids).float() - adapter).abs().max() < 0.2 * (adapter - untrained).abs().max()


def _header_bytes(path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_merge_refuses_prefix_full_and_a_non_empty_out(write_recipe, tmp_path, capsys):
    for kind, expected in (("prefix", "prefix tuning cannot be merged"), ("none", "nothing to merge")):
        run_dir = tmp_path / kind
        run_dir.mkdir()
        shutil.copy(write_recipe(adapter={"kind": kind}), run_dir / "recipe.yaml")
        assert main(["merge", str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert expected in err
        if kind == "prefix":
            assert f"finetune export {run_dir} --format adapter" in err
        assert sorted(p.name for p in run_dir.iterdir()) == ["recipe.yaml"]
    run_dir = tmp_path / "lora"
    run_dir.mkdir()
    shutil.copy(write_recipe(), run_dir / "recipe.yaml")
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    (run_dir / "merged").mkdir()
    (run_dir / "merged" / "keep.txt").write_text("mine")
    assert main(["merge", str(run_dir)]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in (run_dir / "merged").iterdir()] == ["keep.txt"]


def test_a_failed_check_exits_1_and_writes_nothing(write_recipe, capsys):
    # an adapter config that no longer matches its weights: peft now skips q_proj's LoRA pair, the merge does not
    run_dir = train(write_recipe, adapter={"target_modules": ["q_proj", "v_proj"]})
    config_path = run_dir / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"exclude_modules": ["q_proj"]}))
    assert main(["merge", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "merge check failed" in err and "nothing was written" in err
    assert not (run_dir / "merged").exists() and not (run_dir / "merged.partial").exists()


def train_ia3(write_recipe):
    """(IA)^3 scales start at 1; a high learning rate moves them far enough to change the logits clearly."""
    return train(write_recipe, adapter={"kind": "ia3"}, train={"lr": 5e-2})


def test_ia3_merge_equals_adapter(write_recipe, tiny_model_dir, capsys):
    run_dir = train_ia3(write_recipe)
    assert main(["merge", str(run_dir)]) == 0
    assert "max |merged - adapter| logit difference" in capsys.readouterr().out
    assert_merged_equals_adapter(run_dir, tiny_model_dir, run_dir / "merged")


def test_ia3_merge_that_drops_the_feedforward_scales_fails_its_check(write_recipe, monkeypatch, capsys):
    import dataclasses

    from finetune.model.methods import METHODS, ia3

    run_dir = train_ia3(write_recipe)
    read_scales = ia3.read_scales

    def without_feedforward(folder, *, device="cpu"):
        scales = read_scales(folder, device=device)
        scales.vectors = {name: v for name, v in scales.vectors.items() if "down_proj" not in name}
        return scales

    monkeypatch.setitem(METHODS, "ia3", dataclasses.replace(ia3.METHOD, read_merge=without_feedforward))
    assert main(["merge", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "merge check failed" in err and "nothing was written" in err
    assert not (run_dir / "merged").exists()


# --- the families people fine-tune today, from bf16 base checkpoints


def float32_logits(folder, ids):
    """Logits in float32 of a model folder (16-bit weights upcast exactly)."""
    return logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), ids)


def adapter_and_base_float32_logits(run_dir, ids):
    """The run's adapter model as the run loads it (on CPU: the bf16 base upcast to float32), and its base."""
    from finetune.eval.generate import load_trained
    from finetune.run_folder import read_recipe

    model, _ = load_trained(run_dir, read_recipe(run_dir), device="cpu")
    assert model.dtype == torch.float32
    adapter = logits(model, ids)
    with model.disable_adapter():
        return adapter, logits(model, ids)


def family_ids(run_dir):
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    return torch.tensor([tokenizer("Name three colors. Add 123 and 4567.").input_ids])


def safetensors_dtypes(folder) -> set[str]:
    return {info["dtype"] for path in folder.glob("*.safetensors") for info in tensor_infos(path).values()}


@pytest.mark.parametrize("family", ["llama", "llama3", "mistral", "qwen2"])
def test_a_bf16_base_merges_in_bf16_per_family(family, family_lora_run, bf16_model_dir, tmp_path):
    """Default dtype is the base's; the config (rope scaling, sliding window, tied head) and Qwen2's q/k/v
    biases are carried; merged logits are the adapter's up to bf16 rounding, far below the adapter's effect."""
    base, run_dir = bf16_model_dir(family), family_lora_run(family)
    result = merge_run(run_dir, out=tmp_path / "merged", echo=lambda _: None)
    merged = result.path
    assert result.dtype == "bfloat16" and safetensors_dtypes(merged) == {"BF16"}
    assert result.max_diff <= result.tolerance

    base_config = json.loads((base / "config.json").read_text())
    merged_config = json.loads((merged / "config.json").read_text())
    for key in ("rope_parameters", "sliding_window", "tie_word_embeddings", "use_sliding_window"):
        assert merged_config.get(key) == base_config.get(key), key
    base_tensors, merged_tensors = load_file(base / "model.safetensors"), load_file(merged / "model.safetensors")
    assert ("lm_head.weight" in merged_tensors) == ("lm_head.weight" in base_tensors)
    biases = [name for name in base_tensors if name.endswith(".bias")]
    assert bool(biases) == (family == "qwen2")
    for name in biases:  # LoRA has no bias: the base's are carried bit for bit
        assert torch.equal(merged_tensors[name], base_tensors[name]) and base_tensors[name].abs().max() > 0

    ids = family_ids(run_dir)
    adapter, base_logits = adapter_and_base_float32_logits(run_dir, ids)
    merged_logits = float32_logits(merged, ids)
    effect = (adapter - base_logits).abs().max()
    assert (merged_logits - adapter).abs().max() < 0.05 * effect  # bf16 rounding of the merged weights only
    assert (merged_logits - base_logits).abs().max() > 0.5 * effect > 0.1  # the update is in the merge
    print(
        f"{family}: bf16 merge check {result.max_diff:.3g} (tolerance {result.tolerance:.3g}); in float32, "
        f"max |merged - adapter| {(merged_logits - adapter).abs().max():.3g}, adapter effect {effect:.3g}"
    )


EMBEDDING_CHANGES = {
    "lora-on-embeddings": {"target_modules": ["embed_tokens"]},
    "embeddings-trained-in-full": {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]},
}


@pytest.mark.parametrize("adapter", EMBEDDING_CHANGES.values(), ids=EMBEDDING_CHANGES.keys())
def test_a_tied_head_is_untied_when_the_adapter_changes_the_embedding(
    adapter, family_lora_run, bf16_model_dir, tmp_path
):
    """Qwen2's head is its embedding; an adapter on embed_tokens changes the input side only (peft's output head
    keeps the base matrix), so the merged folder holds both matrices, untied."""
    base, run_dir = bf16_model_dir("qwen2"), family_lora_run("qwen2", **adapter)
    result = merge_run(run_dir, out=tmp_path / "merged", echo=lambda _: None)
    assert json.loads((result.path / "config.json").read_text())["tie_word_embeddings"] is False
    tensors, base_tensors = load_file(result.path / "model.safetensors"), load_file(base / "model.safetensors")
    assert "lm_head.weight" not in base_tensors
    assert torch.equal(tensors["lm_head.weight"], base_tensors["model.embed_tokens.weight"])
    assert not torch.equal(tensors["model.embed_tokens.weight"], base_tensors["model.embed_tokens.weight"])
    ids = family_ids(run_dir)
    adapter_logits, base_logits = adapter_and_base_float32_logits(run_dir, ids)
    effect = (adapter_logits - base_logits).abs().max()
    assert (float32_logits(result.path, ids) - adapter_logits).abs().max() < 0.05 * effect


def test_a_merge_that_kept_the_tie_would_fail_the_check(family_lora_run, tmp_path, capsys):
    """What a merge that kept the tie would write (the trained embedding, no head of its own) gives other
    logits than the adapter model: more than the bf16 merge check allows."""
    from safetensors.torch import save_file

    run_dir = family_lora_run("qwen2", **EMBEDDING_CHANGES["embeddings-trained-in-full"])
    untied = tmp_path / "untied"
    assert main(["merge", str(run_dir), "--out", str(untied)]) == 0
    assert "both are written, untied" in capsys.readouterr().out
    kept_tie = tmp_path / "kept-tie"
    shutil.copytree(untied, kept_tie)
    tensors = load_file(kept_tie / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, kept_tie / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((kept_tie / "config.json").read_text())
    (kept_tie / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))

    ids = family_ids(run_dir)
    adapter, base = adapter_and_base_float32_logits(run_dir, ids)
    effect = (adapter - base).abs().max().item()
    assert (float32_logits(untied, ids) - adapter).abs().max().item() < 0.05 * effect
    kept_tied = (float32_logits(kept_tie, ids) - adapter).abs().max().item()
    tolerance = merge_tolerance("bfloat16", [adapter], effect)
    assert kept_tied > tolerance
    print(f"kept tied: off the adapter by {kept_tied:.3g}, bf16 tolerance {tolerance:.3g}")


def test_a_bf16_merge_that_loses_the_update_fails_its_check(family_lora_run, monkeypatch, tmp_path, capsys):
    run_dir = family_lora_run("qwen2")
    monkeypatch.setattr(Adapter, "apply", lambda self, name, tensor: tensor)  # a merge that forgets every update
    assert main(["merge", str(run_dir), "--out", str(tmp_path / "lost")]) == 1
    err = capsys.readouterr().err
    assert "merge check failed" in err and "above the bfloat16 tolerance" in err
    assert not (tmp_path / "lost").exists() and not (tmp_path / "lost.partial").exists()


def test_dtype_flag_overrides_the_bases(family_lora_run, tmp_path):
    run_dir = family_lora_run("mistral")
    assert main(["merge", str(run_dir), "--dtype", "float32", "--out", str(tmp_path / "f32")]) == 0
    assert safetensors_dtypes(tmp_path / "f32") == {"F32"}
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
