"""Errors the user can act on.

Every error we raise on purpose is a `FinetuneError`. The CLI prints its message (no traceback unless
`--debug`) and exits with its `exit_code`: 2 for bad input (recipe, data, files), 1 for failures at run
time. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, located so the user can jump to it.

    Args:
        where: `FILE:LINE:COL`, `FILE: row N`, or `command line`.
        subject: the dotted recipe key (or `key=value` for an override); empty when none applies.
        message: what is wrong, in plain words.
        hint: how to fix it, when we know.
    """

    where: str
    subject: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        parts = [self.where]
        if self.subject:
            parts.append(self.subject)
        text = ": ".join(parts) + ": " + self.message
        return f"{text}; {self.hint}" if self.hint else text


class FinetuneError(Exception):
    """An error with a message meant for the user; `exit_code` is what the CLI exits with."""

    exit_code = 1


class InputError(FinetuneError):
    """The user's input (recipe, data file, model folder, command line) cannot be used."""

    exit_code = 2


class RecipeError(InputError):
    """A recipe with one or more problems, all reported at once."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class DataError(InputError):
    """A data source with one or more bad rows, all reported at once (up to a limit)."""

    def __init__(self, problems: list[Problem], omitted: int = 0):
        self.problems = problems
        lines = [str(p) for p in problems]
        if omitted:
            lines.append(f"... and {omitted} more problem(s) of the same kind")
        super().__init__("\n".join(lines))


class Interrupted(FinetuneError):
    """The run was stopped by a signal (Ctrl-C) after saving a checkpoint; the CLI exits 130."""

    exit_code = 130
