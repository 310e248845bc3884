"""report.html: one self-contained page per run (PNG figures embedded as data: URIs, no network)."""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path

from finetune.model.methods import run_method_name
from finetune.report import plots
from finetune.run_folder import RunDir, RunRecord, read_run, read_sample_steps, write_text

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 62rem; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0; } td, th { padding: 0.25rem 0.7rem; text-align: left;
vertical-align: top; border-bottom: 1px solid #eee; } th { background: #f6f6f6; }
pre { background: #f6f6f6; padding: 0.7rem; overflow-x: auto; white-space: pre-wrap; }
td pre { margin: 0; padding: 0.3rem 0.5rem; } th { white-space: nowrap; }
img { max-width: 100%; } .muted { color: #777; } .status-finished { color: #17702d; }
.status-failed, .status-interrupted { color: #a11; font-weight: bold; }
"""


def write_report(run_path: str | Path, *, force_unlock: bool = False) -> Path:
    """`finetune report RUN_DIR`: `build_report` under the run folder's claim (finetune/lock.py).

    Raises:
        InputError: not a run folder, or another command (a run still training) writes it.
    """
    from finetune.lock import claim

    read_run(run_path)  # a folder that is no run folder is refused before anything is written to it
    with claim(run_path, subject=None, force_unlock=force_unlock):
        return build_report(run_path)


def build_report(run_path: str | Path) -> Path:
    """Write DIR/plots/*.png and DIR/report.html from the run folder's files; returns the report's path."""
    run = read_run(run_path)
    images = {
        "loss": plots.save(plots.loss_figure(run.metrics, title=f"{run.name}: loss"), run.path / "plots" / "loss.png"),
        "lr": plots.save(plots.lr_figure(run.metrics), run.path / "plots" / "lr.png"),
        "throughput": plots.save(plots.throughput_figure(run.metrics), run.path / "plots" / "throughput.png"),
    }
    goat = _read_json(run.path / "eval.json")
    if goat and goat.get("cells"):
        images["goat"] = plots.save(plots.goat_figure(goat), run.path / "plots" / "goat_accuracy.png")
    page = "\n".join(
        [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{escape(run.name)}: finetune report</title><style>{STYLE}</style></head><body>",
            f"<h1>{escape(run.name)}</h1>",
            f'<p class="muted">{escape(run_method_name(run.recipe))} on {escape(run.base)} · status '
            f'<span class="status-{escape(run.status)}">{escape(run.status)}</span></p>',
            _error(run),
            "<h2>Summary</h2>",
            _table(_summary_rows(run)),
            "<h2>Loss</h2>",
            _image(images["loss"], "train and eval loss per step"),
            "<h2>Learning rate</h2>",
            _image(images["lr"], "learning rate per step"),
            "<h2>Throughput</h2>",
            _image(images["throughput"], "real tokens per second"),
            _goat_section(goat, images.get("goat")),
            _tasks_section((goat or {}).get("tasks")),
            _samples_section(_read_json(run.path / "samples.json"), read_sample_steps(RunDir(run.path))),
            "<h2>Data</h2>",
            _data_section(_read_json(run.path / "data.json")),
            "<h2>Recipe</h2>",
            f"<pre>{escape((run.path / 'recipe.yaml').read_text(encoding='utf-8'))}</pre>",
            "<h2>Environment</h2>",
            _table([(k, v) for k, v in _flatten_environment(_read_json(run.path / "environment.json"))]),
            "</body></html>",
        ]
    )
    target = run.path / "report.html"
    write_text(target, page)
    return target


def _summary_rows(run: RunRecord) -> list[tuple[str, str]]:
    s = run.summary
    rows = [("steps", run.steps), ("epochs", _round(s.get("epochs"), 2))]
    if s.get("first_train_loss") is not None:
        rows.append(("train loss", f"{s['first_train_loss']:.4f} → {s['last_train_loss']:.4f}"))
    rows += [
        ("eval loss", _round(run.last("eval_loss"), 4)),
        ("exact match", f"{run.exact_match:.1%}" if run.exact_match is not None else None),
        ("real tokens seen", _count(s.get("tokens_seen"))),
        ("padding share", f"{s['padding_share']:.1%}" if s.get("padding_share") is not None else None),
        ("real tokens / s", _count(s.get("tokens_per_s"))),
        ("peak memory (RSS)", _mib(run.last("peak_rss_mib"))),
        ("peak GPU memory (torch)", _mib(run.last("peak_gpu_mib"))),
        ("training time", _seconds(s.get("train_runtime_s"))),
        ("wall time", _seconds(s.get("wall_time_s"))),
        ("trainable parameters", _params(s)),
    ]
    return [(key, value) for key, value in rows if value is not None]


def _goat_section(goat: dict | None, image: bytes | None) -> str:
    if not goat or "cells" not in goat:  # eval.json may hold lm_eval tasks only
        return ""
    cells = sorted(goat["cells"], key=lambda c: (c["accuracy"], -c["n"]))
    worst = [
        (f"{c['op']} {c['a_digits']} x {c['b_digits']} digits", f"{c['accuracy']:.0%} of {c['n']}")
        for c in cells[:8]
        if c["accuracy"] < 1
    ]
    mistakes = [(m["input"], m["expected"], m["got"]) for m in goat.get("mistakes", [])[:8]]
    parts = [
        "<h2>Exact match (Goat)</h2>",
        f"<p>{goat['correct']} of {goat['n']} = <b>{goat['accuracy']:.1%}</b> on {escape(goat['source'])}, "
        "answered greedily.</p>",
    ]
    if image:
        parts.append(_image(image, "exact match per operation and operand digit lengths"))
    parts.append("<h3>Worst cells</h3>" + (_table(worst) if worst else "<p>every cell is 100%</p>"))
    if mistakes:
        parts.append("<h3>Some mistakes</h3>" + _table(mistakes, header=("problem", "expected", "answered")))
    return "\n".join(parts)


def _tasks_section(tasks: dict | None) -> str:
    """eval.json's lm-evaluation-harness tasks (`finetune eval RUN --tasks`): one row per task and metric."""
    if not tasks:
        return ""
    rows = [
        (
            name,
            metric,
            f"{value:.4g}" if isinstance(value, int | float) else value,
            f"{entry['stderr'][metric]:.4g}" if entry["stderr"].get(metric) is not None else None,
            entry["samples"],
            entry["model"],
        )
        for name, entry in tasks.items()
        for metric, value in entry["metrics"].items()
    ]
    return "\n".join(
        [
            "<h2>Benchmark tasks (lm-evaluation-harness)</h2>",
            _table(rows, header=("task", "metric", "value", "stderr", "samples", "model")),
        ]
    )


def _samples_section(samples: dict | None, steps: list[dict]) -> str:
    if steps:
        return _sample_steps_section(samples, steps)
    if not samples or not samples.get("samples"):
        return ""
    rows = [(s["row"], s["prompt"], s["reference"], s["generated"]) for s in samples["samples"]]
    return "\n".join(
        [
            "<h2>Sample generations</h2>",
            f'<p class="muted">greedy, on {escape(samples["source"])}</p>',
            _table(rows, header=("row", "prompt", "reference", "generated"), pre=True),
        ]
    )


def _sample_steps_section(final: dict | None, steps: list[dict]) -> str:
    """One table per prompt: its answer at each sampled step (samples.jsonl), the final one (samples.json; "-"
    before the run has finished), and the reference."""
    finals = {sample["row"]: sample for sample in (final or {}).get("samples", [])}
    prompts, answers = {}, {}
    for record in steps:
        for sample in record["samples"]:
            prompts.setdefault(sample["row"], sample)
            answers.setdefault(sample["row"], []).append((f"step {record['step']}", sample["generated"]))
    for row, sample in finals.items():  # eval.samples may have grown on a resume: answered at the end only
        prompts.setdefault(row, sample)
    source = f" on {escape(final['source'])}" if final else ""
    parts = [
        "<h2>Sample generations</h2>",
        f'<p class="muted">greedy{source}, during training (eval.samples_every) and at the end</p>',
    ]
    for row, sample in prompts.items():
        final_answer = finals[row]["generated"] if row in finals else None
        rows = [*answers.get(row, []), ("final", final_answer), ("reference", sample["reference"])]
        parts += [f"<h3>{escape(row)}</h3>", f"<pre>{escape(sample['prompt'])}</pre>", _table(rows, pre=True)]
    return "\n".join(parts)


def _data_section(data: dict | None) -> str:
    if not data:
        return "<p>no data.json</p>"
    rows = [
        ("source", data.get("source")),
        ("rows read", data.get("rows_read")),
        ("train / eval samples", f"{data.get('train_rows')} / {data.get('eval_rows')}"),
        ("train tokens (trained)", f"{_count(data.get('train_tokens'))} ({_count(data.get('trained_tokens'))})"),
        (
            "truncated / duplicate / dropped rows",
            "{} / {} / {}".format(
                len(data.get("truncated_rows", [])),
                len(data.get("duplicate_rows", [])),
                len(data.get("dropped_rows", [])),
            ),
        ),
        ("fingerprint", data.get("fingerprint")),
    ]
    return _table(rows)


def _flatten_environment(environment: dict | None) -> list[tuple[str, str]]:
    if not environment:
        return []
    rows = []
    for key, value in environment.items():
        if isinstance(value, dict):
            rows += [(f"{key}.{k}", v) for k, v in value.items()]
        else:
            rows.append((key, value))
    return rows


def _image(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(rows, header=None, pre: bool = False) -> str:
    def cell(value, tag):
        text = escape("-" if value is None else str(value))
        return f"<{tag}>{f'<pre>{text}</pre>' if pre and tag == 'td' else text}</{tag}>"

    head = "<tr>" + "".join(cell(h, "th") for h in header) + "</tr>" if header else ""
    body = "".join(
        "<tr>" + "".join(cell(v, "th" if i == 0 and not header else "td") for i, v in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table>{head}{body}</table>"


def _error(run: RunRecord) -> str:
    error = run.summary.get("error")
    return f"<pre>{escape(error)}</pre>" if error else ""


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _round(value, digits: int):
    return None if value is None else round(value, digits)


def _count(value) -> str | None:
    return None if value is None else f"{value:,.0f}"


def _mib(value) -> str | None:
    return None if value is None else f"{value:,.0f} MiB"


def _seconds(value) -> str | None:
    return None if value is None else f"{value:.1f} s"


def _params(summary: dict) -> str | None:
    if "trainable_params" not in summary:
        return None
    trainable, total = summary["trainable_params"], summary["total_params"]
    return f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
