"""One progress style for the long work outside training: merge, export, push, tokenizing, exact match, generate.

The bars are tqdm's, the style users already see in the Trainer's training bar: a label such as
`merge: folding model.safetensors`, `export gguf: writing tensors`, `data: tokenizing train rows` or
`eval: answering`, then the count out of the total, elapsed time, ETA and rate. They go to stderr, so stdout
keeps exactly the lines a command prints without them.

A bar shows only where someone watches it: stderr is a terminal, FINETUNE_PROGRESS is not turned off
(`0`, `false`, `no` or `off`), and this is the main process of a launch (the others do the same work
silently). CI logs, pipes and files get no bar lines and no carriage returns.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

SWITCH = "FINETUNE_PROGRESS"
OFF = ("0", "false", "no", "off")


def progress_shown() -> bool:
    """Whether bars show here: stderr is a terminal, FINETUNE_PROGRESS does not turn them off, main process."""
    from finetune.run_folder import is_main_process

    if os.environ.get(SWITCH, "").strip().lower() in OFF:
        return False
    return sys.stderr.isatty() and is_main_process()


def progress(
    iterable: Iterable | None = None, *, label: str, total: int | None = None, unit: str = "it", when: bool = True
):
    """A progress bar labelled `label`, over `iterable`, or (without one) advanced by hand with `update(n)`.

    Args:
        iterable: what the caller loops over; the bar counts its items (its length is the total).
        label: what is being done, `verb-group: doing what`, e.g. `eval: answering`.
        total: the count at completion, where `iterable` has no length or is not given.
        unit: what one step is (tensor, row, batch, file).
        when: the caller's own condition (e.g. only for a large data set); the bar also needs `progress_shown()`.

    Returns:
        A tqdm bar: iterate over it, or use it in a `with` block and call `update`. Where it does not show, it
        yields the items and ignores updates, writing nothing.

    Example: `for item in progress(plan, label="export gguf: writing tensors", unit="tensor"): write(item)`
    """
    from tqdm import tqdm

    return tqdm(
        iterable,
        desc=label,
        total=total,
        unit=unit,
        file=sys.stderr,
        disable=not (when and progress_shown()),
        dynamic_ncols=True,  # follows the terminal's width as it is resized
        leave=True,  # the finished bar stays as one line, ended by a newline
    )
