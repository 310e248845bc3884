"""The adapter methods: one module per `adapter.kind`, each holding what its kind means (see `method.py`).

The registry is checked when this package is imported: every kind of the recipe schema has a complete
entry here and every entry is a kind of the schema, so a kind added to one and not the other, or left
half-described, fails at import rather than in the middle of a run.
"""

from __future__ import annotations

from typing import get_args

from finetune.model.methods import full, ia3, lora, prefix, prompt
from finetune.model.methods.method import Method
from finetune.recipe.schema import ADAPTER_SPECS, AdapterSection, AdapterSpec

METHODS: dict[str, Method] = {
    "lora": lora.METHOD,
    "prefix": prefix.METHOD,
    "prompt": prompt.METHOD,
    "ia3": ia3.METHOD,
    "none": full.METHOD,
}


def check_registry(methods: dict[str, Method]) -> None:
    """Raises TypeError unless `methods` and the schema's adapter kinds match one to one, each complete."""
    union = {get_args(member)[0] for member in get_args(get_args(AdapterSpec)[0])}
    if union != set(ADAPTER_SPECS.values()):
        raise TypeError("recipe/schema/adapter.py: AdapterSpec and ADAPTER_SPECS list different adapter sections")
    if set(methods) != set(ADAPTER_SPECS):
        raise TypeError(
            f"adapter kinds without a method: {sorted(set(ADAPTER_SPECS) - set(methods))}; "
            f"methods without a kind in the schema: {sorted(set(methods) - set(ADAPTER_SPECS))}"
        )
    for kind, method in methods.items():
        if method.spec is not ADAPTER_SPECS[kind] or get_args(method.spec.model_fields["kind"].annotation) != (kind,):
            raise TypeError(f"method {kind!r} describes {method.spec.__name__}, not the schema's section for {kind!r}")
        if method.missing():
            raise TypeError(f"method {kind!r} leaves out: {', '.join(method.missing())}")


check_registry(METHODS)


def method_of(spec: AdapterSection) -> Method:
    """The method of a recipe's `adapter` section."""
    return METHODS[spec.kind]


def listing_name(adapter: dict | None, quant_bits: int | None) -> str:
    """The method of a run folder's recipe as written (a mapping), as listings name it; its kind when the
    section no longer validates."""
    from pydantic import TypeAdapter, ValidationError

    try:
        spec = TypeAdapter(AdapterSpec).validate_python(adapter or {})
    except ValidationError:
        return str((adapter or {}).get("kind", "?"))
    return method_of(spec).name(spec, quant_bits)


def run_method_name(recipe: dict) -> str:
    """The method of a run folder's recipe (a mapping, as read back), as listings and cards name it."""
    return listing_name(recipe.get("adapter"), (recipe.get("quant") or {}).get("bits"))
