"""`finetune eval`: score a finished run; results in RUN_DIR/eval.json."""

from __future__ import annotations

from finetune.cli.options import add_debug, add_force_unlock


def add(verbs) -> None:
    evaluate = verbs.add_parser("eval", help="score a finished Goat run by exact match; writes RUN_DIR/eval.json")
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument("--n", type=int, default=500, help="held-out problems to score (default 500)")
    evaluate.add_argument("--batch-size", type=int, default=32)
    add_debug(evaluate)
    add_force_unlock(evaluate)
    evaluate.set_defaults(handler=handle)


def handle(args) -> int:
    from finetune.eval.exact_match import evaluate
    from finetune.eval.goat import format_table

    result = evaluate(args.run_dir, n=args.n, batch_size=args.batch_size, force_unlock=args.force_unlock)
    print(format_table(result))
    print(f"written to {args.run_dir}/eval.json")
    return 0
