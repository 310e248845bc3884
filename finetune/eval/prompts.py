"""Prompts for `finetune generate`: read from the command line or a file, formatted as in training.

A run is prompted with the template it trained on, through the same functions the data pipeline
uses, so the prompt's token ids are exactly the masked prefix of a training sample:

- alpaca: BOS + Stanford Alpaca's template (`finetune.data.alpaca.format_prompt`);
- goat: BOS + `{instruction}\\nAnswer:` (`finetune.data.goat.format_prompt`);
- chat: the chat template saved with the tokenizer (what a lima run trained with; lima's own when the
  tokenizer has none), rendered with the generation prompt;
- raw: BOS + the text as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import InputError

PROMPT_FORMATS = ("alpaca", "goat", "chat", "raw")
# recipe data.format -> prompt format
TRAINED_FORMATS = {"alpaca": "alpaca", "goat": "goat", "lima": "chat"}


def read_prompts(prompt: str | None, file: str | Path | None) -> list[dict]:
    """Rows of `instruction` (and optional `input`): one from `prompt`, or one per line of `file`.

    A line of the file is a JSON object with `instruction` and optional `input`, or plain text (the
    instruction). Blank lines are skipped.

    Raises:
        InputError: neither or both are given, the file cannot be read, or a JSON line lacks `instruction`.
    """
    if (prompt is None) == (file is None):
        raise InputError("give exactly one of --prompt TEXT and --file FILE")
    if prompt is not None:
        return [{"instruction": prompt}]
    path = Path(file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--file: cannot read {path}: {e}") from None
    rows = [read_line(line, f"{path}: line {number}") for number, line in enumerate(lines, start=1) if line.strip()]
    if not rows:
        raise InputError(f"--file: {path} holds no prompt")
    return rows


def read_line(line: str, where: str) -> dict:
    if not line.lstrip().startswith("{"):
        return {"instruction": line}
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON: {e.msg}") from None
    if not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
        raise InputError(f"{where}: 'instruction' is missing or empty")
    if not isinstance(row.get("input", ""), str):
        raise InputError(f"{where}: 'input' must be a string")
    return {"instruction": row["instruction"], "input": row.get("input", "")}


def choose_format(requested: str | None, trained_formats: list[str] | None, tokenizer) -> str:
    """The prompt format: the one asked for, else the run's, else chat when the tokenizer has a template.

    Args:
        requested: --format, or None.
        trained_formats: the run's data formats (None for a model folder without a recipe).

    Raises:
        InputError: the run trained on several formats and none was asked for.
    """
    if requested is not None:
        return requested
    if trained_formats is None:
        return "chat" if getattr(tokenizer, "chat_template", None) else "raw"
    formats = sorted({TRAINED_FORMATS[name] for name in trained_formats})
    if len(formats) > 1:
        raise InputError(f"the run trained on several data formats ({', '.join(formats)}); choose one with --format")
    return formats[0]


def prompt_ids(tokenizer, prompt_format: str, row: dict) -> list[int]:
    """The token ids the model is prompted with, exactly as training tokenized a prompt (see the module doc)."""
    from finetune.data import alpaca, goat
    from finetune.data.templates import resolve_chat_template

    instruction, input = row["instruction"], row.get("input", "")
    if prompt_format == "chat":
        content = f"{instruction}\n\n{input}" if input else instruction
        _, template = resolve_chat_template(None, tokenizer)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], chat_template=template, tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False).input_ids  # the template writes its own BOS
    if prompt_format == "alpaca":
        text = alpaca.format_prompt(instruction, input)
    elif prompt_format == "goat":
        text = goat.format_prompt(instruction)
    else:
        text = f"{instruction}\n{input}" if input else instruction
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(text, add_special_tokens=False).input_ids
