"""LIMA-style conversations -> chat-template segments: user turns masked, assistant turns trained.

Rows come as the public LIMA set has them (`conversations`: alternating user/assistant strings, optional
`source`) or in the common `messages` form (`[{"role": ..., "content": ...}]`, an optional leading
system message). The chat template renders the conversation; each assistant turn's answer (through its
end-of-turn token) is trained, everything else is masked. What a template writes after the end-of-turn
token (ChatML's newline between turns) is masked, and dropped after the last answer: generation stops
at that token, so the model never writes what follows. With `train_on: last_turn` only the final answer is trained.
"""

from __future__ import annotations

from typing import Literal

from finetune.data.conversation import Conversation, RowError, Segment, expect_object

TrainOn = Literal["all_assistant_turns", "last_turn"]


def to_messages(row: dict) -> list[dict]:
    """A row in either form -> [{role, content}], checked to alternate user/assistant and end with assistant.

    Raises:
        RowError: naming the turn that is wrong.
    """
    expect_object(row, "conversations")
    if "conversations" in row:
        turns = row["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise RowError("'conversations' must be a list of strings (user, assistant, user, ...)")
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    elif "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise RowError("'messages' must be a list of {role, content} objects with string values")
    else:
        raise RowError("neither 'conversations' nor 'messages' is present")
    check_turns(messages)
    return messages


def check_turns(messages: list[dict]) -> None:
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


def to_conversation(
    row: dict,
    ref: str,
    *,
    render,
    train_on: TrainOn = "all_assistant_turns",
    train_on_prompt: bool = False,
    end_of_turn: str | None = None,
) -> Conversation:
    """Render the conversation and split it at every assistant answer.

    Args:
        render: `render(messages, add_generation_prompt) -> str`, the chat template.
        end_of_turn: the special token the template closes an answer with; the trained span ends there.

    Raises:
        RowError: the row's turns are malformed, or the template does not render each conversation prefix
            as a prefix of the whole (masking could not be decided exactly).
    """
    messages = to_messages(row)
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
