"""Verbs that read finished run folders: report, runs, compare."""

from __future__ import annotations

from pathlib import Path

from finetune.cli.options import add_force_unlock, add_verb


def add(verbs) -> None:
    report = add_verb(
        verbs,
        "report",
        handle_report,
        "write RUN_DIR/report.html and RUN_DIR/plots/ from the run's files",
        recipe=False,
    )
    report.add_argument("run_dir", metavar="RUN_DIR")
    add_force_unlock(report)
    runs = add_verb(
        verbs, "runs", handle_runs, "list run folders: method, base, steps, losses, exact match, status", recipe=False
    )
    runs.add_argument("dir", metavar="DIR", nargs="?", default="runs", help="folder holding run folders (default runs)")
    compare = add_verb(
        verbs,
        "compare",
        handle_compare,
        "overlay runs' loss curves and list the recipe keys that differ",
        recipe=False,
    )
    compare.add_argument("run_dirs", metavar="RUN_DIR", nargs="+")
    compare.add_argument("--out", default="compare.png", help="PNG of the overlaid losses (default compare.png)")


def handle_report(args) -> int:
    from finetune.report.html import write_report

    print(f"report: {write_report(args.run_dir, force_unlock=args.force_unlock)}")
    return 0


def handle_runs(args) -> int:
    from finetune.report.runs import find_runs, format_runs

    runs = find_runs(args.dir)
    print(format_runs(runs) if runs else f"no run folders in {args.dir}")
    return 0


def handle_compare(args) -> int:
    from finetune.report import plots
    from finetune.report.runs import format_differences
    from finetune.run_folder import read_run

    runs = [read_run(path) for path in args.run_dirs]
    plots.save(plots.compare_figure([(run.name, run.metrics) for run in runs]), Path(args.out))
    print(format_differences(runs))
    print(f"loss curves: {args.out}")
    return 0
