"""The TEMPLATE of an Ollama Modelfile: the prompt a run trained on, in the Go text/template syntax Ollama
executes.

How Ollama fills a template that names `.Messages` (ollama/ollama: template/template.go, server/routes.go):
`.Messages` is the conversation, with consecutive messages of one role joined; `.System` is its system
messages joined; the Modelfile's SYSTEM is prepended as a system message when the conversation does not
begin with one. The rendered text is tokenized with special tokens parsed and BOS added when the GGUF says
so (tokenizer.ggml.add_bos_token, written exactly when the tokenizer has a BOS), so the TEMPLATE never
writes BOS itself.

Chat runs: the run's Jinja chat template is rendered for marked conversations and read as a layout: what
comes before and after each user, assistant and system message, the generation prompt, the system message
it writes when the conversation has none, and whether a system message goes inside the first user turn (as
Mistral's `[INST]` has it). The layout is accepted only when it renders a set of check conversations
exactly as the Jinja template does; a template it cannot reproduce (one that rewrites or reorders messages)
is refused, never written wrong. Llama-3's header/eot template, ChatML (Qwen2.5's, with its default system
message), Mistral's `[INST]` and our lima template all read this way.

Alpaca and Goat runs: their own prompt (`format_prompt` of data/formats) around the last user message, as
`finetune generate` prompts them; earlier turns are not shown to a model trained on single prompts.

Only text, `{{ .Field }}`, `if`/`else if`/`end`, `range` and the builtins `eq`, `len`, `slice`, `not` are
written (tests/test_artifacts_ollama.py renders exactly that subset). Go's templates cannot trim, so a
template that strips whitespace around messages (Llama-3's `| trim`) is reproduced for messages without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Marked message contents: short, no whitespace at either end (Llama-3 trims), nothing a template writes
SYSTEM_MARK = "Sqx0"
USER_MARKS = ("Uqx1", "Uqx2", "Uqx3")
ASSISTANT_MARKS = ("Aqx1", "Aqx2")
# Conversations the layout must render exactly as the Jinja template does, each ending with a user turn
CHECKS = (
    [("user", "Name three colors.\nBe brief.")],
    [("system", "You answer in French."), ("user", "Name three colors.")],
    [("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Add 2 and 3.")],
    [("system", "Be terse."), ("user", "Hi"), ("assistant", "Hello."), ("user", "What is 2 + 3?")],
    [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d e"), ("user", "f\ng")],
)
LAST = "{{ $last := eq (len (slice $.Messages $i)) 1 }}"

Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text, the Jinja template


class Untranslatable(ValueError):
    """The chat template has no layout that Go's template subset reproduces; the message says why."""


@dataclass(frozen=True)
class ChatLayout:
    """How a chat template lays out a conversation.

    Args:
        user, assistant, system: the text before and after each such message; for a system message written
            inside the first user turn, ("", what separates it from the user's message).
        generation_prompt: what follows the last user message when the model is to answer.
        default_system: the system message written when there is none (None: no system block then).
        system_in_first_user: the system message opens the first user turn (Mistral's `[INST]`).
        writes_bos: the template begins with the BOS text (llama.cpp adds BOS itself).
    """

    user: tuple[str, str]
    assistant: tuple[str, str]
    system: tuple[str, str]
    generation_prompt: str
    default_system: str | None
    system_in_first_user: bool
    writes_bos: bool

    def render(self, messages: list[dict]) -> str:
        """The prompt for `messages` (ending with a user turn) as the layout writes it, BOS left out."""
        system = [m["content"] for m in messages if m["role"] == "system"]
        if not system and self.default_system:
            system = [self.default_system]
        system_text = "\n\n".join(system)
        turns = [m for m in messages if m["role"] != "system"]
        text = ""
        if not self.system_in_first_user and (system_text or self.default_system is not None):
            text += self.system[0] + system_text + self.system[1]
        for i, message in enumerate(turns):
            last = i == len(turns) - 1
            if message["role"] == "user":
                inner = system_text + self.system[1] if self.system_in_first_user and system_text and i == 0 else ""
                text += self.user[0] + inner + message["content"] + self.user[1]
                text += self.generation_prompt if last else ""
            else:
                text += self.assistant[0] + message["content"] + ("" if last else self.assistant[1])
        return text


def read_layout(render: Render, bos_token: str | None) -> ChatLayout:
    """The layout of the chat template `render`, checked against it on `CHECKS`.

    Raises:
        Untranslatable: the template renders something no layout reproduces, or fails on a plain conversation.
    """
    try:
        layout = _probe(render, bos_token)
        for check in CHECKS:
            messages = [{"role": role, "content": content} for role, content in check]
            expected = _without_bos(render(messages, True), bos_token if layout.writes_bos else None)
            if layout.render(messages) != expected:
                raise Untranslatable(f"it renders {[role for role, _ in check]} in a way no message layout reproduces")
    except Untranslatable:
        raise
    except Exception as error:  # the template itself fails (raise_exception, an unknown filter)
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise Untranslatable(f"it fails on a user, assistant or system message ({first_line})") from None
    for piece in (*layout.user, *layout.assistant, *layout.system, layout.generation_prompt, layout.default_system):
        if piece and ("{{" in piece or '"""' in piece):
            raise Untranslatable(f"it writes {_short(piece)}, which a Modelfile TEMPLATE cannot hold as text")
    return layout


def _probe(render: Render, bos_token: str | None) -> ChatLayout:
    u1, u2, _ = USER_MARKS
    a1 = ASSISTANT_MARKS[0]

    def chat(*contents: tuple[str, str], generation: bool = False) -> str:
        return render([{"role": role, "content": content} for role, content in contents], generation)

    plain = chat(("user", u1))
    writes_bos = bool(bos_token) and plain.startswith(bos_token)
    bos = bos_token if writes_bos else None
    plain = _without_bos(plain, bos)
    generation = _without_bos(chat(("user", u1), generation=True), bos)
    answered = _without_bos(chat(("user", u1), ("assistant", a1)), bos)
    dialog = _without_bos(chat(("user", u1), ("assistant", a1), ("user", u2)), bos)
    with_system = _without_bos(chat(("system", SYSTEM_MARK), ("user", u1)), bos)

    head, user_suffix = _split(plain, u1)
    if not generation.startswith(plain):
        raise Untranslatable("its generation prompt does not follow the conversation")
    before_answer, assistant_suffix = _split(answered, a1)
    if not before_answer.startswith(plain):
        raise Untranslatable("an answer changes the text before it")
    _, after_answer = _split(dialog, a1)
    if not after_answer.startswith(assistant_suffix):
        raise Untranslatable("an answer is closed differently when a user turn follows")
    user_prefix = _split(after_answer, u2)[0][len(assistant_suffix) :]
    if not head.endswith(user_prefix):
        raise Untranslatable("the first user turn is opened differently from the others")
    default_block = head[: len(head) - len(user_prefix)]
    system_head, system_rest = _split(with_system, SYSTEM_MARK)
    between = _split(system_rest, u1)[0]
    if user_prefix and between.endswith(user_prefix):  # a system block of its own
        system, in_first_user = (system_head, between[: len(between) - len(user_prefix)]), False
    elif system_head == default_block + user_prefix:  # the system message opens the first user turn
        system, in_first_user = ("", between), True
    else:
        raise Untranslatable("its system message is neither a block of its own nor part of the first user turn")
    default_system = None
    if default_block:
        prefix, suffix = system
        if in_first_user or not (default_block.startswith(prefix) and default_block.endswith(suffix)):
            raise Untranslatable(f"it writes {_short(default_block)} before the first user turn, not a system block")
        default_system = default_block[len(prefix) : len(default_block) - len(suffix)]
    return ChatLayout(
        user=(user_prefix, user_suffix),
        assistant=(before_answer[len(plain) :], assistant_suffix),
        system=system,
        generation_prompt=generation[len(plain) :],
        default_system=default_system,
        system_in_first_user=in_first_user,
        writes_bos=writes_bos,
    )


def _split(text: str, mark: str) -> tuple[str, str]:
    if text.count(mark) != 1:
        raise Untranslatable(f"it writes a message {text.count(mark)} times")
    before, _, after = text.partition(mark)
    return before, after


def _short(text: str) -> str:
    """`text` quoted, cut to its first 60 characters."""
    return repr(text) if len(text) <= 60 else repr(text[:60]) + "..."


def _without_bos(text: str, bos: str | None) -> str:
    return text[len(bos) :] if bos and text.startswith(bos) else text


def chat_go_template(layout: ChatLayout) -> str:
    """The Go template of a chat layout, rendering what `layout.render` does for Ollama's `.Messages`."""
    (user_prefix, user_suffix), (assistant_prefix, assistant_suffix) = layout.user, layout.assistant
    system_prefix, system_suffix = layout.system
    text = ""
    if not layout.system_in_first_user:
        block = f"{system_prefix}{{{{ .System }}}}{system_suffix}"
        # a template that writes its system block without a system message writes it always
        text += block if layout.default_system is not None else f"{{{{ if .System }}}}{block}{{{{ end }}}}"
    inner = ""
    if layout.system_in_first_user:  # the system message is first in .Messages, so the first user turn is 1
        inner = f"{{{{ if $.System }}}}{{{{ if eq $i 1 }}}}{{{{ $.System }}}}{system_suffix}{{{{ end }}}}{{{{ end }}}}"
    generation = f"{{{{ if $last }}}}{layout.generation_prompt}{{{{ end }}}}" if layout.generation_prompt else ""
    closing = f"{{{{ if not $last }}}}{assistant_suffix}{{{{ end }}}}" if assistant_suffix else ""
    return (
        text
        + "{{ range $i, $_ := .Messages }}"
        + LAST
        + f'{{{{ if eq .Role "user" }}}}{user_prefix}{inner}{{{{ .Content }}}}{user_suffix}{generation}'
        + f'{{{{ else if eq .Role "assistant" }}}}{assistant_prefix}{{{{ .Content }}}}{closing}'
        + "{{ end }}{{ end }}"
    )


def prompt_go_template(format_prompt: Callable[[str, str], str]) -> str:
    """The Go template of a prompt format (Alpaca, Goat): its prompt around the last message, a user's."""
    before, after = _split(format_prompt(USER_MARKS[0], ""), USER_MARKS[0])
    return (
        "{{ range $i, $_ := .Messages }}"
        + LAST
        + f'{{{{ if $last }}}}{{{{ if eq .Role "user" }}}}{before}{{{{ .Content }}}}{after}{{{{ end }}}}{{{{ end }}}}'
        + "{{ end }}"
    )
