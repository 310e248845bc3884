"""LIMA-style conversations -> chat-template segments: user turns masked, assistant turns trained.

Rows come as the public LIMA set has them (`conversations`: alternating user/assistant strings, optional
`source`) or in the common `messages` form (`[{"role": ..., "content": ...}]`, an optional leading
system message). The chat template renders the conversation; each assistant turn's answer (through its
end-of-turn token) is trained, everything else is masked. With `train_on: last_turn` only the final
answer is trained.
"""

from __future__ import annotations

from finetune.data.conversation import Conversation, RowError, expect_object
from finetune.data.templates import TrainOn, chat_conversation, check_turns


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

    Args:
        render: `render(messages, add_generation_prompt) -> str`, the chat template.
        end_of_turn: the special token the template closes an answer with (see `chat_conversation`).

    Raises:
        RowError: the row's turns are malformed, or the template does not render each conversation prefix
            as a prefix of the whole (masking could not be decided exactly).
    """
    messages = to_messages(row)
    return chat_conversation(
        messages, ref, render=render, train_on=train_on, train_on_prompt=train_on_prompt, end_of_turn=end_of_turn
    )
