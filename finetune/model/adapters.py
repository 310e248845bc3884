"""Recipe `adapter` section -> peft configuration -> the model wrapped for training.

`adapter.kind` picks the method: lora (QLoRA on a quantized base), prefix, prompt, or none (full
fine-tuning, no peft at all).
"""

from __future__ import annotations

from finetune.recipe.schema import FullSpec, LoraSpec, PrefixSpec, PromptSpec


def build_peft_config(spec: LoraSpec | PrefixSpec | PromptSpec, *, tokenizer_source: str):
    """The one place a peft config is built.

    Args:
        spec: the recipe's `adapter` section (not kind: none).
        tokenizer_source: folder or hub id of the tokenizer; prompt tuning tokenizes `init_text` with it.
    """
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType

    if isinstance(spec, LoraSpec):
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
    if isinstance(spec, PrefixSpec):
        return PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=spec.num_virtual_tokens,
            prefix_projection=spec.prefix_projection,
            encoder_hidden_size=spec.encoder_hidden_size,
        )
    if spec.init_text is None:
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=spec.num_virtual_tokens)
    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=spec.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=spec.init_text,
        tokenizer_name_or_path=tokenizer_source,
    )


def wrap_adapter(model, spec, *, gradient_checkpointing: bool, tokenizer_source: str):
    """Freeze the base model and add the adapter, or (kind: none) make every weight trainable.

    A quantized base is first prepared for k-bit training (norms in fp32, input gradients on).
    """
    if isinstance(spec, FullSpec):
        model.requires_grad_(True)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_quantized", False):
        # Makes the embedding output require grad, which checkpointing needs when every weight before
        # the first adapter is frozen.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return get_peft_model(model, build_peft_config(spec, tokenizer_source=tokenizer_source))


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
