"""A model's shape (layers, widths, heads, vocabulary) from its config.json alone: no weights, no torch.

The memory planner works from this. A local folder's config.json is read directly; for a hub id only
config.json is downloaded (huggingface_hub). Any LLaMA-architecture config reads: LLaMA-1/2, Llama-3.x,
Mistral, Qwen2/2.5 (q/k/v biases, tied embeddings). `KNOWN_SHAPES` are published sizes, so a plan can be
asked for before any model is chosen (`finetune plan --model-params Llama-3.1-8B`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import InputError
from finetune.recipe.checks import looks_local


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a LLaMA-family decoder that decide its memory."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int
    tied_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2's q, k and v projections have biases
    o_bias: bool = False  # attention_bias in a Llama config puts one on o_proj too

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer, by module name."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_bias_count(self) -> int:
        """Bias values of one decoder layer (none in LLaMA, Llama-3 or Mistral)."""
        return (self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0) + (self.hidden_size if self.o_bias else 0)

    @property
    def parameters(self) -> int:
        """Every parameter, a tied embedding counted once (the figure model cards publish)."""
        h = self.hidden_size
        layer = sum(i * o for i, o in self.linear_shapes().values()) + 2 * h + self.layer_bias_count()
        embeddings = self.vocab_size * h * (1 if self.tied_embeddings else 2)
        return embeddings + self.num_layers * layer + h


def llama1(hidden: int, layers: int, intermediate: int, heads: int) -> ModelShape:
    return ModelShape(hidden, intermediate, layers, heads, heads, 32000, hidden // heads)


# LLaMA-1 (Touvron et al. 2023), Table 2: dimension, layers, heads; the FFN width of the released weights.
LLAMA1_SHAPES = {
    "7B": llama1(4096, 32, 11008, 32),
    "13B": llama1(5120, 40, 13824, 40),
    "33B": llama1(6656, 60, 17920, 52),
    "65B": llama1(8192, 80, 22016, 64),
}
# Today's bases, from their published config.json: hidden, intermediate, layers, heads, kv heads, vocab,
# head_dim, tied embeddings, q/k/v biases. Parameter totals are checked in tests/test_train_plan.py.
KNOWN_SHAPES = LLAMA1_SHAPES | {
    "Llama-3.1-8B": ModelShape(4096, 14336, 32, 32, 8, 128256, 128),
    "Llama-3.1-70B": ModelShape(8192, 28672, 80, 64, 8, 128256, 128),
    "Llama-3.2-1B": ModelShape(2048, 8192, 16, 32, 8, 128256, 64, tied_embeddings=True),
    "Llama-3.2-3B": ModelShape(3072, 8192, 28, 24, 8, 128256, 128, tied_embeddings=True),
    "Mistral-7B": ModelShape(4096, 14336, 32, 32, 8, 32000, 128),
    "Qwen2.5-7B": ModelShape(3584, 18944, 28, 28, 4, 152064, 128, qkv_bias=True),
}


def shape_from_config(config: dict, source: str) -> ModelShape:
    """The shape of a transformers LLaMA-family config mapping (llama, mistral, qwen2 and their relatives).

    Raises:
        InputError: a size the planner needs is missing.
    """
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [key for key in needed if not isinstance(config.get(key), int)]
    if missing:
        raise InputError(f"{source}: config.json lacks {', '.join(missing)}; is it a LLaMA-family decoder?")
    heads = config["num_attention_heads"]
    return ModelShape(
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        vocab_size=config["vocab_size"],
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases (its config has no key for them); Llama's attention_bias covers o_proj too.
        qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)),
        o_bias=config.get("model_type") != "qwen2" and bool(config.get("attention_bias", False)),
    )


def read_shape(name_or_path: str, revision: str | None = None) -> ModelShape:
    """The shape of a local model folder or hub model, from config.json only.

    Raises:
        InputError: no readable config.json there.
    """
    if looks_local(name_or_path):
        path = Path(name_or_path).expanduser() / "config.json"
    else:
        path = _download_config(name_or_path, revision)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"model.name_or_path: cannot read {path}: {e}") from None
    return shape_from_config(config, name_or_path)


def _download_config(repo_id: str, revision: str | None) -> Path:
    from finetune.hub_files import download

    try:
        files = download(repo_id, key="model.name_or_path", revision=revision, patterns=["config.json"])
    except InputError as e:
        raise InputError(f"{e}; or give --model-params ({', '.join(KNOWN_SHAPES)})") from None
    return files.folder / "config.json"
