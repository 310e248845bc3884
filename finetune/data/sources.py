"""Read raw rows from a local JSON/JSONL file, a dataset folder or a datasets hub id.

Rows keep a reference (`FILE: row N`, `FILE:LINE` for JSON lines) so any later problem names the row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import DataError, InputError, Problem
from finetune.recipe.checks import looks_local


@dataclass(frozen=True)
class Rows:
    """Rows of one source, with a reference for each and a fingerprint of the source bytes."""

    name: str
    rows: list[dict]
    refs: list[str]
    sha256: str


def read_rows(source: str, split: str = "train", max_rows: int | None = None) -> Rows:
    """Read every row of `source`.

    Raises:
        DataError: the file is not valid JSON/JSON lines or not UTF-8, naming file and line.
        InputError: the source cannot be found or read.
    """
    path = Path(source).expanduser()
    if path.is_file():
        rows = _read_json_file(path, source)
    elif path.is_dir() or not looks_local(source):
        rows = _read_with_datasets(source, split)
    else:
        raise InputError(f"{source}: no such file")
    if max_rows is not None:
        rows = Rows(rows.name, rows.rows[:max_rows], rows.refs[:max_rows], rows.sha256)
    if not rows.rows:
        raise InputError(f"{source}: no rows")
    return rows


def _read_json_file(path: Path, name: str) -> Rows:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            [Problem(f"{name}:{line}", "", f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})")]
        ) from None
    sha = hashlib.sha256(raw).hexdigest()
    if name.endswith(".jsonl") or text.lstrip().startswith("{"):
        rows, refs = _parse_json_lines(text, name)
    else:
        rows, refs = _parse_json_list(text, name)
    return Rows(name, rows, refs, sha)


def _parse_json_list(text: str, name: str) -> tuple[list[dict], list[str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError([Problem(f"{name}:{e.lineno}:{e.colno}", "", f"invalid JSON: {e.msg}")]) from None
    if not isinstance(data, list):
        raise DataError([Problem(name, "", "expected a JSON list of rows (or one JSON object per line)")])
    refs = [f"{name}: row {i}" for i in range(1, len(data) + 1)]
    return data, refs


def _parse_json_lines(text: str, name: str) -> tuple[list[dict], list[str]]:
    rows, refs, problems = [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
            refs.append(f"{name}:{number}")
        except json.JSONDecodeError as e:
            problems.append(Problem(f"{name}:{number}:{e.colno}", "", f"invalid JSON: {e.msg}"))
    if problems:
        raise DataError(problems[:20], omitted=max(0, len(problems) - 20))
    return rows, refs


def _read_with_datasets(source: str, split: str) -> Rows:
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as e:  # datasets raises many types for "not found", "offline", "no such split"
        raise InputError(
            f"{source}: cannot load dataset (split {split!r}): {e.__class__.__name__}: {e}\n"
            "A hub id needs network access or a local cache; otherwise give a local .json/.jsonl file."
        ) from None
    rows = dataset.to_list()
    refs = [f"{source} [{split}]: row {i}" for i in range(1, len(rows) + 1)]
    return Rows(source, rows, refs, dataset._fingerprint)
