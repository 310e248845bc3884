"""Goat exact match: greedy answers to held-out problems, scored per operation x operand digit lengths."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

from finetune.data import goat
from finetune.data.build import load_rows, sources_of, split_holdout
from finetune.data.sources import read_rows
from finetune.recipe.schema import DataSpec, GoatSpec


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


def held_out_rows(spec: DataSpec, seed: int, n: int) -> tuple[list[dict], str]:
    """The rows to score: the run's own eval split when it had one, else `n` fresh problems it never saw.

    Returns:
        The rows and a description of where they come from.
    """
    if spec.eval_path is not None:
        return read_rows(spec.eval_path, spec.split).rows[:n], f"data.eval_path {spec.eval_path}"
    # the Goat sources, each split with seed + its index as training split them
    sources = [(index, source) for index, source in enumerate(sources_of(spec)) if source.format == "goat"]
    per_source = [(index, source, load_rows(source).rows) for index, source in sources]
    if spec.eval_fraction > 0:
        held_out = [
            row
            for index, _, rows in per_source
            for row in split_holdout(rows, spec.eval_fraction, seed + index, group_of=goat.problem_of)[1]
        ]
        return held_out[:n], f"the run's held-out {spec.eval_fraction:.0%}"
    rows = [row for _, _, source_rows in per_source for row in source_rows]
    seen = {goat.problem_of(row) for row in rows}
    generators = [source.goat for _, source, _ in per_source if source.goat is not None]
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
