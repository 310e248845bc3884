"""What users write instead of `finetune run`, set up as their authors document them, on the benchmark's
model, rows, LoRA, optimizer and schedule:

  trl             TRL's SFTTrainer on prompt/completion rows (its README's 30 lines), with SFTConfig's
                  defaults or one of its batching options: padding_free=True, or packing=True (bfd)
  alpaca-lora     tloen/alpaca-lora's finetune.py as its README runs it (--group_by_length): transformers
                  Trainer + peft, prompt and response tokenized together with EOS, the loss on the prompt
                  too (train_on_inputs=True, its default), padded on the left to a multiple of 8 per
                  batch (DataCollatorForSeq2Seq), batches of similar lengths (group_by_length)

All run in float32 without gradient checkpointing, as every setup here (TRL's bf16 default fails on CPU;
its checkpointing default is turned off so batching, not recomputation, is compared). alpaca-lora's
torch.compile and 8-bit base are left out: the first costs minutes per process on CPU, the second needs a
GPU. Its eval rows mask the prompt like every other setup's, so eval losses compare; its training loss
includes the prompt, which is its recipe.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "alpaca_sample.json"
MICRO_BATCH, LR, SEED, EVAL_ROWS, MAX_LEN = 8, 2e-3, 0, 12, 512
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
OPTIMIZER = "adamw_torch_fused"  # finetune's default; the Trainer's own default on this torch


def split_rows() -> tuple[list[dict], list[dict]]:
    """The benchmark's train and held-out rows: the last EVAL_ROWS rows are held out, for every setup alike."""
    rows = json.loads(DATA.read_text(encoding="utf-8"))
    return rows[:-EVAL_ROWS], rows[-EVAL_ROWS:]


def trainer_arguments(steps: int, out: Path) -> dict:
    """The training arguments every peer shares with the others and with finetune's setup."""
    return {
        "output_dir": str(out),
        "max_steps": steps,
        "per_device_train_batch_size": MICRO_BATCH,
        "per_device_eval_batch_size": MICRO_BATCH,
        "learning_rate": LR,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.05,
        "optim": OPTIMIZER,
        "use_cpu": True,
        "seed": SEED,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def lora_config(**extra):
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear", **extra
    )


def train_and_evaluate(trainer) -> dict:
    """Train inside the shared window, then the eval loss on the held-out rows (outside it)."""
    from train_window import instrument

    figures = instrument(trainer)
    trainer.train()
    return {**figures, "eval_loss": trainer.evaluate()["eval_loss"]}


def run_trl(model_path: Path, steps: int, out: Path, option: str) -> dict:
    """TRL's SFTTrainer with SFTConfig defaults ('defaults'), or with padding_free or packing on."""
    return train_and_evaluate(build_trl_trainer(model_path, steps, out, option))


def build_trl_trainer(model_path: Path, steps: int, out: Path, option: str, *, evaluate: bool = True):
    """The SFTTrainer of run_trl, untrained; without `evaluate`, no eval rows."""
    from datasets import Dataset
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

    options = {"defaults": {}, "padding_free": {"padding_free": True}, "packing": {"packing": True}}[option]
    train, held_out = split_rows()
    # TRL refuses max_length with padding_free and no packing (it would not be enforced); no row here is longer
    max_length = None if option == "padding_free" else MAX_LEN
    args = SFTConfig(
        **trainer_arguments(steps, out), max_length=max_length, bf16=False, gradient_checkpointing=False, **options
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=to_dataset(train),
        eval_dataset=to_dataset(held_out) if evaluate else None,
        processing_class=tokenizer,
        peft_config=lora_config(),
    )


def run_alpaca_lora(model_path: Path, steps: int, out: Path) -> dict:
    """tloen/alpaca-lora's finetune.py, with its README's --group_by_length."""
    from datasets import Dataset
    from peft import get_peft_model
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
    tokenizer.padding_side = "left"  # alpaca-lora: "Allow batched inference"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), lora_config(task_type="CAUSAL_LM"))

    def tokenize(row, train_on_inputs: bool):
        prompt = format_prompt(row["instruction"], row.get("input", ""))
        full = tokenizer(prompt + row["output"], truncation=True, max_length=MAX_LEN)["input_ids"]
        if full[-1] != tokenizer.eos_token_id and len(full) < MAX_LEN:
            full = full + [tokenizer.eos_token_id]
        labels = list(full)
        if not train_on_inputs:
            prompt_len = len(tokenizer(prompt)["input_ids"])
            labels = [-100] * prompt_len + labels[prompt_len:]
        return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}

    train, held_out = split_rows()
    trainer = Trainer(
        model=model,
        # transformers 5 spells alpaca-lora's group_by_length=True so
        args=TrainingArguments(**trainer_arguments(steps, out), train_sampling_strategy="group_by_length"),
        train_dataset=Dataset.from_list([tokenize(r, train_on_inputs=True) for r in train]),
        eval_dataset=Dataset.from_list([tokenize(r, train_on_inputs=False) for r in held_out]),
        data_collator=DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True),
    )
    return train_and_evaluate(trainer)
