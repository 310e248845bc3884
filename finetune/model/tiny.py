"""A tiny random-weight LLaMA with a LLaMA-style SentencePiece tokenizer, built locally from a seed.

It is what the quickstart trains and what the tests load through `from_pretrained`: every code path
of a real LLaMA (GQA attention, RoPE, SwiGLU, byte-fallback tokenizer) at a size that trains on a
CPU in seconds. Hidden and intermediate sizes are multiples of 64 because bitsandbytes' 4-bit CPU
kernels need that for eval/no-grad forwards.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path


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


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> bytes:
    """A LLaMA-style SentencePiece BPE model (byte fallback, digits split, <unk>=0 <s>=1 </s>=2, no pad)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t for t in texts if t.strip()]),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,  # one thread: the same corpus gives the same vocabulary
        minloglevel=2,
    )
    return model.getvalue()


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
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "tokenizer.model").write_bytes(train_sentencepiece(texts, shape.vocab_size))
        # from_pretrained on a folder, not LlamaTokenizer(vocab_file=...): the latter silently builds a
        # 3-token vocabulary in transformers 5.
        tokenizer = LlamaTokenizer.from_pretrained(scratch, add_bos_token=True, add_eos_token=False)
        tokenizer.save_pretrained(out)
        # Keep the SentencePiece model too: converters (GGUF) read the vocabulary from it.
        shutil.copy(Path(scratch) / "tokenizer.model", out / "tokenizer.model")
    dims = asdict(shape) | {"vocab_size": len(tokenizer)}
    config = LlamaConfig(
        **dims,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    return out
