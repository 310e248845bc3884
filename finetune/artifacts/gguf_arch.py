"""What llama.cpp expects of each model family in a GGUF file: architecture, tensor names, hyper-parameters.

Follows llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel`, `Qwen2Model`):
  transformers model_type   GGUF architecture   Q/K rows
  llama (Llama-1/2/3.x)     llama               permuted (llama.cpp rotates interleaved pairs)
  mistral                   llama               permuted
  qwen2 (Qwen2, Qwen2.5)    qwen2               as they are (llama.cpp rotates Qwen2 in halves, like transformers)
Biases (Qwen2's q/k/v) are written beside their weights (`blk.N.attn_q.bias`), permuted like them. A tied output
head has no tensor of its own: llama.cpp reuses `token_embd.weight` when `output.weight` is missing. Llama-3.1's
`llama3` rope scaling is written as `rope_freqs.weight`, the per-frequency divisors llama.cpp's converter
computes; linear scaling as its two keys. Mistral's sliding window is not written: llama.cpp's `llama`
architecture attends to the whole context, as its converter does for Mistral.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import InputError

LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
MODEL_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
ROPE_FREQS = "rope_freqs.weight"
ROPE_TYPES = ("default", "linear", "llama3")  # what the GGUF keys written here express


@dataclass(frozen=True)
class Family:
    """How one transformers model type is written for llama.cpp."""

    arch: str  # general.architecture
    permute_qk: bool  # rotary layout: halves (transformers) -> interleaved pairs (llama.cpp's llama)


FAMILIES = {
    "llama": Family("llama", permute_qk=True),
    "mistral": Family("llama", permute_qk=True),
    "qwen2": Family("qwen2", permute_qk=False),
}


def family_of(config, where: str | Path) -> Family:
    """The GGUF family of a transformers config, checked to be one this export writes exactly.

    Args:
        config: a transformers `PretrainedConfig`.
        where: named in the error (the run folder or model folder the user gave).

    Raises:
        InputError: another model type, or a rope scaling the GGUF keys written here do not express.
    """
    model_type = config.model_type
    if model_type not in FAMILIES:
        architectures = ", ".join(getattr(config, "architectures", None) or [model_type])
        raise InputError(
            f"{where}: GGUF export writes the model types {', '.join(FAMILIES)} (Llama-1/2/3.x, Mistral, "
            f"Qwen2/2.5); this model is {model_type!r} ({architectures})"
        )
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise InputError(
            f"{where}: GGUF export writes the rope scalings {', '.join(ROPE_TYPES)}; this model uses {rope_type!r}"
        )
    return FAMILIES[model_type]


def rope_parameters(config) -> dict:
    """transformers 5's normalized rope settings (rope_type, rope_theta, factor, ...)."""
    return dict(getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)})


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name for a transformers tensor of these families; None for tensors llama.cpp does not load.

    >>> gguf_name("model.layers.3.self_attn.q_proj.weight")
    'blk.3.attn_q.weight'
    >>> gguf_name("model.layers.0.self_attn.k_proj.bias")
    'blk.0.attn_k.bias'
    """
    module, _, kind = hf_name.rpartition(".")
    if module in MODEL_TENSORS:
        return f"{MODEL_TENSORS[module]}.{kind}"
    layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if layer and layer.group(2) in LAYER_TENSORS:
        return f"blk.{layer.group(1)}.{LAYER_TENSORS[layer.group(2)]}.{kind}"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None  # recomputed by llama.cpp from rope.freq_base
    raise InputError(f"GGUF export: no llama.cpp name for tensor {hf_name}")


def add_hyperparameters(writer, config, name: str, file_type) -> None:
    """The `{arch}.*` keys llama.cpp builds the graph from (the writer prefixes them with its architecture)."""
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type") == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)


def llama3_rope_factors(config) -> list[float] | None:
    """Per-frequency divisors of Llama-3.1's rope scaling, as llama.cpp's converter computes them
    (`LlamaModel.generate_extra_tensors`); None for other rope types.

    Low frequencies (wavelength past original_max_position_embeddings / low_freq_factor) are divided by
    `factor`, high ones (past ... / high_freq_factor) are kept, and the band between is interpolated.
    """
    rope = rope_parameters(config)
    if rope.get("rope_type") != "llama3":
        return None
    dim = head_dim(config)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelength, high_wavelength = old_context / low, old_context / high
    factors = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * rope["rope_theta"] ** (i / dim)
        if wavelength < high_wavelength:
            factors.append(1.0)
        elif wavelength > low_wavelength:
            factors.append(float(factor))
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def sliding_window_note(config) -> str | None:
    """A note when transformers limits attention to a window that llama.cpp's `llama` architecture ignores."""
    window = getattr(config, "sliding_window", None)
    if config.model_type != "mistral" or not window or window >= config.max_position_embeddings:
        return None
    return (
        f"note: llama.cpp attends to the whole context; this model's sliding window of {window} tokens is not "
        f"applied, so its outputs differ from transformers' on inputs longer than {window} tokens"
    )
