"""Read raw rows from a local JSON/JSONL file, a dataset folder or a datasets hub id.

Rows keep a reference (`FILE: row N`, `FILE:LINE` for JSON lines) so any later problem names the row.
A hub id is fetched at its revision into huggingface_hub's cache (`finetune.hub_files`; the repo's
files but its loading scripts) and read by `datasets` from that snapshot folder, laid out as the hub
has it (parquet under data/, JSON lines at the top, a README's `configs`), so the commit read is known.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import DataError, InputError, Problem
from finetune.hub_files import download
from finetune.recipe.checks import looks_local


@dataclass(frozen=True)
class Rows:
    """Rows of one source, with a reference for each and a fingerprint of the source bytes."""

    name: str
    rows: list[dict]
    refs: list[str]
    sha256: str
    hub: dict | None = None  # repo id, revision and commit of a hub dataset


def read_rows(
    source: str, split: str = "train", max_rows: int | None = None, revision: str | None = None, key: str = "data.path"
) -> Rows:
    """Read every row of `source` (a hub id at `revision`).

    Raises:
        DataError: the file is not valid JSON/JSON lines or not UTF-8, naming file and line.
        InputError: the source cannot be found or read.
    """
    path = Path(source).expanduser()
    if path.is_file():
        rows = _read_json_file(path, source)
    elif path.is_dir():
        rows = _read_with_datasets(source, split)
    elif not looks_local(source):
        files = download(source, key=key, repo_type="dataset", revision=revision, ignore=["*.py", ".gitattributes"])
        rows = _read_with_datasets(source, split, folder=str(files.folder))
        rows = Rows(rows.name, rows.rows, rows.refs, rows.sha256, files.record())
    else:
        raise InputError(f"{source}: no such file")
    if max_rows is not None:
        rows = Rows(rows.name, rows.rows[:max_rows], rows.refs[:max_rows], rows.sha256, rows.hub)
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


def _read_with_datasets(source: str, split: str, folder: str | None = None) -> Rows:
    """Rows of a dataset folder (`source`, or the hub snapshot `folder` of the hub id `source`)."""
    import datasets

    try:
        dataset = datasets.load_dataset(folder or source, split=split)
    except Exception as e:  # datasets raises many types for "no such split", "no data files", bad files
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"{source}: cannot load dataset (split {split!r}): {e.__class__.__name__}: {detail}") from None
    rows = dataset.to_list()
    refs = [f"{source} [{split}]: row {i}" for i in range(1, len(rows) + 1)]
    return Rows(source, rows, refs, dataset._fingerprint)
