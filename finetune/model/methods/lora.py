"""adapter.kind: lora (QLoRA on a quantized base, rsLoRA, DoRA): its peft config, trainable tensors, names,
checks, and its merge: a saved adapter read as the updates it makes to named base tensors, applied one
tensor at a time.

Matches peft's own merge (`peft/tuners/lora/layer.py` `get_delta_weight`, `variants.py` DoRA `merge_safe`):
  LoRA     W' = W + scaling * B @ A              scaling = alpha / r (alpha / sqrt(r) with rsLoRA)
  DoRA     W' = m / ||W + scaling * B @ A||_row * (W + scaling * B @ A)   (norm over the input dimension)
  bias     b' = b + scaling * lora_B.bias        (lora_bias)
Embedding LoRA stores A as [r, vocab] and B as [dim, r]: the delta is (B @ A).T. Every other tensor in the
adapter (modules_to_save, trained biases, saved embeddings) replaces the base tensor of the same name.
The arithmetic runs in float32 whatever the storage dtype.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import InputError
from finetune.model.methods.method import Method, Tensors
from finetune.recipe.checks import KeyProblem
from finetune.recipe.schema import LoraSpec, Recipe

PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# peft LoraConfig settings whose effect this merge does not reproduce: refused rather than merged wrongly
UNSUPPORTED = ("fan_in_fan_out", "use_qalora", "layer_replication", "trainable_token_indices", "target_parameters")


@dataclass
class LowRank:
    """The LoRA update of one base tensor (`{module}.weight`)."""

    a: object  # [r, in] (embeddings: [r, vocab])
    b: object  # [out, r] (embeddings: [dim, r])
    scaling: float
    embedding: bool = False
    magnitude: object = None  # DoRA's m, one value per output row (embeddings: per dimension)
    bias: object = None  # lora_B.bias (lora_bias: true)

    def delta(self):
        """scaling * B @ A in float32, in the base tensor's [out, in] layout."""
        product = self.b.float() @ self.a.float()
        return (product.T if self.embedding else product) * self.scaling


@dataclass
class Adapter:
    """What a LoRA adapter does to the base checkpoint, keyed by base tensor name."""

    low_rank: dict[str, LowRank] = field(default_factory=dict)
    replaced: dict[str, object] = field(default_factory=dict)  # full tensors that take the base's place

    @property
    def targets(self) -> set[str]:
        biases = {_bias_name(name) for name, update in self.low_rank.items() if update.bias is not None}
        return set(self.low_rank) | set(self.replaced) | biases

    def apply(self, name: str, tensor):
        """The merged value of base tensor `name` (float32 when changed, the input as is otherwise).

        A saved tensor takes the base's place first: peft saves an embedding or output layer's base weight
        beside its LoRA pair (`save_embedding_layers`), and the update applies on top of it.
        """
        if name in self.replaced:
            tensor = self.replaced[name]
            if name not in self.low_rank:
                return tensor.float()
        if name in self.low_rank:
            return _merge_weight(tensor.float(), self.low_rank[name])
        weight = name.removesuffix(".bias") + ".weight"
        if name.endswith(".bias") and weight in self.low_rank and self.low_rank[weight].bias is not None:
            update = self.low_rank[weight]
            return tensor.float() + update.bias.float() * update.scaling
        return tensor


def _merge_weight(weight, update: LowRank):
    merged = weight + update.delta()
    if update.magnitude is None:
        return merged
    magnitude = update.magnitude.float()
    if update.embedding:  # peft: the norm of the transposed weight, one per embedding dimension
        return merged * (magnitude / merged.norm(dim=0)).view(1, -1)
    return merged * (magnitude / merged.norm(dim=1)).view(-1, 1)


def _bias_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight") + ".bias"


def read_adapter(folder: Path, *, device: str = "cpu") -> Adapter:
    """Read `adapter_config.json` and `adapter_model.safetensors` of a LoRA adapter folder onto `device`.

    Raises:
        InputError: not a LoRA adapter, or one using settings this merge cannot reproduce.
    """
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise InputError(f"{folder}: holds a {config.get('peft_type')} adapter, not the LoRA adapter the run trained")
    used = [key for key in UNSUPPORTED if config.get(key)]
    if used:
        raise InputError(f"{folder}/adapter_config.json: cannot merge an adapter with {', '.join(used)} set")
    tensors = load_file(folder / ADAPTER_WEIGHTS, device=device)
    adapter = Adapter()
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        module, part = _split(name)
        if part is None:
            adapter.replaced[name.replace(".base_layer.", ".")] = tensor
            continue
        update = adapter.low_rank.setdefault(module + ".weight", LowRank(None, None, 0.0))
        setattr(update, part, tensor)
        update.embedding = update.embedding or key.endswith(("lora_embedding_A", "lora_embedding_B"))
    for weight_name, update in adapter.low_rank.items():
        if update.a is None or update.b is None:
            raise InputError(f"{folder}/{ADAPTER_WEIGHTS}: {weight_name} has only half of its LoRA pair")
        update.scaling = _scaling(config, weight_name.removesuffix(".weight"), rank=update.a.shape[0])
    return adapter


def _split(name: str) -> tuple[str, str | None]:
    """(module, which LoRA part) of an adapter tensor name; part None for a full tensor."""
    parts = {
        ".lora_A.weight": "a",
        ".lora_B.weight": "b",
        ".lora_B.bias": "bias",
        ".lora_embedding_A": "a",
        ".lora_embedding_B": "b",
        ".lora_magnitude_vector": "magnitude",
    }
    for suffix, part in parts.items():
        if name.endswith(suffix):
            return name.removesuffix(suffix), part
    return name, None


def _scaling(config: dict, module: str, *, rank: int) -> float:
    """alpha / r (or alpha / sqrt(r)), with peft's per-module rank_pattern / alpha_pattern overrides."""
    from peft.utils.other import get_pattern_key

    alpha = config["lora_alpha"]
    if config.get("alpha_pattern"):
        key = get_pattern_key(config["alpha_pattern"].keys(), module)
        alpha = config["alpha_pattern"].get(key, alpha)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def peft_config(spec: LoraSpec, tokenizer_source: str):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        modules_to_save=spec.modules_to_save or None,
        bias=spec.bias,
        use_rslora=spec.use_rslora,
        use_dora=spec.use_dora,
    )


def lora_targets(spec: LoraSpec, shape) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each adapted linear module of one decoder layer."""
    linears = shape.linear_shapes()
    if spec.target_modules == "all-linear":
        return linears
    return {name: dims for name, dims in linears.items() if name in spec.target_modules}


def trainable_tensors(spec: LoraSpec, shape, setup) -> Tensors:
    """A and B per target and layer (and DoRA's magnitudes) in float32; modules_to_save in full."""
    tensors = []
    for in_features, out_features in lora_targets(spec, shape).values():
        tensors += [spec.r * in_features, spec.r * out_features] + ([out_features] if spec.use_dora else [])
    tensors *= shape.num_layers
    saved_bytes = 4 if setup.kbit_prepared else setup.weight_bytes
    embeddings = [name for name in spec.modules_to_save if name in ("embed_tokens", "lm_head")]
    to_save = [shape.vocab_size * shape.hidden_size] * len(embeddings)
    return [(n, 4) for n in tensors] + [(n, saved_bytes) for n in to_save]


def variant(spec: LoraSpec) -> str:
    return "dora" if spec.use_dora else "rslora" if spec.use_rslora else "lora"


def name(spec: LoraSpec, quant_bits: int | None) -> str:
    """lora, rslora or dora; q-prefixed on a 4-bit base (QLoRA), marked on an 8-bit one."""
    return {4: f"q{variant(spec)} (4-bit)", 8: f"{variant(spec)} (8-bit base)"}.get(quant_bits, variant(spec))


def tags(spec: LoraSpec, quant_bits: int | None) -> list[str]:
    return ["lora"] + ["qlora"] * (quant_bits == 4) + ["dora"] * spec.use_dora + ["rslora"] * spec.use_rslora


def check(recipe: Recipe) -> list[KeyProblem]:
    quant = recipe.quant
    if recipe.adapter.use_dora and quant is not None and quant.bits == 8:
        return [
            KeyProblem(("adapter", "use_dora"), "DoRA is not supported on an 8-bit base by peft", "use quant.bits: 4")
        ]
    return []


METHOD = Method(
    spec=LoraSpec,
    peft_config=peft_config,
    trainable_tensors=trainable_tensors,
    name=name,
    tags=tags,
    read_merge=read_adapter,
    check=check,
)
