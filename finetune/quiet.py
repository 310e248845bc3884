"""Keep the libraries' own noise off the terminal of commands that report their progress themselves.

`merge`, `export`, `generate` and `tiny-model` print what they do in a few lines; transformers'
"Loading weights" and "Writing model shards" bars, its advisory log lines and the deprecation warnings
of the libraries under it (FutureWarning, DeprecationWarning) say nothing a user can act on there.
Errors still show: only warnings and progress bars are silenced, and only while the command runs.
Their own progress bars are finetune's (finetune/progress.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

SILENCED = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Within the block: no huggingface_hub/transformers progress bars, transformers logs errors only, and
    deprecation warnings are dropped; everything is restored afterwards (commands also run in-process)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    hub_bars_off = are_progress_bars_disabled()
    transformers_bars_on = transformers_logging.is_progress_bar_enabled()
    verbosity = transformers_logging.get_verbosity()
    disable_progress_bars()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            for category in SILENCED:
                warnings.simplefilter("ignore", category)
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if transformers_bars_on:
            transformers_logging.enable_progress_bar()
        if not hub_bars_off:
            enable_progress_bars()


@contextmanager
def hub_bars_where_progress_shows() -> Iterator[None]:
    """Within the block, huggingface_hub's bars show only where finetune's own would (finetune/progress.py).

    Its upload bars follow each file byte by byte, which nothing outside huggingface_hub can, so `push` keeps
    them, in the same tqdm style, rather than a bar of its own; but they print carriage returns into logs and
    pipes as well, and do not know FINETUNE_PROGRESS or the main process.
    """
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from finetune.progress import progress_shown

    if progress_shown() or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()
