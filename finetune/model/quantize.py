"""Recipe `quant` section -> bitsandbytes configuration: the one place it is built."""

from __future__ import annotations

from finetune.recipe.schema import QuantSpec


def build_bnb_config(spec: QuantSpec, compute_dtype):
    """A `BitsAndBytesConfig` for 4-bit (NF4/FP4, QLoRA) or 8-bit (LLM.int8) loading.

    Args:
        spec: the recipe's `quant` section.
        compute_dtype: torch dtype the 4-bit matmuls run in (the training precision).
    """
    from transformers import BitsAndBytesConfig

    if spec.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.type,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=spec.storage_dtype,
    )
