"""adapter.kind: none (full fine-tuning): every weight trains, no peft model wraps the base, and the run
folder holds a whole model."""

from __future__ import annotations

from finetune.model.methods.method import Method, Tensors
from finetune.recipe.checks import KeyProblem
from finetune.recipe.schema import FullSpec, Recipe


def trainable_tensors(spec: FullSpec, shape, setup) -> Tensors:
    """Every linear weight, bias, norm and embedding (the output head too when it is not tied), in the weight dtype."""
    h, layers = shape.hidden_size, shape.num_layers
    tensors = [i * o for i, o in shape.linear_shapes().values()] * layers
    tensors += [h] * (2 * layers + 1) + [shape.vocab_size * h] * (1 if shape.tied_embeddings else 2)
    if shape.layer_bias_count():  # Qwen2's q/k/v biases
        tensors += [shape.layer_bias_count()] * layers
    return [(n, setup.weight_bytes) for n in tensors]


def check(recipe: Recipe) -> list[KeyProblem]:
    if recipe.quant is None:
        return []
    return [
        KeyProblem(
            ("quant", "bits"),
            "adapter.kind: none (full fine-tuning) cannot train quantized weights",
            "remove the quant section, or train an adapter (adapter.kind: lora is QLoRA)",
        )
    ]


METHOD = Method(
    spec=FullSpec,
    peft_config=None,
    trainable_tensors=trainable_tensors,
    name=lambda spec, quant_bits: "full",
    tags=lambda spec, quant_bits: ["full-fine-tuning"],
    read_merge=None,
    merge_refusal="{run}: a full fine-tuning run has nothing to merge; {artifact} is already a whole model that "
    "AutoModelForCausalLM.from_pretrained loads",
    check=check,
)
