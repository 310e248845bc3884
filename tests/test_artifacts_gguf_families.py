"""finetune export --format gguf for each family, merged from a bf16 base: the file read back with gguf's reader,
and (marker gguf) run by llama.cpp; broken files fail that comparison."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from finetune.artifacts import gguf_arch, gguf_vocab
from finetune.artifacts.gguf import unpermute, write_gguf
from finetune.artifacts.gguf_arch import Family, gguf_name
from finetune.cli import main

from conftest import FAMILIES
from llama_cpp_check import LOGITS, TOKENS, field, llama_cpp_comparison

pytestmark = pytest.mark.slow

# family -> (general.architecture, tokenizer.ggml.model, tokenizer.ggml.pre)
CONVENTIONS = {
    "llama": ("llama", "llama", "default"),
    "llama3": ("llama", "gpt2", "llama-bpe"),
    "mistral": ("llama", "llama", "default"),
    "qwen2": ("qwen2", "gpt2", "qwen2"),
}


@pytest.fixture(scope="module")
def family_export(family_lora_run):
    """family_export(family) -> (run folder with merged/, its GGUF f16 file), from `finetune merge` and
    `finetune export` of the family's LoRA run."""
    done = {}

    def export(family: str):
        if family not in done:
            run_dir = family_lora_run(family)
            assert main(["merge", str(run_dir), "--overwrite"]) == 0
            assert main(["export", str(run_dir), "--format", "gguf", "--overwrite"]) == 0
            done[family] = run_dir, run_dir / "model-f16.gguf"
        return done[family]

    return export


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_tensors_and_hyperparameters_per_family(family, family_export):
    """llama.cpp's names; Q/K rows permuted for the llama architecture only; Qwen2's biases kept and its tied
    head not written; llama3 rope factors that turn the base frequencies into transformers' scaled ones."""
    import gguf

    run_dir, path = family_export(family)
    merged = load_file(run_dir / "merged" / "model.safetensors")
    config = AutoConfig.from_pretrained(run_dir / "merged")
    reader = gguf.GGUFReader(path)
    arch = field(reader, "general.architecture")
    assert arch == CONVENTIONS[family][0]
    tensors = {t.name: t for t in reader.tensors}
    computed = {"rope_freqs.weight"} if family == "llama3" else set()
    assert set(tensors) == {gguf_name(name) for name in merged} | computed
    assert ("output.weight" in tensors) == (not config.tie_word_embeddings) == (family != "qwen2")
    assert any(name.endswith(".bias") for name in tensors) == (family == "qwen2")
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for name, hf in merged.items():
        t = tensors[gguf_name(name)]
        stored = t.data.astype(np.float32)
        if arch == "llama" and t.name.split(".")[-2] in heads:
            stored = unpermute(stored, heads[t.name.split(".")[-2]])
        assert np.array_equal(stored, hf.float().numpy().astype(t.data.dtype).astype(np.float32)), name

    keys = {
        "block_count": config.num_hidden_layers,
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads,
        "attention.head_count_kv": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
    }
    assert {key: field(reader, f"{arch}.{key}") for key in keys} == keys
    assert field(reader, f"{arch}.rope.freq_base") == pytest.approx(config.rope_parameters["rope_theta"])
    if family == "llama3":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        dim = config.hidden_size // config.num_attention_heads
        base = 1.0 / config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        factors = tensors["rope_freqs.weight"].data
        assert factors.min() == 1.0 and factors.max() == config.rope_parameters["factor"]  # both ends are used
        np.testing.assert_allclose(base.numpy() / factors, scaled.double().numpy(), rtol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_vocabulary_and_special_tokens_per_family(family, family_export):
    import gguf

    run_dir, path = family_export(family)
    reader = gguf.GGUFReader(path)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "merged")
    config = AutoConfig.from_pretrained(run_dir / "merged")
    _, model, pre = CONVENTIONS[family]
    assert (field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre")) == (model, pre)
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == config.vocab_size >= len(tokenizer)
    if model == "gpt2":
        assert tokens[: len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        spec = json.loads((run_dir / "merged" / "tokenizer.json").read_text())
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        assert field(reader, "tokenizer.ggml.merges") == merges
        for i, added in tokenizer.added_tokens_decoder.items():
            assert types[i] == (gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    else:
        assert "tokenizer.ggml.merges" not in reader.fields
        assert len(field(reader, "tokenizer.ggml.scores")) == len(tokens)
        assert [tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.BYTE] == [
            f"<0x{b:02X}>" for b in range(256)
        ]

    def ids(*names):
        return [tokenizer.convert_tokens_to_ids(name) for name in names]

    expected = {
        "llama": {"bos": ids("<s>"), "eos": ids("</s>")},
        "llama3": {"bos": ids("<|begin_of_text|>"), "eos": ids("<|end_of_text|>"), "eot": ids("<|eot_id|>")},
        "mistral": {"bos": ids("<s>"), "eos": ids("</s>"), "eot": ids("</s>")},
        # no BOS in the tokenizer: config.json's, never added
        "qwen2": {"bos": ids("<|endoftext|>"), "eos": ids("<|im_end|>"), "eot": ids("<|im_end|>")},
    }[family]
    keys = {kind: f"tokenizer.ggml.{kind}_token_id" for kind in ("bos", "eos", "eot")}
    written = {kind: field(reader, key) for kind, key in keys.items() if key in reader.fields}
    assert written == {kind: value[0] for kind, value in expected.items()}
    if tokenizer.pad_token_id is not None:
        assert field(reader, "tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is (family != "qwen2")
    if tokenizer.chat_template:
        assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template


@pytest.mark.gguf
@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_logits_match_transformers_per_family(family, family_export):
    run_dir, path = family_export(family)
    figures = llama_cpp_comparison(path, run_dir / "merged")
    print(
        f"{family}: llama.cpp f16 vs transformers: max |diff| {figures['max_diff']:.4g} (max |logit| "
        f"{figures['max_logit']:.3g}), argmax agrees at {figures['argmax_agreement']:.0%} of {figures['tokens']} "
        "positions"
    )


# case -> (family, how the export is broken, what the comparison says)
BREAKS = {
    # Q/K rows left in transformers' layout: llama.cpp rotates the wrong pairs of dimensions
    "llama-unpermuted-qk": (
        "llama",
        lambda mp: mp.setitem(gguf_arch.FAMILIES, "llama", Family("llama", permute_qk=False)),
        LOGITS,
    ),
    # merges out of rank order: the same pieces, merged in another order
    "qwen2-merges-reversed": ("qwen2", lambda mp: _reverse_merges(mp), TOKENS),
    # Llama-3's pre-tokenizer named Qwen2's: digits split one by one
    "llama3-wrong-pre-tokenizer": (
        "llama3",
        lambda mp: mp.setitem(gguf_vocab.PRE_TOKENIZERS, gguf_vocab.LLAMA3_SPLIT, "qwen2"),
        TOKENS,
    ),
    # no rope_freqs.weight: llama.cpp rotates with the unscaled frequencies
    "llama3-without-rope-factors": (
        "llama3",
        lambda mp: mp.setattr(gguf_arch, "llama3_rope_factors", lambda _: None),
        LOGITS,
    ),
}


def _reverse_merges(monkeypatch) -> None:
    merges = gguf_vocab.bpe_merges
    monkeypatch.setattr(gguf_vocab, "bpe_merges", lambda spec: merges(spec)[::-1])


@pytest.mark.gguf
@pytest.mark.parametrize("case", BREAKS, ids=BREAKS)
def test_a_broken_export_fails_the_llama_cpp_comparison(case, family_export, monkeypatch, tmp_path):
    family, breaks, failure = BREAKS[case]
    run_dir, good = family_export(family)
    llama_cpp_comparison(good, run_dir / "merged")
    breaks(monkeypatch)
    write_gguf(run_dir / "merged", tmp_path / "broken.gguf", "f16", echo=lambda _: None)
    with pytest.raises(AssertionError, match=failure) as failed:
        llama_cpp_comparison(tmp_path / "broken.gguf", run_dir / "merged")
    print(f"{case}: {str(failed.value).splitlines()[0][:160]}")
