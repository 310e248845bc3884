"""The recipe: every shipped file validates; bad recipes give every problem at once, located."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.cli import main
from finetune.errors import RecipeError
from finetune.recipe.load import load_recipe, recipe_to_yaml
from finetune.recipe.schema import TrainSpec

from conftest import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def problems_of(path, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as raised:
        load_recipe(path, list(overrides))
    return [str(p) for p in raised.value.problems]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # recipe paths are relative to the recipe file, wherever the command runs
    loaded = load_recipe(recipe)
    assert loaded.output.dir == str(REPO / "runs" / recipe.stem)
    for name in (loaded.model.name_or_path, loaded.data.path):
        assert name is None or not name.startswith("/") or Path(name).exists()  # local ones resolved, hub ids kept


def test_bad_recipe_reports_every_problem_with_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "model:\n"
        "  name_or_path: ./no/such/model\n"
        "adapter:\n"
        "  r: 0\n"
        "data:\n"
        "  format: alpacca\n"
        f"  path: {tmp_path}/missing.json\n"
        "train:\n"
        "  lr_warmup: 5\n"
        "output:\n"
        "  dir: runs/x\n"
    )
    assert problems_of(path, ["train.epochs=three"]) == [
        f"{path}:2:17: model.name_or_path: no such folder: {tmp_path}/no/such/model; "
        "give a local model folder or a hub id such as huggyllama/llama-7b",
        f"{path}:4:6: adapter.r: must be greater than 0 (got 0)",
        f"{path}:6:11: data.format: must be one of 'alpaca', 'goat', 'lima' or 'sharegpt' (got 'alpacca'); "
        "did you mean 'alpaca'?",
        f"{path}:7:9: data.path: no such file: {tmp_path}/missing.json",
        f"{path}:9:3: train.lr_warmup: unknown key; did you mean 'warmup_steps'?",
        "command line: train.epochs=three: expected a number (got 'three')",
    ]


def test_missing_required_keys_point_at_their_section(write_recipe, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{name_or_path: {write_recipe().parent}}}\ndata:\n  format: alpaca\noutput: {{}}\n")
    problems = problems_of(path)
    assert problems[0] == (
        f"{path}:3:3: data.path: required key is missing; "
        "expected: a .json/.jsonl file, dataset folder or hub id (or data.goat to generate Goat rows)"
    )
    assert problems[1].startswith(f"{path}:4:9: output.dir: required key is missing")


def test_unknown_section_and_unknown_override_are_errors(write_recipe):
    path = write_recipe(logging={"x": 1})
    line = path.read_text().splitlines().index("logging:") + 1
    assert problems_of(path, ["train.nope=1"]) == [
        f"{path}:{line}:1: logging: unknown key; valid keys: model, quant, adapter, data, train, eval, output",
        "command line: train.nope=1: unknown key; valid keys: " + ", ".join(TrainSpec.model_fields),
    ]


def test_overrides_are_typed_by_yaml_and_the_schema(write_recipe):
    recipe = load_recipe(
        write_recipe(), ["train.max_steps=7", "adapter.target_modules=[q_proj, v_proj]", "train.lr=5e-5"]
    )
    assert recipe.train.max_steps == 7
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]
    assert recipe.train.lr == pytest.approx(5e-5)


def test_malformed_override_is_reported(write_recipe):
    assert problems_of(write_recipe(), ["train.max_steps"]) == [
        "command line: train.max_steps: expected key=value, e.g. train.max_steps=10"
    ]


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name_or_path: [unclosed\ndata: {}\n")
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:3:5: YAML syntax error:")


def test_duplicate_keys_are_errors_not_silently_last_wins(write_recipe, tmp_path):
    text = write_recipe().read_text() + "output:\n  dir: elsewhere\n"
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    [problem] = problems_of(path)
    assert problem.endswith("output: duplicate key; the earlier one would be ignored")


def test_cross_field_conflicts_name_the_key(write_recipe):
    path = write_recipe(train={"warmup_ratio": 0.1, "warmup_steps": 3})
    [problem] = problems_of(path)
    assert ": train.warmup_steps: set either warmup_steps or warmup_ratio, not both" in problem


def test_resolved_recipe_round_trips_with_every_default(write_recipe, tmp_path):
    recipe = load_recipe(write_recipe())
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(recipe_to_yaml(recipe))
    assert load_recipe(resolved) == recipe
    assert "warmup_ratio" in resolved.read_text() and "use_dora" in resolved.read_text()


def test_validate_command_exit_codes(write_recipe, capsys):
    good = write_recipe()
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(good), "adapter.r=-1"]) == 2
    assert "command line: adapter.r=-1: must be greater than 0 (got -1)" in capsys.readouterr().err


def test_schema_command_prints_closed_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["LoraSpec"]["additionalProperties"] is False
    assert "description" in schema["$defs"]["TrainSpec"]["properties"]["lr"]


def test_cli_and_validate_do_not_import_torch(write_recipe):
    code = (
        "import sys\n"
        "from finetune.cli import main\n"
        f"assert main(['validate', {str(write_recipe())!r}]) == 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "finetune", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "validate" in out.stdout


def test_problem_in_the_file_is_not_blamed_on_an_override_of_a_sibling_key(write_recipe, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(write_recipe().read_text().replace(f"  dir: {tmp_path / 'run'}\n", "  trackers: []\n"))
    line = path.read_text().splitlines().index("  trackers: []") + 1
    [problem] = problems_of(path, ["output.trackers=[tensorboard]"])
    assert problem.startswith(f"{path}:{line}:3: output.dir: required key is missing")


FORBIDDEN = {
    "prefix-with-checkpointing": (
        {"adapter": {"kind": "prefix"}, "train": {"gradient_checkpointing": True}},
        "train.gradient_checkpointing: adapter.kind: prefix cannot train with gradient checkpointing",
    ),
    "full-finetune-of-quantized-weights": (
        {"adapter": {"kind": "none"}, "quant": {"bits": 4}},
        "quant.bits: adapter.kind: none (full fine-tuning) cannot train quantized weights",
    ),
    "dora-on-8bit": (
        {"adapter": {"use_dora": True}, "quant": {"bits": 8}},
        "adapter.use_dora: DoRA is not supported on an 8-bit base by peft",
    ),
    "prompt-tuning-packed": (
        {"adapter": {"kind": "prompt"}, "data": {"packing": "padding_free"}},
        "data.packing: adapter.kind: prompt cannot train packed rows",
    ),
    "min-lr-on-constant-schedule": (
        {"train": {"lr_scheduler": "constant", "min_lr": 1e-6}},
        "train.min_lr: applies to linear and cosine schedules, not constant",
    ),
    "min-lr-above-lr": ({"train": {"lr": 1e-5, "min_lr": 1e-4}}, "train.min_lr: must be below train.lr (1e-05)"),
    "warmup-twice": (
        {"train": {"warmup_ratio": 0.1, "warmup_steps": 3}},
        "train.warmup_steps: set either warmup_steps or warmup_ratio, not both",
    ),
    "eval-split-twice": (
        {"data": {"eval_fraction": 0.1, "eval_path": str(REPO / "data" / "alpaca_sample.json")}},
        "data.eval_fraction: set either eval_fraction or eval_path, not both",
    ),
}


@pytest.mark.parametrize("case", FORBIDDEN, ids=list(FORBIDDEN))
def test_forbidden_combinations_are_validation_errors(case, write_recipe):
    sections, expected = FORBIDDEN[case]
    [problem] = problems_of(write_recipe(**sections))
    assert expected in problem


def test_prefix_without_checkpointing_key_resolves_to_off(write_recipe):
    assert load_recipe(write_recipe(adapter={"kind": "prefix"})).gradient_checkpointing is False
    assert load_recipe(write_recipe(train={"gradient_checkpointing": None})).gradient_checkpointing is True


def test_packing_left_out_is_padding_free_except_for_virtual_token_adapters(write_recipe):
    assert load_recipe(write_recipe()).packing == "padding_free"
    assert load_recipe(write_recipe(adapter={"kind": "none"})).packing == "padding_free"
    assert load_recipe(write_recipe(adapter={"kind": "prefix"})).packing == "none"
    assert load_recipe(write_recipe(adapter={"kind": "prompt"})).packing == "none"
    assert load_recipe(write_recipe(data={"packing": "none"})).packing == "none"


def test_keys_of_another_adapter_kind_are_named_as_such(write_recipe):
    path = write_recipe(adapter={"kind": "prompt", "r": 8})
    [problem] = problems_of(path)
    assert problem.endswith(
        "adapter.r: unknown key; it is a key of adapter.kind: lora; "
        "this kind takes: kind, num_virtual_tokens, init_text"
    )


def test_unknown_adapter_kind_suggests_the_closest(write_recipe):
    [problem] = problems_of(write_recipe(), ["adapter.kind=prefx"])
    assert problem == (
        "command line: adapter.kind=prefx: must be one of 'lora', 'prefix', 'prompt', 'ia3', 'none' (got 'prefx'); "
        "did you mean 'prefix'?"
    )


def test_paths_are_relative_to_the_recipe_file_and_overrides_to_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "rows.json").write_text("[]")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "other.jsonl").write_text("")
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.write_text(
        "model: {name_or_path: huggyllama/llama-7b}\ndata: {path: ../data/rows.json}\noutput: {dir: ../runs/r}\n"
    )
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = load_recipe(recipe)
    assert loaded.data.path == str(tmp_path / "data" / "rows.json")
    assert loaded.output.dir == str(tmp_path / "runs" / "r")
    assert loaded.model.name_or_path == "huggyllama/llama-7b"  # a hub id stays one
    overridden = load_recipe(recipe, ["data.path=other.jsonl", "output.dir=out"])
    assert overridden.data.path == str(tmp_path / "elsewhere" / "other.jsonl")
    assert overridden.output.dir == str(tmp_path / "elsewhere" / "out")
    assert "../" not in recipe_to_yaml(loaded)  # a run folder's recipe.yaml reads the same from anywhere


@pytest.mark.parametrize("folder", ["/", "~", "~/"])
def test_output_dir_may_not_be_the_root_or_home(folder, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{name_or_path: huggyllama/llama-7b}}\ndata: {{path: x/y}}\noutput: {{dir: '{folder}'}}\n"
    )
    target = Path(folder).expanduser().resolve()
    assert problems_of(recipe) == [
        f"{recipe}:3:15: output.dir: must not be {target}: a run folder is emptied by --overwrite; choose a folder "
        "of its own, e.g. runs/NAME"
    ]
