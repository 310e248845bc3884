"""`finetune eval`: score a finished run; results in RUN_DIR/eval.json."""

from __future__ import annotations

from finetune.cli.options import add_debug, add_force_unlock
from finetune.errors import InputError

GOAT_N = 500
# options that only `--tasks` (lm-evaluation-harness) reads, and their defaults
TASK_OPTIONS = {"include_path": None, "limit": None, "model": "adapter", "chat_template": "auto"}


def add(verbs) -> None:
    evaluate = verbs.add_parser(
        "eval",
        help="score a finished run: Goat exact match, or lm-evaluation-harness tasks (--tasks); "
        "writes RUN_DIR/eval.json",
    )
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument("--n", type=int, default=GOAT_N, help=f"held-out Goat problems to score (default {GOAT_N})")
    evaluate.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default 32)")
    harness = evaluate.add_argument_group("lm-evaluation-harness (pip install 'finetune[lm-eval]')")
    harness.add_argument(
        "--tasks",
        metavar="NAME[,NAME...]",
        help="lm_eval tasks or groups to run instead of Goat exact match (`lm-eval ls tasks` lists them)",
    )
    harness.add_argument("--include-path", metavar="DIR", help="a folder of task YAML files to add to lm_eval's")
    harness.add_argument("--limit", type=int, metavar="N", help="score the first N rows of each task (default all)")
    harness.add_argument(
        "--model",
        choices=["adapter", "merged"],
        default=TASK_OPTIONS["model"],
        help="adapter: the run's adapter on its base (default); merged: RUN_DIR/merged from `finetune merge`",
    )
    harness.add_argument(
        "--chat-template",
        choices=["auto", "on", "off"],
        default=TASK_OPTIONS["chat_template"],
        help="put requests through the tokenizer's chat template; auto: when the run trained through one "
        "(lima, sharegpt data)",
    )
    add_debug(evaluate)
    add_force_unlock(evaluate)
    evaluate.set_defaults(handler=handle)


def handle(args) -> int:
    if args.tasks is not None:
        return handle_tasks(args)
    given = [name for name, default in TASK_OPTIONS.items() if getattr(args, name) != default]
    if given:
        options = ", ".join("--" + name.replace("_", "-") for name in given)
        raise InputError(f"{options}: only with --tasks (lm-evaluation-harness tasks)")
    from finetune.eval.exact_match import evaluate
    from finetune.eval.goat import format_table

    result = evaluate(args.run_dir, n=args.n, batch_size=args.batch_size, force_unlock=args.force_unlock)
    print(format_table(result))
    print(f"written to {args.run_dir}/eval.json")
    return 0


def handle_tasks(args) -> int:
    from pathlib import Path

    from finetune.eval.harness import TaskRequest, evaluate_tasks, format_task_table

    if args.n != GOAT_N:
        raise InputError("--n: the number of Goat problems, not read with --tasks; give --limit N instead")

    request = TaskRequest(
        tasks=tuple(name.strip() for name in args.tasks.split(",")),
        include_path=Path(args.include_path) if args.include_path is not None else None,
        limit=args.limit,
        batch_size=args.batch_size,
        model=args.model,
        chat_template=args.chat_template,
    )
    entries = evaluate_tasks(args.run_dir, request, force_unlock=args.force_unlock)
    print(format_task_table(entries))
    print(f"written to {args.run_dir}/eval.json")
    return 0
