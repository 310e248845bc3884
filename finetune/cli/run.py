"""`finetune run`: train a recipe into its run folder."""

from __future__ import annotations

from pathlib import Path

from finetune.cli.options import add_force_unlock, add_verb


def add(verbs) -> None:
    run = add_verb(verbs, "run", handle, "train a recipe and write its run folder")
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


def handle(args) -> int:
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
