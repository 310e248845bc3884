"""Rows per second of `finetune run`'s data step (read, convert, split, tokenize and mask Alpaca-format rows)
on 50,000 distinct rows: cold (an empty cache: the samples are built, then stored), from the cache (the same
recipe again: a hit), and cold with data.cache: false (built, not stored: what storing the entry costs).

    python benchmarks/preprocess.py            # 50,000 rows
    python benchmarks/preprocess.py --quick    # 2,000 rows (the test's smoke run)

The rows are data/alpaca_sample.json's 120 over and over, each instruction ending in " (request i)" so that no
two rows are alike. Each mode runs in its own process, with FINETUNE_CACHE_DIR pointing both at the same
temporary folder, and times `finetune.pipeline.prepare_data` (tokenizer load and data building, what
`finetune run` calls for its data) on recipes/quickstart.yaml with data.path pointed at the rows and
data/tiny-llama's tokenizer; transformers is imported before the clock starts, as a run has by then.
Writes the table into benchmarks/RESULTS.md (or --results FILE).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from child import run_child
from results import RESULTS, machine_line, write_section

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "quickstart.yaml"
SAMPLE = REPO / "data" / "alpaca_sample.json"
# mode -> (data.cache, the cache status data.json must then report); in this order, so that the hit finds the entry
MODES = {"cold, cache off": ("false", "off"), "cold": ("true", "miss"), "cache hit": ("true", "hit")}


def distinct_rows(n: int) -> list[dict]:
    """`n` rows cycling through the sample rows, each instruction made unique by its index."""
    sample = json.loads(SAMPLE.read_text(encoding="utf-8"))
    rows = []
    for i in range(n):
        row = sample[i % len(sample)]
        rows.append({**row, "instruction": f"{row['instruction']} (request {i})"})
    return rows


def child(overrides: list[str]) -> None:
    """Prepare the data once in this process (cache as FINETUNE_CACHE_DIR has it) and print the figures as JSON."""
    from finetune.model.load import load_tokenizer
    from finetune.pipeline import prepare_data
    from finetune.recipe.load import load_recipe

    recipe = load_recipe(RECIPE, overrides)
    load_tokenizer(recipe.model)  # imports transformers' tokenizer code: a run has done that before its data step
    start = time.perf_counter()
    _, data = prepare_data(recipe)
    seconds = time.perf_counter() - start
    report = data.report
    print(json.dumps({"rows": report.rows_read, "seconds": seconds, "cache": report.cache}))


def measure(data_path: Path, cache: str, cache_dir: Path) -> dict:
    arguments = [f"data.path={data_path}", f"data.cache={cache}"]
    return run_child(__file__, arguments, env={**os.environ, "FINETUNE_CACHE_DIR": str(cache_dir)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,000 rows")
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child)
    n_rows = 2_000 if args.quick else args.rows

    figures = {}
    with tempfile.TemporaryDirectory() as scratch:
        data_path = Path(scratch) / "alpaca_rows.json"
        data_path.write_text(json.dumps(distinct_rows(n_rows)), encoding="utf-8")
        for mode, (cache, expected) in MODES.items():
            figures[mode] = measure(data_path, cache, Path(scratch) / "cache")
            if figures[mode]["cache"] != expected:  # else a row would not measure what its name says
                raise SystemExit(f"{mode}: data.json says cache {figures[mode]['cache']}, expected {expected}")

    rows = ["| mode | cache (data.json) | rows | seconds | rows/s |", "|---|---|---|---|---|"]
    for mode, f in figures.items():
        rows.append(f"| {mode} | {f['cache']} | {f['rows']:,} | {f['seconds']:.2f} | {f['rows'] / f['seconds']:,.0f} |")
    cold, hit, unstored = (figures[mode]["seconds"] for mode in ("cold", "cache hit", "cold, cache off"))
    lines = [
        f"- cache hit: {cold / hit:.1f}x the cold rows/s",
        f"- storing the cache entry: {cold - unstored:.2f} s of the cold run's {cold:.2f} s",
    ]
    table = "\n".join(rows) + "\n\n" + "\n".join(lines)
    print(table)
    header = (
        f"## preprocess (tokenization + masking of {n_rows:,} Alpaca rows, data/tiny-llama's tokenizer, cold, from "
        f"the cache and uncached; `python benchmarks/preprocess.py`)\n\n"
        f"{machine_line('transformers', 'tokenizers')}\n\n"
    )
    write_section(args.results, "preprocess", header + table + "\n")


if __name__ == "__main__":
    main()
