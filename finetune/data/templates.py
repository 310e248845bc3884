"""Chat templates: the tokenizer's own, a named one from the registry, or a Jinja string from the recipe.

The template a run trains with is saved with its tokenizer (`tokenizer.chat_template`), so
`apply_chat_template` at inference builds exactly the prompts the model was trained on.
"""

from __future__ import annotations

from finetune.errors import InputError

# LIMA-style: plain speaker labels, and EOS closes every assistant turn (the role of LIMA's end-of-turn
# token, without adding a token to the vocabulary). The generation prompt ends with "Assistant:" and the
# answer starts with a space, so the prompt's tokens are a prefix of the whole conversation's tokens.
LIMA = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# ChatML: expects <|im_start|> and <|im_end|> to be tokens of the tokenizer (a warning says when not).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT_TEMPLATES = {"lima": LIMA, "chatml": CHATML}


def resolve_chat_template(choice: str | None, tokenizer) -> tuple[str, str]:
    """(name, Jinja source) of the template to train with.

    Args:
        choice: None (the tokenizer's own, else lima), a registry name, or a Jinja string.

    Raises:
        InputError: a name that is neither in the registry nor Jinja.
    """
    if choice is None:
        own = getattr(tokenizer, "chat_template", None)
        return ("tokenizer", own) if isinstance(own, str) and own else ("lima", LIMA)
    if choice in CHAT_TEMPLATES:
        return choice, CHAT_TEMPLATES[choice]
    if "{{" in choice or "{%" in choice:
        return "custom", choice
    raise InputError(
        f"data.chat_template: {choice!r} is neither a template name ({', '.join(CHAT_TEMPLATES)}) nor a Jinja string"
    )


def special_token_ids(tokenizer) -> set[int]:
    """Ids of every special token: the named ones (BOS, EOS, ...) and the added ones marked special
    (`<|eot_id|>`, `<|im_end|>`, which Llama-3 and Qwen tokenizers do not name)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}


def end_of_turn_token(tokenizer, template: str | None = None) -> str | None:
    """The special token the chat template closes an assistant turn with (`<|eot_id|>`, `<|im_end|>`, EOS),
    or None when the template closes it with plain text or there is no template."""
    probe = "\u2063answer\u2063"  # invisible separators: no real answer holds this
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": probe}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except Exception:  # a template that refuses the probe (or no template): no end-of-turn token to find
        return None
    if probe not in text:
        return None
    after = text[text.rindex(probe) + len(probe) :]
    specials = tokenizer.convert_ids_to_tokens(sorted(special_token_ids(tokenizer)))
    starting = [token for token in specials if token and after.startswith(token)]
    return max(starting, key=len) if starting else None


def template_warnings(name: str, tokenizer) -> list[str]:
    """Things about the tokenizer that make the chosen template work badly."""
    if name != "chatml":
        return []
    vocab = tokenizer.get_vocab()
    missing = [token for token in ("<|im_start|>", "<|im_end|>") if token not in vocab]
    if missing:
        return [
            f"chat template chatml: {', '.join(missing)} are not tokens of this tokenizer, so they are spelled in "
            "several tokens and generation will not stop at the end of a turn; prefer chat_template: lima"
        ]
    return []
