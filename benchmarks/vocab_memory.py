"""Peak memory and speed of a LoRA step at today's vocabularies: Llama-2's 32,000 entries and Llama-3's
128,256, where the float32 logits (tokens x vocabulary) are the step's largest tensor.

  trl padding_free             TRL's fastest setting in benchmarks/train_throughput.py: SFTTrainer with
                               padding_free=True, its own fused LM head (tiles of up to 4,096 tokens x
                               32,768 vocabulary entries)
  finetune                     `finetune run`'s defaults: padding-free, the chunked loss (train.loss_chunk_mib
                               32: finetune/train/loss.py)
  finetune, TRL's loss head    train.loss_chunk_mib: null, the same run with TRL's head

Same model (the 3.5M-parameter proportioned LLaMA, its embedding and head widened to the vocabulary; the
tokenizer's entries are the only labels), rows, LoRA, micro-batch 8, no gradient checkpointing, each
configuration in its own process. Step 2 runs under torch.profiler for its peak (benchmarks/step_memory.py's
StepMeter: tensors allocated during the step, on top of those resident before it); the steps after it run
unprofiled for real tokens/s.

    python benchmarks/vocab_memory.py            # vocabularies 32,000 and 128,256, 5 steps
    python benchmarks/vocab_memory.py --quick    # vocabulary 8,192, 3 steps

Writes its table into benchmarks/RESULTS.md (or --results FILE).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from child import run_child
from models import model_folder
from peers import MICRO_BATCH, build_trl_trainer
from results import RESULTS, machine_line, write_section
from step_memory import MiB, StepMeter

REPO = Path(__file__).resolve().parents[1]
SETUPS = ("trl padding_free", "finetune", "finetune, TRL's loss head")
BASELINE = "trl padding_free"
OURS = "finetune"
PROFILED_STEP = 1  # 0-based: the first step also creates the optimizer state


def measuring_callback(meter: StepMeter, steps: list[list[float]]):
    """Profiles PROFILED_STEP with `meter`; records (begin, end) of every step in `steps`."""
    from transformers import TrainerCallback

    class MeasureSteps(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if state.global_step == PROFILED_STEP:
                meter.start(model, optimizer)
            steps.append([time.perf_counter()])

        def on_step_end(self, args, state, control, **kwargs):
            if meter.running:
                meter.stop()
            steps[-1].append(time.perf_counter())

    return MeasureSteps()


def measure_trainer(trainer, meter: StepMeter, steps: list, batch_tokens: list) -> None:
    """Attach the callback and a collator wrapper recording each training batch's real tokens."""
    collate = trainer.data_collator

    def counting_collate(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        batch_tokens.append(batch["input_ids"].numel() if mask is None else int(mask.sum()))
        return batch

    trainer.data_collator = counting_collate
    trainer.add_callback(measuring_callback(meter, steps))


def run_finetune(model: Path, steps: int, out: Path, overrides: list[str], hooks) -> None:
    import finetune.train.trainer as trainer_module
    from finetune.pipeline import run
    from finetune.recipe.load import load_recipe

    build_trainer = trainer_module.build_trainer

    def build_measured_trainer(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        hooks(trainer)
        return trainer

    trainer_module.build_trainer = build_measured_trainer
    recipe = load_recipe(
        REPO / "recipes" / "quickstart.yaml",
        [
            f"model.name_or_path={model}",
            f"train.max_steps={steps}",
            f"train.micro_batch_size={MICRO_BATCH}",
            "train.save_steps=100000",
            "data.eval_fraction=0",
            "data.cache=false",
            "eval.samples=0",
            "output.report=false",
            "output.trackers=[]",
            f"output.dir={out / 'run'}",
            *overrides,
        ],
    )
    run(recipe, echo=lambda _: None)


def child(setup: str, model: Path, steps: int) -> None:
    """Train one configuration in this process and print its figures as JSON."""
    meter, step_times, batch_tokens = StepMeter(), [], []

    def hooks(trainer):
        measure_trainer(trainer, meter, step_times, batch_tokens)

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        if setup == BASELINE:
            trainer = build_trl_trainer(model, steps, out, "padding_free", evaluate=False)
            hooks(trainer)
            trainer.train()
        else:
            overrides = ["train.loss_chunk_mib=null"] if setup != OURS else []
            run_finetune(model, steps, out, overrides, hooks)
    (window,) = meter.steps
    timed = range(PROFILED_STEP + 1, len(step_times))
    seconds = sum(step_times[i][1] - step_times[i][0] for i in timed)
    figures = {
        "resident_mib": window["resident"] / MiB,
        "step_peak_mib": window["peak"] / MiB,
        "largest_allocation_mib": None if window["largest"] is None else window["largest"] / MiB,
        "tokens_per_s": sum(batch_tokens[i] for i in timed) / seconds,
        "timed_steps": len(timed),
    }
    print(json.dumps(figures))


def table_rows(vocab: int, measured: dict[str, dict]) -> list[str]:
    base = measured[BASELINE]
    rows = []
    for setup, f in measured.items():
        largest = f["largest_allocation_mib"]
        cells = [
            f"{vocab:,}",
            setup,
            f"{f['resident_mib']:.1f}",
            f"{f['step_peak_mib']:.1f}",
            "-" if largest is None else f"{largest:.1f}",
            f"{f['step_peak_mib'] / base['step_peak_mib']:.2f}",
            f"{f['tokens_per_s']:.0f}",
            f"{f['tokens_per_s'] / base['tokens_per_s']:.2f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def finding(vocab: int, measured: dict[str, dict]) -> str:
    ours, base = measured[OURS], measured[BASELINE]
    memory = ours["step_peak_mib"] / base["step_peak_mib"]
    speed = ours["tokens_per_s"] / base["tokens_per_s"]
    return (
        f"- vocabulary {vocab:,}: finetune's step peak is {memory:.2f}x TRL's (goal <= 0.6x: "
        f"{'met' if memory <= 0.6 else 'NOT met'}), its real tokens/s {speed:.2f}x TRL's (goal >= 1.0x: "
        f"{'met' if speed >= 1.0 else 'NOT met'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="vocabulary 8,192, 3 steps")
    parser.add_argument("--vocabs", nargs="+", type=int, default=[32000, 128256])
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per configuration (at least 3)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child, args.model_path, args.steps)
    vocabs, steps = ([8192], 3) if args.quick else (args.vocabs, max(3, args.steps))

    rows, findings = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for vocab in vocabs:
            model = model_folder("proportioned", Path(scratch), vocab_size=vocab)
            arguments = ["--model-path", str(model), "--steps", str(steps)]
            measured = {setup: run_child(__file__, [setup, *arguments]) for setup in SETUPS}
            rows += table_rows(vocab, measured)
            findings.append(finding(vocab, measured))
    table = "\n".join(
        [
            "| vocabulary | setup | tensors resident before the step MiB | peak allocated during the step MiB "
            "| largest single allocation MiB | step peak / TRL's | real tokens/s | tokens/s / TRL's |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            *findings,
        ]
    )
    print(table)
    command = "python benchmarks/vocab_memory.py" + (" --quick" if args.quick else "")
    header = (
        f"## vocab_memory (a LoRA step at each vocabulary, 3.5M-parameter proportioned LLaMA with its head widened, "
        f"micro-batch {MICRO_BATCH}, step 2 profiled, steps 3-{steps} timed; `{command}`)\n\n"
        f"{machine_line('torch', 'transformers', 'peft', 'trl')}\n\n"
    )
    write_section(args.results, "vocab_memory", header + table + "\n")


if __name__ == "__main__":
    main()
