"""Trainer callbacks of a run: the complete-checkpoint marker and the stop on Ctrl-C (no Trainer subclass)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from finetune.run_folder import write_json
from finetune.train.checkpoints import COMPLETE_MARKER

# Test hook: `FINETUNE_TEST_HANG_AT_SAVE=N` sleeps for a minute after checkpoint-N is written and before
# it is marked complete, so a test can kill the process while that checkpoint is unfinished.
HANG_AT_SAVE_ENV = "FINETUNE_TEST_HANG_AT_SAVE"


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
        write_json(folder / COMPLETE_MARKER, {"step": state.global_step, "time": round(time.time(), 3)})


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
