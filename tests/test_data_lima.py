"""LIMA-style conversations: chat templates, per-turn masks, and prompts identical to inference."""

from __future__ import annotations

import json

import pytest

from finetune.cli import main
from finetune.data.build import build_datasets
from finetune.errors import DataError, InputError
from finetune.recipe.schema import DataSpec

CONVERSATION = ["What is 2 + 2?", "It is 4.", "And 3 + 3?", "That is 6."]
MESSAGES = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(CONVERSATION)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def trained_text(sample, tokenizer) -> list[str]:
    """The decoded runs of trained tokens, in order."""
    runs, current = [], []
    for token, trained in zip(sample.input_ids, sample.completion_mask, strict=True):
        if trained:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("template", [None, "lima", "chatml"])
def test_every_assistant_turn_is_trained_and_nothing_else(template, tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": CONVERSATION}])
    [sample] = build_datasets(DataSpec(format="lima", path=str(path), chat_template=template), tokenizer, 0).train
    runs = trained_text(sample, tokenizer)
    assert len(runs) == 2
    assert runs[0].strip().startswith("It is 4.") and runs[1].strip().startswith("That is 6.")
    end_of_turn = "<|im_end|>" if template == "chatml" else "</s>"
    assert all(end_of_turn in run for run in runs)  # the model learns to end its turn


def test_last_turn_only(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": CONVERSATION}])
    spec = DataSpec(format="lima", path=str(path), train_on="last_turn")
    [sample] = build_datasets(spec, tokenizer, 0).train
    assert [run.strip() for run in trained_text(sample, tokenizer)] == ["That is 6.</s>"]


def test_conversations_and_messages_forms_give_the_same_sample(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "chat.jsonl", [{"conversations": CONVERSATION, "source": "x"}, {"messages": MESSAGES}]
    )
    first, second = build_datasets(DataSpec(format="lima", path=str(path)), tokenizer, 0).train
    assert (first.input_ids, first.completion_mask) == (second.input_ids, second.completion_mask)


def test_malformed_conversations_are_named_by_row_and_reason(tmp_path, tokenizer):
    rows = [
        {"conversations": ["hi", "hello"]},
        {"conversations": ["only a question"]},
        {"messages": [{"role": "assistant", "content": "I speak first"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        {"conversations": ["question", "   "]},
        {"text": "no turns"},
        {"conversations": "not a list"},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as raised:
        build_datasets(DataSpec(format="lima", path=str(path)), tokenizer, 0)
    assert str(raised.value).splitlines() == [
        f"{path}:2: the last turn is from the user; a conversation must end with an assistant answer",
        f"{path}:3: turn 1 is from 'assistant', expected 'user' (turns must alternate)",
        f"{path}:4: turn 2 is from 'user', expected 'assistant' (turns must alternate)",
        f"{path}:5: turn 2 (assistant) is empty",
        f"{path}:6: neither 'conversations' nor 'messages' is present",
        f"{path}:7: 'conversations' must be a list of strings (user, assistant, user, ...)",
    ]


def test_custom_jinja_template_and_unknown_names(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": CONVERSATION[:2]}])
    custom = (
        "{{ bos_token }}{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}"
    )
    data = build_datasets(DataSpec(format="lima", path=str(path), chat_template=custom), tokenizer, 0)
    assert data.chat_template == custom
    assert tokenizer.decode(data.train[0].input_ids) == "<s>[user] What is 2 + 2?\n[assistant] It is 4.</s>"
    with pytest.raises(InputError, match="data.chat_template: 'vicuna' is neither a template name"):
        build_datasets(DataSpec(format="lima", path=str(path), chat_template="vicuna"), tokenizer, 0)


def test_trained_prompt_ids_equal_the_saved_tokenizers_chat_template(write_recipe, tmp_path, capsys):
    from transformers import AutoTokenizer

    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": CONVERSATION}] * 8)
    recipe = write_recipe(data={"format": "lima", "path": str(path), "chat_template": "lima"})
    assert main(["run", str(recipe), "train.max_steps=1"]) == 0
    assert main(["preview", str(recipe), "-n", "1", "--json"]) == 0
    sample = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = AutoTokenizer.from_pretrained(tmp_path / "run" / "adapter")
    for turns in (1, 3):  # the prompt before each assistant answer
        prompt = saved.apply_chat_template(MESSAGES[:turns], add_generation_prompt=True, tokenize=True)
        prompt_ids = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
        assert sample["input_ids"][: len(prompt_ids)] == list(prompt_ids)
        assert sample["labels"][len(prompt_ids) - 1] == -100 and sample["labels"][len(prompt_ids)] != -100


def test_the_tokenizers_own_template_is_the_default(tmp_path, tiny_model_dir):
    from finetune.model.load import load_tokenizer
    from finetune.recipe.schema import ModelSpec

    own = load_tokenizer(ModelSpec(name_or_path=str(tiny_model_dir)))
    own.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": CONVERSATION[:2]}])
    assert build_datasets(DataSpec(format="lima", path=str(path)), own, 0).chat_template == own.chat_template


@pytest.mark.parametrize("template", ["lima", "chatml"])
def test_the_shipped_sample_conversations_all_build(template, tokenizer):
    from conftest import REPO

    spec = DataSpec(
        format="lima", path=str(REPO / "data" / "lima_sample.jsonl"), chat_template=template, max_seq_len=4096
    )
    data = build_datasets(spec, tokenizer, 0)
    assert data.report.rows_read == 50 and data.report.train_rows == 50 and not data.report.dropped_rows
    multi_turn = [s for s in data.train if len(trained_text(s, tokenizer)) > 1]
    assert len(multi_turn) == 10  # the ten multi-turn conversations train every answer


# The token each family's own chat template ends an assistant turn with (the tiny LLaMA has no template of
# its own, so LIMA's, which ends turns with EOS).
END_OF_TURN = {"llama": "</s>", "llama3": "<|eot_id|>", "mistral": "</s>", "qwen2": "<|im_end|>"}


def family_tokenizer(family_model_dir, family):
    from finetune.model.load import load_tokenizer
    from finetune.recipe.schema import ModelSpec

    return load_tokenizer(ModelSpec(name_or_path=str(family_model_dir(family))))


def trained_spans(sample) -> list[list[int]]:
    """The ids of each run of trained tokens, in order."""
    spans, current = [], []
    for token, trained in zip(sample.input_ids, sample.completion_mask, strict=True):
        if trained:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


@pytest.mark.parametrize("family", sorted(END_OF_TURN))
def test_each_family_template_trains_every_answer_through_its_end_of_turn_token(family, family_model_dir, tmp_path):
    tokenizer = family_tokenizer(family_model_dir, family)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": CONVERSATION}])
    [sample] = build_datasets(DataSpec(format="lima", path=str(path)), tokenizer, 0).train
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN[family])
    spans = trained_spans(sample)
    assert len(spans) == 2 and all(span[-1] == end for span in spans)
    assert [tokenizer.decode(span[:-1]).strip() for span in spans] == ["It is 4.", "That is 6."]
    if tokenizer.chat_template:  # the ids of the family's template, through the last end-of-turn token
        ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True)["input_ids"]
        assert sample.input_ids == ids[: len(ids) - ids[::-1].index(end)]


@pytest.mark.parametrize("family", sorted(END_OF_TURN))
def test_no_sample_holds_bos_twice(family, family_model_dir, tmp_path):
    tokenizer = family_tokenizer(family_model_dir, family)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": CONVERSATION}])
    [sample] = build_datasets(DataSpec(format="lima", path=str(path)), tokenizer, 0).train
    bos = tokenizer.bos_token_id
    if bos is None:  # Qwen: no BOS at all, and the template writes none
        assert tokenizer.apply_chat_template(MESSAGES, tokenize=False).startswith("<|im_start|>")
        return
    assert sample.input_ids[0] == bos and sample.input_ids.count(bos) == 1
    if tokenizer.chat_template:
        # What it guards against: the template writes BOS itself; tokenizing its text the default way adds another.
        assert tokenizer(tokenizer.apply_chat_template(MESSAGES, tokenize=False)).input_ids[:2] == [bos, bos]


def test_chatml_newline_after_the_end_of_turn_token_is_masked(family_model_dir, tmp_path):
    tokenizer = family_tokenizer(family_model_dir, "qwen2")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": CONVERSATION}])
    [sample] = build_datasets(DataSpec(format="lima", path=str(path)), tokenizer, 0).train
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    after_ends = [i + 1 for i, token in enumerate(sample.input_ids) if token == end and i + 1 < len(sample.input_ids)]
    newline_ids = tokenizer("\n", add_special_tokens=False).input_ids
    assert after_ends and all(sample.input_ids[i : i + len(newline_ids)] == newline_ids for i in after_ends)
    assert all(sample.completion_mask[i] == 0 for i in after_ends)
