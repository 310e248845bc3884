"""Checkpoints that are complete or ignored, Ctrl-C that saves, and the newest checkpoint to resume from.

The Trainer writes `checkpoints/checkpoint-N/` in place (weights, then optimizer and scheduler, RNG
states, trainer_state.json last), so a process killed during a save leaves a folder that looks like
any other. A checkpoint is *complete* when it holds `finetune-complete.json`, which
`CompleteCheckpointCallback` writes in `on_save`, after the Trainer has written every file, and whose
trainer_state.json parses. Resume uses the newest complete checkpoint and ignores the others.
The callbacks live in `train/callbacks.py`; this module imports nothing heavy, so checking a run folder
before the model loads stays quick.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

COMPLETE_MARKER = "finetune-complete.json"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


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
