"""Conversations -> token ids and a completion mask, decided segment by segment.

Each segment is tokenized on its own and the ids are concatenated, so the mask boundary is exactly
the segment boundary. (Tokenizing the whole text and assuming the prompt's ids are a prefix of it is
the boundary bug of many SFT scripts: SentencePiece can merge across the join.)

BOS is added only before segments tokenized on their own; a chat template's text holds the BOS the
template writes (Llama-3's, Mistral's) and nothing is added to it, so no sample holds BOS twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from finetune.data.conversation import Conversation, RowError
from finetune.errors import DataError, Problem

Overlong = Literal["truncate", "drop", "error"]
# Rows from which tokenizing shows a progress bar: a smaller set is tokenized in under a second (Goat rows
# with the tiny LLaMA's tokenizer: about 0.5 ms a row on two busy CPU cores)
LARGE_SET = 1_000
# Texts per tokenizer call: batched for speed, small enough that a progress bar over rows moves steadily
ENCODE_CHUNK = 1024


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
    conversations: Sequence[Conversation],
    tokenizer,
    max_seq_len: int,
    overlong: Overlong = "truncate",
    label: str = "data: tokenizing",
) -> tuple[list[Sample], list[Dropped]]:
    """Tokenize every conversation; apply the overlong policy. A set of more than LARGE_SET rows shows a
    progress bar named `label` (see finetune/progress.py).

    `truncate` keeps the first `max_seq_len` tokens when at least one token of the last segment (the
    response) survives, and drops the row otherwise.

    Returns:
        The samples, and the rows dropped with the reason (never silently: the caller reports them).

    Raises:
        DataError: with `overlong="error"`, naming every row longer than `max_seq_len`.
    """
    from finetune.progress import progress

    encoded = encode_in_chunks(tokenizer, [text for conv in conversations for text in texts_to_encode(conv)])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    samples, dropped, problems = [], [], []
    for conv in progress(conversations, label=label, unit="row", when=len(conversations) > LARGE_SET):
        encodings = [next(encoded) for _ in conv.segments]
        try:
            pieces = split_prefixes(encodings) if conv.whole_text else encodings
        except RowError as e:
            problems.append(Problem(conv.row, "", str(e)))
            continue
        starts_with_bos = bos is not None and not conv.whole_text
        ids, mask = ([bos], [int(conv.segments[0].trained)]) if starts_with_bos else ([], [])
        for segment, piece in zip(conv.segments, pieces, strict=True):
            last_segment_start = len(ids)
            ids += piece
            mask += [int(segment.trained)] * len(piece)
        if conv.add_eos and eos is not None:
            ids.append(eos)
            mask.append(int(conv.segments[-1].trained))
        if len(ids) <= max_seq_len:
            samples.append(Sample(ids, mask, conv.row))
        elif overlong == "error":
            problems.append(Problem(conv.row, "", f"{len(ids)} tokens, longer than data.max_seq_len={max_seq_len}"))
        elif overlong == "drop":
            dropped.append(Dropped(conv.row, f"{len(ids)} tokens > max_seq_len {max_seq_len}"))
        elif last_segment_start < max_seq_len:
            samples.append(Sample(ids[:max_seq_len], mask[:max_seq_len], conv.row, truncated=True))
        else:
            dropped.append(Dropped(conv.row, f"prompt fills max_seq_len {max_seq_len}: no response token left"))
    if problems:
        raise DataError(problems[:20], omitted=max(0, len(problems) - 20))
    return samples, dropped


def encode_in_chunks(tokenizer, texts: list[str]) -> Iterator[list[int]]:
    """The ids of each text (no special tokens added), tokenized a chunk at a time as they are asked for."""
    for start in range(0, len(texts), ENCODE_CHUNK):
        yield from tokenizer(texts[start : start + ENCODE_CHUNK], add_special_tokens=False)["input_ids"]


def texts_to_encode(conv: Conversation) -> list[str]:
    """One text per segment: the segment itself, or (whole_text) the text up to the segment's end."""
    if not conv.whole_text:
        return [segment.text for segment in conv.segments]
    ends = [len(segment.text) for segment in conv.segments]
    whole = "".join(segment.text for segment in conv.segments)
    return [whole[: sum(ends[: i + 1])] for i in range(len(ends))]


def split_prefixes(encodings: list[list[int]]) -> list[list[int]]:
    """Ids of growing prefixes of one text -> the ids each prefix adds, checking nothing before it changed.

    Raises:
        RowError: a prefix's ids do not begin with the previous prefix's ids (the tokenizer merged
            across a segment boundary, so the mask there would be a guess).
    """
    pieces, previous = [], []
    for number, ids in enumerate(encodings, start=1):
        if ids[: len(previous)] != previous:
            raise RowError(
                f"the tokenizer merges text across the end of segment {number - 1} of the chat template's "
                "output, so the loss mask cannot be placed exactly there"
            )
        pieces.append(ids[len(previous) :])
        previous = ids
    return pieces
