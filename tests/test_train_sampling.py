"""eval.samples_every: the eval.samples prompts answered during training are the model's own greedy answers
at that step, leave training exactly as it was, survive a resume, and show step by step in report.html."""

from __future__ import annotations

import contextlib
import json
import shutil
from html import escape

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.cli import main
from finetune.recipe.load import load_recipe
from finetune.run_folder import RunDir, read_metrics, read_sample_steps
from finetune.train import sampling

from conftest import SAMPLE_DATA

pytestmark = pytest.mark.slow


def sampling_recipe(folder, tiny_model_dir, name: str, samples_every: int):
    """4 steps with LoRA dropout (so the RNG matters to training), checkpoints at steps 2 and 4, 2 held-out
    prompts answered at the end and every `samples_every` steps."""
    recipe = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.1},
        "data": {
            "format": "alpaca",
            "path": str(SAMPLE_DATA),
            "max_seq_len": 128,
            "max_rows": 24,
            "eval_fraction": 0.2,
        },
        "train": {
            "max_steps": 4,
            "micro_batch_size": 4,
            "grad_accum": 1,
            "lr": 2e-2,
            "gradient_checkpointing": False,
            "logging_steps": 1,
            "save_steps": 2,
            "save_total_limit": None,
        },
        "eval": {"samples": 2, "samples_every": samples_every},
        "output": {"dir": str(folder / name), "report": False, "trackers": []},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """The same recipe trained with samples every 2 steps ("sampled") and only at the end ("plain")."""
    folder = tmp_path_factory.mktemp("sampling")
    for name, every in (("sampled", 2), ("plain", 0)):
        assert main(["run", str(sampling_recipe(folder, tiny_model_dir, name, every))]) == 0
    return folder


def steps_of(run) -> dict[int, list[dict]]:
    return {record["step"]: record["samples"] for record in read_sample_steps(RunDir(run))}


def checkpoint_answers(run, step: int) -> list[dict]:
    """What checkpoint-STEP, loaded afresh with plain peft, answers to the run's sample prompts."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data.build import build_datasets
    from finetune.eval.generate import answer_sample_prompts, pick_sample_prompts

    recipe = load_recipe(run / "recipe.yaml")
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    base = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path)
    model = PeftModel.from_pretrained(base, run / "checkpoints" / f"checkpoint-{step}").eval()
    data = build_datasets(recipe.data, tokenizer, recipe.train.seed)
    return answer_sample_prompts(model, tokenizer, pick_sample_prompts(data.train, data.eval, 2)[1])


def test_samples_at_every_nth_step_are_the_models_own_answers_at_that_step(runs):
    run = runs / "sampled"
    steps = steps_of(run)
    final = json.loads((run / "samples.json").read_text())["samples"]
    assert sorted(steps) == [2, 4] and [len(samples) for samples in steps.values()] == [2, 2]
    assert steps[4] == final  # the trained model at step 4 is the final one: same prompts, same greedy answers
    assert steps[2] == checkpoint_answers(run, 2)
    assert [s["generated"] for s in steps[2]] != [s["generated"] for s in steps[4]]  # training changed them


def test_sampling_during_training_leaves_training_unchanged(runs):
    sampled, plain = (runs / name for name in ("sampled", "plain"))
    weights = {name: load_file(runs / name / "adapter" / "adapter_model.safetensors") for name in ("sampled", "plain")}
    assert weights["sampled"].keys() == weights["plain"].keys()
    for name, tensor in weights["plain"].items():
        assert weights["sampled"][name].equal(tensor), name
    assert [r.get("loss") for r in read_metrics(sampled / "metrics.jsonl")] == [
        r.get("loss") for r in read_metrics(plain / "metrics.jsonl")
    ]
    assert not (plain / "samples.jsonl").exists()


def test_the_comparison_sees_a_sampler_that_draws_from_the_rng(runs, tiny_model_dir, tmp_path, monkeypatch):
    """Greedy decoding draws nothing, so the previous test would pass without the RNG guard; this one shows it
    would fail if generating ever drew from the RNG (the dropout masks after it change), and that the guard
    keeps training as it was even then."""
    answer = sampling.answer_sample_prompts

    def answer_and_draw(*args, **kwargs):
        torch.rand(1)
        return answer(*args, **kwargs)

    monkeypatch.setattr(sampling, "answer_sample_prompts", answer_and_draw)
    guarded = sampling_recipe(tmp_path, tiny_model_dir, "guarded", 2)
    assert main(["run", str(guarded), "eval.samples=1"]) == 0
    monkeypatch.setattr(sampling, "preserved_rng", lambda model: contextlib.nullcontext())
    unguarded = sampling_recipe(tmp_path, tiny_model_dir, "unguarded", 2)
    assert main(["run", str(unguarded), "eval.samples=1"]) == 0

    plain = load_file(runs / "plain" / "adapter" / "adapter_model.safetensors")
    for name, same_as_plain in (("guarded", True), ("unguarded", False)):
        trained = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
        assert all(trained[key].equal(plain[key]) for key in plain) is same_as_plain, name


def test_a_resumed_run_keeps_the_earlier_samples_once(runs, tmp_path, capsys):
    run = tmp_path / "resumed"
    shutil.copytree(runs / "sampled", run)
    # as a kill after step 4 was sampled and before checkpoint-4 was complete leaves the folder
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run / "adapter")
    (run / "samples.json").unlink()
    (run / "summary.json").unlink()
    records = (run / "samples.jsonl").read_text()
    (run / "samples.jsonl").write_text(records.replace('"step": 2', '"step": 2, "kept": true'))  # to tell it apart

    assert main(["run", str(run), "--resume"]) == 0
    assert "resume: 1 samples.jsonl record(s) after step 2 dropped" in capsys.readouterr().out
    records = read_sample_steps(RunDir(run))
    assert [r["step"] for r in records] == [2, 4] and records[0].get("kept")  # step 2 from before, kept once
    assert records[1]["samples"] == steps_of(runs / "sampled")[4]  # step 4 trained and sampled again


def test_the_report_shows_each_prompt_answer_by_step(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "sampled", run)
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text(encoding="utf-8")
    for step2, final in zip(steps_of(run)[2], json.loads((run / "samples.json").read_text())["samples"], strict=True):
        section = page[page.index(f"<h3>{escape(step2['row'])}</h3>") :]
        table = section[section.index("<table>") : section.index("</table>")]
        assert escape(step2["prompt"]) in section
        labels = [table.index(f"<th>{label}</th>") for label in ("step 2", "step 4", "final", "reference")]
        assert labels == sorted(labels)  # the row labels, not words of a path or an answer
        assert f"<pre>{escape(step2['generated'])}</pre>" in table and escape(final["reference"]) in table


@pytest.mark.parametrize(
    "adapter, checkpointing",
    [({"kind": "lora", "r": 8, "dropout": 0.1}, True), ({"kind": "prefix", "num_virtual_tokens": 4}, False)],
    ids=["lora-checkpointed", "prefix"],
)
def test_generating_mid_training_puts_the_model_back_as_it_was(write_recipe, tokenizer, adapter, checkpointing):
    from finetune.data.build import build_datasets
    from finetune.eval.generate import answer_sample_prompts, pick_sample_prompts
    from finetune.model.adapters import wrap_adapter
    from finetune.model.load import load_model

    recipe = load_recipe(write_recipe(adapter=adapter, train={"gradient_checkpointing": checkpointing}))
    base = load_model(recipe.model, None, device="cpu", tokenizer=tokenizer)
    model = wrap_adapter(base, recipe.adapter, gradient_checkpointing=checkpointing, tokenizer_source="")
    if checkpointing:  # as the Trainer turns it on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    base.model.embed_tokens.eval()  # a module its owner left in eval mode stays so
    modes = {name: module.training for name, module in model.named_modules()}
    use_cache, rng = base.config.use_cache, torch.get_rng_state()
    _, prompts = pick_sample_prompts(build_datasets(recipe.data, tokenizer, 0).train, [], 1)

    with sampling.generating(model):
        during = answer_sample_prompts(model, tokenizer, prompts)  # prefix-tuning generates with the KV cache only
        assert not any(m.training for m in model.modules())  # no dropout while answering
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert base.is_activation_checkpointing == checkpointing and base.config.use_cache == use_cache
    assert torch.get_rng_state().equal(rng)
    assert during == answer_sample_prompts(model.eval(), tokenizer, prompts) and all(s["generated"] for s in during)


def test_samples_every_needs_prompts_and_is_refused_under_fsdp(write_recipe, monkeypatch):
    from finetune.errors import InputError, RecipeError
    from finetune.train.launch import check_launch, read_accelerate_config

    from conftest import REPO

    with pytest.raises(RecipeError, match="eval.samples_every: answers the eval.samples prompts during training"):
        load_recipe(write_recipe(eval={"samples": 0, "samples_every": 2}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the check that follows the GPU check
    config = read_accelerate_config(str(REPO / "accelerate_configs" / "fsdp.yaml"))
    recipe = load_recipe(write_recipe(eval={"samples": 2, "samples_every": 2}))
    with pytest.raises(InputError) as refused:
        check_launch(recipe, config, "fsdp.yaml")
    assert str(refused.value) == (
        "fsdp.yaml (FSDP): eval.samples_every: FSDP shards the weights over the processes, so generating during "
        "training would make them all decode in lockstep, and training hangs if one stops a token early; set "
        "eval.samples_every: 0 (samples.json is still written at the end)"
    )
    check_launch(recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"samples_every": 0})}), config, "x")
