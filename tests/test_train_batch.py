"""train.micro_batch_size: auto and train.tokens_per_update: chosen by the planner, written into recipe.yaml."""

from __future__ import annotations

import math
import re

import pytest
import yaml

from finetune.cli import main
from finetune.errors import InputError, RecipeError
from finetune.model.shape import read_shape
from finetune.recipe.load import load_recipe
from finetune.train.batch import Batch, resolve_batch, with_batch
from finetune.train.plan import GiB, plan_memory


def test_tokens_per_update_sets_grad_accum(write_recipe):
    recipe = load_recipe(write_recipe(train={"grad_accum": None}), ["train.tokens_per_update=5000"])
    batch = resolve_batch(recipe, None, device_memory=None, world_size=2)
    assert batch == Batch(micro_batch_size=4, grad_accum=math.ceil(5000 / (4 * 256 * 2))) == Batch(4, 3)
    recorded = with_batch(recipe, batch).train  # what recipe.yaml holds
    assert (recorded.micro_batch_size, recorded.grad_accum, recorded.tokens_per_update) == (4, 3, None)


def test_auto_takes_the_largest_micro_batch_that_fits(write_recipe, tiny_model_dir):
    recipe = load_recipe(write_recipe(), ["train.micro_batch_size=auto", "train.gpu_memory=0.9GiB"])
    shape, memory = read_shape(str(tiny_model_dir)), int(0.9 * GiB)
    chosen = resolve_batch(recipe, shape, device_memory=None).micro_batch_size
    # the definition, micro-batch by micro-batch: the chosen one's plan fits 0.9 GiB, one more sample does not
    totals = [plan_memory(recipe, shape, micro_batch_size=micro).total for micro in range(1, 1025)]
    assert totals == sorted(totals)  # more samples never take less memory
    assert chosen == sum(total <= memory for total in totals) > 1
    assert totals[chosen - 1] <= memory < totals[chosen]
    more = resolve_batch(
        recipe.model_copy(update={"train": recipe.train.model_copy(update={"gpu_memory": "2GiB"})}),
        shape,
        device_memory=None,
    )
    assert more.micro_batch_size > chosen


def test_auto_on_cpu_needs_a_memory_figure(write_recipe, tiny_model_dir):
    recipe = load_recipe(write_recipe(), ["train.micro_batch_size=auto"])
    shape = read_shape(str(tiny_model_dir))
    with pytest.raises(InputError, match="set train.gpu_memory"):
        resolve_batch(recipe, shape, device_memory=None)
    assert resolve_batch(recipe, shape, device_memory=GiB).micro_batch_size > 0  # a GPU's memory serves


def test_auto_refuses_when_nothing_fits(write_recipe, tiny_model_dir):
    recipe = load_recipe(write_recipe(), ["train.micro_batch_size=auto", "train.gpu_memory=0.5GiB"])
    with pytest.raises(InputError, match="not even one sample of 256 tokens fits"):
        resolve_batch(
            recipe, read_shape(str(tiny_model_dir)), device_memory=None
        )  # the 0.75 GiB CUDA context alone is more


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.tokens_per_update=4096", "train.grad_accum=2"], "train.tokens_per_update sets grad_accum"),
        (["train.gpu_memory=24GiB"], "only sizes micro_batch_size: auto"),
        (["train.micro_batch_size=auto", "train.gpu_memory=lots"], "not a memory size: 'lots'"),
        (["train.micro_batch_size=0"], "must be greater than 0 or auto (got 0)"),
    ],
)
def test_contradictory_batch_keys_are_refused(write_recipe, overrides, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(write_recipe(train={"grad_accum": None}), overrides)


def test_run_writes_the_chosen_numbers_into_recipe_yaml(write_recipe, tmp_path, capsys):
    path = write_recipe(
        train={
            "micro_batch_size": "auto",
            "gpu_memory": "0.8GiB",
            "grad_accum": None,
            "tokens_per_update": 3000,
            "max_steps": 1,
        },
        data={"max_rows": 40},
    )
    assert main(["run", str(path)]) == 0
    written = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["train"]
    assert isinstance(written["micro_batch_size"], int) and written["micro_batch_size"] > 1
    assert written["grad_accum"] == math.ceil(3000 / (written["micro_batch_size"] * 256))
    assert written["tokens_per_update"] is None and written["gpu_memory"] is None
    assert (
        f"batch: micro-batch {written['micro_batch_size']}, grad_accum {written['grad_accum']}"
        in capsys.readouterr().out
    )
    load_recipe(tmp_path / "run" / "recipe.yaml")  # the resolved recipe is itself valid
