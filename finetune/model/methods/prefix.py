"""adapter.kind: prefix (prefix-tuning): trained key/value vectors prepended at every layer."""

from __future__ import annotations

from finetune.model.methods.method import Method, Tensors, packed_rows_problems
from finetune.recipe.checks import KeyProblem
from finetune.recipe.schema import PrefixSpec, Recipe


def peft_config(spec: PrefixSpec, tokenizer_source: str):
    from peft import PrefixTuningConfig, TaskType

    return PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=spec.num_virtual_tokens,
        prefix_projection=spec.prefix_projection,
        encoder_hidden_size=spec.encoder_hidden_size,
    )


def trainable_tensors(spec: PrefixSpec, shape, setup) -> Tensors:
    """A key and a value per virtual token and layer (float32), or the MLP that produces them."""
    h, width = shape.hidden_size, 2 * shape.num_layers * shape.kv_dim
    if not spec.prefix_projection:
        return [(spec.num_virtual_tokens * width, 4)]
    hidden = spec.encoder_hidden_size or h
    return [(n, 4) for n in (spec.num_virtual_tokens * h, h * hidden, hidden, hidden * width, width)]


def check(recipe: Recipe) -> list[KeyProblem]:
    problems = packed_rows_problems(recipe)
    if recipe.train.gradient_checkpointing:
        problems.append(
            KeyProblem(
                ("train", "gradient_checkpointing"),
                "adapter.kind: prefix cannot train with gradient checkpointing: checkpointed decoder layers drop "
                "the prefix key/values",
                "set train.gradient_checkpointing: false (or leave it out; it is then off for prefix-tuning)",
            )
        )
    return problems


METHOD = Method(
    spec=PrefixSpec,
    peft_config=peft_config,
    trainable_tensors=trainable_tensors,
    name=lambda spec, quant_bits: "prefix-tuning",
    tags=lambda spec, quant_bits: ["prefix-tuning"],
    read_merge=None,
    merge_refusal="{run}: prefix tuning cannot be merged: it adds virtual tokens, not changes to base weights; "
    "`finetune export {run} --format adapter` writes the adapter for use with peft",
    check=check,
)
