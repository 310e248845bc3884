"""adapter.kind: prompt (prompt tuning): trained embeddings prepended to the input."""

from __future__ import annotations

from finetune.model.methods.method import Method, packed_rows_problems
from finetune.recipe.schema import PromptSpec


def peft_config(spec: PromptSpec, tokenizer_source: str):
    """Random soft prompt, or one initialised from `init_text` (tokenized with the run's tokenizer)."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    if spec.init_text is None:
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=spec.num_virtual_tokens)
    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=spec.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=spec.init_text,
        tokenizer_name_or_path=tokenizer_source,
    )


METHOD = Method(
    spec=PromptSpec,
    peft_config=peft_config,
    trainable_tensors=lambda spec, shape, setup: [(spec.num_virtual_tokens * shape.hidden_size, 4)],
    name=lambda spec, quant_bits: "prompt-tuning",
    tags=lambda spec, quant_bits: ["prompt-tuning"],
    read_merge=None,
    merge_refusal="{run}: prompt tuning cannot be merged: it adds virtual tokens, not changes to base weights; "
    "`finetune export {run} --format adapter` writes the adapter for use with peft",
    check=packed_rows_problems,
)
