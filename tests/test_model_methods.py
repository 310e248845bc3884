"""The method registry: it matches the recipe schema one to one, and a kind missing, extra or half-described
fails when the registry is checked (at import), not in the middle of a run."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from finetune.model.methods import METHODS, check_registry, listing_name
from finetune.recipe.schema import ADAPTER_SPECS

from conftest import REPO


def test_every_schema_kind_has_a_complete_method():
    assert set(METHODS) == set(ADAPTER_SPECS)
    for kind, method in METHODS.items():
        assert method.spec is ADAPTER_SPECS[kind] and not method.missing(), kind


def test_a_kind_without_a_method_fails_the_check():
    with pytest.raises(TypeError, match=r"adapter kinds without a method: \['ia3'\]"):
        check_registry({kind: m for kind, m in METHODS.items() if kind != "ia3"})


def test_a_method_without_a_schema_kind_fails_the_check():
    with pytest.raises(TypeError, match=r"methods without a kind in the schema: \['vera'\]"):
        check_registry(METHODS | {"vera": METHODS["lora"]})


def test_an_unfinished_method_fails_the_check():
    unfinished = dataclasses.replace(METHODS["ia3"], read_merge=None)  # cannot merge, and says not why
    with pytest.raises(TypeError, match="method 'ia3' leaves out: merge_refusal"):
        check_registry(METHODS | {"ia3": unfinished})
    with pytest.raises(TypeError, match="method 'ia3' leaves out: name"):
        check_registry(METHODS | {"ia3": dataclasses.replace(METHODS["ia3"], name=None)})


def test_a_method_filed_under_another_kind_fails_the_check():
    with pytest.raises(TypeError, match="method 'prompt' describes PrefixSpec"):
        check_registry(METHODS | {"prompt": METHODS["prefix"]})


def test_listing_names_come_from_the_methods():
    assert listing_name({"r": 8}, None) == "lora"  # kind left out: lora
    assert listing_name({"kind": "lora", "use_dora": True}, 4) == "qdora (4-bit)"
    assert listing_name({"kind": "ia3"}, None) == "ia3"
    assert listing_name({"kind": "prefix"}, None) == "prefix-tuning"
    assert listing_name({"kind": "none"}, None) == "full"
    assert listing_name({"kind": "lora", "r": "eight"}, None) == "lora"  # no longer valid: its kind


def test_the_registry_imports_no_torch_or_peft():
    code = "import sys, finetune.model.methods; print(sorted({'torch', 'peft'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
