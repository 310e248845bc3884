"""Recipe `adapter` section -> peft configuration -> the model wrapped for training."""

from __future__ import annotations

from finetune.recipe.schema import LoraSpec


def build_lora_config(spec: LoraSpec):
    """The one place a `peft.LoraConfig` is built."""
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


def wrap_adapter(model, spec: LoraSpec, *, gradient_checkpointing: bool):
    """Freeze the base model and add the adapter; a quantized base is first prepared for k-bit training."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_quantized", False):
        # Casts norms to fp32 and makes the embedding output require grad, which checkpointing needs
        # when every weight before the first adapter is frozen.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return get_peft_model(model, build_lora_config(spec))


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
