"""Figures of a run, drawn from its metrics records with matplotlib's Agg backend (no display needed).

Each function returns the Figure so callers can check the plotted data before saving it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from finetune.data.formats.goat import SYMBOL  # noqa: E402


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every record that has `key`."""
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def throughput(records: list[dict]) -> tuple[list[int], list[float]]:
    """Real (non-padding) tokens per second between consecutive training log records."""
    train = [r for r in records if "num_tokens" in r and "time" in r]
    steps, rates = [], []
    for before, after in zip(train, train[1:], strict=False):
        seconds = after["time"] - before["time"]
        if seconds > 0:
            steps.append(after["step"])
            rates.append((after["num_tokens"] - before["num_tokens"]) / seconds)
    return steps, rates


def loss_figure(records: list[dict], title: str = ""):
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(*series(records, "loss"), label="train loss")
    eval_steps, eval_losses = series(records, "eval_loss")
    if eval_steps:
        axes.plot(eval_steps, eval_losses, "o-", label="eval loss")
    axes.set(xlabel="step", ylabel="loss (log scale)", title=title or "loss", yscale="log")
    axes.grid(alpha=0.3, which="both")
    axes.legend()
    figure.tight_layout()
    return figure


def lr_figure(records: list[dict]):
    figure, axes = plt.subplots(figsize=(7, 3))
    axes.plot(*series(records, "learning_rate"))
    axes.set(xlabel="step", ylabel="learning rate", title="learning rate")
    axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def throughput_figure(records: list[dict]):
    figure, axes = plt.subplots(figsize=(7, 3))
    axes.plot(*throughput(records))
    axes.set(xlabel="step", ylabel="tokens / s", title="real (non-padding) tokens per second")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def accuracy_grid(cells: list[dict], op: str) -> tuple[list[int], list[int], np.ndarray]:
    """(digits of a, digits of b, accuracy[a, b]) for one operation; NaN where no problem was scored."""
    mine = [c for c in cells if c["op"] == op]
    rows = sorted({c["a_digits"] for c in mine})
    columns = sorted({c["b_digits"] for c in mine})
    grid = np.full((len(rows), len(columns)), np.nan)
    for c in mine:
        grid[rows.index(c["a_digits"]), columns.index(c["b_digits"])] = c["accuracy"]
    return rows, columns, grid


def goat_figure(result: dict):
    """Exact match as a heatmap over the digit lengths of the two operands, one panel per operation."""
    ops = list(dict.fromkeys(c["op"] for c in result["cells"]))
    figure, panels = plt.subplots(1, len(ops), figsize=(4.2 * len(ops), 4), squeeze=False, layout="constrained")
    for axes, op in zip(panels[0], ops, strict=True):
        rows, columns, grid = accuracy_grid(result["cells"], op)
        image = axes.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", origin="lower", aspect="auto")
        axes.set_xticks(range(len(columns)), [str(c) for c in columns])
        axes.set_yticks(range(len(rows)), [str(r) for r in rows])
        axes.set(xlabel="digits of b", ylabel="digits of a", title=f"{op} (a {SYMBOL[op]} b)")
        if grid.size <= 64:
            for (i, j), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    axes.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=panels[0].tolist(), label="exact match")
    figure.suptitle(f"exact match {result['accuracy']:.1%} of {result['n']}")
    return figure


def compare_figure(runs: list[tuple[str, list[dict]]]):
    """Train (solid) and eval (dashed) loss of several runs on one axis."""
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for name, records in runs:
        (line,) = axes.plot(*series(records, "loss"), label=f"{name} train")
        eval_steps, eval_losses = series(records, "eval_loss")
        if eval_steps:
            axes.plot(eval_steps, eval_losses, "--", color=line.get_color(), label=f"{name} eval")
    axes.set(xlabel="step", ylabel="loss (log scale)", title="loss", yscale="log")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def save(figure, path: Path) -> bytes:
    """Write the figure as PNG to `path` and return the bytes (for embedding)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()
