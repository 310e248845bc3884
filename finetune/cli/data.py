"""`finetune data goat|stats`: make Goat rows; measure a recipe's data."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.cli.options import add_debug, add_recipe


def add(verbs) -> None:
    data = verbs.add_parser("data", help="data tools", description="data tools")
    tools = data.add_subparsers(dest="data_verb", required=True, metavar="TOOL")
    goat = tools.add_parser("goat", help="generate Goat arithmetic rows (JSON lines)")
    goat.add_argument("--out", required=True, help="JSONL file to write")
    goat.add_argument("--n", type=int, default=10_000, help="number of rows (default 10000)")
    goat.add_argument("--seed", type=int, default=0)
    goat.add_argument("--ops", default="add,sub,mul,div", help="operations, comma-separated (default all four)")
    goat.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_debug(goat)
    goat.set_defaults(handler=handle_goat)
    stats = tools.add_parser("stats", help="rows, tokens, masks, duplicates and drops of a recipe's data")
    add_recipe(stats)
    add_debug(stats)
    stats.set_defaults(handler=handle_stats)


def handle_stats(args) -> int:
    from finetune.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from finetune.data.stats import format_stats
    from finetune.pipeline import prepare_data

    print(format_stats(prepare_data(recipe)[1]))
    return 0


def handle_goat(args) -> int:
    from finetune.data.formats import goat
    from finetune.errors import InputError
    from finetune.run_folder import write_text

    ops = tuple(op.strip() for op in args.ops.split(",") if op.strip())
    unknown = [op for op in ops if op not in goat.OPERATIONS]
    if unknown or not ops:
        raise InputError(
            f"--ops: unknown operation(s) {unknown or args.ops!r}; choose from {', '.join(goat.OPERATIONS)}"
        )
    if args.n <= 0:
        raise InputError(f"--n: must be greater than 0 (got {args.n})")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise InputError(f"--out: {out} exists; pass --overwrite to replace it")
    write_text(out, "".join(json.dumps(row) + "\n" for row in goat.generate(args.n, args.seed, ops)))
    print(f"{args.n} Goat rows ({', '.join(ops)}; seed {args.seed}) written to {out}")
    return 0
