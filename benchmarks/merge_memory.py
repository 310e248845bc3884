"""Peak memory and wall time of `finetune merge` against peft's `merge_and_unload`, on the same LoRA run.

    python benchmarks/merge_memory.py            # a 134M-parameter LLaMA (hidden 768, 12 layers, vocab 32000)
    python benchmarks/merge_memory.py --quick    # a 2M-parameter one, no check run (the test's smoke run)

Builds a random-weight LLaMA saved in several safetensors shards (float32), a LoRA adapter on every linear
layer with random non-zero B, and a run folder that `finetune merge` reads. Then, each in a fresh process:
  baseline                  the imports a merge needs, and nothing else (the floor under every figure)
  finetune merge --no-verify  the shard-by-shard merge alone
  finetune merge            the merge plus its logit check (loads the merged model, then the adapter model);
                            not in --quick
  peft merge_and_unload     base + PeftModel loaded whole, merged, save_pretrained with the same shard size
Peak RSS is the child's ru_maxrss. The target is "peak RSS above the baseline <= 1.5 x largest shard + adapter"
for the merge without its check; the check needs one whole model in memory, by design, and is reported
apart. Also checks that both merges wrote the same weights. Writes the table into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import RESULTS, machine_line, write_section

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "full": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12},
    "quick": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4},
}
SHARD_SIZE = {"full": "150MB", "quick": "2MB"}
VOCAB = {"full": 32000, "quick": 8000}


def build_run(folder: Path, size: str) -> Path:
    """Base model (sharded), adapter (B random) and run folder under `folder`; returns the run folder."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finetune.recipe.load import load_recipe, recipe_to_yaml

    torch.manual_seed(0)
    config = LlamaConfig(
        **SHAPES[size], vocab_size=VOCAB[size], max_position_embeddings=1024, tie_word_embeddings=False
    )
    base = folder / "base"
    model = LlamaForCausalLM(config)
    model.save_pretrained(base, max_shard_size=SHARD_SIZE[size])
    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "tiny-llama")
    tokenizer.save_pretrained(base)
    shutil.copy(REPO / "data" / "tiny-llama" / "tokenizer.model", base / "tokenizer.model")

    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    run_dir = folder / "run"
    peft_model.save_pretrained(run_dir / "adapter")
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.save_pretrained(run_dir / "adapter")
    recipe = {
        "model": {"name_or_path": str(base)},
        "adapter": {"kind": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {"format": "alpaca", "path": str(REPO / "data" / "alpaca_sample.json"), "max_seq_len": 64},
        "output": {"dir": str(run_dir)},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (run_dir / "recipe.yaml").write_text(recipe_to_yaml(load_recipe(folder / "recipe.yaml")))
    return run_dir


def child(task: str, run_dir: Path, out: Path, shard_size: str) -> None:
    """One measured job in this (fresh) process; prints its peak RSS as JSON."""
    if task == "baseline":
        import peft.utils.other  # noqa: F401
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
        from transformers import AutoConfig, AutoTokenizer  # noqa: F401

        import finetune.artifacts.merge  # noqa: F401
    elif task.startswith("finetune merge"):
        from finetune.cli import main

        flags = ["--no-verify"] if task.endswith("--no-verify") else []
        assert main(["merge", str(run_dir), "--out", str(out), *flags]) == 0
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from finetune.run_folder import read_recipe

        base = AutoModelForCausalLM.from_pretrained(read_recipe(run_dir).model.name_or_path)
        merged = PeftModel.from_pretrained(base, run_dir / "adapter").merge_and_unload()
        merged.save_pretrained(out, max_shard_size=shard_size)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(task: str, run_dir: Path, out: Path, shard_size: str) -> dict:
    start = time.perf_counter()
    command = [sys.executable, __file__, "--child", task, str(run_dir), str(out), shard_size]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{task} failed:\n{done.stdout}\n{done.stderr}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    check = next((line for line in done.stdout.splitlines() if line.startswith("check:")), None)
    return figures | {"wall_s": time.perf_counter() - start, "check": check}


def max_weight_difference(a: Path, b: Path) -> float:
    """Largest |a - b| over every tensor of two merged folders, read one tensor at a time."""
    from safetensors import safe_open

    from finetune.artifacts.shards import list_shards

    located = {name: shard.path for shard in list_shards(b) for name in shard.names}
    worst = 0.0
    for shard in list_shards(a):
        with safe_open(shard.path, framework="pt") as fa:
            for name in shard.names:
                with safe_open(located[name], framework="pt") as fb:
                    worst = max(worst, (fa.get_tensor(name).float() - fb.get_tensor(name).float()).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 2M-parameter model, no check run")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], Path(args.child[1]), Path(args.child[2]), args.child[3])
    size = "quick" if args.quick else "full"
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        # built in a process of its own: a child's ru_maxrss starts from its parent's RSS at fork time, so this
        # process must stay small until the measurements are done
        build = f"import merge_memory as m; m.build_run(m.Path({scratch!r}), {size!r})"
        subprocess.run([sys.executable, "-c", build], cwd=Path(__file__).parent, check=True, capture_output=True)
        run_dir = folder / "run"
        shards = sorted((folder / "base").glob("*.safetensors"))
        largest = max(p.stat().st_size for p in shards) / 2**20
        adapter = (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size / 2**20
        params = _parameters(folder / "base")
        tasks = ["baseline", "finetune merge --no-verify", "finetune merge", "peft merge_and_unload"]
        if args.quick:
            tasks.remove("finetune merge")
        figures = {task: measure(task, run_dir, folder / task.replace(" ", "_"), SHARD_SIZE[size]) for task in tasks}
        same = max_weight_difference(folder / "finetune_merge_--no-verify", folder / "peft_merge_and_unload")
    table = _table(figures, largest, adapter)
    floor = figures["baseline"]["peak_rss_mib"]
    ours = figures["finetune merge --no-verify"]["peak_rss_mib"] - floor
    theirs = figures["peft merge_and_unload"]["peak_rss_mib"] - floor
    target = 1.5 * largest + adapter
    lines = [
        f"model: {params / 1e6:.0f}M parameters, float32, {len(shards)} shards (largest {largest:.0f} MiB); "
        f"adapter {adapter:.1f} MiB (r 16, all linear layers)",
        f"peak RSS above the baseline: finetune merge --no-verify {ours:.0f} MiB, peft merge_and_unload "
        f"{theirs:.0f} MiB: {theirs / max(ours, 1):.1f}x less",
        f"target: {ours:.0f} MiB <= 1.5 x largest shard + adapter = {target:.0f} MiB: "
        + ("met" if ours <= target else "MISSED"),
        f"the two merges' weights differ by at most {same:.3g}",
    ]
    if "finetune merge" in figures:
        lines.append(f"finetune merge {figures['finetune merge']['check']}")
    print(table + "\n\n" + "\n".join(lines))
    header = (
        f"## merge_memory ({params / 1e6:.0f}M-parameter LLaMA, {len(shards)} float32 shards; "
        f"`python benchmarks/merge_memory.py{' --quick' if args.quick else ''}`)\n\n"
        f"{machine_line('torch', 'transformers', 'peft', 'safetensors')}\n\n"
    )
    write_section(
        args.results, "merge_memory", header + table + "\n\n" + "\n".join(f"- {line}" for line in lines) + "\n"
    )


def _table(figures: dict, largest: float, adapter: float) -> str:
    floor = figures["baseline"]["peak_rss_mib"]
    rows = [
        "| process | peak RSS MiB | above baseline MiB | / (largest shard + adapter) | wall s |",
        "|---|---|---|---|---|",
    ]
    for task, f in figures.items():
        above = f["peak_rss_mib"] - floor
        ratio = above / (largest + adapter)
        rows.append(f"| {task} | {f['peak_rss_mib']:.0f} | {above:.0f} | {ratio:.2f} | {f['wall_s']:.1f} |")
    return "\n".join(rows)


def _parameters(folder: Path) -> int:
    from finetune.artifacts.shards import list_shards, tensor_infos

    total = 0
    for shard in list_shards(folder):
        for info in tensor_infos(shard.path).values():
            n = 1
            for dim in info["shape"]:
                n *= dim
            total += n
    return total


if __name__ == "__main__":
    main()
