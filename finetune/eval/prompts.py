"""Prompts for `finetune generate`: read from the command line or a file, formatted as in training.

A run is prompted with the template it trained on, through the same functions the data pipeline
uses (each data format's `format_prompt` in `data/formats/`), so the prompt's token ids are exactly the
masked prefix of a training sample:

- a format with its own template (alpaca, goat): BOS + that template;
- chat: the chat template saved with the tokenizer (what a chat-format run, lima or sharegpt, trained
  with; lima's own when the tokenizer has none), rendered with the generation prompt;
- raw: BOS + the text as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.data.formats import CHAT, FORMATS, prompt_format
from finetune.errors import InputError

RAW = "raw"
PROMPT_FORMATS = (*(name for name, entry in FORMATS.items() if entry.format_prompt is not None), CHAT, RAW)


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
        return CHAT if getattr(tokenizer, "chat_template", None) else RAW
    formats = sorted({prompt_format(name) for name in trained_formats})
    if len(formats) > 1:
        raise InputError(f"the run trained on several data formats ({', '.join(formats)}); choose one with --format")
    return formats[0]


def prompt_ids(tokenizer, prompt_format: str, row: dict) -> list[int]:
    """The token ids the model is prompted with, exactly as training tokenized a prompt (see the module doc)."""
    from finetune.data.templates import resolve_chat_template

    instruction, input = row["instruction"], row.get("input", "")
    if prompt_format == CHAT:
        content = f"{instruction}\n\n{input}" if input else instruction
        _, template = resolve_chat_template(None, tokenizer)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], chat_template=template, tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False).input_ids  # the template writes its own BOS
    if prompt_format == RAW:
        text = f"{instruction}\n{input}" if input else instruction
    else:
        text = FORMATS[prompt_format].format_prompt(instruction, input)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(text, add_special_tokens=False).input_ids
