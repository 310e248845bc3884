"""Several processes: `finetune run --accelerate-config FILE`, and refusing accelerate's silent fallbacks.

accelerate does not say when it cannot do what its config asks: an FSDP config on a machine without
CUDA trains unsharded, and `use_cpu: true` runs one process. So the launcher checks the config before
starting anything, and each launched process checks that the Trainer really shards (or really has
all the processes) before the first step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from finetune.errors import FinetuneError, InputError
from finetune.lock import claim
from finetune.recipe.checks import check_fsdp
from finetune.recipe.schema import Recipe
from finetune.run_folder import RunDir
from finetune.train.trackers import check_tracker_packages


def world_size() -> int:
    """Processes training together, as the launcher told this one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def fsdp_requested() -> bool:
    """accelerate launch was given an FSDP config (it sets ACCELERATE_USE_FSDP for every process)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def read_accelerate_config(path: str) -> dict:
    """The accelerate config file as a mapping.

    Raises:
        InputError: missing, unreadable, or not a mapping.
    """
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"--accelerate-config: cannot read {path}: {e}") from None
    if not isinstance(config, dict) or "distributed_type" not in config:
        raise InputError(f"--accelerate-config: {path} is not an accelerate config (no distributed_type)")
    return config


def fsdp_problems(recipe: Recipe, precision: str) -> list[str]:
    """Recipe keys FSDP cannot work with, as printable lines."""
    return [
        f"{'.'.join(p.path)}: {p.message}" + (f"; {p.hint}" if p.hint else "") for p in check_fsdp(recipe, precision)
    ]


def check_fsdp_launch(recipe: Recipe, precision: str, device: str) -> None:
    """In a process accelerate launched with an FSDP config: refuse what it would not shard.

    Raises:
        InputError: no GPU (accelerate would train unsharded), or recipe keys FSDP cannot shard.
    """
    if not fsdp_requested():
        return
    if device != "cuda":
        raise InputError(
            "accelerate was asked for FSDP, which needs CUDA GPUs, and this process trains on CPU; accelerate "
            "would train unsharded without saying so. On CPU use accelerate_configs/cpu_ddp.yaml"
        )
    problems = fsdp_problems(recipe, precision)
    if problems:
        raise InputError("\n".join(f"FSDP: {line}" for line in problems))


def check_launch(recipe: Recipe, config: dict, config_path: str) -> None:
    """Refuse, before any process starts, what accelerate would silently run otherwise.

    Raises:
        InputError: FSDP without CUDA GPUs, a multi-process config that would run one process, or recipe
            keys FSDP cannot shard.
    """
    import torch

    kind = config.get("distributed_type")
    if kind == "FSDP":
        if not torch.cuda.is_available() or recipe.train.use_cpu:
            raise InputError(
                f"--accelerate-config: {config_path} asks for FSDP, which needs CUDA GPUs and this run has none; "
                "accelerate would train unsharded without saying so. On CPU use accelerate_configs/cpu_ddp.yaml"
            )
        precision = recipe.train.precision if recipe.train.precision != "auto" else "bf16"
        problems = fsdp_problems(recipe, precision)
        if problems:
            raise InputError("\n".join(f"{config_path} (FSDP): {line}" for line in problems))
    processes = int(config.get("num_processes", 1))
    if kind == "MULTI_CPU" and processes > 1 and not config.get("mpirun_hostfile"):
        raise InputError(
            f"--accelerate-config: {config_path} has distributed_type: MULTI_CPU without mpirun_hostfile, with "
            f"which accelerate starts one process, not {processes}; for processes on one CPU machine use "
            "accelerate_configs/cpu_ddp.yaml (MULTI_GPU launcher, train.use_cpu: true)"
        )
    if config.get("use_cpu") and processes > 1:
        raise InputError(
            f"--accelerate-config: {config_path} has use_cpu: true, with which accelerate starts one process, "
            f"not {config['num_processes']}; set use_cpu: false there and train.use_cpu: true in the recipe"
        )


def launch_run(
    recipe: Recipe,
    config_path: str,
    recipe_path: str,
    overrides: list[str],
    *,
    overwrite: bool,
    resume: bool,
    debug: bool,
    force_unlock: bool = False,
) -> int:
    """Check the config and claim output.dir, then launch `finetune run` in every process; the exit status.

    A refusal is printed once, before any process starts, and leaves the run folder as it was. The claim on
    output.dir (finetune/lock.py) is held here, for all the processes, until the last one has ended.

    Raises:
        InputError: what check_launch refuses, an output.dir claimed by another command, or one that cannot
            take a new run.
    """
    check_tracker_packages(recipe.output.trackers)  # before any process starts, as for the checks above
    check_launch(recipe, read_accelerate_config(config_path), config_path)
    with claim(recipe.output.dir, subject="output.dir", force_unlock=force_unlock) as held:
        if not resume:
            RunDir.claim(recipe.output.dir, overwrite=overwrite)
        flags = ["--overwrite"] * overwrite + ["--resume"] * resume + ["--debug"] * debug
        return launch(config_path, recipe_path, [*overrides, *flags], environment=held.environment())


def launch(config_path: str, recipe_path: str, arguments: list[str], *, environment: dict[str, str]) -> int:
    """Run `accelerate launch --config_file FILE -m finetune run RECIPE ARGUMENTS` with `environment` added to
    this process's; its exit status."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_path]
    command += ["-m", "finetune", "run", recipe_path, *arguments]
    return subprocess.run(command, env={**os.environ, **environment}).returncode


def check_trainer_distribution(trainer) -> None:
    """Inside a launched process: the Trainer does what the launcher asked, or the run stops here.

    Raises:
        FinetuneError: FSDP was requested but the Trainer does not shard, or the processes would train apart.
    """
    if fsdp_requested() and not trainer.is_fsdp_enabled:
        raise FinetuneError(
            "accelerate was asked for FSDP (ACCELERATE_USE_FSDP) but the Trainer would not shard the model "
            "(FSDP needs CUDA GPUs); stopping instead of training unsharded"
        )
    if world_size() > 1 and trainer.args.world_size != world_size():
        raise FinetuneError(
            f"{world_size()} processes were launched but the Trainer trains on {trainer.args.world_size}: they "
            "would train apart, unsynchronised; on CPU set train.use_cpu: true in the recipe and use_cpu: false "
            "in the accelerate config"
        )


def close_process_group() -> None:
    """Under a launcher, wait for every process, then close the process group.

    A process that exits with its gloo process group open can abort in teardown ("terminate called without
    an active exception"), which fails the launch after a finished run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
