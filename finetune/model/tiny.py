"""Tiny random-weight models of the families people fine-tune, each with its own tokenizer kind, built
locally from a seed.

They are what the quickstart trains and what the tests load through `from_pretrained`: every code path
of the real checkpoints at a size that trains on a CPU in seconds.
- `llama`: LLaMA-1/2 (GQA, RoPE, SwiGLU), SentencePiece with byte fallback, <unk>, no pad.
- `llama3`: Llama-3.1 (llama3 rope scaling, theta 500000), byte-level BPE without <unk> or pad, several
  EOS ids in generation_config.json, the chat template that writes BOS itself.
- `mistral`: Mistral-7B (sliding window), SentencePiece, the `[INST]` template.
- `qwen2`: Qwen2.5 (q/k/v biases, tied embeddings), byte-level BPE without BOS, ChatML.
Hidden and intermediate sizes are multiples of 64 because bitsandbytes' 4-bit CPU kernels need that for
eval/no-grad forwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

FAMILIES = ("llama", "llama3", "mistral", "qwen2")


@dataclass(frozen=True)
class TinyShape:
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    # 5x LLaMA's 0.02: with 0.02 the random output head maps every hidden state to nearly uniform
    # logits, and an adapter on the linear layers below it cannot move the loss off ln(vocab).
    initializer_range: float = 0.1


def build_tiny(
    family: str, out_dir: str | Path, texts: Iterable[str], *, seed: int = 0, shape: TinyShape = TinyShape()
) -> Path:
    """Write a tiny model of `family` (one of FAMILIES) and its tokenizer to `out_dir`; see the builders."""
    builders = {
        "llama": build_tiny_llama,
        "llama3": build_tiny_llama3,
        "mistral": build_tiny_mistral,
        "qwen2": build_tiny_qwen2,
    }
    if family not in builders:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    return builders[family](out_dir, texts, seed=seed, shape=shape)


def build_tiny_llama(
    out_dir: str | Path, texts: Iterable[str], *, seed: int = 0, shape: TinyShape = TinyShape()
) -> Path:
    """Write a tokenizer (tokenizer.model + tokenizer.json) and a random LLaMA (safetensors) to `out_dir`.

    Args:
        out_dir: folder to create; `AutoTokenizer`/`AutoModelForCausalLM.from_pretrained` load it.
        texts: corpus for the tokenizer (the project's own sample data).
        seed: seeds the weights.
        shape: model dimensions.
    """
    from transformers import LlamaConfig

    from finetune.model.tiny_tokenizers import sentencepiece_tokenizer

    out = _folder(out_dir)
    tokenizer = sentencepiece_tokenizer(texts, shape.vocab_size, out)
    config = LlamaConfig(
        **_dims(shape, tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    return _save_model(config, out, seed)


def build_tiny_llama3(
    out_dir: str | Path, texts: Iterable[str], *, seed: int = 0, shape: TinyShape = TinyShape()
) -> Path:
    """Like `build_tiny_llama`, shaped as Llama-3.1: byte-level BPE tokenizer, llama3 rope scaling, and a
    generation config that stops at `<|end_of_text|>`, `<|eom_id|>` and `<|eot_id|>`."""
    from transformers import LlamaConfig

    from finetune.model.tiny_tokenizers import llama3_tokenizer

    out = _folder(out_dir)
    tokenizer = llama3_tokenizer(texts, shape.vocab_size, out)
    stops = tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
    config = LlamaConfig(
        **_dims(shape, tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stops,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        # Llama-3.1's factors and theta; its pre-training context is 1/16 of its window (8192 of 131072).
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": shape.max_position_embeddings // 16,
        },
    )
    return _save_model(config, out, seed)


def build_tiny_mistral(
    out_dir: str | Path, texts: Iterable[str], *, seed: int = 0, shape: TinyShape = TinyShape()
) -> Path:
    """A random Mistral (sliding-window attention) with a SentencePiece tokenizer and the `[INST]` template."""
    from transformers import MistralConfig

    from finetune.model.tiny_tokenizers import MISTRAL_CHAT_TEMPLATE, sentencepiece_tokenizer

    out = _folder(out_dir)
    tokenizer = sentencepiece_tokenizer(texts, shape.vocab_size, out, chat_template=MISTRAL_CHAT_TEMPLATE)
    config = MistralConfig(
        **_dims(shape, tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        sliding_window=4096,  # Mistral-7B-v0.1's
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return _save_model(config, out, seed)


def build_tiny_qwen2(
    out_dir: str | Path, texts: Iterable[str], *, seed: int = 0, shape: TinyShape = TinyShape()
) -> Path:
    """A random Qwen2.5 (biases on q/k/v, input and output embeddings tied) with a byte-level BPE tokenizer
    without BOS, ChatML, and a generation config that stops at `<|im_end|>` and `<|endoftext|>`."""
    from transformers import Qwen2Config

    from finetune.model.tiny_tokenizers import qwen2_tokenizer

    out = _folder(out_dir)
    tokenizer = qwen2_tokenizer(texts, shape.vocab_size, out)
    stops = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = Qwen2Config(
        **_dims(shape, tokenizer),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=stops,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    return _save_model(config, out, seed)


def _folder(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _dims(shape: TinyShape, tokenizer) -> dict:
    """The shape with the vocabulary the tokenizer really has (BPE training may stop short of the target)."""
    return asdict(shape) | {"vocab_size": len(tokenizer)}


def _save_model(config, out: Path, seed: int) -> Path:
    """Random weights for `config` from `seed`, saved in `out` with a generation_config.json of its BOS/EOS."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out
