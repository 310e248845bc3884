"""finetune export --format gguf on the tiny LLaMA (LoRA and full runs, f16 and q8_0, rope scalings): the file
read back with gguf's reader, and (marker gguf) run by llama.cpp. Each family: test_artifacts_gguf_families.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from finetune.artifacts import gguf_arch
from finetune.artifacts.gguf import unpermute, write_gguf
from finetune.artifacts.gguf_arch import gguf_name
from finetune.cli import main
from finetune.pipeline import run
from finetune.recipe.load import load_recipe

from conftest import SAMPLE_DATA, require
from llama_cpp_check import LOGITS, field, llama_cpp_comparison

pytestmark = pytest.mark.slow
HEADS, KV_HEADS = 4, 2  # conftest's tiny LLaMA


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir):
    """A LoRA run on the tiny LLaMA, its merged folder, and its GGUF files (f16, q8_0)."""
    folder = tmp_path_factory.mktemp("gguf-run")
    recipe = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"format": "alpaca", "path": str(SAMPLE_DATA), "max_seq_len": 128},
        "train": {"max_steps": 3, "micro_batch_size": 4, "grad_accum": 1, "lr": 2e-2, "gradient_checkpointing": False},
        "eval": {"samples": 0},
        "output": {"dir": str(folder / "run"), "report": False},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run_dir = run(load_recipe(folder / "recipe.yaml"), echo=lambda _: None).path
    assert main(["merge", str(run_dir), "--no-verify"]) == 0
    files = {}
    for kind in ("f16", "q8_0"):
        assert main(["export", str(run_dir), "--format", "gguf", "--type", kind]) == 0
        files[kind] = run_dir / f"model-{kind}.gguf"
    return run_dir, files


def test_gguf_tensors_metadata_and_vocabulary(exported, tiny_model_dir):
    import gguf

    run_dir, files = exported
    merged = load_file(run_dir / "merged" / "model.safetensors")
    reader = gguf.GGUFReader(files["f16"])
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {gguf_name(name) for name in merged}
    for name, hf in merged.items():
        t = tensors[gguf_name(name)]
        assert list(reversed(t.shape.tolist())) == list(hf.shape)  # GGUF lists the row length first
        expected = gguf.GGMLQuantizationType.F32 if hf.ndim == 1 else gguf.GGMLQuantizationType.F16
        assert t.tensor_type == expected

    for name, heads in (("self_attn.q_proj", HEADS), ("self_attn.k_proj", KV_HEADS)):
        hf = merged[f"model.layers.1.{name}.weight"].numpy()
        stored = tensors[gguf_name(f"model.layers.1.{name}.weight")].data.astype(np.float32)
        assert not np.array_equal(stored, hf.astype(np.float16).astype(np.float32))  # permuted ...
        assert np.array_equal(unpermute(stored, heads), hf.astype(np.float16).astype(np.float32))  # ... and back
    v = merged["model.layers.0.self_attn.v_proj.weight"].numpy()
    assert np.array_equal(tensors["blk.0.attn_v.weight"].data, v.astype(np.float16))

    config = AutoModelForCausalLM.from_pretrained(run_dir / "merged").config
    assert field(reader, "general.architecture") == "llama"
    expected_keys = {
        "llama.block_count": config.num_hidden_layers,
        "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": config.hidden_size,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV_HEADS,
        "llama.rope.dimension_count": config.hidden_size // HEADS,
        "llama.vocab_size": config.vocab_size,
        "general.file_type": gguf.LlamaFileType.MOSTLY_F16,
    }
    assert {key: field(reader, key) for key in expected_keys} == expected_keys
    assert field(reader, "llama.rope.freq_base") == pytest.approx(config.rope_parameters["rope_theta"])
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)

    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == config.vocab_size == merged["model.embed_tokens.weight"].shape[0]
    assert tokens[: sp.vocab_size()] == [sp.IdToPiece(i) for i in range(sp.vocab_size())]
    assert [tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.BYTE] == [f"<0x{b:02X}>" for b in range(256)]
    assert field(reader, "tokenizer.ggml.scores")[5] == pytest.approx(sp.GetScore(5))
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field(reader, "tokenizer.ggml.unknown_token_id") == tokenizer.unk_token_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is True


def test_gguf_q8_0_blocks_dequantize_to_the_merged_weights(exported):
    import gguf

    run_dir, files = exported
    merged = load_file(run_dir / "merged" / "model.safetensors")
    reader = gguf.GGUFReader(files["q8_0"])
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    for t in reader.tensors:
        hf_name = next(name for name in merged if gguf_name(name) == t.name)
        hf = merged[hf_name].numpy()
        if hf.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(hf.shape)
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):
            values = unpermute(values, HEADS if "attn_q" in t.name else KV_HEADS)
        # q8_0: one scale per 32 values, 127 steps each side of zero
        assert np.abs(values - hf).max() <= np.abs(hf).max() / 127 + 1e-6


def test_gguf_refuses_prefix_runs_and_an_existing_file(exported, write_recipe, tmp_path, capsys):
    run_dir, files = exported
    assert main(["export", str(run_dir), "--format", "gguf"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    shutil.copy(write_recipe(adapter={"kind": "prefix"}), prefix / "recipe.yaml")
    assert main(["export", str(prefix), "--format", "gguf"]) == 2
    assert "prefix tuning cannot be merged" in capsys.readouterr().err
    assert sorted(p.name for p in prefix.iterdir()) == ["recipe.yaml"]


@pytest.mark.gguf
def test_llama_cpp_logits_match_transformers(exported):
    """llama.cpp runs the exported files: f16 logits close to transformers', q8_0 picks the same next token."""
    try:
        import llama_cpp
    except ImportError as error:  # not installed, or a build that cannot load
        require(False, f"llama_cpp cannot be imported ({error}); pip install -e .[gguf-test]")
    run_dir, files = exported
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "merged")
    text = "Below is an instruction that describes a task.\n\n### Instruction:\nName three colors.\n\n### Response:\n"
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(run_dir / "merged")(torch.tensor([ids])).logits[0].numpy()
    scale = np.abs(reference).max()
    for kind, path in files.items():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=2, verbose=False)
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids  # same vocabulary, same BOS
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)])
        diff = np.abs(logits - reference).max()
        agree = (logits.argmax(-1) == reference.argmax(-1)).mean()
        print(f"llama.cpp {kind}: max |llama.cpp - transformers| {diff:.4g} (max |logit| {scale:.3g}), "
              f"argmax agrees at {agree:.0%} of {len(ids)} positions")  # fmt: skip
        assert logits[-1].argmax() == reference[-1].argmax()
        if kind == "f16":
            assert diff <= 0.01 * scale  # f16 weights, f32 activations: rounding only
        del llm


def with_rope(source, folder, rope: dict):
    """A copy of model folder `source` whose config.json has these rope parameters."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"rope_parameters": rope}))
    return folder


LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}


def test_linear_rope_scaling_is_written_as_its_two_keys(family_model_dir, tmp_path):
    import gguf

    folder = with_rope(family_model_dir("llama"), tmp_path / "linear", LINEAR)
    write_gguf(folder, tmp_path / "linear.gguf", "f16", echo=lambda _: None)
    reader = gguf.GGUFReader(tmp_path / "linear.gguf")
    assert field(reader, "llama.rope.scaling.type") == "linear"
    assert field(reader, "llama.rope.scaling.factor") == 4.0


@pytest.mark.gguf
def test_llama_cpp_applies_linear_rope_scaling_as_transformers_does(family_model_dir, tmp_path):
    """transformers divides positions by the factor; so does llama.cpp with the keys, and without them it differs."""
    folder = with_rope(family_model_dir("llama"), tmp_path / "linear", LINEAR)
    write_gguf(folder, tmp_path / "linear.gguf", "f16", echo=lambda _: None)
    llama_cpp_comparison(tmp_path / "linear.gguf", folder)
    unscaled = with_rope(folder, tmp_path / "unscaled", {"rope_type": "default", "rope_theta": 10000.0})
    write_gguf(unscaled, tmp_path / "unscaled.gguf", "f16", echo=lambda _: None)
    with pytest.raises(AssertionError, match=LOGITS):
        llama_cpp_comparison(tmp_path / "unscaled.gguf", folder)


def test_mistral_sliding_window_is_reported_when_llama_cpp_would_ignore_it(family_model_dir):
    from transformers import MistralConfig

    short = MistralConfig(sliding_window=4096, max_position_embeddings=32768)  # Mistral-7B-v0.1
    assert "sliding window of 4096 tokens is not applied" in gguf_arch.sliding_window_note(short)
    assert gguf_arch.sliding_window_note(AutoConfig.from_pretrained(family_model_dir("mistral"))) is None
    assert gguf_arch.sliding_window_note(MistralConfig(sliding_window=None)) is None  # v0.2 and later


@pytest.fixture(scope="module")
def full_export(tiny_run, tmp_path_factory):
    """(run folder, GGUF file) of a full fine-tuning run on the tiny LLaMA: its model/ has tokenizer.json only."""
    run_dir = tiny_run("full", adapter={"kind": "none"})
    path = tmp_path_factory.mktemp("full-gguf") / "full.gguf"
    assert main(["export", str(run_dir), "--format", "gguf", "--out", str(path)]) == 0
    return run_dir, path


def test_a_full_run_exports_with_the_sentencepiece_model_of_its_base(full_export, tiny_model_dir):
    import gguf
    from sentencepiece import SentencePieceProcessor

    run_dir, path = full_export
    assert not (run_dir / "model" / "tokenizer.model").exists()  # transformers 5 saves tokenizer.json only
    reader = gguf.GGUFReader(path)
    sp = SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))
    assert field(reader, "tokenizer.ggml.model") == "llama"
    pieces = [sp.IdToPiece(i) for i in range(sp.vocab_size())]
    assert field(reader, "tokenizer.ggml.tokens")[: sp.vocab_size()] == pieces


@pytest.mark.gguf
def test_llama_cpp_runs_a_full_run_as_transformers_does(full_export):
    run_dir, path = full_export
    llama_cpp_comparison(path, run_dir / "model")
