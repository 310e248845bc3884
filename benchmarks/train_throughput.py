"""Real (non-padding) tokens per second of `finetune run` against what users would write instead (TRL's
SFTTrainer at its defaults and with each of its batching options, tloen/alpaca-lora as its README runs it:
benchmarks/peers.py), and finetune's own modes, which split its gain into its parts:

  finetune                          the defaults: padding-free batches, attention per sample, chunked loss
  finetune, packing none            padded batches (the padding removal is the step from here ...)
  finetune, padding_free, sdpa      ... to padding-free batches under transformers' own sdpa (one
                                    block-causal mask over the row), and per-sample attention is the step
                                    from here to `finetune`
  finetune, TRL's loss head         train.loss_chunk_mib: null, so the chunked loss is the step from here
                                    to `finetune`
  finetune, packing bfd             samples packed best-fit-decreasing into rows of max_seq_len

Every setup trains the same model (random weights, benchmarks/models.py), rows, LoRA (r 16, alpha 32, all
linear layers), optimizer (fused AdamW), schedule (cosine, 5% warmup, lr 2e-3) and number of optimizer
steps, in micro-batches of 8 rows, float32 on CPU, each in a process of its own. One timing window for all:
first to last optimizer step, eval and saving outside it; tokens counted from each training batch's
input_ids and labels (benchmarks/train_window.py). Setups run round-robin, one round after another (the
starting setup rotates), so a busy minute on a shared machine hits every setup alike; the table gives
each setup's median over the rounds and its min-max spread. The eval loss after the last step (prompt
masked, the same 12 held-out rows) shows whether speed cost quality; packing trains more samples in the
same steps, so its eval loss is not like for like.

    python benchmarks/train_throughput.py            # wide then proportioned model, 4 steps, 5 rounds
    python benchmarks/train_throughput.py --quick    # data/tiny-llama, 2 steps, 2 rounds, 3 setups

Writes its tables into benchmarks/RESULTS.md (or --results FILE).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from child import run_child
from models import model_folder
from peers import LORA, LR, MAX_LEN, MICRO_BATCH, SEED, run_alpaca_lora, run_trl, split_rows
from results import RESULTS, machine_line, write_section

REPO = Path(__file__).resolve().parents[1]

# name -> (runner, argument): finetune overrides, or the TRL option
SETUPS = {
    "finetune": ("finetune", []),
    "finetune, packing none": ("finetune", ["data.packing=none"]),
    "finetune, padding_free, sdpa": ("finetune_sdpa", ["data.packing=padding_free"]),
    "finetune, TRL's loss head": ("finetune", ["train.loss_chunk_mib=null"]),
    "finetune, packing bfd": ("finetune", ["data.packing=bfd"]),
    "trl defaults": ("trl", "defaults"),
    "trl padding_free": ("trl", "padding_free"),
    "trl packing": ("trl", "packing"),
    "alpaca-lora": ("alpaca_lora", None),
}
QUICK = ("finetune", "trl defaults", "alpaca-lora")
BASELINES = ("trl defaults", "alpaca-lora")
TRL_OPTIONS = ("trl padding_free", "trl packing")
MODEL_HELP = "wide: hidden 768 (the headline); proportioned: the 3.5M-parameter model; tiny: data/tiny-llama"


def run_finetune(model: Path, overrides: list[str], steps: int, out: Path, *, transformers_sdpa: bool) -> dict:
    """`finetune.pipeline.run` on recipes/quickstart.yaml with the benchmark's shared settings."""
    from train_window import instrument

    import finetune.model.load as load_module
    import finetune.train.trainer as trainer_module
    from finetune.pipeline import run
    from finetune.recipe.load import load_recipe

    if transformers_sdpa:  # model.attn_implementation: sdpa means per-sample sdpa; this is transformers' own
        load_module.attention_implementation = lambda spec: spec.attn_implementation
    instrumented: dict = {}
    build_trainer = trainer_module.build_trainer

    # pipeline.run imports build_trainer when it runs, so wrapping the module's function instruments the very
    # trainer a run builds
    def build_instrumented_trainer(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        instrumented["figures"] = instrument(trainer)
        return trainer

    trainer_module.build_trainer = build_instrumented_trainer
    train, held_out = split_rows()
    (out / "data").mkdir(parents=True)
    for name, rows in (("train", train), ("eval", held_out)):
        (out / "data" / f"{name}.json").write_text(json.dumps(rows), encoding="utf-8")
    recipe = load_recipe(
        REPO / "recipes" / "quickstart.yaml",
        [
            f"model.name_or_path={model}",
            f"data.path={out / 'data' / 'train.json'}",
            f"data.eval_path={out / 'data' / 'eval.json'}",
            "data.eval_fraction=0",
            f"data.max_seq_len={MAX_LEN}",
            "data.cache=false",  # a cache hit would flatter the first setup that runs
            f"train.max_steps={steps}",
            f"train.micro_batch_size={MICRO_BATCH}",
            f"train.lr={LR}",
            f"train.seed={SEED}",
            "train.eval_steps=100000",
            "train.save_steps=100000",
            f"adapter.r={LORA['r']}",
            f"adapter.alpha={LORA['alpha']}",
            f"adapter.dropout={LORA['dropout']}",
            "eval.samples=0",
            "output.report=false",
            "output.trackers=[]",
            f"output.dir={out / 'run'}",
            *overrides,
        ],
    )
    summary = run(recipe, echo=lambda _: None).summary
    return {**instrumented["figures"], "eval_loss": summary["eval_loss"]}


def child(name: str, model: Path, steps: int) -> None:
    """Train one setup in this process and print its figures as JSON."""
    runner, argument = SETUPS[name]
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        if runner.startswith("finetune"):
            figures = run_finetune(model, argument, steps, out, transformers_sdpa=runner == "finetune_sdpa")
        elif runner == "trl":
            figures = run_trl(model, steps, out, argument)
        else:
            figures = run_alpaca_lora(model, steps, out)
    print(json.dumps(figures))


def measure(name: str, model: Path, steps: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    figures = run_child(__file__, [name, "--model-path", str(model), "--steps", str(steps)], env=env)
    figures["tokens_per_s"] = figures["real_tokens"] / figures["train_s"]
    figures["padding_share"] = 1 - figures["real_tokens"] / figures["processed_tokens"]
    return figures


def run_rounds(names: tuple[str, ...], model: Path, steps: int, rounds: int, threads: int) -> dict[str, list[dict]]:
    """Every setup once per round; each round starts one setup later, so none always runs first."""
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(measure(name, model, steps, threads))
            figures = runs[name][-1]
            print(f"round {round_index + 1}, {name}: {figures['tokens_per_s']:.0f} real tokens/s", file=sys.stderr)
    return runs


def summarize(runs: list[dict]) -> dict:
    """Median real tokens/s with its min-max spread; token counts and eval loss from the median run."""
    speeds = sorted(run["tokens_per_s"] for run in runs)
    median = statistics.median(speeds)
    middle = min(runs, key=lambda run: abs(run["tokens_per_s"] - median))
    return {**middle, "tokens_per_s": median, "slowest": speeds[0], "fastest": speeds[-1], "rounds": len(runs)}


def table(summaries: dict[str, dict]) -> list[str]:
    ours = summaries["finetune"]["tokens_per_s"]
    rows = [
        "| setup | real tokens | trained tokens | padding share | train s (median run) | real tokens/s, median "
        "| min-max | x finetune | eval loss after last step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in summaries.items():
        cells = [
            name,
            f"{f['real_tokens']:,}",
            f"{f['trained_tokens']:,}",
            f"{f['padding_share']:.1%}",
            f"{f['train_s']:.1f}",
            f"{f['tokens_per_s']:.0f}",
            f"{f['slowest']:.0f}-{f['fastest']:.0f}",
            f"{f['tokens_per_s'] / ours:.2f}",
            f"{f['eval_loss']:.4f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def ratio(summaries: dict[str, dict], faster: str, slower: str) -> float:
    return summaries[faster]["tokens_per_s"] / summaries[slower]["tokens_per_s"]


def findings(summaries: dict[str, dict]) -> list[str]:
    """The ratios against the goals, and finetune's gain split into its parts, ahead or not."""
    lines = []
    for baseline in (b for b in BASELINES if b in summaries):
        r = ratio(summaries, "finetune", baseline)
        verdict = "met" if r >= 1.4 else "NOT met"
        lines.append(f"- finetune / {baseline}: {r:.2f}x real tokens/s (goal >= 1.4x: {verdict})")
    options = [o for o in TRL_OPTIONS if o in summaries]
    if options:
        best = max(options, key=lambda o: summaries[o]["tokens_per_s"])
        r = ratio(summaries, "finetune", best)
        losses = f"eval loss {summaries['finetune']['eval_loss']:.4f} vs {summaries[best]['eval_loss']:.4f}"
        verdict = "met" if r >= 1.0 else "NOT met: TRL's option is faster here"
        lines.append(f"- finetune / TRL's fastest option ({best}): {r:.2f}x ({losses}; goal >= 1.0x: {verdict})")
    parts = (
        ("padding removal", "finetune, padding_free, sdpa", "finetune, packing none"),
        ("per-sample attention", "finetune", "finetune, padding_free, sdpa"),
        ("chunked loss", "finetune", "finetune, TRL's loss head"),
    )
    split = [f"{part} {ratio(summaries, a, b):.2f}x" for part, a, b in parts if a in summaries and b in summaries]
    if split:
        lines.append(f"- finetune's gain over its own padded batches, step by step: {', '.join(split)}")
    return lines


def command_options(args) -> list[str]:
    """The options that decide the figures, as the command line gives them (not --load or --results)."""
    if args.quick:
        return ["--quick"]
    options = [f"--models {' '.join(args.models)}", f"--steps {args.steps}", f"--rounds {args.rounds}"]
    options += [f"--threads {args.threads}"]
    if args.only:
        options.append("--only " + " ".join(f"'{name}'" if " " in name else name for name in args.only))
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="data/tiny-llama, 2 steps, 2 rounds, 3 setups")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per setup and round")
    parser.add_argument("--rounds", type=int, default=5, help="every setup runs once per round; medians count")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every setup's process")
    parser.add_argument("--results", type=Path, default=RESULTS)
    models = ("wide", "proportioned", "tiny")
    parser.add_argument("--models", nargs="+", choices=models, default=["wide", "proportioned"], help=MODEL_HELP)
    parser.add_argument("--only", nargs="+", choices=tuple(SETUPS), help="run these setups only")
    parser.add_argument("--load", default="", help="what else ran on the machine meanwhile, for RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child, args.model_path, args.steps)
    steps, rounds, models = (2, 2, ["tiny"]) if args.quick else (args.steps, args.rounds, args.models)
    names = tuple(args.only or (QUICK if args.quick else SETUPS))

    command = " ".join(["python benchmarks/train_throughput.py", *command_options(args)])
    with tempfile.TemporaryDirectory() as scratch:
        for model_name in models:  # each model's section is written as soon as it is measured
            model = model_folder(model_name, Path(scratch))
            runs = run_rounds(names, model, steps, rounds, args.threads)
            summaries = {name: summarize(runs[name]) for name in names}
            text = "\n".join([*table(summaries), "", *findings(summaries)])
            print(f"{model_name} model\n{text}\n")
            header = (
                f"## train_throughput, {model_name} model ({steps} steps per setup, micro-batch {MICRO_BATCH}, "
                f"LoRA r {LORA['r']} all-linear, data/alpaca_sample.json; median of {rounds} interleaved rounds; "
                f"`{command}`)\n\n"
                f"{machine_line('torch', 'transformers', 'peft', 'trl')}; {args.threads} threads per process"
                f"{'; ' + args.load if args.load else ''}\n\n"
            )
            write_section(args.results, f"train_throughput, {model_name} model", header + text + "\n")


if __name__ == "__main__":
    main()
