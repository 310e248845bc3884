"""Data spec -> tokenized train/eval samples and a report of what happened to every row.

Steps, in order: read rows -> adapter (row -> Conversation) -> split -> dedup -> tokenize -> length filter
-> report, skipped when the cache holds the result. Every bad row is reported at once, by file and row;
every dropped, duplicate or truncated row is listed in the report.
"""

from __future__ import annotations

import hashlib
import math
import random
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

from finetune.data import cache
from finetune.data.conversation import Conversation, RowError
from finetune.data.formats import FORMATS, goat, uses_chat_template
from finetune.data.sources import Rows, read_rows
from finetune.data.templates import end_of_turn_token, resolve_chat_template, template_warnings
from finetune.data.tokenize import Dropped, Sample, tokenize_conversations
from finetune.errors import DataError, InputError, Problem
from finetune.recipe.schema import DataSpec, SourceSpec

Adapter = Callable[..., Conversation]
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
    duplicate_rows: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    cache: str = "off"  # hit, miss (built and stored) or off (data.cache: false)
    dropped_rows: list[dict] = field(default_factory=list)
    fingerprint: str = ""
    # the rows of the eval samples, in order: what `finetune eval` scores, so it never re-derives the split
    held_out_rows: list[str] = field(default_factory=list)
    hub_inputs: list[dict] = field(default_factory=list)  # repo id, revision and commit of each hub dataset read


@dataclass
class BuiltData:
    train: list[Sample]
    eval: list[Sample]
    report: DataReport
    chat_template: str | None = None  # the template chat-format rows were rendered with; saved with the tokenizer


def build_datasets(spec: DataSpec, tokenizer, seed: int) -> BuiltData:
    """Read, convert, split and tokenize the recipe's data (or take it from the cache).

    Args:
        spec: the recipe's `data` section.
        tokenizer: the model's tokenizer (its BOS/EOS ids are used).
        seed: seeds the eval split, so the same recipe always holds out the same rows.

    Raises:
        DataError: bad rows, each named by file and row.
        InputError: a source that cannot be read or yields no usable sample.
    """
    sources = sources_of(spec)
    warnings = check_tokenizer(spec, sources, tokenizer)
    template = None
    if uses_chat_template(source.format for source in sources):
        template_name, template = resolve_chat_template(spec.chat_template, tokenizer)
        warnings += template_warnings(template_name, tokenizer)
    rows = [load_rows(source, key) for source, key in zip(sources, source_keys(spec), strict=True)]
    eval_rows = (
        read_rows(spec.eval_path, spec.split, revision=spec.revision, key="data.eval_path")
        if spec.eval_path is not None
        else None
    )
    digests = "".join(r.sha256 for r in rows) + (eval_rows.sha256 if eval_rows else "")
    hub_inputs = [r.hub for r in [*rows, eval_rows] if r is not None and r.hub is not None]
    key = cache.cache_key(spec, digests, tokenizer, template, seed, commits=tuple(h["commit"] for h in hub_inputs))
    cached = cache.load(key) if spec.cache else None
    if cached is not None:
        held_out = [sample.row for sample in cached["eval"]]
        found = {"cache": "hit", "warnings": warnings, "held_out_rows": held_out, "hub_inputs": hub_inputs}
        report = DataReport(**cached["report"] | found)
        return BuiltData(cached["train"], cached["eval"], report, template)
    built = tokenize_sources(spec, sources, rows, eval_rows, tokenizer, template, seed)
    built.report.warnings = warnings
    built.report.hub_inputs = hub_inputs
    if spec.cache:
        cache.store(key, {"train": built.train, "eval": built.eval, "report": asdict(built.report)})
        built.report.cache = "miss"
    return built


def sources_of(spec: DataSpec) -> list[SourceSpec]:
    """data.sources, or the single source that data.format/path/goat describe."""
    if spec.sources:
        return list(spec.sources)
    return [
        SourceSpec(
            format=spec.format,
            path=spec.path,
            goat=spec.goat,
            split=spec.split,
            revision=spec.revision,
            max_rows=spec.max_rows,
        )
    ]


def source_keys(spec: DataSpec) -> list[str]:
    """The recipe key that names each source's path, for messages."""
    return [f"data.sources.{i}.path" for i in range(len(spec.sources))] if spec.sources else ["data.path"]


def tokenize_sources(spec, sources, rows: list[Rows], eval_rows: Rows | None, tokenizer, template, seed: int):
    """Rows -> conversations -> split -> dedup -> weight -> tokens -> filters, every dropped row accounted for.

    Each source is split on its own (seed + its index), so adding a source never changes which rows of
    another are held out; weights apply to training rows only.
    """
    train_convs, eval_convs, skipped, duplicates = [], [], [], []
    seen: set[str] = set()
    for index, (source, source_rows) in enumerate(zip(sources, rows, strict=True)):
        adapter = make_adapter(source.format, spec, tokenizer, template)
        conversations, bad = to_conversations(source_rows, adapter, spec.on_bad_row)
        skipped += bad
        held_out_fraction = 0.0 if eval_rows is not None else spec.eval_fraction
        source_train, source_eval = split_holdout(
            conversations, held_out_fraction, seed + index, group_of=lambda c: c.group
        )
        source_train, repeated = drop_duplicates(source_train, spec.dedup, seen)
        duplicates += repeated
        train_convs += weighted(source_train, source.weight, seed + index)
        eval_convs += source_eval
    if eval_rows is not None:
        eval_convs, bad = to_conversations(
            eval_rows, make_adapter(spec.format, spec, tokenizer, template), spec.on_bad_row
        )
        skipped += bad
    eval_convs, repeated = drop_duplicates(eval_convs, spec.dedup, seen)
    duplicates += repeated
    train, train_dropped = tokenize_conversations(
        train_convs, tokenizer, spec.max_seq_len, spec.overlong, label="data: tokenizing train rows"
    )
    eval_, eval_dropped = tokenize_conversations(
        eval_convs, tokenizer, spec.max_seq_len, spec.overlong, label="data: tokenizing eval rows"
    )
    train, train_short = drop_short(train, spec.min_tokens)
    eval_, eval_short = drop_short(eval_, spec.min_tokens)
    name = " + ".join(r.name for r in rows)
    if not train:
        raise InputError(
            f"{name}: no training sample left after data.overlong={spec.overlong}, "
            f"data.max_seq_len={spec.max_seq_len}, data.min_tokens={spec.min_tokens} and data.dedup={spec.dedup}"
        )
    report = DataReport(
        source=name,
        source_sha256=rows[0].sha256
        if len(rows) == 1
        else hashlib.sha256("".join(r.sha256 for r in rows).encode()).hexdigest(),
        rows_read=sum(len(r.rows) for r in rows),
        train_rows=len(train),
        eval_rows=len(eval_),
        train_tokens=sum(len(s.input_ids) for s in train),
        trained_tokens=sum(s.trained_tokens for s in train),
        truncated_rows=[s.row for s in train + eval_ if s.truncated],
        duplicate_rows=duplicates,
        dropped_rows=[
            {"row": d.row, "reason": d.reason}
            for d in skipped + train_dropped + eval_dropped + train_short + eval_short
        ],
        fingerprint=fingerprint(train, eval_),
        held_out_rows=[sample.row for sample in eval_],
    )
    return BuiltData(train, eval_, report, template)


def weighted(items: list, weight: float, seed: int) -> list:
    """`items` repeated by the whole part of `weight`, plus a seeded sample of the fractional part."""
    whole, fraction = int(weight), weight - int(weight)
    extra = random.Random(seed).sample(items, round(fraction * len(items))) if fraction else []
    return items * whole + extra


def load_rows(spec: SourceSpec | DataSpec, key: str = "data.path") -> Rows:
    """A source's rows: read from its path (`key` names it in messages), or generated by its goat section."""
    if spec.goat is None:
        return read_rows(spec.path, spec.split, spec.max_rows, revision=spec.revision, key=key)
    rows = list(goat.generate_from_spec(spec.goat))[: spec.max_rows]
    name = f"goat generator (seed {spec.goat.seed})"
    digest = hashlib.sha256(spec.goat.model_dump_json().encode()).hexdigest()
    return Rows(name, rows, [f"{name}: row {i}" for i in range(1, len(rows) + 1)], digest)


def check_tokenizer(spec: DataSpec, sources: list[SourceSpec], tokenizer) -> list[str]:
    """Warnings about the tokenizer for this data (an error where the recipe asks for one)."""
    if not any(source.format == "goat" for source in sources):
        return []
    problem = goat.digit_split_problem(tokenizer)
    if problem and spec.require_digit_split:
        raise InputError(f"data.require_digit_split: {problem}")
    return [problem] if problem else []


def make_adapter(format: str, spec: DataSpec, tokenizer, template: str | None) -> Adapter:
    """`adapter(row, ref) -> Conversation` for a format (`data/formats/`), with the data section's settings bound."""
    adapter = partial(FORMATS[format].to_conversation, train_on_prompt=spec.train_on_prompt)
    if not FORMATS[format].uses_chat_template:
        return adapter

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    end_of_turn = end_of_turn_token(tokenizer, template)
    return partial(adapter, render=render, train_on=spec.train_on, end_of_turn=end_of_turn)


def to_conversations(source: Rows, adapter: Adapter, on_bad_row: str = "error") -> tuple[list, list[Dropped]]:
    """Apply the dataset adapter to every row: every bad row is named at once, or (skip) returned as dropped."""
    conversations, problems = [], []
    for row, ref in zip(source.rows, source.refs, strict=True):
        try:
            conversations.append(adapter(row, ref))
        except RowError as e:
            problems.append(Problem(ref, "", str(e)))
    if problems and on_bad_row == "error":
        raise DataError(problems[:MAX_PROBLEMS], omitted=max(0, len(problems) - MAX_PROBLEMS))
    return conversations, [Dropped(p.where, f"skipped (data.on_bad_row): {p.message}") for p in problems]


def text_key(conv: Conversation, mode: str) -> str:
    """What two samples must share to count as duplicates."""
    text = "".join(segment.text for segment in conv.segments)
    if mode == "exact":
        return text
    kept = "".join(c for c in text.lower() if not unicodedata.category(c).startswith("P"))
    return " ".join(kept.split())


def drop_duplicates(convs: list[Conversation], mode: str, seen: set[str]) -> tuple[list[Conversation], list[str]]:
    """Keep the first of each group of repeated samples (counting those already in `seen`); returns the rest's rows."""
    if mode == "none":
        return convs, []
    kept, duplicates = [], []
    for conv in convs:
        key = text_key(conv, mode)
        if key in seen:
            duplicates.append(conv.row)
        else:
            seen.add(key)
            kept.append(conv)
    return kept, duplicates


def drop_short(samples: list[Sample], min_tokens: int) -> tuple[list[Sample], list[Dropped]]:
    short = [
        Dropped(s.row, f"{len(s.input_ids)} tokens < data.min_tokens {min_tokens}")
        for s in samples
        if len(s.input_ids) < min_tokens
    ]
    return [s for s in samples if len(s.input_ids) >= min_tokens], short


def split_holdout(items: list, fraction: float, seed: int, group_of=None) -> tuple[list, list]:
    """(train, eval): a seeded random `fraction` of the items (at least one when fraction > 0) is held out.

    With `group_of`, the fraction is of groups and a group is held out whole (an item whose group is None is
    its own group), so the same problem never lands on both sides.
    """
    if fraction <= 0:
        return list(items), []
    keys = [_group_key(group_of, item, i) for i, item in enumerate(items)]
    groups = list(dict.fromkeys(keys))
    n_eval = min(len(groups) - 1, max(1, math.ceil(len(groups) * fraction)))
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    held_out = {groups[i] for i in order[:n_eval]}
    train = [item for key, item in zip(keys, items, strict=True) if key not in held_out]
    eval_ = [item for key, item in zip(keys, items, strict=True) if key in held_out]
    return train, eval_


def _group_key(group_of, item, index: int):
    group = group_of(item) if group_of is not None else None
    return ("row", index) if group is None else ("group", group)


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
