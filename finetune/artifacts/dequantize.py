"""The base weights a QLoRA adapter trained against, for `finetune merge --base dequantized`.

A QLoRA run never saw its base's 16-bit weights: every Linear was NF4 (or FP4) quantized at load time and
each forward pass dequantized it. Merging the adapter into the original 16-bit weights therefore gives a
model that differs from the trained one by the base's quantization error (huggingface/peft#1043, #2105;
huggingface/transformers#31293). Here the base is loaded quantized exactly as the run loaded it (its
recipe's `model` and `quant` sections, through `model/load.py`), and each bitsandbytes 4-bit Linear's
weight is dequantized back to the dense matrix the forward pass used, one at a time on request, so the
merge streams them like checkpoint tensors. Everything bitsandbytes leaves unquantized (embeddings, norms,
lm_head) is the checkpoint's own tensor.

An 8-bit (LLM.int8) base is refused: its matmuls also round every input to int8 (outlier columns aside),
so no 16-bit weights reproduce the model it trained with; on the tiny test model the dequantized merge was
barely closer to the 8-bit model than the original one.
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import InputError
from finetune.recipe.schema import Recipe

BASE_WEIGHTS = ("original", "dequantized")


def check_base_weights(run: Path, recipe: Recipe, base_weights: str) -> None:
    """`--base dequantized` needs a run that trained on a 4-bit base (checked before anything is loaded).

    Raises:
        InputError: an unknown choice, a run without `quant`, or an 8-bit run.
    """
    if base_weights not in BASE_WEIGHTS:
        raise InputError(f"--base: expected one of {', '.join(BASE_WEIGHTS)} (got {base_weights!r})")
    if base_weights == "original":
        return
    if recipe.quant is None:
        raise InputError(
            f"--base dequantized: {run} trained on a 16-bit base (its recipe has no quant section), so there are "
            "no quantized weights to dequantize; merge with --base original"
        )
    if recipe.quant.bits == 8:
        raise InputError(
            f"--base dequantized: {run} trained on an 8-bit (LLM.int8) base, whose matmuls also round their "
            "inputs to int8, so no 16-bit weights reproduce it; merge with --base original"
        )


class DequantizedBase:
    """The dense weights of a base model's bitsandbytes 4-bit Linears, keyed by checkpoint tensor name."""

    def __init__(self, model) -> None:
        self._model = model  # owns the quantized tensors the modules below point into
        self._modules = {
            f"{name}.weight": module
            for name, module in model.named_modules()
            if type(getattr(module, "weight", None)).__name__ == "Params4bit"
        }
        self.names = frozenset(self._modules)

    def __contains__(self, name: str) -> bool:
        return name in self._modules

    def weight(self, name: str):
        """The weight `name` as the quantized model's forward pass used it, in the dtype it was loaded in."""
        from bitsandbytes.functional import dequantize_4bit

        weight = self._modules[name].weight
        return dequantize_4bit(weight.data, weight.quant_state)


def load_dequantized_base(recipe: Recipe, device: str) -> DequantizedBase:
    """The run's base, loaded quantized as the run loaded it, ready to give back its dense weights.

    Raises:
        InputError: the base cannot be loaded (see `model.load.load_model`), or it holds no 4-bit Linear.
    """
    from finetune.model.load import load_model

    base = DequantizedBase(load_model(recipe.model, recipe.quant, device=device))
    if not base.names:
        raise InputError(f"{recipe.model.name_or_path}: loaded with the run's quant section, it has no 4-bit Linear")
    return base
