"""A Trainer callback that appends every log entry to metrics.jsonl (main process only)."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from transformers import TrainerCallback


class MetricsFileCallback(TrainerCallback):
    """Appends `{"step", "epoch", "time", **logs, peak memory}` per log event, flushed at once so a crash loses
    nothing. The last step is always logged, so the final record covers the whole run."""

    def __init__(self, path: Path):
        self.path = path

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time(), 3), **logs}
        record.update(peak_memory())
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def peak_memory() -> dict:
    """Peak resident memory of this process and, on CUDA, peak memory allocated by torch (MiB); no device sync."""
    import torch

    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    peaks = {"peak_rss_mib": round(rss, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peaks
