"""Goat exact match: greedy answers to held-out problems, scored per operation x operand digit lengths."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune.data.build import load_rows, sources_of
from finetune.data.formats import goat
from finetune.data.sources import read_rows
from finetune.errors import InputError
from finetune.recipe.schema import DataSpec, GoatSpec, SourceSpec


@dataclass
class Cell:
    op: str
    a_digits: int
    b_digits: int
    n: int = 0
    correct: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


@dataclass
class GoatEval:
    n: int
    correct: int
    source: str
    cells: list[Cell] = field(default_factory=list)
    mistakes: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def to_json(self) -> dict:
        return {
            "task": "goat_exact_match",
            "accuracy": self.accuracy,
            "n": self.n,
            "correct": self.correct,
            "source": self.source,
            "cells": [asdict(c) | {"accuracy": c.accuracy} for c in self.cells],
            "mistakes": self.mistakes,
        }


def held_out_rows(spec: DataSpec, n: int, data_report: Path) -> tuple[list[dict], str]:
    """The rows to score: the run's own eval split as its data.json records it, else (a run with no eval
    split) `n` fresh problems it never saw.

    The split is read, not re-derived: rows the run skipped (data.on_bad_row: skip) or dropped would shift a
    split recomputed from the raw rows, and exact match could then score problems the run trained on.

    Returns:
        The rows and a description of where they come from.

    Raises:
        InputError: the run had an eval split but its data.json does not record it, or it holds no Goat row.
    """
    sources = [source for source in sources_of(spec) if source.format == "goat"]
    if spec.eval_path is None and spec.eval_fraction == 0:
        return fresh_problems(sources, n)
    held_out = recorded_held_out(data_report)
    candidates = [read_rows(spec.eval_path, spec.split)] if spec.eval_path is not None else map(load_rows, sources)
    by_ref = {ref: row for rows in candidates for ref, row in zip(rows.refs, rows.rows, strict=True)}
    rows = [by_ref[ref] for ref in held_out if ref in by_ref][:n]  # rows of other formats' sources are not scored
    if not rows:
        raise InputError(f"{data_report}: the run's eval split holds no Goat row to score")
    # the split as data.json records it, named as the recipe asked for it
    if spec.eval_path is not None:
        return rows, f"data.eval_path {spec.eval_path}"
    return rows, f"the run's held-out {spec.eval_fraction:.0%}"


def recorded_held_out(data_report: Path) -> list[str]:
    """The eval samples' rows that the run wrote into data.json."""
    try:
        report = json.loads(data_report.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{data_report}: cannot read the run's data report ({e})") from None
    if "held_out_rows" not in report:
        raise InputError(
            f"{data_report}: records no held-out rows (written by an older finetune); run it again to score it"
        )
    return report["held_out_rows"]


def fresh_problems(sources: list[SourceSpec], n: int) -> tuple[list[dict], str]:
    """`n` generated problems that none of the Goat sources' rows holds."""
    rows = [row for source in sources for row in load_rows(source).rows]
    seen = {goat.problem_of(row) for row in rows}
    generators = [source.goat for source in sources if source.goat is not None]
    generator = (
        generators[0] if generators else GoatSpec(n=n, ops=sorted({goat.operation_of(r["input"])[0] for r in rows}))
    )
    fresh = []
    for row in goat.generate_from_spec(generator.model_copy(update={"n": 20 * n, "seed": generator.seed + 1})):
        if row["input"] not in seen:
            seen.add(row["input"])
            fresh.append(row)
            if len(fresh) == n:
                break
    return fresh, f"{len(fresh)} generated problems absent from the training rows"


def score(rows: list[dict], completions: list[str], source: str) -> GoatEval:
    """Exact match of each completion's final answer against the row's `answer` (`q R 0` counts as `q`)."""
    cells: dict[tuple[str, int, int], Cell] = {}
    result = GoatEval(n=len(rows), correct=0, source=source)
    for row, completion in zip(rows, completions, strict=True):
        op, a, b = goat.operation_of(row["input"])
        key = (op, goat.digits(a), goat.digits(b))
        cell = cells.setdefault(key, Cell(*key))
        cell.n += 1
        predicted = goat.parse_answer(completion)
        if predicted == goat.same_as_goat(row["answer"]):
            cell.correct += 1
            result.correct += 1
        elif len(result.mistakes) < 20:
            result.mistakes.append({"input": row["input"], "expected": row["answer"], "got": completion.strip()})
    result.cells = [cells[key] for key in sorted(cells)]
    return result


def format_table(result: GoatEval) -> str:
    """Accuracy per operation (rows: first operand digits, columns: second operand digits)."""
    lines = [f"exact match {result.correct}/{result.n} = {result.accuracy:.1%} on {result.source}"]
    by_op: dict[str, list[Cell]] = defaultdict(list)
    for cell in result.cells:
        by_op[cell.op].append(cell)
    for op, cells in by_op.items():
        columns = sorted({c.b_digits for c in cells})
        grid = {(c.a_digits, c.b_digits): c for c in cells}
        lines += ["", f"{op} ({goat.SYMBOL[op]}): digits of a (rows) x digits of b (columns)"]
        lines.append("      " + "".join(f"{b:>7}" for b in columns))
        for a in sorted({c.a_digits for c in cells}):
            row = "".join(f"{grid[a, b].accuracy:>7.0%}" if (a, b) in grid else f"{'-':>7}" for b in columns)
            lines.append(f"{a:>5} " + row)
    return "\n".join(lines)
