"""`finetune VERB ...`: parse argv, call one function, print errors. Imports nothing heavy at import time."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

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
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue output.dir (or RECIPE given as a run folder) from its newest complete checkpoint",
    )
    add_force_unlock(run)
    run.add_argument(
        "--accelerate-config",
        metavar="FILE",
        help="launch the run with `accelerate launch --config_file FILE` (e.g. accelerate_configs/fsdp.yaml)",
    )
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
    add_force_unlock(evaluate)
    evaluate.set_defaults(handler=cmd_eval)
    report = verb(
        "report", cmd_report, "write RUN_DIR/report.html and RUN_DIR/plots/ from the run's files", recipe=False
    )
    report.add_argument("run_dir", metavar="RUN_DIR")
    add_force_unlock(report)
    runs = verb("runs", cmd_runs, "list run folders: method, base, steps, losses, exact match, status", recipe=False)
    runs.add_argument("dir", metavar="DIR", nargs="?", default="runs", help="folder holding run folders (default runs)")
    compare = verb(
        "compare", cmd_compare, "overlay runs' loss curves and list the recipe keys that differ", recipe=False
    )
    compare.add_argument("run_dirs", metavar="RUN_DIR", nargs="+")
    compare.add_argument("--out", default="compare.png", help="PNG of the overlaid losses (default compare.png)")
    export = verb(
        "export", cmd_export, "write what a run trained as a clean PEFT folder (adapter) or GGUF (gguf)", recipe=False
    )
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--format", required=True, choices=list(EXPORT_FORMATS), help="what to write")
    export.add_argument(
        "--out", metavar="PATH", help="where to write (default RUN_DIR/export/adapter, RUN_DIR/model-TYPE.gguf)"
    )
    export.add_argument("--type", choices=["f16", "q8_0"], default="f16", help="gguf: tensor type (default f16)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_force_unlock(export)
    gen = verb("generate", cmd_generate, "answer prompts with a trained run or a model folder", recipe=False)
    gen.add_argument("target", metavar="RUN_DIR|MODEL_DIR", help="a run folder, an exported or merged folder")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt (the instruction)")
    source.add_argument("--file", help="one prompt per line: text, or JSON with instruction and optional input")
    gen.add_argument(
        "--format",
        choices=["alpaca", "goat", "chat", "raw"],
        help="prompt template (default: the run's data format; for a folder without recipe.yaml, chat when "
        "the tokenizer has a chat template, else raw)",
    )
    gen.add_argument("--max-new-tokens", type=int, default=256, help="default 256; stops earlier at EOS")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sample")
    gen.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest tokens (default 50; 0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="sample from the top-p probability mass (default 1)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed, set before each prompt (default 0)")
    push = verb("push", cmd_push, "upload a run's adapter, merged model or GGUF file to a hub repo", recipe=False)
    push.add_argument("run_dir", metavar="RUN_DIR")
    push.add_argument("--repo-id", required=True, help="namespace/name; created if missing")
    what = push.add_mutually_exclusive_group()
    what.add_argument("--merged", action="store_true", help="upload RUN_DIR/merged (from finetune merge)")
    what.add_argument(
        "--gguf", action="store_true", help="upload RUN_DIR/model-*.gguf (from finetune export --format gguf)"
    )
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", metavar="BRANCH", help="branch to commit to, created if missing (default main)")
    push.add_argument("--dry-run", action="store_true", help="list the files and sizes; upload nothing")
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
    tiny = verb("tiny-model", cmd_tiny_model, "build a tiny random model + tokenizer to try recipes on", recipe=False)
    tiny.add_argument("out", metavar="OUT", help="folder to write")
    from finetune.model.tiny import FAMILIES  # names only: the builders import torch when called

    tiny.add_argument(
        "--family",
        choices=FAMILIES,
        default="llama",
        help="llama (LLaMA-1/2, SentencePiece), llama3 (Llama-3.1, byte-level BPE), mistral, qwen2 (Qwen2.5, "
        "ChatML) (default llama)",
    )
    tiny.add_argument("--corpus", required=True, help="JSON/JSONL rows whose text trains the tokenizer")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    tiny.add_argument("--hidden-size", type=int, default=128, help="a multiple of 64 (default 128)")
    tiny.add_argument("--intermediate-size", type=int, default=256, help="a multiple of 64 (default 256)")
    tiny.add_argument("--init-std", type=float, default=0.1, help="std of the random weights (default 0.1)")
    plan = verb("plan", cmd_plan, "predict peak GPU memory of a recipe from the model's config alone")
    plan.add_argument("--gpu-memory", metavar="SIZE", help="memory per GPU, e.g. 24GiB or 80GB: say if it fits")
    plan.add_argument("--world-size", type=int, default=1, metavar="N", help="GPUs sharing the model with FSDP")
    from finetune.model.shape import KNOWN_SHAPES  # sizes only: no torch

    plan.add_argument(
        "--model-params",
        choices=tuple(KNOWN_SHAPES),
        metavar="SHAPE",
        help=f"plan for a published shape instead of the recipe's model: {', '.join(KNOWN_SHAPES)} "
        "(7B..65B are LLaMA-1)",
    )
    add_merge_verb(verb)
    return parser


def add_force_unlock(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--force-unlock",
        action="store_true",
        help="take over the claim on the folder this command writes, left by a process on another machine "
        "(see Interrupted runs in README.md)",
    )


def add_merge_verb(verb) -> None:
    merge = verb(
        "merge",
        cmd_merge,
        "fold a LoRA or IA3 run's adapter into its base weights: a plain transformers folder",
        recipe=False,
    )
    merge.add_argument("run_dir", metavar="RUN_DIR")
    merge.add_argument("--out", metavar="DIR", help="folder to write (default RUN_DIR/merged)")
    merge.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="weight dtype (default the base checkpoint's: a bf16 base gives a bf16 merge)",
    )
    merge.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to merge (default cpu)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_force_unlock(merge)
    merge.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip comparing the merged model's logits with the adapter model's",
    )


def cmd_merge(args) -> int:
    from finetune.artifacts.merge import merge_run
    from finetune.quiet import quiet_libraries

    with quiet_libraries():
        merge_run(
            args.run_dir,
            out=args.out,
            dtype=args.dtype,
            device=args.device,
            overwrite=args.overwrite,
            verify=args.verify,
            force_unlock=args.force_unlock,
        )
    return 0


def cmd_validate(args) -> int:
    from finetune.recipe.load import load_recipe

    load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: ok")
    return 0


def cmd_plan(args) -> int:
    from finetune.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from finetune.model.shape import KNOWN_SHAPES, LLAMA1_SHAPES, read_shape
    from finetune.train.plan import plan_report

    if args.model_params:
        name = f"LLaMA-{args.model_params}" if args.model_params in LLAMA1_SHAPES else args.model_params
        shape, model = KNOWN_SHAPES[args.model_params], f"{name} shape"
    else:
        shape, model = read_shape(recipe.model.name_or_path, recipe.model.revision), recipe.model.name_or_path
    print(plan_report(recipe, args.recipe, shape, model, gpu_memory=args.gpu_memory, world_size=args.world_size))
    return 0


def cmd_schema(args) -> int:
    from finetune.recipe.schema import Recipe

    print(json.dumps(Recipe.model_json_schema(), indent=2))
    return 0


def cmd_run(args) -> int:
    from finetune.errors import InputError
    from finetune.recipe.load import load_recipe
    from finetune.run_folder import read_recipe

    if args.resume and args.overwrite:
        raise InputError("--resume continues a run folder and --overwrite empties it; give one of them")
    if Path(args.recipe).is_dir() and not args.resume:
        raise InputError(f"{args.recipe} is a folder: give a recipe file, or add --resume to continue a run folder")
    if args.resume and Path(args.recipe).is_dir():
        recipe = read_recipe(args.recipe, args.overrides, check_files=True)
    else:
        recipe = load_recipe(args.recipe, args.overrides)
    if args.accelerate_config:
        from finetune.train.launch import launch_run

        flags = {
            "overwrite": args.overwrite,
            "resume": args.resume,
            "debug": args.debug,
            "force_unlock": args.force_unlock,
        }
        return launch_run(recipe, args.accelerate_config, args.recipe, args.overrides, **flags)
    from finetune.pipeline import run

    result = run(recipe, overwrite=args.overwrite, resume=args.resume, force_unlock=args.force_unlock)
    from finetune.run_folder import is_main_process

    if not is_main_process():
        return 0
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
    from finetune.eval.exact_match import evaluate
    from finetune.eval.goat import format_table

    result = evaluate(args.run_dir, n=args.n, batch_size=args.batch_size, force_unlock=args.force_unlock)
    print(format_table(result))
    print(f"written to {args.run_dir}/eval.json")
    return 0


def cmd_report(args) -> int:
    from finetune.report.html import write_report

    print(f"report: {write_report(args.run_dir, force_unlock=args.force_unlock)}")
    return 0


def cmd_runs(args) -> int:
    from finetune.report.runs import find_runs, format_runs

    runs = find_runs(args.dir)
    print(format_runs(runs) if runs else f"no run folders in {args.dir}")
    return 0


def cmd_compare(args) -> int:
    from pathlib import Path

    from finetune.report import plots
    from finetune.report.runs import format_differences
    from finetune.run_folder import read_run

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


def cmd_tiny_model(args) -> int:
    from finetune.data.sources import read_rows
    from finetune.model.tiny import TinyShape, build_tiny
    from finetune.quiet import quiet_libraries

    rows = read_rows(args.corpus).rows
    texts = [value for row in rows for value in row.values() if isinstance(value, str)]
    shape = TinyShape(
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        initializer_range=args.init_std,
    )
    with quiet_libraries():
        out = build_tiny(args.family, args.out, texts, seed=args.seed, shape=shape)
    print(f"tiny {args.family} model written to {out}")
    return 0


def cmd_generate(args) -> int:
    from finetune.eval.generate import Sampling, generate
    from finetune.eval.prompts import read_prompts
    from finetune.quiet import quiet_libraries

    rows = read_prompts(args.prompt, args.file)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    with quiet_libraries():
        generate(args.target, rows, sampling, prompt_format=args.format)
    return 0


def cmd_push(args) -> int:
    from finetune.artifacts.hub import push

    push(
        args.run_dir,
        args.repo_id,
        merged=args.merged,
        gguf=args.gguf,
        private=args.private,
        revision=args.revision,
        dry_run=args.dry_run,
    )
    return 0


def cmd_export(args) -> int:
    from finetune.quiet import quiet_libraries

    with quiet_libraries():
        return EXPORT_FORMATS[args.format](args)


def cmd_export_adapter(args) -> int:
    from finetune.artifacts.export import export_adapter

    result = export_adapter(args.run_dir, args.out, overwrite=args.overwrite, force_unlock=args.force_unlock)
    if result.whole_model:
        print("full fine-tuning run (adapter.kind: none): it has no adapter, so the whole model is exported")
    print(f"exported {len(result.files)} files to {result.path}: {', '.join(result.files)}")
    return 0


def cmd_export_gguf(args) -> int:
    from finetune.artifacts.gguf import export_gguf

    export_gguf(
        args.run_dir, out=args.out, quant_type=args.type, overwrite=args.overwrite, force_unlock=args.force_unlock
    )
    return 0


# --format of `finetune export` -> its handler; a new format is one entry here
EXPORT_FORMATS = {"adapter": cmd_export_adapter, "gguf": cmd_export_gguf}
