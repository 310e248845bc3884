"""What an adapter kind means, as one record: the registry in `model/methods/__init__.py` holds one per kind.

Every place that needs to know something of a kind (the peft config, the memory planner, merge, model
cards and run listings, the run folder, the recipe checks) asks its `Method`, so a new kind is one module
and one registry line, and the registry refuses an entry that leaves a question unanswered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finetune.recipe.checks import KeyProblem
from finetune.recipe.schema import AdapterSection, Recipe

Tensors = list[tuple[int, int]]  # (values, bytes per value) of each trainable tensor


def no_problems(recipe: Recipe) -> list[KeyProblem]:
    return []


@dataclass(frozen=True)
class Method:
    """One adapter kind's meaning.

    Args:
        spec: its section class in recipe/schema/adapter.py (the documentation of its keys).
        peft_config: `(spec, tokenizer_source) -> peft config`; None when no peft model wraps the base
            (full fine-tuning trains the model itself, and the run folder holds a whole model).
        trainable_tensors: `(spec, shape, setup) -> [(values, bytes)]` for the memory planner
            (`shape`: model.shape.ModelShape, `setup`: train.plan.Setup).
        name: `(spec, quant_bits) -> str`, the method as run listings show it.
        tags: `(spec, quant_bits) -> [str]`, the method as model cards tag it.
        read_merge: `(adapter_folder, *, device) -> updates` with `targets` (base tensor names it changes),
            `replaced` (tensors that take the base's place) and `apply(name, tensor)`; None when the kind
            cannot be folded into the base weights.
        merge_refusal: why not, when read_merge is None; `{run}` and `{artifact}` name the run's folders.
        check: `recipe -> [KeyProblem]`, combinations of keys this kind cannot train with.
    """

    spec: type[AdapterSection]
    peft_config: Callable[[Any, str], Any] | None
    trainable_tensors: Callable[[Any, Any, Any], Tensors]
    name: Callable[[Any, int | None], str]
    tags: Callable[[Any, int | None], list[str]]
    read_merge: Callable[..., Any] | None
    merge_refusal: str = ""
    check: Callable[[Recipe], list[KeyProblem]] = no_problems

    @property
    def artifact_folder(self) -> str:
        """The run folder's subfolder that holds the trained result."""
        return "model" if self.peft_config is None else "adapter"

    def missing(self) -> list[str]:
        """What this entry leaves unanswered (empty for a complete entry)."""
        gaps = [f for f in ("trainable_tensors", "name", "tags", "check") if not callable(getattr(self, f))]
        if self.peft_config is not None and not callable(self.peft_config):
            gaps.append("peft_config")
        if self.read_merge is None and not self.merge_refusal:
            gaps.append("merge_refusal (it cannot merge, so it must say why)")
        return gaps


def packed_rows_problems(recipe: Recipe) -> list[KeyProblem]:
    """Kinds that prepend virtual tokens once per row cannot train rows packed with several samples."""
    kind = recipe.adapter.kind
    if recipe.data.packing in (None, "none"):
        return []
    return [
        KeyProblem(
            ("data", "packing"),
            f"adapter.kind: {kind} cannot train packed rows: its virtual tokens are prepended once "
            "per row, so every sample after the first would train without them",
            f"set data.packing: none (or leave it out; it is then none for adapter.kind: {kind})",
        )
    ]
