"""The batches of a run: train.micro_batch_size: auto and train.tokens_per_update turned into numbers,
from the memory plan (train/plan.py) for this device and world size."""

from __future__ import annotations

import math
from collections.abc import Callable

from finetune.errors import InputError
from finetune.model.shape import read_shape
from finetune.recipe.checks import parse_memory_size as parse_size
from finetune.recipe.schema import Recipe
from finetune.train import launch
from finetune.train.plan import format_size, largest_micro_batch


def size_batches(recipe: Recipe, device: str, echo: Callable[[str], None]) -> Recipe:
    """micro_batch_size: auto and tokens_per_update, resolved for this device and world size."""
    memory = None
    if device == "cuda":
        import torch

        memory = torch.cuda.get_device_properties(0).total_memory
    processes = launch.world_size()
    resolved = resolve_batch(recipe, device_memory=memory, world_size=processes, sharded=launch.fsdp_requested())
    if resolved is not recipe:
        train = resolved.train
        tokens = train.micro_batch_size * recipe.data.max_seq_len * train.grad_accum * processes
        echo(
            f"batch: micro-batch {train.micro_batch_size}, grad_accum {train.grad_accum}, {processes} process(es): "
            f"up to {tokens:,} tokens per optimizer step"
        )
    return resolved


def resolve_batch(recipe: Recipe, *, device_memory: int | None, world_size: int = 1, sharded: bool = False) -> Recipe:
    """The recipe with micro_batch_size: auto and tokens_per_update turned into numbers.

    auto takes the largest micro-batch the plan fits in train.gpu_memory, else in `device_memory`;
    tokens_per_update then sets grad_accum = ceil(tokens / (micro-batch x max_seq_len x world size)).
    The returned recipe holds the chosen numbers only, so its recipe.yaml reruns the same batches.

    Args:
        recipe: the validated recipe.
        device_memory: total memory of this run's GPU in bytes; None on CPU.
        world_size: processes training together (each takes a micro-batch).
        sharded: the processes shard the model with FSDP (the plan divides states by world_size).

    Raises:
        InputError: auto with no memory figure, or not even one sample fits.
    """
    train, seq = recipe.train, recipe.data.max_seq_len
    if train.micro_batch_size != "auto" and train.tokens_per_update is None:
        return recipe
    micro = train.micro_batch_size
    if micro == "auto":
        memory = parse_size(train.gpu_memory) if train.gpu_memory else device_memory
        if memory is None:
            raise InputError(
                "train.micro_batch_size: auto sizes the micro-batch for a GPU's memory and this run has no GPU; "
                "set train.gpu_memory (e.g. 24GiB) to size it for that, or give a number"
            )
        shape = read_shape(recipe.model.name_or_path, recipe.model.revision)
        micro = largest_micro_batch(recipe, shape, world_size=world_size if sharded else 1, gpu_memory=memory)
        if micro == 0:
            raise InputError(
                f"train.micro_batch_size: auto: not even one sample of {seq} tokens fits in {format_size(memory)}; "
                "`finetune plan RECIPE` shows where the memory goes and what to change"
            )
    grad_accum = train.grad_accum
    if train.tokens_per_update is not None:
        grad_accum = math.ceil(train.tokens_per_update / (micro * seq * world_size))
    chosen = {"micro_batch_size": micro, "grad_accum": grad_accum, "tokens_per_update": None, "gpu_memory": None}
    return recipe.model_copy(update={"train": train.model_copy(update=chosen)})
