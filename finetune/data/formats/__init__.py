"""The data formats: one module per `data.format`, and this registry of what each means.

A format says how a row becomes a `Conversation` (its template), whether its rows are conversations
rendered with the tokenizer's chat template, and how `finetune generate` / `eval` prompt a run that
trained on it. The registry is checked when this package is imported: it and the recipe schema's
`Format` list the same names, each entry complete, so a format added to one and not the other fails at
import, not when a run or `generate` first meets it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import get_args

from finetune.data.conversation import Conversation
from finetune.data.formats import alpaca, goat, lima, sharegpt
from finetune.recipe.schema import Format

CHAT = "chat"  # the prompt format of every chat-template data format


@dataclass(frozen=True)
class DataFormat:
    """One data format.

    Args:
        to_conversation: `(row, ref, *, train_on_prompt, [render, train_on]) -> Conversation`; raises RowError
            naming what is wrong with a row. Chat formats also take `render` (the chat template) and `train_on`.
        uses_chat_template: rows are conversations rendered with the tokenizer's chat template.
        format_prompt: `(instruction, input) -> text`, the prompt `generate` and `eval` give a run that trained
            on this format; None for a chat format, whose prompt is a user turn through the chat template.
    """

    to_conversation: Callable[..., Conversation]
    uses_chat_template: bool = False
    format_prompt: Callable[[str, str], str] | None = None


FORMATS: dict[str, DataFormat] = {
    "alpaca": DataFormat(alpaca.to_conversation, format_prompt=alpaca.format_prompt),
    "goat": DataFormat(goat.to_conversation, format_prompt=lambda instruction, input: goat.format_prompt(instruction)),
    "lima": DataFormat(lima.to_conversation, uses_chat_template=True),
    "sharegpt": DataFormat(sharegpt.to_conversation, uses_chat_template=True),
}


def check_registry(formats: dict[str, DataFormat]) -> None:
    """Raises TypeError unless `formats` and the schema's `Format` match one to one, each entry complete."""
    schema = set(get_args(Format))
    if set(formats) != schema:
        raise TypeError(
            f"data formats without an entry: {sorted(schema - set(formats))}; "
            f"entries without a format in the schema: {sorted(set(formats) - schema)}"
        )
    for name, entry in formats.items():
        if not callable(entry.to_conversation):
            raise TypeError(f"data format {name!r} cannot read a row (to_conversation)")
        if entry.uses_chat_template == (entry.format_prompt is not None):
            raise TypeError(f"data format {name!r} needs exactly one of a chat template and a format_prompt")
        if name == CHAT:
            raise TypeError(f"data format {name!r} would hide the chat prompt format")


check_registry(FORMATS)


def uses_chat_template(names) -> bool:
    """Whether any of these data formats renders its rows with the chat template."""
    return any(FORMATS[name].uses_chat_template for name in names)


def prompt_format(name: str) -> str:
    """How `generate` prompts a run trained on data format `name`: chat, or the format's own template."""
    return CHAT if FORMATS[name].uses_chat_template else name
