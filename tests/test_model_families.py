"""Each family (LLaMA, Llama-3, Mistral, Qwen2) trains the quickstart's Alpaca LoRA without touching its
vocabulary: the adapter holds adapter weights only and loads with plain peft on the untouched base."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from finetune.model.load import load_tokenizer
from finetune.pipeline import run
from finetune.recipe.load import load_recipe
from finetune.recipe.schema import ModelSpec

from conftest import FAMILIES, REPO, SAMPLE_DATA

# The pad each family ends up with: its own, a reserved one it ships, or <unk>; never a new token.
EXPECTED_PAD = {
    "llama": "<unk>",
    "llama3": "<|finetune_right_pad_id|>",
    "mistral": "<unk>",
    "qwen2": "<|endoftext|>",
}


@pytest.fixture(scope="module")
def quickstart_runs(family_model_dir, tmp_path_factory):
    """family -> (run result, base folder): recipes/quickstart.yaml for a few steps on each family's model."""
    done = {}

    def train(family: str):
        if family not in done:
            base = family_model_dir(family)
            overrides = [
                f"model.name_or_path={base}",
                f"data.path={SAMPLE_DATA}",
                "data.max_seq_len=256",
                "data.max_rows=32",
                "train.max_steps=3",
                "train.micro_batch_size=4",
                "output.report=false",
                f"output.dir={tmp_path_factory.mktemp(f'quickstart-{family}') / 'run'}",
            ]
            done[family] = run(load_recipe(REPO / "recipes" / "quickstart.yaml", overrides), echo=lambda _: None), base
        return done[family]

    return train


@pytest.mark.parametrize("family", FAMILIES)
def test_pad_comes_from_the_vocabulary(family_model_dir, family):
    folder = family_model_dir(family)
    from transformers import AutoTokenizer

    untouched = len(AutoTokenizer.from_pretrained(folder))
    tokenizer = load_tokenizer(ModelSpec(name_or_path=str(folder)))
    assert tokenizer.pad_token == EXPECTED_PAD[family] and len(tokenizer) == untouched


@pytest.mark.parametrize("family", FAMILIES)
def test_quickstart_adapter_holds_only_lora_weights_and_reloads_with_plain_peft(quickstart_runs, family):
    result, base = quickstart_runs(family)
    adapter = result.path / "adapter"
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all("lora_A" in name or "lora_B" in name for name in names)
    assert not [name for name in names if "embed_tokens" in name or "lm_head" in name]

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    untouched = AutoModelForCausalLM.from_pretrained(base).eval()
    trained = result.model.eval()
    prompt = torch.tensor([list(range(20, 60))])
    with torch.no_grad():
        expected, actual = trained(input_ids=prompt).logits, reloaded(input_ids=prompt).logits
        before = untouched(input_ids=prompt).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(actual, before, atol=1e-4)  # the adapter did change the model
    assert reloaded.get_input_embeddings().num_embeddings == untouched.get_input_embeddings().num_embeddings


def train(recipe: str, overrides: list[str]):
    """The run folder of a shipped recipe trained with `overrides`."""
    return run(load_recipe(REPO / "recipes" / recipe, overrides), echo=lambda _: None).path


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2"])
def test_a_chat_run_generates_and_a_goat_run_evaluates_on_each_family(family, family_model_dir, tmp_path):
    from finetune.eval.exact_match import evaluate
    from finetune.eval.generate import Sampling, generate, load_target
    from finetune.eval.prompts import prompt_ids
    from finetune.run_folder import read_recipe

    base = str(family_model_dir(family))
    common = ["train.max_steps=2", "train.micro_batch_size=2", "output.report=false", "eval.samples=0"]
    lima = [f"data.path={REPO / 'data' / 'lima_sample.jsonl'}", "data.max_seq_len=512", "data.max_rows=8"]
    own_template = [f"model.name_or_path={base}", "data.chat_template=null", *lima, *common]
    chat = train("lima_lora.yaml", [*own_template, f"output.dir={tmp_path / 'chat'}"])
    question = {"instruction": "Name a color."}
    [answer] = generate(chat, [question], Sampling(max_new_tokens=6), prompt_format=None, echo=None)
    assert 0 < len(answer) <= 6
    _, tokenizer = load_target(chat, read_recipe(chat), device="cpu")
    assert tokenizer.chat_template == load_tokenizer(ModelSpec(name_or_path=base)).chat_template
    messages = [{"role": "user", "content": question["instruction"]}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert prompt_ids(tokenizer, "chat", question) == expected  # the family's own template, one BOS at most

    goat = ["data.goat.n=32", "data.goat.ops=[add]", "data.goat.add_sub_digits=2", "data.eval_fraction=0.25"]
    goat += ["data.require_digit_split=false"]  # the Llama-3 tokenizer groups digits: the check would refuse it
    arithmetic = train(
        "goat_lora.yaml",
        [f"model.name_or_path={base}", "quant=null", *goat, *common, f"output.dir={tmp_path / 'goat'}"],
    )
    result = evaluate(arithmetic, n=8, batch_size=4, echo=lambda _: None)
    assert result.n == 8 and (arithmetic / "eval.json").is_file()
