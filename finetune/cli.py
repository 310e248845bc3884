"""`finetune VERB ...`: parse argv, call one function, print errors. Imports nothing heavy at import time."""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from finetune import __version__
from finetune.errors import FinetuneError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # parse_known_args so that overrides may come after options: `run r.yaml --overwrite train.lr=1e-4`
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if "=" not in item or item.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = args.overrides + extra
    try:
        return args.handler(args) or 0
    except FinetuneError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}" if "\n" not in str(e) else str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune LLaMA-family models from one YAML recipe.")
    parser.add_argument("--version", action="version", version=f"finetune {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, handler, help: str, recipe: bool = True) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help, description=help)
        if recipe:
            sub.add_argument("recipe", metavar="RECIPE", help="YAML recipe file")
            sub.add_argument(
                "overrides", nargs="*", metavar="KEY=VALUE", help="override a recipe key, e.g. train.max_steps=10"
            )
        sub.add_argument("--debug", action="store_true", help="show the traceback of errors")
        sub.set_defaults(handler=handler)
        return sub

    run = verb("run", cmd_run, "train a recipe and write its run folder")
    run.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty output.dir")
    verb("validate", cmd_validate, "check a recipe without loading anything; exit 2 with every problem")
    preview = verb("preview", cmd_preview, "show the first training samples as the model sees them")
    preview.add_argument("-n", type=int, default=3, metavar="N", help="number of samples (default 3)")
    preview.add_argument("--json", action="store_true", help="one JSON object per line: input_ids, labels, text")
    verb("schema", cmd_schema, "print the JSON Schema of the recipe", recipe=False)
    evaluate = verbs.add_parser("eval", help="score a finished Goat run by exact match; writes RUN_DIR/eval.json")
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument("--n", type=int, default=500, help="held-out problems to score (default 500)")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--debug", action="store_true", help="show the traceback of errors")
    evaluate.set_defaults(handler=cmd_eval)
    report = verb(
        "report", cmd_report, "write RUN_DIR/report.html and RUN_DIR/plots/ from the run's files", recipe=False
    )
    report.add_argument("run_dir", metavar="RUN_DIR")
    runs = verb("runs", cmd_runs, "list run folders: method, base, steps, losses, exact match, status", recipe=False)
    runs.add_argument("dir", metavar="DIR", nargs="?", default="runs", help="folder holding run folders (default runs)")
    compare = verb(
        "compare", cmd_compare, "overlay runs' loss curves and list the recipe keys that differ", recipe=False
    )
    compare.add_argument("run_dirs", metavar="RUN_DIR", nargs="+")
    compare.add_argument("--out", default="compare.png", help="PNG of the overlaid losses (default compare.png)")
    data = verbs.add_parser("data", help="data tools", description="data tools")
    data_verbs = data.add_subparsers(dest="data_verb", required=True, metavar="TOOL")
    goat = data_verbs.add_parser("goat", help="generate Goat arithmetic rows (JSON lines)")
    goat.add_argument("--out", required=True, help="JSONL file to write")
    goat.add_argument("--n", type=int, default=10_000, help="number of rows (default 10000)")
    goat.add_argument("--seed", type=int, default=0)
    goat.add_argument("--ops", default="add,sub,mul,div", help="operations, comma-separated (default all four)")
    goat.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    goat.add_argument("--debug", action="store_true", help="show the traceback of errors")
    goat.set_defaults(handler=cmd_data_goat)
    stats = data_verbs.add_parser("stats", help="rows, tokens, masks, duplicates and drops of a recipe's data")
    stats.add_argument("recipe", metavar="RECIPE", help="YAML recipe file")
    stats.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override a recipe key")
    stats.add_argument("--debug", action="store_true", help="show the traceback of errors")
    stats.set_defaults(handler=cmd_data_stats)
    tiny = verb("tiny-model", cmd_tiny_model, "build a tiny random LLaMA + tokenizer to try recipes on", recipe=False)
    tiny.add_argument("out", metavar="OUT", help="folder to write")
    tiny.add_argument("--corpus", required=True, help="JSON/JSONL rows whose text trains the tokenizer")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    tiny.add_argument("--hidden-size", type=int, default=128, help="a multiple of 64 (default 128)")
    tiny.add_argument("--intermediate-size", type=int, default=256, help="a multiple of 64 (default 256)")
    tiny.add_argument("--init-std", type=float, default=0.1, help="std of the random weights (default 0.1)")
    add_merge_verb(verb)
    add_export_verb(verb)
    return parser


def add_merge_verb(verb) -> None:
    merge = verb(
        "merge", cmd_merge, "fold a LoRA run's adapter into its base weights: a plain transformers folder", recipe=False
    )
    merge.add_argument("run_dir", metavar="RUN_DIR")
    merge.add_argument("--out", metavar="DIR", help="folder to write (default RUN_DIR/merged)")
    merge.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="weight dtype (default the recipe's model.dtype; auto is float32 on CPU)",
    )
    merge.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to merge (default cpu)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    merge.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip comparing the merged model's logits with the adapter model's",
    )


def add_export_verb(verb) -> None:
    export = verb("export", cmd_export, "write a run's model in another format: gguf (llama.cpp)", recipe=False)
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--format", required=True, choices=sorted(EXPORTERS), help="what to write")
    export.add_argument("--out", metavar="PATH", help="file or folder to write (default inside RUN_DIR)")
    export.add_argument("--type", choices=["f16", "q8_0"], default="f16", help="gguf: tensor type (default f16)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def cmd_export(args) -> int:
    return EXPORTERS[args.format](args)


def export_gguf(args) -> int:
    from finetune.artifacts.gguf import export_gguf

    export_gguf(args.run_dir, out=args.out, quant_type=args.type, overwrite=args.overwrite)
    return 0


# --format NAME -> the handler that writes it
EXPORTERS = {"gguf": export_gguf}


def cmd_merge(args) -> int:
    from finetune.artifacts.merge import merge_run

    merge_run(
        args.run_dir, out=args.out, dtype=args.dtype, device=args.device, overwrite=args.overwrite, verify=args.verify
    )
    return 0


def cmd_validate(args) -> int:
    from finetune.recipe.load import load_recipe

    load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: ok")
    return 0


def cmd_schema(args) -> int:
    from finetune.recipe.schema import Recipe

    print(json.dumps(Recipe.model_json_schema(), indent=2))
    return 0


def cmd_run(args) -> int:
    from finetune.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from finetune.pipeline import run

    result = run(recipe, overwrite=args.overwrite)
    summary = result.summary
    print(
        f"done in {summary['wall_time_s']:.1f}s, {summary['steps']} steps: "
        f"train loss {summary['first_train_loss']:.4f} -> {summary['last_train_loss']:.4f}"
        + (f", eval loss {summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else "")
    )
    print(f"run folder: {result.path}")
    return 0


def cmd_preview(args) -> int:
    from finetune.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from finetune.data.preview import render_sample, sample_record
    from finetune.pipeline import prepare_data

    tokenizer, data = prepare_data(recipe)
    report = data.report
    for number, sample in enumerate(data.train[: args.n], start=1):
        if args.json:
            print(json.dumps(sample_record(sample, tokenizer), ensure_ascii=False))
        else:
            print(render_sample(sample, tokenizer, number, color=sys.stdout.isatty()) + "\n")
    if not args.json:
        dropped, truncated = len(report.dropped_rows), len(report.truncated_rows)
        print(f"{report.train_rows} training samples; {dropped} dropped, {truncated} truncated")
    return 0


def cmd_eval(args) -> int:
    from finetune.eval.goat import format_table
    from finetune.pipeline import evaluate

    result = evaluate(args.run_dir, n=args.n, batch_size=args.batch_size)
    print(format_table(result))
    print(f"written to {args.run_dir}/eval.json")
    return 0


def cmd_report(args) -> int:
    from finetune.report.html import build_report

    print(f"report: {build_report(args.run_dir)}")
    return 0


def cmd_runs(args) -> int:
    from finetune.report.runs import find_runs, format_runs

    runs = find_runs(args.dir)
    print(format_runs(runs) if runs else f"no run folders in {args.dir}")
    return 0


def cmd_compare(args) -> int:
    from pathlib import Path

    from finetune.report import plots
    from finetune.report.runs import format_differences, read_run

    runs = [read_run(path) for path in args.run_dirs]
    plots.save(plots.compare_figure([(run.name, run.metrics) for run in runs]), Path(args.out))
    print(format_differences(runs))
    print(f"loss curves: {args.out}")
    return 0


def cmd_data_stats(args) -> int:
    from finetune.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from finetune.data.stats import format_stats
    from finetune.pipeline import prepare_data

    print(format_stats(prepare_data(recipe)[1]))
    return 0


def cmd_data_goat(args) -> int:
    from pathlib import Path

    from finetune.data import goat
    from finetune.errors import InputError

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
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with partial.open("w", encoding="utf-8") as f:
        for row in goat.generate(args.n, args.seed, ops):
            f.write(json.dumps(row) + "\n")
    partial.replace(out)
    print(f"{args.n} Goat rows ({', '.join(ops)}; seed {args.seed}) written to {out}")
    return 0


def cmd_tiny_model(args) -> int:
    from finetune.data.sources import read_rows
    from finetune.model.tiny import TinyShape, build_tiny_llama

    rows = read_rows(args.corpus).rows
    texts = [value for row in rows for value in row.values() if isinstance(value, str)]
    shape = TinyShape(
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        initializer_range=args.init_std,
    )
    print(f"tiny LLaMA written to {build_tiny_llama(args.out, texts, seed=args.seed, shape=shape)}")
    return 0
