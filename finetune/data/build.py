"""Data spec -> tokenized train/eval samples and a report of what happened to every row.

Steps, in order: read rows -> adapter (row -> Conversation) -> split -> tokenize -> report. Every bad
row is reported at once, by file and row; every dropped or truncated row is counted in the report.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from finetune.data import alpaca, goat
from finetune.data.conversation import Conversation, RowError
from finetune.data.sources import Rows, read_rows
from finetune.data.tokenize import Sample, tokenize_conversations
from finetune.errors import DataError, InputError, Problem
from finetune.recipe.schema import DataSpec

Adapter = Callable[..., Conversation]
DATASET_ADAPTERS: dict[str, Adapter] = {"alpaca": alpaca.to_conversation, "goat": goat.to_conversation}
MAX_PROBLEMS = 20


@dataclass
class DataReport:
    """What the data pipeline did; written to the run folder as data.json."""

    source: str
    source_sha256: str
    rows_read: int
    train_rows: int = 0
    eval_rows: int = 0
    train_tokens: int = 0
    trained_tokens: int = 0
    truncated_rows: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dropped_rows: list[dict] = field(default_factory=list)
    fingerprint: str = ""


@dataclass
class BuiltData:
    train: list[Sample]
    eval: list[Sample]
    report: DataReport


def build_datasets(spec: DataSpec, tokenizer, seed: int) -> BuiltData:
    """Read, convert, split and tokenize the recipe's data.

    Args:
        spec: the recipe's `data` section.
        tokenizer: the model's tokenizer (its BOS/EOS ids are used).
        seed: seeds the eval split, so the same recipe always holds out the same rows.

    Raises:
        DataError: bad rows, each named by file and row.
        InputError: a source that cannot be read or yields no usable sample.
    """
    warnings = check_tokenizer(spec, tokenizer)
    source = read_rows(spec.path, spec.split, spec.max_rows)
    conversations = to_conversations(source, spec)
    if spec.eval_path is not None:
        train_convs = conversations
        eval_convs = to_conversations(read_rows(spec.eval_path, spec.split), spec)
    else:
        train_convs, eval_convs = split_holdout(conversations, spec.eval_fraction, seed)
    train, train_dropped = tokenize_conversations(train_convs, tokenizer, spec.max_seq_len, spec.overlong)
    eval_, eval_dropped = tokenize_conversations(eval_convs, tokenizer, spec.max_seq_len, spec.overlong)
    if not train:
        raise InputError(
            f"{spec.path}: no training sample left after applying data.overlong={spec.overlong} "
            f"with data.max_seq_len={spec.max_seq_len}"
        )
    report = DataReport(
        source=source.name,
        source_sha256=source.sha256,
        rows_read=len(source.rows),
        train_rows=len(train),
        eval_rows=len(eval_),
        train_tokens=sum(len(s.input_ids) for s in train),
        trained_tokens=sum(s.trained_tokens for s in train),
        truncated_rows=[s.row for s in train + eval_ if s.truncated],
        dropped_rows=[{"row": d.row, "reason": d.reason} for d in train_dropped + eval_dropped],
        warnings=warnings,
        fingerprint=fingerprint(train, eval_),
    )
    return BuiltData(train, eval_, report)


def check_tokenizer(spec: DataSpec, tokenizer) -> list[str]:
    """Warnings about the tokenizer for this data (an error where the recipe asks for one)."""
    if spec.format != "goat":
        return []
    problem = goat.digit_split_problem(tokenizer)
    if problem and spec.require_digit_split:
        raise InputError(f"data.require_digit_split: {problem}")
    return [problem] if problem else []


def to_conversations(source: Rows, spec: DataSpec) -> list[Conversation]:
    """Apply the dataset adapter to every row, collecting every bad row before failing."""
    adapter = partial(DATASET_ADAPTERS[spec.format], train_on_prompt=spec.train_on_prompt)
    conversations, problems = [], []
    for row, ref in zip(source.rows, source.refs, strict=True):
        try:
            conversations.append(adapter(row, ref))
        except RowError as e:
            problems.append(Problem(ref, "", str(e)))
    if problems:
        raise DataError(problems[:MAX_PROBLEMS], omitted=max(0, len(problems) - MAX_PROBLEMS))
    return conversations


def split_holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a seeded random `fraction` of the items (at least one when fraction > 0) is held out."""
    if fraction <= 0:
        return list(items), []
    n_eval = min(len(items) - 1, max(1, math.ceil(len(items) * fraction)))
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_eval])
    train = [item for i, item in enumerate(items) if i not in held_out]
    eval_ = [item for i, item in enumerate(items) if i in held_out]
    return train, eval_


def fingerprint(*splits: list[Sample]) -> str:
    """sha256 over every split's token ids and masks: equal fingerprints mean the model saw equal data."""
    digest = hashlib.sha256()
    for split in splits:
        digest.update(b"|split|")
        for sample in split:
            digest.update(",".join(map(str, sample.input_ids)).encode())
            digest.update(b":")
            digest.update(bytes(sample.completion_mask))
            digest.update(b";")
    return digest.hexdigest()
