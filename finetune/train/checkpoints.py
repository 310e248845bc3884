"""Checkpoints that are complete or ignored, Ctrl-C that saves, and the newest checkpoint to resume from.

The Trainer writes `checkpoints/checkpoint-N/` in place (weights, then optimizer and scheduler, RNG
states, trainer_state.json last), so a process killed during a save leaves a folder that looks like
any other. A checkpoint is *complete* when it holds `finetune-complete.json`, which
`CompleteCheckpointCallback` writes in `on_save`, after the Trainer has written every file, and whose
trainer_state.json parses. Resume uses the newest complete checkpoint and ignores the others.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

COMPLETE_MARKER = "finetune-complete.json"
TRAINER_STATE = "trainer_state.json"
# Test hook: `FINETUNE_TEST_HANG_AT_SAVE=N` sleeps for a minute after checkpoint-N is written and before
# it is marked complete, so a test can kill the process while that checkpoint is unfinished.
HANG_AT_SAVE_ENV = "FINETUNE_TEST_HANG_AT_SAVE"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


class CompleteCheckpointCallback(TrainerCallback):
    """Marks `checkpoint-N` complete once the Trainer has written all of it (main process only)."""

    def __init__(self, checkpoints: Path):
        self.checkpoints = checkpoints

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = self.checkpoints / f"checkpoint-{state.global_step}"
        if os.environ.get(HANG_AT_SAVE_ENV) == str(state.global_step):
            time.sleep(60)
        partial = folder / (COMPLETE_MARKER + ".partial")
        partial.write_text(json.dumps({"step": state.global_step, "time": round(time.time(), 3)}) + "\n")
        partial.replace(folder / COMPLETE_MARKER)


class StopOnSignalCallback(TrainerCallback):
    """Ctrl-C (SIGINT) or SIGTERM: finish the current optimizer step, save a checkpoint, stop training.

    A second signal is not caught: the default handler raises KeyboardInterrupt (or ends the process).
    """

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; a run in another thread keeps the default ones
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True
            control.should_log = True  # the last step's loss is in metrics.jsonl before the checkpoint


@dataclass(frozen=True)
class Checkpoints:
    """The checkpoints of a run folder: the newest complete one and those that are not complete."""

    complete: Path | None
    incomplete: list[Path]

    @property
    def step(self) -> int:
        return checkpoint_step(self.complete) if self.complete else 0


def checkpoint_step(folder: Path) -> int:
    return int(_CHECKPOINT_NAME.match(folder.name)[1])


def is_complete(folder: Path) -> bool:
    """The marker is there and trainer_state.json parses."""
    if not (folder / COMPLETE_MARKER).is_file():
        return False
    try:
        json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def scan_checkpoints(checkpoints: Path) -> Checkpoints:
    """The newest complete checkpoint under `checkpoints/`, and every incomplete one (newer or not)."""
    folders = sorted(
        (p for p in checkpoints.glob("checkpoint-*") if p.is_dir() and _CHECKPOINT_NAME.match(p.name)),
        key=checkpoint_step,
    )
    complete = [p for p in folders if is_complete(p)]
    return Checkpoints(complete[-1] if complete else None, [p for p in folders if p not in complete])


def estimate_checkpoint_bytes(model) -> int:
    """Disk size of one checkpoint: the saved weights plus AdamW's two fp32 moments per trainable parameter."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # an adapter, or every weight
    return sum(p.numel() * (p.element_size() + 8) for p in trainable)
