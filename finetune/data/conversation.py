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
            model learns to stop.
    """

    segments: tuple[Segment, ...]
    row: str
    add_eos: bool = True


class RowError(ValueError):
    """A dataset adapter cannot turn a row into a sample; the message names the field."""
