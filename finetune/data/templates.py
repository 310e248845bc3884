"""Chat templates: the tokenizer's own, a named one from the registry, or a Jinja string from the recipe; and
conversations ([{role, content}], from any chat data format) rendered into trained and masked segments.

The template a run trains with is saved with its tokenizer (`tokenizer.chat_template`), so
`apply_chat_template` at inference builds exactly the prompts the model was trained on.
"""

from __future__ import annotations

from typing import Literal

from finetune.data.conversation import Conversation, RowError, Segment
from finetune.errors import InputError

TrainOn = Literal["all_assistant_turns", "last_turn"]

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


def check_turns(messages: list[dict]) -> None:
    """An optional system message, then user and assistant turns that alternate, none empty, ending with the
    assistant.

    Raises:
        RowError: naming the turn that is wrong.
    """
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise RowError("the conversation has no turns")
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RowError(f"turn {i + 1} is from {message['role']!r}, expected {expected!r} (turns must alternate)")
        if not message["content"].strip():
            raise RowError(f"turn {i + 1} ({expected}) is empty")
    if body[-1]["role"] != "assistant":
        raise RowError("the last turn is from the user; a conversation must end with an assistant answer")


def chat_conversation(
    messages: list[dict],
    ref: str,
    *,
    render,
    train_on: TrainOn = "all_assistant_turns",
    train_on_prompt: bool = False,
    end_of_turn: str | None = None,
) -> Conversation:
    """Render checked messages and split them at every assistant answer: each answer (through its end-of-turn
    token) is trained, everything else masked; with `train_on: last_turn` only the final answer is trained.

    What the template writes after the end-of-turn token (ChatML's newline between turns) is masked, and
    dropped after the last answer: generation stops at that token, so the model never writes what follows.

    Args:
        render: `render(messages, add_generation_prompt) -> str`, the chat template.
        end_of_turn: the special token the template closes an answer with (`end_of_turn_token`); the
            trained span ends there.

    Raises:
        RowError: the template does not render each conversation prefix as a prefix of the whole (masking
            could not be decided exactly).
    """
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    segments, done = [], ""
    for i in answers:
        prompt = render(messages[:i], add_generation_prompt=True)
        through_answer = render(messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not through_answer.startswith(prompt):
            raise RowError("the chat template does not render a conversation prefix as a prefix of the whole")
        trained = train_on == "all_assistant_turns" or i == answers[-1]
        answer, after = split_after(through_answer[len(prompt) :], end_of_turn)
        segments.append(Segment(prompt[len(done) :], trained=train_on_prompt))
        segments.append(Segment(answer, trained=trained))
        if after and i != answers[-1]:  # after the last answer the conversation is over: nothing to learn
            segments.append(Segment(after, trained=train_on_prompt))
        done = through_answer
    return Conversation(tuple(segments), row=ref, add_eos=False, whole_text=True)


def split_after(answer: str, end_of_turn: str | None) -> tuple[str, str]:
    """(the answer through its last `end_of_turn`, what follows); the whole answer when the token is absent."""
    if not end_of_turn or end_of_turn not in answer:
        return answer, ""
    cut = answer.rindex(end_of_turn) + len(end_of_turn)
    return answer[:cut], answer[cut:]
