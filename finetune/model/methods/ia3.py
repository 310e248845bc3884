"""adapter.kind: ia3 ((IA)^3, Liu et al. 2022): a trained vector per target module that rescales it, and its
merge into the base weights.

peft (`peft/tuners/ia3/layer.py` `Linear.merge`) stores the vector l as [out, 1] for an attention target,
which scales the module's output, and as [1, in] for a feed-forward target, which scales its input, so
both fold into the weight the same way:
  W' = W * l          (broadcast: output rows, or input columns)
  b' = b * l          (attention targets only; a feed-forward target's bias is added after the scaling)
The arithmetic runs in float32 whatever the storage dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import InputError
from finetune.model.methods.method import Method, Tensors
from finetune.recipe.checks import KeyProblem
from finetune.recipe.schema import IA3Spec, Recipe

PREFIX, SUFFIX = "base_model.model.", ".ia3_l"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_config(spec: IA3Spec, tokenizer_source: str):
    from peft import IA3Config, TaskType

    return IA3Config(
        task_type=TaskType.CAUSAL_LM,
        target_modules=spec.target_modules,
        feedforward_modules=spec.feedforward_modules,
    )


def trainable_tensors(spec: IA3Spec, shape, setup) -> Tensors:
    """One float32 vector per target and layer: input-sized for feed-forward targets, output-sized otherwise."""
    sizes = [
        in_features if name in spec.feedforward_modules else out_features
        for name, (in_features, out_features) in shape.linear_shapes().items()
        if name in spec.target_modules
    ]
    return [(n, 4) for n in sizes * shape.num_layers]


def check(recipe: Recipe) -> list[KeyProblem]:
    spec, problems = recipe.adapter, []
    strays = [name for name in spec.feedforward_modules if name not in spec.target_modules]
    if strays:
        problems.append(
            KeyProblem(
                ("adapter", "feedforward_modules"),
                f"{', '.join(strays)} {'is' if len(strays) == 1 else 'are'} not in adapter.target_modules",
                "list only target modules here, or add them to adapter.target_modules",
            )
        )
    if recipe.quant is not None:
        # SFTTrainer casts a quantized model's trainable weights to bfloat16 (the QLoRA recipe), and a scale
        # near 1 in bfloat16 only moves in steps of 1/128: at (IA)^3 learning rates it never changes.
        problems.append(
            KeyProblem(
                ("quant", "bits"),
                "adapter.kind: ia3 cannot train on a quantized base: the trainer keeps a quantized model's adapter "
                "in bfloat16, where its scales (near 1) cannot take steps below 1/128",
                "remove the quant section (ia3 trains few values; the base stays frozen in 16 bits)",
            )
        )
    return problems


@dataclass
class Scales:
    """What a saved (IA)^3 adapter does to the base checkpoint, keyed by base tensor name."""

    vectors: dict[str, object] = field(default_factory=dict)  # `{module}.weight` -> l ([out, 1] or [1, in])
    replaced: dict[str, object] = field(default_factory=dict)  # full tensors that take the base's place

    @property
    def targets(self) -> set[str]:
        return set(self.vectors) | set(self.replaced)

    def apply(self, name: str, tensor):
        """The merged value of base tensor `name` (float32 when changed, the input as is otherwise)."""
        if name in self.replaced:
            return self.replaced[name].float()
        if name in self.vectors:
            return tensor.float() * self.vectors[name].float()
        weight = name.removesuffix(".bias") + ".weight"
        if name.endswith(".bias") and weight in self.vectors and self.vectors[weight].shape[1] == 1:
            return tensor.float() * self.vectors[weight].float().view(-1)
        return tensor


def read_scales(folder: Path, *, device: str = "cpu") -> Scales:
    """Read `adapter_config.json` and `adapter_model.safetensors` of an (IA)^3 adapter folder onto `device`.

    Raises:
        InputError: not an (IA)^3 adapter, or one stored transposed (fan_in_fan_out).
    """
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type") != "IA3":
        raise InputError(f"{folder}: holds a {config.get('peft_type')} adapter, not the IA3 adapter the run trained")
    if config.get("fan_in_fan_out"):
        raise InputError(f"{folder}/adapter_config.json: cannot merge an adapter with fan_in_fan_out set")
    scales = Scales()
    for key, tensor in load_file(folder / ADAPTER_WEIGHTS, device=device).items():
        name = key.removeprefix(PREFIX)
        if name.endswith(SUFFIX):
            scales.vectors[name.removesuffix(SUFFIX) + ".weight"] = tensor
        else:
            scales.replaced[name.replace(".base_layer.", ".")] = tensor
    return scales


METHOD = Method(
    spec=IA3Spec,
    peft_config=peft_config,
    trainable_tensors=trainable_tensors,
    name=lambda spec, quant_bits: {4: "ia3 (4-bit base)", 8: "ia3 (8-bit base)"}.get(quant_bits, "ia3"),
    tags=lambda spec, quant_bits: ["ia3"],
    read_merge=read_scales,
    check=check,
)
