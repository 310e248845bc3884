"""The tiny family models: each carries its family's architecture traits and tokenizer kind."""

from __future__ import annotations

import json

import pytest

from conftest import FAMILIES, SAMPLE_DATA

CHAT = [{"role": "user", "content": "Add 12345 and 678."}, {"role": "assistant", "content": "13023"}]


def load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    return (
        AutoTokenizer.from_pretrained(folder),
        AutoModelForCausalLM.from_pretrained(folder),
        GenerationConfig.from_pretrained(folder),
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_loads_round_trips_text_and_has_4bit_friendly_sizes(family_model_dir, family):
    tokenizer, model, _ = load(family_model_dir(family))
    assert model.config.vocab_size == len(tokenizer) and 256 < len(tokenizer) <= 1024
    assert model.config.hidden_size % 64 == 0 and model.config.intermediate_size % 64 == 0
    text = "Pay 1234 € now, naïve café"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text  # byte fallback or byte-level: nothing is unknown


def test_llama3_is_byte_level_bpe_without_unk_or_pad_and_with_several_stops(family_model_dir):
    folder = family_model_dir("llama3")
    tokenizer, model, generation = load(folder)
    assert not (folder / "tokenizer.model").exists()
    assert json.loads((folder / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert tokenizer.unk_token is None and tokenizer.pad_token is None
    assert tokenizer.bos_token == "<|begin_of_text|>" and tokenizer.eos_token == "<|end_of_text|>"
    vocab = tokenizer.get_vocab()
    for token in ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<|eot_id|>", "<|start_header_id|>"):
        assert token in vocab
    stops = tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
    assert generation.eos_token_id == stops
    assert model.config.rope_parameters["rope_type"] == "llama3" and not model.config.tie_word_embeddings
    assert tokenizer("12345").input_ids[0] == tokenizer.bos_token_id
    # Llama-3's split regex groups up to three digits before BPE: no piece holds more than three
    pieces = tokenizer.tokenize("in 2026, 123456789 items")
    assert max(sum(c.isdigit() for c in piece) for piece in pieces) <= 3
    assert any(sum(c.isdigit() for c in piece) > 1 for piece in tokenizer.tokenize("12345 678"))
    ids = tokenizer.apply_chat_template(CHAT, tokenize=True)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[-1] == vocab["<|eot_id|>"]


def test_qwen2_has_no_bos_chatml_tied_embeddings_and_qkv_biases(family_model_dir):
    tokenizer, model, generation = load(family_model_dir("qwen2"))
    assert tokenizer.bos_token is None and tokenizer.unk_token is None
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert generation.eos_token_id == tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    attention = model.model.layers[0].self_attn
    assert all(getattr(attention, name).bias is not None for name in ("q_proj", "k_proj", "v_proj"))
    assert attention.o_proj.bias is None
    assert [sum(c.isdigit() for c in piece) for piece in tokenizer.tokenize("12345")] == [1] * 5
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("13023<|im_end|>\n")


def test_mistral_has_a_sliding_window_and_the_inst_template(family_model_dir):
    folder = family_model_dir("mistral")
    tokenizer, model, generation = load(folder)
    assert model.config.model_type == "mistral" and model.config.sliding_window == 4096
    assert (folder / "tokenizer.model").is_file() and tokenizer.unk_token == "<unk>" and tokenizer.pad_token is None
    assert generation.eos_token_id == tokenizer.eos_token_id
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert text == "<s> [INST] Add 12345 and 678. [/INST] 13023</s>"


def test_cli_builds_the_family_asked_for(tmp_path, capsys):
    from finetune.cli import main

    assert main(["tiny-model", str(tmp_path / "q"), "--family", "qwen2", "--corpus", str(SAMPLE_DATA)]) == 0
    assert "tiny qwen2 model written to" in capsys.readouterr().out
    assert json.loads((tmp_path / "q" / "config.json").read_text())["model_type"] == "qwen2"
