"""`finetune plan` against what torch really allocates.

    python benchmarks/plan_accuracy.py            # tiny LLaMA and a random ~100M LLaMA (+ 7B on CUDA)
    python benchmarks/plan_accuracy.py --quick    # the tiny LLaMA only (the test's smoke run)

CPU part: weights + gradients + optimizer state, predicted by the planner from config.json, against
the bytes of the real parameter, quantization-constant, gradient and optimizer-state tensors after one
training step (LoRA, full fine-tuning, QLoRA NF4), for data/tiny-llama and a random ~100M LLaMA
(LlamaConfig, no download).
CUDA part (only where a GPU is visible): a random 7B-shaped LLaMA under QLoRA and LoRA (bf16,
checkpointing, sequence 512) at several micro-batch sizes; predicted peak (without the CUDA context,
which torch does not count) against torch.cuda.max_memory_allocated over three training steps.
Writes both tables into benchmarks/RESULTS.md (or --results FILE).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from results import RESULTS, machine_line, write_section

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "data" / "tiny-llama"
MIB = 2**20
CPU_METHODS = {
    "lora": [],
    "full": ["adapter={kind: none}"],
    "qlora nf4": ["quant.bits=4"],
}
LLAMA_100M = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12)
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
GPU_METHODS = {"qlora nf4": ["quant.bits=4", "train.optimizer=paged_adamw_32bit"], "lora bf16": []}
GPU_MICRO_BATCHES = (1, 2, 4)


def recipe_for(model_dir: Path, overrides: list[str]):
    from finetune.recipe.load import load_recipe

    return load_recipe(REPO / "recipes" / "quickstart.yaml", [f"model.name_or_path={model_dir}", *overrides])


def random_llama(folder: Path, sizes: dict, *, dtype: str, device: str) -> Path:
    """A LLaMA of `sizes` with random weights and the tiny tokenizer, saved where from_pretrained finds it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, **sizes)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(TINY / name, folder / name)
    return folder


def cpu_row(model_dir: Path, method: str) -> dict:
    """Predicted and measured weights + gradients + optimizer state of one method on CPU (float32)."""
    import torch

    from finetune.model.adapters import wrap_adapter
    from finetune.model.load import load_model
    from finetune.model.shape import read_shape
    from finetune.train.memory import measure_training_step
    from finetune.train.plan import plan_memory

    recipe = recipe_for(model_dir, ["model.dtype=float32", "train.precision=fp32", *CPU_METHODS[method]])
    plan = plan_memory(recipe, read_shape(str(model_dir)))
    torch.manual_seed(0)
    model = load_model(recipe.model, recipe.quant, device="cpu")
    model = wrap_adapter(model, recipe.adapter, gradient_checkpointing=False, tokenizer_source=str(model_dir))
    ids = torch.randint(3, 500, (1, 64))
    real = measure_training_step(model, recipe.train.optimizer, ids, full_finetune=recipe.adapter.kind == "none")
    return {"predicted": plan.states, "measured": real.total}


def gpu_row(model_dir: Path, method: str, micro: int) -> dict:
    """Predicted peak (tensors only) and torch.cuda.max_memory_allocated over three training steps."""
    import torch

    from finetune.model.adapters import wrap_adapter
    from finetune.model.load import load_model
    from finetune.model.shape import read_shape
    from finetune.train.memory import build_optimizer
    from finetune.train.plan import CUDA_CONTEXT_BYTES, plan_memory

    overrides = [*GPU_METHODS[method], "model.dtype=bfloat16", "train.precision=bf16"]
    overrides += ["train.gradient_checkpointing=true", f"train.micro_batch_size={micro}", "data.max_seq_len=512"]
    recipe = recipe_for(model_dir, overrides)
    plan = plan_memory(recipe, read_shape(str(model_dir)))
    model = load_model(recipe.model, recipe.quant, device="cuda")
    model = wrap_adapter(model, recipe.adapter, gradient_checkpointing=True, tokenizer_source=str(model_dir))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.quant is None:  # quantized weights are placed on the GPU as they load
        model.to("cuda")
    model.train()
    optimizer = build_optimizer(recipe.train.optimizer, [p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(3, 500, (micro, recipe.data.max_seq_len), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"predicted": plan.total - CUDA_CONTEXT_BYTES, "measured": torch.cuda.max_memory_allocated()}


def child(args: list[str]) -> None:
    model_dir, method, micro = args
    print(json.dumps(gpu_row(Path(model_dir), method, int(micro))))


def measure_peak(model_dir: Path, method: str, micro: int) -> dict:
    """One GPU measurement in a fresh process, so that the peaks and caches of the others do not count."""
    command = [sys.executable, __file__, "--child", str(model_dir), method, str(micro)]
    done = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table_row(model: str, method: str, figures: dict) -> str:
    predicted, real = figures["predicted"], figures["measured"]
    return f"| {model} | {method} | {predicted / MIB:.2f} | {real / MIB:.2f} | {predicted / real:.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny LLaMA only, CPU only")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child)
    import torch

    header = "| model | method | predicted MiB | measured MiB | predicted / measured |\n|---|---|---|---|---|"
    cpu_rows, gpu_rows = [header], [header.replace("model |", "model | micro-batch |").replace("|---|", "|---|---|", 1)]
    with tempfile.TemporaryDirectory() as scratch:
        models = {"data/tiny-llama": TINY}
        if not args.quick:
            models["random LLaMA ~106M"] = random_llama(
                Path(scratch) / "100m", LLAMA_100M, dtype="float32", device="cpu"
            )
        for name, folder in models.items():
            for method in CPU_METHODS:
                cpu_rows.append(table_row(name, method, cpu_row(folder, method)))  # counted bytes: one process is fine
        if torch.cuda.is_available() and not args.quick:
            folder = random_llama(Path(scratch) / "7b", LLAMA_7B, dtype="bfloat16", device="cuda")
            for method in GPU_METHODS:
                for micro in GPU_MICRO_BATCHES:
                    row = table_row("random LLaMA-7B shape", method, measure_peak(folder, method, micro))
                    gpu_rows.append(row.replace(f"| {method} |", f"| {micro} | {method} |", 1))
    cpu_table = "\n".join(cpu_rows)
    print(cpu_table)
    section = (
        "## plan_accuracy (weights + gradients + optimizer state after one step, CPU, float32; "
        "`python benchmarks/plan_accuracy.py`)\n\n"
        f"{machine_line('torch', 'transformers', 'peft', 'bitsandbytes')}\n\n{cpu_table}\n"
    )
    if len(gpu_rows) > 1:
        gpu_table = "\n".join(gpu_rows)
        print(gpu_table)
        section += (
            f"\nPeak on {torch.cuda.get_device_name()} (torch.cuda.max_memory_allocated, 3 steps):\n\n{gpu_table}\n"
        )
    else:
        section += "\nNo GPU here: the peak-memory comparison (activations, logits, overhead) was not measured.\n"
    write_section(args.results, "plan_accuracy", section)


if __name__ == "__main__":
    main()
