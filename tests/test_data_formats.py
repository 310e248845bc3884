"""The format registry: it matches the recipe schema one to one, and a format missing, extra or half-described
fails when the registry is checked (at import); `generate` offers every format's prompt."""

from __future__ import annotations

import dataclasses
from typing import get_args

import pytest

from finetune.cli import build_parser
from finetune.data.formats import FORMATS, DataFormat, check_registry, prompt_format
from finetune.eval.prompts import PROMPT_FORMATS
from finetune.recipe.schema import Format


def test_every_schema_format_has_an_entry():
    assert set(FORMATS) == set(get_args(Format))
    check_registry(FORMATS)


def test_a_format_without_an_entry_fails_the_check():
    with pytest.raises(TypeError, match=r"data formats without an entry: \['sharegpt'\]"):
        check_registry({name: f for name, f in FORMATS.items() if name != "sharegpt"})


def test_an_entry_without_a_schema_format_fails_the_check():
    with pytest.raises(TypeError, match=r"entries without a format in the schema: \['dolly'\]"):
        check_registry(FORMATS | {"dolly": FORMATS["alpaca"]})


def test_an_entry_with_no_way_to_prompt_fails_the_check():
    unfinished = dataclasses.replace(FORMATS["alpaca"], format_prompt=None)
    with pytest.raises(TypeError, match="'alpaca' needs exactly one of a chat template and a format_prompt"):
        check_registry(FORMATS | {"alpaca": unfinished})
    with pytest.raises(TypeError, match="'lima' cannot read a row"):
        check_registry(FORMATS | {"lima": DataFormat(None, uses_chat_template=True)})


def test_chat_formats_prompt_through_the_chat_template():
    assert {name: prompt_format(name) for name in FORMATS} == {
        "alpaca": "alpaca",
        "goat": "goat",
        "lima": "chat",
        "sharegpt": "chat",
    }


def test_generate_offers_every_prompt_format():
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    [choice] = [action for action in generate._actions if action.dest == "format"]
    assert tuple(choice.choices) == PROMPT_FORMATS
