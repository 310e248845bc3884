"""ShareGPT-style conversations -> chat-template segments: user turns masked, assistant turns trained.

Rows hold `conversations`: a list of `{"from": ..., "value": ...}` turns, the form most public chat sets
use. `from` is human or gpt (user and assistant work too), with an optional leading system turn. The turns
are rendered through the chat template and masked as LIMA conversations are (`data/templates.py`).
"""

from __future__ import annotations

from finetune.data.conversation import Conversation, RowError, expect_object
from finetune.data.templates import TrainOn, chat_conversation, check_turns

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def to_messages(row: dict) -> list[dict]:
    """A row -> [{role, content}], checked to alternate user/assistant and end with assistant.

    >>> to_messages({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]})
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello.'}]

    Raises:
        RowError: naming the turn that is wrong.
    """
    expect_object(row, "conversations")
    turns = row.get("conversations")
    if turns is None:
        raise RowError("'conversations' is missing")
    if not isinstance(turns, list) or not turns:
        raise RowError("'conversations' must be a non-empty list of {from, value} turns")
    messages = [to_message(turn, number) for number, turn in enumerate(turns, start=1)]
    if any(m["role"] == "system" for m in messages[1:]):
        raise RowError("a system turn may only come first")
    check_turns(messages)
    return messages


def to_message(turn, number: int) -> dict:
    if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
        raise RowError(f"turn {number} must be an object with string 'from' and 'value'")
    role = ROLES.get(turn["from"].lower())
    if role is None:
        raise RowError(f"turn {number} is from {turn['from']!r}: expected human, gpt or system (or user, assistant)")
    return {"role": role, "content": turn["value"]}


def to_conversation(
    row: dict,
    ref: str,
    *,
    render,
    train_on: TrainOn = "all_assistant_turns",
    train_on_prompt: bool = False,
    end_of_turn: str | None = None,
) -> Conversation:
    """Render the conversation with the chat template and split it at every assistant answer.

    Raises:
        RowError: the row's turns are malformed (see `to_messages`), or the template cannot be masked exactly.
    """
    messages = to_messages(row)
    return chat_conversation(
        messages, ref, render=render, train_on=train_on, train_on_prompt=train_on_prompt, end_of_turn=end_of_turn
    )
