"""Recipe `adapter` section -> peft configuration -> the model wrapped for training.

`adapter.kind` picks the method (`model/methods/`): lora (QLoRA on a quantized base), prefix, prompt, ia3,
or none (full fine-tuning, no peft at all).
"""

from __future__ import annotations

from finetune.model.methods import method_of


def build_peft_config(spec, *, tokenizer_source: str):
    """The one place a peft config is built: the adapter kind's method builds it.

    Args:
        spec: the recipe's `adapter` section (a kind that wraps the model in peft).
        tokenizer_source: folder or hub id of the tokenizer; prompt tuning tokenizes `init_text` with it.
    """
    return method_of(spec).peft_config(spec, tokenizer_source)


def wrap_adapter(model, spec, *, gradient_checkpointing: bool, tokenizer_source: str):
    """Freeze the base model and add the adapter, or (kind: none) make every weight trainable.

    A quantized base is first prepared for k-bit training (norms in fp32, input gradients on).
    """
    if method_of(spec).peft_config is None:
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
