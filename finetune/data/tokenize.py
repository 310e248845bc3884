"""Conversations -> token ids and a completion mask, decided segment by segment.

Each segment is tokenized on its own and the ids are concatenated, so the mask boundary is exactly
the segment boundary. (Tokenizing the whole text and assuming the prompt's ids are a prefix of it is
the boundary bug of many SFT scripts: SentencePiece can merge across the join.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from finetune.data.conversation import Conversation
from finetune.errors import DataError, Problem

Overlong = Literal["truncate", "drop", "error"]


@dataclass(frozen=True)
class Sample:
    """A tokenized sample: `completion_mask[i]` is 1 where the loss is computed on `input_ids[i]`."""

    input_ids: list[int]
    completion_mask: list[int]
    row: str
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(self.completion_mask)


@dataclass(frozen=True)
class Dropped:
    row: str
    reason: str


def tokenize_conversations(
    conversations: Sequence[Conversation], tokenizer, max_seq_len: int, overlong: Overlong = "truncate"
) -> tuple[list[Sample], list[Dropped]]:
    """Tokenize every conversation; apply the overlong policy.

    `truncate` keeps the first `max_seq_len` tokens when at least one token of the last segment (the
    response) survives, and drops the row otherwise.

    Returns:
        The samples, and the rows dropped with the reason (never silently: the caller reports them).

    Raises:
        DataError: with `overlong="error"`, naming every row longer than `max_seq_len`.
    """
    texts = [segment.text for conv in conversations for segment in conv.segments]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    samples, dropped, too_long = [], [], []
    for conv in conversations:
        ids, mask = ([bos], [int(conv.segments[0].trained)]) if bos is not None else ([], [])
        for segment in conv.segments:
            last_segment_start = len(ids)
            piece = next(encoded)
            ids += piece
            mask += [int(segment.trained)] * len(piece)
        if conv.add_eos and eos is not None:
            ids.append(eos)
            mask.append(int(conv.segments[-1].trained))
        if len(ids) <= max_seq_len:
            samples.append(Sample(ids, mask, conv.row))
        elif overlong == "error":
            too_long.append(Problem(conv.row, "", f"{len(ids)} tokens, longer than data.max_seq_len={max_seq_len}"))
        elif overlong == "drop":
            dropped.append(Dropped(conv.row, f"{len(ids)} tokens > max_seq_len {max_seq_len}"))
        elif last_segment_start < max_seq_len:
            samples.append(Sample(ids[:max_seq_len], mask[:max_seq_len], conv.row, truncated=True))
        else:
            dropped.append(Dropped(conv.row, f"prompt fills max_seq_len {max_seq_len}: no response token left"))
    if too_long:
        raise DataError(too_long[:20], omitted=max(0, len(too_long) - 20))
    return samples, dropped
