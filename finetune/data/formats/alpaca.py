"""Stanford Alpaca rows (`instruction`, optional `input`, `output`) -> prompt and response segments.

The two prompt templates are Stanford Alpaca's, character for character
(https://github.com/tatsu-lab/stanford_alpaca, `train.py`, `PROMPT_DICT`). There is no newline after
`### Response:`; the response is tokenized as its own segment, so a SentencePiece tokenizer starts it
with a word boundary, exactly as it would when the model generates after the prompt.
"""

from __future__ import annotations

from finetune.data.conversation import Conversation, Segment, expect_object, text_field

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for an instruction and an optional input.

    >>> format_prompt("Add 2 and 3.").endswith("### Instruction:\\nAdd 2 and 3.\\n\\n### Response:")
    True
    """
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def to_conversation(row: dict, ref: str, *, train_on_prompt: bool = False) -> Conversation:
    """One Alpaca row -> [prompt (masked unless train_on_prompt), response + EOS (trained)].

    Raises:
        RowError: a field is missing, not a string, or (for instruction and output) empty.
    """
    expect_object(row, "instruction", "output")
    instruction = text_field(row, "instruction", required=True)
    output = text_field(row, "output", required=True)
    input = text_field(row, "input", required=False)
    prompt = format_prompt(instruction, input)
    return Conversation(segments=(Segment(prompt, trained=train_on_prompt), Segment(output, trained=True)), row=ref)
