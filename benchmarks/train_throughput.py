"""Real (non-padding) tokens per second of `finetune run` against what users would write instead, on the
same model, data, LoRA settings and number of steps:

  finetune            `finetune run` with the recipe's defaults (recipes/quickstart.yaml's LoRA):
                      padding-free batches, attention per sample
  trl defaults        the 30 lines of TRL: SFTTrainer on prompt/completion rows, SFTConfig defaults
                      (but fp32 and no gradient checkpointing, as every setup here)
  alpaca-lora         transformers Trainer + peft, prompt masked by hand, padded to the longest in the
                      batch (DataCollatorForSeq2Seq), no packing: alpaca-lora's `finetune.py` recipe

plus finetune's other batching modes and its QLoRA and full fine-tuning, each in its own process, on a
LLaMA-proportioned random-weight model (benchmarks/models.py; --model tiny for data/tiny-llama).
Every setup trains the same 108 rows in batches of the same size for the same steps (by default 3 whole
epochs of 14 batches), so all see the same samples; the eval loss after the last step (prompt masked, on
the same held-out rows) shows whether speed cost quality. The ratio line divides finetune's real tokens/s
by each baseline's, from one run of this script (the machine is noisy: compare within a run, not across
runs).

    python benchmarks/train_throughput.py            # 42 steps per setup, 2 rounds (best of 2)
    python benchmarks/train_throughput.py --quick    # 3 steps, one round, the three main setups

Writes its table into benchmarks/RESULTS.md (or --results FILE).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from child import run_child
from models import model_folder
from results import RESULTS, machine_line, write_section

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "alpaca_sample.json"
MICRO_BATCH, LR, SEED, EVAL_ROWS, MAX_LEN = 8, 2e-3, 0, 12, 512
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}

# name -> (kind, finetune overrides)
SETUPS = {
    "finetune": ("finetune", []),
    "trl defaults": ("trl", []),
    "alpaca-lora": ("alpaca_lora", []),
    "finetune, packing none": ("finetune", ["data.packing=none"]),
    "finetune, packing bfd": ("finetune", ["data.packing=bfd"]),
    "finetune, qlora nf4": ("finetune", ["quant.bits=4"]),
    "finetune, full": ("finetune", ["adapter={kind: none}", "train.lr=1e-3"]),
}
QUICK = ("finetune", "trl defaults", "alpaca-lora")
BASELINES = ("trl defaults", "alpaca-lora")
MODEL_HELP = "proportioned: LLaMA's shape ratios at 3.5M parameters (default); tiny: data/tiny-llama"


def split_rows() -> tuple[list[dict], list[dict]]:
    """The benchmark's train and held-out rows: the last EVAL_ROWS rows are held out, for every setup alike."""
    rows = json.loads(DATA.read_text(encoding="utf-8"))
    return rows[:-EVAL_ROWS], rows[-EVAL_ROWS:]


def run_finetune(model: Path, overrides: list[str], steps: int, out: Path) -> dict:
    from finetune.pipeline import run
    from finetune.recipe.load import load_recipe

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
            "output.tensorboard=false",
            f"output.dir={out / 'run'}",
            *overrides,
        ],
    )
    summary = run(recipe, echo=lambda _: None).summary
    return {
        "real_tokens": summary["tokens_seen"],
        "processed_tokens": summary["tokens_processed"],
        "train_runtime_s": summary["train_runtime_s"],
        "eval_loss": summary["eval_loss"],
    }


class CountingCollator:
    """Wraps a collator to count real (attention_mask) and processed (padded) tokens of every batch."""

    def __init__(self, collate):
        self.collate, self.real, self.processed = collate, 0, 0

    def __call__(self, features):
        batch = self.collate(features)
        self.real += int(batch["attention_mask"].sum())
        self.processed += batch["attention_mask"].numel()
        return batch


def baseline_figures(trainer, counter: CountingCollator) -> dict:
    counter.real = counter.processed = 0  # train only: the final eval pass is not counted
    runtime = trainer.train().metrics["train_runtime"]
    figures = {"real_tokens": counter.real, "processed_tokens": counter.processed, "train_runtime_s": runtime}
    return {**figures, "eval_loss": trainer.evaluate()["eval_loss"]}


def baseline_arguments(steps: int, out: Path) -> dict:
    """The training arguments both baselines share with each other and with finetune's setup."""
    return {
        "output_dir": str(out),
        "max_steps": steps,
        "per_device_train_batch_size": MICRO_BATCH,
        "per_device_eval_batch_size": MICRO_BATCH,
        "learning_rate": LR,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.05,
        "use_cpu": True,
        "seed": SEED,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
    }


def run_trl(model_path: Path, steps: int, out: Path) -> dict:
    """What a TRL user writes: prompt/completion rows, a LoraConfig, SFTConfig defaults (fp32 on CPU)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from finetune.data.formats.alpaca import format_prompt

    set_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.pad_token = tokenizer.unk_token
    model = AutoModelForCausalLM.from_pretrained(model_path)

    def to_dataset(rows):
        return Dataset.from_list(
            [{"prompt": format_prompt(r["instruction"], r.get("input", "")), "completion": r["output"]} for r in rows]
        )

    train, held_out = split_rows()
    args = SFTConfig(
        **baseline_arguments(steps, out),
        max_length=MAX_LEN,
        bf16=False,  # TRL's default bf16 fails on CPU
        gradient_checkpointing=False,  # TRL's default is on; off as in the other setups, to compare batching
    )
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear")
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=to_dataset(train),
        eval_dataset=to_dataset(held_out),
        processing_class=tokenizer,
        peft_config=lora,
    )
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    return baseline_figures(trainer, counter)


def run_alpaca_lora(model_path: Path, steps: int, out: Path) -> dict:
    """alpaca-lora's recipe: tokenize prompt + response + EOS, mask the prompt with -100, pad per batch."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from finetune.data.formats.alpaca import format_prompt

    set_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.pad_token_id = 0  # alpaca-lora: "unk. we want this to be different from the eos token"
    model = AutoModelForCausalLM.from_pretrained(model_path)
    lora = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)

    def tokenize(row):
        prompt = format_prompt(row["instruction"], row.get("input", ""))
        full = tokenizer(prompt + row["output"], truncation=True, max_length=MAX_LEN - 1)["input_ids"]
        full = full + [tokenizer.eos_token_id]
        prompt_len = len(tokenizer(prompt)["input_ids"])
        return {
            "input_ids": full,
            "attention_mask": [1] * len(full),
            "labels": [-100] * prompt_len + full[prompt_len:],
        }

    train, held_out = split_rows()
    args = TrainingArguments(**baseline_arguments(steps, out))
    collate = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    counter = CountingCollator(collate)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([tokenize(r) for r in train]),
        eval_dataset=Dataset.from_list([tokenize(r) for r in held_out]),
        data_collator=counter,
    )
    return baseline_figures(trainer, counter)


def child(name: str, model: Path, steps: int) -> None:
    """Train one setup in this process and print its figures as JSON."""
    kind, overrides = SETUPS[name]
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        if kind == "finetune":
            figures = run_finetune(model, overrides, steps, out)
        elif kind == "trl":
            figures = run_trl(model, steps, out)
        else:
            figures = run_alpaca_lora(model, steps, out)
    print(json.dumps(figures))


def measure(name: str, model: Path, steps: int) -> dict:
    figures = run_child(__file__, [name, "--model-path", str(model), "--steps", str(steps)])
    figures["tokens_per_s"] = figures["real_tokens"] / figures["train_runtime_s"]
    figures["padding_share"] = 1 - figures["real_tokens"] / figures["processed_tokens"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 steps, one round, the three main setups")
    parser.add_argument("--steps", type=int, default=42, help="default: 3 epochs of 108 rows in batches of 8")
    parser.add_argument("--rounds", type=int, default=2, help="every setup runs once per round; the best counts")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--model", choices=("proportioned", "tiny"), default="proportioned", help=MODEL_HELP)
    parser.add_argument("--only", nargs="+", choices=tuple(SETUPS), help="run these setups only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child, args.model_path, args.steps)
    steps, rounds = (3, 1) if args.quick else (args.steps, args.rounds)
    names = args.only or (QUICK if args.quick else tuple(SETUPS))

    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        model = model_folder(args.model, Path(scratch))
        for _ in range(rounds):  # rounds interleave the setups, so a busy minute does not hit one setup only
            for name in names:
                figures = measure(name, model, steps)
                if name not in best or figures["tokens_per_s"] > best[name]["tokens_per_s"]:
                    best[name] = figures
    rows = [
        "| setup | real tokens | padding share | train s | real tokens/s | x finetune | eval loss after last step |",
        "|---|---|---|---|---|---|---|",
    ]
    ours = best["finetune"]["tokens_per_s"]
    for name in names:
        f = best[name]
        cells = [
            name,
            f"{f['real_tokens']:,}",
            f"{f['padding_share']:.1%}",
            f"{f['train_runtime_s']:.1f}",
            f"{f['tokens_per_s']:.0f}",
            f"{f['tokens_per_s'] / ours:.2f}",
            f"{f['eval_loss']:.4f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    ratios = ", ".join(f"{ours / best[b]['tokens_per_s']:.2f}x {b}" for b in BASELINES if b in best)
    table = "\n".join(rows) + f"\n\nfinetune real tokens/s: {ratios} (target >= 1.4x both)"
    print(table)
    header = (
        f"## train_throughput ({steps} steps, micro-batch {MICRO_BATCH}, LoRA r {LORA['r']} all-linear, "
        f"{args.model} model, data/alpaca_sample.json; best of {rounds}; `python benchmarks/train_throughput.py`)\n\n"
        f"{machine_line('torch', 'transformers', 'peft', 'trl')}\n\n"
    )
    write_section(args.results, "train_throughput", header + table + "\n")


if __name__ == "__main__":
    main()
