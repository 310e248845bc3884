"""The batches of a run: train.micro_batch_size: auto and train.tokens_per_update turned into numbers,
from the memory plan (train/plan.py) for this device and world size. The run folder's recipe.yaml
records the numbers (`with_batch`), so it reruns, and resumes, with the same batches."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from finetune.errors import InputError
from finetune.recipe.checks import parse_memory_size as parse_size
from finetune.recipe.schema import Recipe
from finetune.train import launch
from finetune.train.plan import format_size, largest_micro_batch

if TYPE_CHECKING:
    from finetune.model.shape import ModelShape


@dataclass(frozen=True)
class Batch:
    """The batch sizes a run trains with, per process."""

    micro_batch_size: int
    grad_accum: int


def size_batches(recipe: Recipe, shape: ModelShape | None, device: str, echo: Callable[[str], None]) -> Batch:
    """micro_batch_size: auto and tokens_per_update, resolved for this device and world size.

    `shape`: the model's sizes, needed by micro_batch_size: auto only.
    """
    memory = None
    if device == "cuda":
        import torch

        memory = torch.cuda.get_device_properties(0).total_memory
    processes = launch.world_size()
    batch = resolve_batch(recipe, shape, device_memory=memory, world_size=processes, sharded=launch.fsdp_requested())
    if batch_is_planned(recipe):
        tokens = batch.micro_batch_size * recipe.data.max_seq_len * batch.grad_accum * processes
        echo(
            f"batch: micro-batch {batch.micro_batch_size}, grad_accum {batch.grad_accum}, {processes} process(es): "
            f"up to {tokens:,} tokens per optimizer step"
        )
    return batch


def batch_is_planned(recipe: Recipe) -> bool:
    """The recipe leaves a batch number to the planner (micro_batch_size: auto or tokens_per_update)."""
    return recipe.train.micro_batch_size == "auto" or recipe.train.tokens_per_update is not None


def resolve_batch(
    recipe: Recipe, shape: ModelShape | None, *, device_memory: int | None, world_size: int = 1, sharded: bool = False
) -> Batch:
    """The micro-batch and grad_accum of the run: micro_batch_size: auto and tokens_per_update as numbers.

    auto takes the largest micro-batch the plan fits in train.gpu_memory, else in `device_memory`;
    tokens_per_update then sets grad_accum = ceil(tokens / (micro-batch x max_seq_len x world size)).

    Args:
        recipe: the validated recipe.
        shape: the model's sizes (`finetune.model.shape.read_shape`); None where the micro-batch is a number.
        device_memory: total memory of this run's GPU in bytes; None on CPU.
        world_size: processes training together (each takes a micro-batch).
        sharded: the processes shard the model with FSDP (the plan divides states by world_size).

    Raises:
        InputError: auto with no memory figure, or not even one sample fits.
    """
    train, seq = recipe.train, recipe.data.max_seq_len
    micro = train.micro_batch_size
    if micro == "auto":
        memory = parse_size(train.gpu_memory) if train.gpu_memory else device_memory
        if memory is None:
            raise InputError(
                "train.micro_batch_size: auto sizes the micro-batch for a GPU's memory and this run has no GPU; "
                "set train.gpu_memory (e.g. 24GiB) to size it for that, or give a number"
            )
        micro = largest_micro_batch(recipe, shape, world_size=world_size if sharded else 1, gpu_memory=memory)
        if micro == 0:
            raise InputError(
                f"train.micro_batch_size: auto: not even one sample of {seq} tokens fits in {format_size(memory)}; "
                "`finetune plan RECIPE` shows where the memory goes and what to change"
            )
    grad_accum = train.grad_accum
    if train.tokens_per_update is not None:
        grad_accum = math.ceil(train.tokens_per_update / (micro * seq * world_size))
    return Batch(micro, grad_accum)


def with_batch(recipe: Recipe, batch: Batch) -> Recipe:
    """The recipe as the run trains it, and as its recipe.yaml records it: the batch numbers in place of
    micro_batch_size: auto, tokens_per_update and gpu_memory, so the file reruns the same batches."""
    if not batch_is_planned(recipe):
        return recipe
    chosen = {**vars(batch), "tokens_per_update": None, "gpu_memory": None}
    return recipe.model_copy(update={"train": recipe.train.model_copy(update=chosen)})
