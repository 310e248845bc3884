"""`finetune data stats`: what the data pipeline makes of a recipe's rows, in numbers."""

from __future__ import annotations

import statistics

from finetune.data.build import BuiltData

BAR_WIDTH = 40


def length_histogram(lengths: list[int], bins: int = 8) -> list[tuple[int, int, int]]:
    """(low, high, count) for equal-width bins over the sample lengths in tokens."""
    low, high = min(lengths), max(lengths)
    width = max(1, -(-(high - low + 1) // bins))
    edges = [(low + i * width, low + (i + 1) * width - 1) for i in range(bins) if low + i * width <= high]
    return [(a, b, sum(a <= n <= b for n in lengths)) for a, b in edges]


def format_stats(data: BuiltData) -> str:
    report, samples = data.report, data.train + data.eval
    lengths = [len(s.input_ids) for s in samples]
    tokens, trained = sum(lengths), sum(s.trained_tokens for s in samples)
    lines = [
        f"source             {report.source}",
        f"rows read          {report.rows_read}",
        f"samples            {report.train_rows} train, {report.eval_rows} eval",
        f"duplicates removed {len(report.duplicate_rows)}",
        f"dropped            {len(report.dropped_rows)}",
        f"truncated          {len(report.truncated_rows)}",
        f"tokens             {tokens:,} ({trained:,} trained, {1 - trained / tokens:.1%} masked)",
        f"tokens per sample  min {min(lengths)}, median {statistics.median(lengths):g}, "
        f"mean {statistics.fmean(lengths):.1f}, max {max(lengths)}",
        "",
        "tokens per sample",
    ]
    histogram = length_histogram(lengths)
    peak = max(count for _, _, count in histogram)
    for low, high, count in histogram:
        bar = "#" * round(BAR_WIDTH * count / peak)
        lines.append(f"{low:>6}-{high:<6} {count:>6} {bar}")
    for warning in report.warnings:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)
