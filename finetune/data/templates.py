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
    messages: list[dict], ref: str, *, render, train_on: TrainOn = "all_assistant_turns", train_on_prompt: bool = False
) -> Conversation:
    """Render checked messages and split them at every assistant answer: each answer (through its end-of-turn
    token) is trained, everything else masked; with `train_on: last_turn` only the final answer is trained.

    Args:
        render: `render(messages, add_generation_prompt) -> str`, the chat template.

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
        segments.append(Segment(prompt[len(done) :], trained=train_on_prompt))
        segments.append(Segment(through_answer[len(prompt) :], trained=trained))
        done = through_answer
    return Conversation(tuple(segments), row=ref, add_eos=False, whole_text=True)
