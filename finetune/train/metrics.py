"""A Trainer callback that appends every log entry to metrics.jsonl (main process only)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback


class MetricsFileCallback(TrainerCallback):
    """Appends `{"step", "epoch", "time", **logs}` per log event, flushed at once so a crash loses nothing."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time(), 3), **logs}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
