"""What every dataset adapter produces: text segments, each trained or masked."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """A span of text and whether the loss is computed on its tokens."""

    text: str
    trained: bool


@dataclass(frozen=True)
class Conversation:
    """One training sample as segments, in order.

    Args:
        segments: tokenized one by one and concatenated, so a mask boundary never depends on how the
            tokenizer would merge text across it.
        row: where the sample came from, for messages (`data/x.json: row 3`).
        add_eos: append the tokenizer's EOS after the last segment, with the last segment's mask, so the
            model learns to stop (chat templates write their own end-of-turn tokens).
        whole_text: the segments are pieces of one rendered text that already holds its special tokens
            (a chat template). They are tokenized as growing prefixes of that text, and each prefix's ids
            must begin with the previous prefix's ids, so every prompt gets exactly the ids that
            `apply_chat_template` gives it at inference. Otherwise each segment is tokenized on its own,
            after a BOS.
        group: samples with the same group fall on the same side of the train/eval split (one Goat problem
            in its several phrasings), so nothing held out was trained on in other words. None: its own group.
    """

    segments: tuple[Segment, ...]
    row: str
    add_eos: bool = True
    whole_text: bool = False
    group: str | None = None


class RowError(ValueError):
    """A dataset adapter cannot turn a row into a sample; the message names the field."""


def expect_object(row, *keys: str) -> None:
    """Raises RowError unless the row is a JSON object (a dict)."""
    if not isinstance(row, dict):
        raise RowError(f"expected an object with {' and '.join(repr(k) for k in keys)}, got {type(row).__name__}")


def text_field(row: dict, key: str, *, required: bool) -> str:
    """A string field of a row; a required one must be present and not blank.

    Raises:
        RowError: the field is missing, not a string, or blank when required.
    """
    if key not in row or row[key] is None:
        if required:
            raise RowError(f"'{key}' is missing")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"'{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RowError(f"'{key}' is empty")
    return value
