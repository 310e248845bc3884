"""Run folders as rows: `finetune runs` lists them, `finetune compare` sets them side by side.

Each run is read by `finetune.run_folder.read_run`, its recipe as plain YAML, not validated: a listing
must not fail on an old run whose data or base model has since moved.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import InputError
from finetune.model.methods import run_method_name
from finetune.run_folder import RunRecord, read_run


def find_runs(directory: str | Path) -> list[RunRecord]:
    """Every run folder directly under `directory` (or `directory` itself), oldest first."""
    root = Path(directory)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    folders = (
        [root] if (root / "recipe.yaml").is_file() else [p for p in root.iterdir() if (p / "recipe.yaml").is_file()]
    )
    return [read_run(p) for p in sorted(folders, key=lambda p: (p / "recipe.yaml").stat().st_mtime)]


def format_runs(runs: list[RunRecord]) -> str:
    header = ("run", "method", "base model", "steps", "train loss", "eval loss", "exact match", "wall time", "status")
    rows = [header] + [
        (
            run.name,
            run_method_name(run.recipe),
            run.base,
            _text(run.steps),
            _number(run.last("loss")),
            _number(run.last("eval_loss")),
            f"{run.exact_match:.1%}" if run.exact_match is not None else "-",
            f"{run.summary['wall_time_s']:.0f}s" if "wall_time_s" in run.summary else "-",
            run.status,
        )
        for run in runs
    ]
    return columns(rows)


def recipe_differences(runs: list[RunRecord]) -> list[tuple[str, list[str]]]:
    """(dotted key, value in each run) for every recipe key whose values differ, output.dir excluded."""
    flat = [_flatten(run.recipe) for run in runs]
    keys = sorted(set().union(*flat) - {"output.dir"})
    missing = "(unset)"
    return [
        (key, [_text(f.get(key, missing)) for f in flat])
        for key in keys
        if len({json.dumps(f.get(key, missing), sort_keys=True) for f in flat}) > 1
    ]


def format_differences(runs: list[RunRecord]) -> str:
    differences = recipe_differences(runs)
    if not differences:
        return "the recipes are identical (output.dir aside)"
    rows = [("key", *[run.name for run in runs])] + [(key, *values) for key, values in differences]
    return columns(rows)


def columns(rows: list[tuple[str, ...]]) -> str:
    """Rows of text cells as left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _flatten(mapping: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _text(value) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else json.dumps(value)
