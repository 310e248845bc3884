"""Run folders as rows: `finetune runs` lists them, `finetune compare` sets them side by side.

The recipe is read as plain YAML, not validated: a listing must not fail on an old run whose data or
base model has since moved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from finetune.errors import InputError
from finetune.train.run_dir import RunDir, read_metrics


@dataclass(frozen=True)
class RunRecord:
    path: Path
    recipe: dict
    summary: dict
    metrics: list[dict]
    exact_match: float | None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def status(self) -> str:
        """finished / failed / interrupted from summary.json; a folder without one stopped before writing it."""
        return self.summary.get("status", "interrupted")

    @property
    def method(self) -> str:
        from finetune.model.methods import listing_name

        return listing_name(self.recipe.get("adapter"), (self.recipe.get("quant") or {}).get("bits"))

    @property
    def base(self) -> str:
        return str((self.recipe.get("model") or {}).get("name_or_path", "?"))

    @property
    def steps(self) -> int | None:
        if "steps" in self.summary:
            return self.summary["steps"]
        return max((r["step"] for r in self.metrics), default=None)

    def last(self, key: str) -> float | None:
        return next((r[key] for r in reversed(self.metrics) if key in r), None)


def read_run(path: str | Path) -> RunRecord:
    """Raises InputError when `path` is not a run folder."""
    run = RunDir(Path(path))
    if not run.recipe.is_file():
        raise InputError(f"{run.path}: not a run folder (no recipe.yaml)")
    exact_match = None
    if run.eval.is_file():
        exact_match = json.loads(run.eval.read_text(encoding="utf-8")).get("accuracy")
    return RunRecord(
        path=run.path,
        recipe=yaml.safe_load(run.recipe.read_text(encoding="utf-8")) or {},
        summary=json.loads(run.summary.read_text(encoding="utf-8")) if run.summary.is_file() else {},
        metrics=read_metrics(run.metrics),
        exact_match=exact_match,
    )


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
            run.method,
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
