"""What only a GPU can show, in one command and one table (under 8 minutes on one 80 GB+ GPU):

  lora                10 LoRA steps on a 7B-shaped random LLaMA (hidden 4096, 32 layers, vocabulary 32,000)
                      in bfloat16, gradient checkpointing on, micro-batch 4: real tokens/s, peak
                      torch.cuda.max_memory_allocated against `finetune plan`'s prediction (less the CUDA
                      context, which the allocator does not see)
  qlora nf4           the same with the base in 4 bits
  qlora nf4, paged_adamw_32bit   and with the QLoRA paper's paged optimizer
  fsdp, 1 process     `finetune run --accelerate-config` with accelerate_configs/fsdp.yaml at one process:
                      4 steps, sharded checkpoints at 2 and 4, the adapter gathered into one folder; then
                      the run is cut back to its step-2 checkpoint and resumed, and the resumed adapter
                      must equal the uninterrupted one
  merge on cuda       `finetune merge --device cuda` of the lora run, its logits check included

    python benchmarks/gpu_check.py               # needs CUDA: without it, says so and exits 0
    python benchmarks/gpu_check.py --cpu-smoke   # the same checks on data/tiny-llama on CPU, 2 steps, with
                                                 # accelerate_configs/cpu_ddp.yaml at one process in place
                                                 # of FSDP (which needs CUDA) and no memory figures

Every check runs in processes of its own. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from child import run_child

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
LLAMA_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
}
TRAIN_CHECKS = {
    "lora": [],
    "qlora nf4": ["quant.bits=4"],
    "qlora nf4, paged_adamw_32bit": ["quant.bits=4", "train.optimizer=paged_adamw_32bit"],
}


@dataclass(frozen=True)
class Target:
    """Where the checks run: the model, the device's recipe keys, steps, accelerate config and merge device."""

    model: Path
    keys: list[str]
    steps: int
    accelerate_config: Path
    device: str

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def make_target(smoke: bool, scratch: Path) -> Target:
    """A random 7B-shaped LLaMA in bfloat16 and FSDP at one process, or (smoke) data/tiny-llama and cpu_ddp."""
    config_name = "cpu_ddp.yaml" if smoke else "fsdp.yaml"
    config = yaml.safe_load((REPO / "accelerate_configs" / config_name).read_text(encoding="utf-8"))
    config["num_processes"] = 1
    accelerate_config = scratch / config_name
    accelerate_config.write_text(yaml.safe_dump(config), encoding="utf-8")
    if smoke:
        keys = ["train.use_cpu=true", "train.gradient_checkpointing=false"]
        return Target(REPO / "data" / "tiny-llama", keys, 2, accelerate_config, "cpu")
    keys = ["model.dtype=bfloat16", "train.precision=bf16", "train.gradient_checkpointing=true", "train.lr=2e-4"]
    return Target(random_7b(scratch / "llama-7b-shaped"), keys, 10, accelerate_config, "cuda")


def random_7b(folder: Path) -> Path:
    """LLaMA-7B's shape with random bfloat16 weights, initialised on the GPU, and data/tiny-llama's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = REPO / "data" / "tiny-llama"
    base = LlamaConfig.from_pretrained(tiny)
    config = LlamaConfig(**LLAMA_7B, bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tiny / name, folder / name)
    return folder


def run_keys(target: Target, out: Path, steps: int, save_steps: int = 100000) -> list[str]:
    return [
        f"model.name_or_path={target.model}",
        *target.keys,
        f"train.max_steps={steps}",
        "train.micro_batch_size=4",
        f"train.save_steps={save_steps}",
        "train.save_total_limit=null",
        "data.eval_fraction=0",
        "data.cache=false",
        "eval.samples=0",
        "output.report=false",
        "output.trackers=[]",
        f"output.dir={out}",
    ]


def child(keys: list[str]) -> None:
    """Train once in this process: real tokens/s of the step window, the peak allocated and the plan."""
    import torch
    from train_window import instrument

    import finetune.train.trainer as trainer_module
    from finetune.model.shape import read_shape
    from finetune.pipeline import run
    from finetune.recipe.load import load_recipe
    from finetune.train.plan import CUDA_CONTEXT_BYTES, plan_memory

    build_trainer, window = trainer_module.build_trainer, {}

    def build_instrumented_trainer(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        window["figures"] = instrument(trainer)
        return trainer

    trainer_module.build_trainer = build_instrumented_trainer
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", keys)
    run(recipe, echo=lambda _: None)
    figures = window["figures"]
    cuda = torch.cuda.is_available() and not recipe.train.use_cpu
    plan = plan_memory(recipe, read_shape(recipe.model.name_or_path))
    print(
        json.dumps(
            {
                "steps": figures["steps"],
                "tokens_per_s": figures["real_tokens"] / figures["train_s"],
                "peak_gib": torch.cuda.max_memory_allocated() / GiB if cuda else None,
                "plan_gib": (plan.total - CUDA_CONTEXT_BYTES) / GiB,
            }
        )
    )


def finetune_cli(*arguments: str) -> subprocess.CompletedProcess:
    """`python -m finetune ARGUMENTS` from the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", "finetune", *arguments], cwd=REPO, capture_output=True, text=True)


def last_line(done: subprocess.CompletedProcess) -> str:
    """What the command said last: its error when it failed, else its last line of output (not a warning)."""
    lines = (done.stderr if done.returncode else done.stdout).strip().splitlines()
    return lines[-1].strip() if lines else f"exit {done.returncode}"


@dataclass
class Row:
    check: str
    ok: bool
    detail: str = ""
    figures: dict | None = None
    seconds: float = 0.0


def check_training(name: str, target: Target, out: Path) -> Row:
    try:
        figures = run_child(__file__, run_keys(target, out, target.steps) + TRAIN_CHECKS[name])
    except subprocess.CalledProcessError as error:
        lines = (error.stderr or "").strip().splitlines()
        return Row(name, False, lines[-1] if lines else str(error))
    return Row(name, figures["steps"] == target.steps, f"{figures['steps']} steps", figures)


def adapter_tensors(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def check_launched_resume(target: Target, run: Path) -> Row:
    """4 steps through accelerate, checkpoints at 2 and 4; cut back to step 2, resume, compare the adapters."""
    name = "fsdp, 1 process" if target.cuda else "cpu_ddp, 1 process"
    launch = ("--accelerate-config", str(target.accelerate_config))
    recipe = str(REPO / "recipes" / "quickstart.yaml")
    first = finetune_cli("run", recipe, *run_keys(target, run, 4, save_steps=2), *launch)
    if first.returncode != 0 or not (run / "adapter" / "adapter_model.safetensors").is_file():
        return Row(name, False, f"first run: {last_line(first)}")
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*"))
    if checkpoints != ["checkpoint-2", "checkpoint-4"]:
        return Row(name, False, f"checkpoints {checkpoints}, expected checkpoint-2 and checkpoint-4")
    files = sum(1 for p in (run / "checkpoints" / "checkpoint-2").rglob("*") if p.is_file())
    uninterrupted = adapter_tensors(run)
    # as if the run had stopped right after its step-2 checkpoint
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    second = finetune_cli("run", str(run), "--resume", *launch)
    if second.returncode != 0 or not (run / "adapter" / "adapter_model.safetensors").is_file():
        return Row(name, False, f"resumed run: {last_line(second)}")
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    resumed = adapter_tensors(run)
    difference = max((resumed[k].float() - v.float()).abs().max().item() for k, v in uninterrupted.items())
    scale = max(v.float().abs().max().item() for k, v in uninterrupted.items() if "lora_B" in k)
    # bf16 kernels on a GPU need not be bit-reproducible; the step-3 and step-4 updates must be
    tolerance = 0.01 if target.cuda else 1e-4
    ok = summary.get("resumed_from") == "checkpoint-2" and difference <= tolerance * scale
    detail = (
        f"adapter of {len(uninterrupted)} tensors; checkpoint-2 holds {files} files; resumed from "
        f"{summary.get('resumed_from')}: max |resumed - uninterrupted| {difference:.2e} (largest lora_B {scale:.2e})"
    )
    return Row(name, ok, detail)


def check_merge(target: Target, lora_run: Path, out: Path) -> Row:
    done = finetune_cli("merge", str(lora_run), "--device", target.device, "--out", str(out))
    ok = done.returncode == 0 and (out / "config.json").is_file()
    checked = [line for line in done.stdout.splitlines() if line.startswith("check: ")]
    return Row(f"merge on {target.device}", ok, checked[-1] if ok and checked else last_line(done))


def timed(check, *arguments) -> Row:
    started = time.perf_counter()
    row = check(*arguments)
    row.seconds = time.perf_counter() - started
    return row


def table(rows: list[Row]) -> str:
    lines = [
        "| check | result | real tokens/s | peak allocated GiB | plan GiB (no CUDA context) | peak / plan | s "
        "| detail |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        f = row.figures or {}
        peak, plan = f.get("peak_gib"), f.get("plan_gib")
        cells = [
            row.check,
            "ok" if row.ok else "FAILED",
            f"{f['tokens_per_s']:.0f}" if f else "-",
            "-" if peak is None else f"{peak:.2f}",
            "-" if plan is None else f"{plan:.2f}",
            "-" if peak is None or plan is None else f"{peak / plan:.2f}",
            f"{row.seconds:.0f}",
            row.detail.replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="the same checks on data/tiny-llama on CPU")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return 0
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check needs CUDA, and this machine has none: nothing was run. `--cpu-smoke` runs the same checks")
        print("on data/tiny-llama on CPU.")
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        target = make_target(args.cpu_smoke, scratch)
        rows = [timed(check_training, name, target, scratch / name.replace(" ", "_")) for name in TRAIN_CHECKS]
        rows.append(timed(check_launched_resume, target, scratch / "launched"))
        rows.append(timed(check_merge, target, scratch / "lora", scratch / "merged"))
    device = torch.cuda.get_device_name() if target.cuda else "CPU (--cpu-smoke)"
    print(f"gpu_check on {device}, {time.perf_counter() - started:.0f} s in all\n")
    print(table(rows))
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
