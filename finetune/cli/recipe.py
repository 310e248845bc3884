"""Verbs that read a recipe without training it: validate, preview, schema, plan."""

from __future__ import annotations

import json
import sys

from finetune.cli.options import add_verb


def add(verbs) -> None:
    add_verb(verbs, "validate", handle_validate, "check a recipe without loading anything; exit 2 with every problem")
    preview = add_verb(verbs, "preview", handle_preview, "show the first training samples as the model sees them")
    preview.add_argument("-n", type=int, default=3, metavar="N", help="number of samples (default 3)")
    preview.add_argument("--json", action="store_true", help="one JSON object per line: input_ids, labels, text")
    add_verb(verbs, "schema", handle_schema, "print the JSON Schema of the recipe", recipe=False)
    plan = add_verb(verbs, "plan", handle_plan, "predict peak GPU memory of a recipe from the model's config alone")
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


def handle_validate(args) -> int:
    from finetune.recipe.load import load_recipe

    load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: ok")
    return 0


def handle_preview(args) -> int:
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


def handle_schema(args) -> int:
    from finetune.recipe.schema import Recipe

    print(json.dumps(Recipe.model_json_schema(), indent=2))
    return 0


def handle_plan(args) -> int:
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
