"""`finetune generate`: every method's run folder answers, prompted exactly as in training; greedy equals
`model.generate` of the run loaded with plain transformers/peft; a model trained on one answer generates it; a
seed makes sampling reproducible; exported and plain model folders answer too; every EOS id a model's
generation config lists stops it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.cli import main
from finetune.data.build import build_datasets, load_rows, sources_of
from finetune.eval.generate import Sampling, generate, load_target
from finetune.eval.prompts import prompt_ids
from finetune.run_folder import read_recipe

from conftest import REPO, write_rows

RUNS = {
    "lora": {},
    "qlora-lima": {
        "quant": {"bits": 4},
        "data": {"format": "lima", "path": str(REPO / "data" / "lima_sample.jsonl"), "max_seq_len": 256},
    },
    "prefix": {"adapter": {"kind": "prefix", "num_virtual_tokens": 4}},
    "prompt-goat": {
        "adapter": {"kind": "prompt", "num_virtual_tokens": 4},
        "data": {"format": "goat", "path": None, "goat": {"n": 64, "ops": ["add"], "add_sub_digits": 3}},
    },
    "ia3-sharegpt": {
        "adapter": {"kind": "ia3"},
        "data": {"format": "sharegpt", "path": str(REPO / "tests" / "sharegpt_sample.jsonl"), "max_seq_len": 256},
    },
    "full": {"adapter": {"kind": "none"}},
}
PROMPT_FORMAT = {
    "lora": "alpaca",
    "qlora-lima": "chat",
    "prefix": "alpaca",
    "prompt-goat": "goat",
    "ia3-sharegpt": "chat",
    "full": "alpaca",
}
QUESTION = {"instruction": "What is 12 + 7?"}


def greedy_ids(model, tokenizer, ids: list[int], max_new_tokens: int) -> list[int]:
    """What plain `model.generate` answers greedily to the same ids."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return output[0, len(ids) :].tolist()


def plain_model(run, recipe):
    """The run's model loaded with plain transformers, peft and bitsandbytes, as a user would: the reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if recipe.adapter.kind == "none":
        return AutoModelForCausalLM.from_pretrained(run / "model").eval(), AutoTokenizer.from_pretrained(run / "model")
    quantized = {}
    if recipe.quant is not None:  # the recipe's 4-bit defaults: NF4, double quantization, float32 compute on CPU
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        quantized = {"quantization_config": config, "device_map": {"": "cpu"}}
    base = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path, dtype=torch.float32, **quantized)
    return PeftModel.from_pretrained(base, run / "adapter").eval(), AutoTokenizer.from_pretrained(run / "adapter")


def masked_prefix(sample) -> list[int]:
    return sample.input_ids[: sample.completion_mask.index(1)]


@pytest.mark.parametrize("name", RUNS, ids=list(RUNS))
def test_every_method_generates_greedily_what_model_generate_gives(name, tiny_run, capsys):
    run = tiny_run(name, **RUNS[name])
    capsys.readouterr()  # the training run's output
    assert main(["generate", str(run), "--prompt", QUESTION["instruction"], "--max-new-tokens", "6"]) == 0
    streamed = capsys.readouterr().out

    model, tokenizer = plain_model(run, read_recipe(run))
    ids = prompt_ids(tokenizer, PROMPT_FORMAT[name], QUESTION)  # the training samples' prefix: see the next test
    expected = greedy_ids(model, tokenizer, ids, 6)
    assert generate(run, [QUESTION], Sampling(max_new_tokens=6), prompt_format=None, echo=None) == [expected]
    assert streamed == tokenizer.decode(expected, skip_special_tokens=True) + "\n"
    assert 0 < len(expected) <= 6 and (len(expected) == 6 or expected[-1] == tokenizer.eos_token_id)


@pytest.mark.parametrize("name", ["lora", "qlora-lima", "prompt-goat", "ia3-sharegpt"])
def test_prompt_ids_are_the_masked_prefix_of_the_training_samples(name, tiny_run):
    run = tiny_run(name, **RUNS[name])
    recipe = read_recipe(run)
    _, tokenizer = load_target(run, recipe, device="cpu")
    samples = build_datasets(recipe.data, tokenizer, recipe.train.seed).train
    source = load_rows(sources_of(recipe.data)[0])
    rows = dict(zip(source.refs, source.rows, strict=True))
    for sample in samples[:8]:
        row = rows[sample.row]
        if name == "qlora-lima":
            row = {"instruction": row["conversations"][0]}
        if name == "ia3-sharegpt":
            if row["conversations"][0]["from"] == "system":
                continue  # a prompt of `generate` is one user turn, with no system turn before it
            row = {"instruction": row["conversations"][0]["value"]}
        assert prompt_ids(tokenizer, PROMPT_FORMAT[name], row) == masked_prefix(sample), sample.row


def test_a_seed_makes_sampling_reproducible(tiny_run):
    run = tiny_run("lora", **RUNS["lora"])

    def sample(seed: int) -> list[int]:
        sampling = Sampling(max_new_tokens=12, temperature=1.5, top_k=0, top_p=1.0, seed=seed)
        return generate(run, [QUESTION, QUESTION], sampling, prompt_format=None, echo=None)

    first, again, other = sample(1), sample(1), sample(2)
    assert first == again and first[0] == first[1]  # the seed is set before every prompt
    assert first != other


def test_a_file_of_prompts_is_answered_in_order(tiny_run, tmp_path, capsys):
    run = tiny_run("lora", **RUNS["lora"])
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"instruction": "Name a colour."}, {"instruction": "Translate to French.", "input": "cat"}]
    prompts.write_text("\n".join(json.dumps(row) for row in rows) + "\n\nWhat is 12 + 7?\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["generate", str(run), "--file", str(prompts), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out

    model, tokenizer = plain_model(run, read_recipe(run))
    expected = []
    for number, row in enumerate([*rows, QUESTION], start=1):
        answer = greedy_ids(model, tokenizer, prompt_ids(tokenizer, "alpaca", row), 4)
        expected.append(f"[{number}/3] {row['instruction']}\n{tokenizer.decode(answer, skip_special_tokens=True)}\n")
    assert out == "".join(expected)


def test_exported_and_plain_model_folders_generate(tiny_run, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tiny_run("lora", **RUNS["lora"])
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "Name a colour.", "--max-new-tokens", "6"]) == 0
    from_run = capsys.readouterr().out
    assert main(["export", str(run), "--format", "adapter", "--out", str(tmp_path / "export")]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "export"), "--prompt", "Name a colour.", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == from_run

    # no recipe.yaml and no chat template: the prompt is raw text after BOS
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert main(["generate", str(tiny_model_dir), "--prompt", "Name a colour.", "--max-new-tokens", "6"]) == 0
    raw = [tokenizer.bos_token_id, *tokenizer("Name a colour.", add_special_tokens=False).input_ids]
    assert (
        capsys.readouterr().out
        == tokenizer.decode(greedy_ids(model, tokenizer, raw, 6), skip_special_tokens=True) + "\n"
    )
    alpaca = generate(
        tiny_model_dir, [{"instruction": "Name a colour."}], Sampling(6), prompt_format="alpaca", echo=None
    )
    assert alpaca == [
        greedy_ids(model, tokenizer, prompt_ids(tokenizer, "alpaca", {"instruction": "Name a colour."}), 6)
    ]


def test_bad_prompts_and_settings_are_refused_by_name(tiny_run, tmp_path, capsys):
    run = str(tiny_run("lora", **RUNS["lora"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"input": "no instruction"}\n', encoding="utf-8")
    capsys.readouterr()
    assert main(["generate", run, "--file", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}: line 2: 'instruction' is missing or empty"
    assert main(["generate", run, "--prompt", "x", "--top-p", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --top-p: must be greater than 0 and at most 1 (got 0.0)"
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path}: neither a run folder (recipe.yaml) nor a model folder (config.json or adapter_config.json)"
    )


def test_a_model_trained_on_one_answer_generates_exactly_that_answer(write_recipe, tmp_path, capsys):
    row = {"instruction": "Which colour is a clear daytime sky?", "input": "", "output": "A clear sky is blue."}
    recipe = write_recipe(
        adapter={"target_modules": "all-linear"},
        data={"path": str(write_rows(tmp_path / "one.json", [row])), "eval_fraction": 0.0},
        train={"max_steps": 40, "micro_batch_size": 1, "lr": 2e-2, "lr_scheduler": "constant"},
    )
    assert main(["run", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", row["instruction"], "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out == row["output"] + "\n"  # the answer, then EOS ends it

    weights = tmp_path / "run" / "adapter" / "adapter_model.safetensors"  # the same run without its update
    save_file({name: t * ("lora_B" not in name) for name, t in load_file(weights).items()}, weights)
    assert main(["generate", str(tmp_path / "run"), "--prompt", row["instruction"], "--max-new-tokens", "20"]) == 0
    assert row["output"] not in capsys.readouterr().out


def rig_to_emit(model, token_id: int) -> None:
    """Make `model` answer `token_id` after any prompt: every layer adds nothing to the residual stream,
    every token embeds to the same vector, and only `token_id`'s output row points along it."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        direction = torch.ones(model.config.hidden_size)
        model.get_input_embeddings().weight[:] = direction
        head = model.get_output_embeddings().weight
        if head.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            head.zero_()
        head[token_id] = 10 * direction


@pytest.mark.parametrize(
    ("family", "stops"),
    [
        ("llama3", ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),
        ("qwen2", ["<|im_end|>", "<|endoftext|>"]),
        ("mistral", ["</s>"]),
    ],
)
def test_generation_stops_at_every_eos_id_of_the_generation_config(family, stops, family_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base = family_model_dir(family)
    tokenizer = AutoTokenizer.from_pretrained(base)
    listed = GenerationConfig.from_pretrained(base).eos_token_id
    assert (listed if isinstance(listed, list) else [listed]) == tokenizer.convert_tokens_to_ids(stops)
    for stop in tokenizer.convert_tokens_to_ids(stops):
        model = AutoModelForCausalLM.from_pretrained(base)
        rig_to_emit(model, stop)
        folder = tmp_path / f"emits-{stop}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        [answer] = generate(folder, [QUESTION], Sampling(max_new_tokens=5), prompt_format="chat", echo=None)
        assert answer == [stop]  # stopped at once
        # What it guards against: stopping at the tokenizer's EOS alone runs on to the token limit.
        if stop != tokenizer.eos_token_id:
            model, loaded = load_target(folder, None, device="cpu")
            assert greedy_ids(model, loaded, prompt_ids(loaded, "chat", QUESTION), 5) == [stop] * 5
