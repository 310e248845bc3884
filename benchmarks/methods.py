"""Every adaptation method on the same tiny LLaMA, same data, same steps: trainable parameters, peak
RSS, real (non-padding) tokens per second and the train loss after N steps.

    python benchmarks/methods.py             # 40 steps per method
    python benchmarks/methods.py --quick     # 3 steps, LoRA and prompt tuning only (the test's smoke run)

Each method trains in its own process (recipes/quickstart.yaml with the method's keys as overrides),
so peak RSS is that method's alone. Learning rates are each method's usual one, printed in the table.
Writes the table into benchmarks/RESULTS.md (or --results FILE).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

from child import run_child
from results import RESULTS, machine_line, write_section

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    "lora": ["train.lr=2e-3"],
    "rslora": ["adapter.use_rslora=true", "train.lr=2e-3"],
    "dora": ["adapter.use_dora=true", "train.lr=2e-3"],
    "qlora (nf4)": ["quant.bits=4", "quant.type=nf4", "train.lr=2e-3"],
    "lora on int8": ["quant.bits=8", "train.lr=2e-3"],
    "prefix": ["adapter={kind: prefix, num_virtual_tokens: 16}", "train.lr=1e-2"],
    "prompt": ["adapter={kind: prompt, num_virtual_tokens: 16, init_text: Answer the request}", "train.lr=3e-2"],
    "full": ["adapter={kind: none}", "train.lr=1e-3"],
}
QUICK = ("lora", "prompt")


def child(overrides: list[str]) -> None:
    """Train once in this process and print the figures as JSON."""
    from finetune.pipeline import run
    from finetune.recipe.load import load_recipe
    from finetune.run_folder import read_metrics

    result = run(load_recipe(REPO / "recipes" / "quickstart.yaml", overrides), echo=lambda _: None)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    losses = [m["loss"] for m in read_metrics(result.path / "metrics.jsonl") if "loss" in m]
    window = min(5, len(losses))  # one batch's loss is noisy: average a few steps at each end
    print(
        json.dumps(
            {
                **result.summary,
                "peak_rss_mib": peak_kib / 1024,
                "train_loss_start": sum(losses[:window]) / window,
                "train_loss_end": sum(losses[-window:]) / window,
            }
        )
    )


def measure(name: str, steps: int, out: Path) -> dict:
    overrides = [
        *METHODS[name],
        f"train.max_steps={steps}",
        "train.logging_steps=1",
        "train.eval_steps=100000",  # one eval, after the last step, on the same 12 held-out rows for all
        "train.save_steps=100000",
        f"output.dir={out}",
    ]
    return run_child(__file__, overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 steps, two methods")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child)
    steps = 3 if args.quick else args.steps
    names = QUICK if args.quick else tuple(METHODS)

    rows = [
        "| method | lr | trainable params | peak RSS MiB | real tokens/s | train loss, first 5 steps "
        "| train loss, last 5 steps | eval loss after last step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            figures = measure(name, steps, Path(scratch) / name.replace(" ", "_"))
            lr = next(o for o in METHODS[name] if o.startswith("train.lr=")).split("=")[1]
            cells = [
                name,
                lr,
                f"{figures['trainable_params']:,}",
                f"{figures['peak_rss_mib']:.0f}",
                f"{figures['tokens_per_s']:.0f}",
                f"{figures['train_loss_start']:.3f}",
                f"{figures['train_loss_end']:.3f}",
                f"{figures['eval_loss']:.3f}",
            ]
            rows.append("| " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    print(table)
    header = (
        f"## methods ({steps} steps, micro-batch 8, data/tiny-llama, data/alpaca_sample.json; "
        f"`python benchmarks/methods.py`)\n\n{machine_line('torch', 'transformers', 'peft', 'trl', 'bitsandbytes')}\n\n"
    )
    write_section(args.results, "methods", header + table + "\n")


if __name__ == "__main__":
    main()
