"""The run folder's one owner: atomic writes, the one output-folder refusal, and reading a run back."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from finetune.errors import InputError, RecipeError
from finetune.model.methods import run_method_name
from finetune.recipe.load import load_recipe
from finetune.run_folder import (
    RunDir,
    claim_folder,
    read_recipe,
    read_run,
    write_atomically,
    write_folder,
    write_json,
)


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_a_failed_file_write_keeps_the_previous_file_and_leaves_no_partial(tmp_path):
    target = tmp_path / "summary.json"
    write_json(target, {"status": "finished"})

    def fail_halfway(partial):
        partial.write_text('{"status": ')
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(target, fail_halfway)
    assert json.loads(target.read_text()) == {"status": "finished"}
    assert siblings(target) == ["summary.json"]


def test_a_folder_is_replaced_only_once_the_new_one_is_complete(tmp_path):
    target = tmp_path / "adapter"
    write_folder(target, lambda folder: (folder / "old.safetensors").write_text("old"))

    def fail_halfway(folder):
        (folder / "new.safetensors").write_text("half")
        raise RuntimeError("stopped while saving")

    with pytest.raises(RuntimeError):
        write_folder(target, fail_halfway)
    assert sorted(p.name for p in target.iterdir()) == ["old.safetensors"]
    assert write_folder(target, lambda folder: (folder / "new.safetensors").write_text("new") and "filled") == "filled"
    assert sorted(p.name for p in target.iterdir()) == ["new.safetensors"]
    assert siblings(target) == ["adapter"]  # no .partial or .old left beside it


@pytest.mark.parametrize("key", ["output.dir", "--out"])
def test_every_output_folder_is_refused_alike(tmp_path, key):
    target = tmp_path / "out"
    claim_folder(target, overwrite=False, key=key)  # not there yet: it will be created
    target.mkdir()
    claim_folder(target, overwrite=False, key=key)  # empty
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(InputError) as refused:
        claim_folder(target, overwrite=False, key=key)
    expected = f"{key}: {target} is not empty; pass --overwrite to replace it, or choose another folder"
    assert str(refused.value) == expected
    claim_folder(target, overwrite=True, key=key)
    assert (target / "notes.txt").read_text() == "keep me"  # claiming writes nothing
    with pytest.raises(InputError, match="exists and is not a folder"):
        claim_folder(target / "notes.txt", overwrite=True, key=key)


def test_an_output_folder_may_not_be_the_runs_own_results(tmp_path):
    run = RunDir(tmp_path / "run")
    run.adapter.mkdir(parents=True)
    for inside in (run.path, run.adapter, run.adapter / "sub", run.checkpoints):
        with pytest.raises(InputError, match="would overwrite the run folder's own files"):
            claim_folder(inside, overwrite=True, key="--out", protect=run)
    claim_folder(run.path / "export" / "adapter", overwrite=False, key="--out", protect=run)


def test_the_recipe_of_a_moved_run_reads_back_with_output_dir_where_it_is(tiny_run, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(tiny_run("lora"), moved)
    recipe = read_recipe(moved)
    assert recipe.output.dir == str(moved)
    assert recipe.model_dump(exclude={"output"}) == read_recipe(tiny_run("lora")).model_dump(exclude={"output"})


def test_a_run_of_another_layout_is_refused_and_the_same_folder_reads_in_this_one(tiny_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run("lora"), copy)
    environment = json.loads((copy / "environment.json").read_text())
    (copy / "environment.json").write_text(json.dumps({**environment, "run_format": 2}))
    with pytest.raises(InputError, match="run_format 2: the folder was written by an incompatible version"):
        read_recipe(copy)
    (copy / "environment.json").write_text(json.dumps(environment))
    assert read_recipe(copy).adapter.kind == "lora"


def test_a_listing_reads_a_run_whose_recipe_no_longer_validates(tiny_run, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(tiny_run("lora"), copy)
    stored = yaml.safe_load((copy / "recipe.yaml").read_text())
    stored["train"]["retired_key"] = 1
    (copy / "recipe.yaml").write_text(yaml.safe_dump(stored))
    record = read_run(copy)
    assert record.status == "finished" and record.steps == 2 and run_method_name(record.recipe) == "lora"
    with pytest.raises(Exception, match="retired_key"):
        read_recipe(copy)  # the validated reader refuses what the listing shows


@pytest.mark.parametrize("enabled, trackers, written", [(True, ["tensorboard"], "[tensorboard]"), (False, [], "[]")])
def test_a_run_folder_written_with_output_tensorboard_reads_back_with_trackers(
    tiny_run, tmp_path, enabled, trackers, written
):
    copy = tmp_path / "old"
    shutil.copytree(tiny_run("lora"), copy)
    stored = yaml.safe_load((copy / "recipe.yaml").read_text())
    del stored["output"]["trackers"]
    stored["output"]["tensorboard"] = enabled  # as recipe.yaml was written before output.trackers
    (copy / "recipe.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    assert read_recipe(copy).output.trackers == trackers
    assert read_run(copy).recipe["output"] == {**read_run(tiny_run("lora")).recipe["output"], "trackers": trackers}
    # the same file as a recipe of one's own is refused, saying what to write
    with pytest.raises(RecipeError) as refused:
        load_recipe(copy / "recipe.yaml")
    [problem] = refused.value.problems
    assert str(problem).endswith(
        f"output.tensorboard: replaced by output.trackers, a list; use output.trackers: {written} instead "
        "(the list may also name wandb and mlflow)"
    )
    with pytest.raises(RecipeError, match="output.tensorboard=false: replaced by output.trackers"):
        read_recipe(copy, ["output.tensorboard=false"])  # an override is the user's own, too
