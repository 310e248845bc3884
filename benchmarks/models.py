"""The benchmarks' models, made here with random weights (nothing is downloaded).

data/tiny-llama (hidden 128, 2 layers) is so small that per-step framework overhead, not arithmetic,
decides its speed, and a toolkit's speed on it says little about a real model. The proportioned model
keeps LLaMA's shape ratios at a width a CPU trains in minutes: MLP width 2.75x hidden (704 = 11 x 64, so
4-bit layers also run their no-grad forward), grouped-query attention with head_dim 32, 4 layers. The
wide model is as wide as GPT-2 small (hidden 768, MLP 2,112 = 33 x 64, 12 heads of 64, 4 key/value
heads) at 2 layers, so 2 CPU cores train it in minutes: a narrow model flatters whatever saves per-token
overhead (attention calls per sample), a wide one weighs the matmuls as a real model does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "data" / "tiny-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
PROPORTIONED = {
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
}
WIDE = {
    "hidden_size": 768,
    "intermediate_size": 2112,
    "num_hidden_layers": 2,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "head_dim": 64,
}
SHAPES = {"proportioned": PROPORTIONED, "wide": WIDE}


def proportioned_model(folder: Path, shape: dict = PROPORTIONED, vocab_size: int | None = None) -> Path:
    """Write a LLaMA-proportioned model (by default the 3.5M-parameter one) with data/tiny-llama's tokenizer
    into `folder`; `vocab_size` widens the embedding and head beyond the tokenizer's entries (memory at a
    large vocabulary: the extra entries are never a label)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    base = LlamaConfig.from_pretrained(TINY)
    config = LlamaConfig(
        **shape,
        vocab_size=vocab_size or base.vocab_size,
        max_position_embeddings=base.max_position_embeddings,
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        rms_norm_eps=base.rms_norm_eps,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(TINY / name, folder / name)
    return folder


def model_folder(name: str, scratch: Path, vocab_size: int | None = None) -> Path:
    """The folder of a benchmark model by name: `proportioned` or `wide` (made under `scratch`), or `tiny`."""
    if name == "tiny":
        return TINY
    suffix = f"-vocab{vocab_size}" if vocab_size else ""
    return proportioned_model(scratch / f"{name}-llama{suffix}", SHAPES[name], vocab_size)
