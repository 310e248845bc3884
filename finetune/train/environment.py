"""environment.json: the versions and machine facts that decide whether a run can be reproduced."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from finetune.run_folder import RUN_FORMAT

TRACKED_PACKAGES = (
    "finetune",
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "bitsandbytes",
    "datasets",
    "tokenizers",
    "safetensors",
    "pydantic",
)


def environment_info(device: str) -> dict:
    """Versions and machine facts that decide whether a run can be reproduced, and the run folder's layout."""
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info = {
        "run_format": RUN_FORMAT,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "device": device,
        "cpu_count": os.cpu_count(),
        "finetune_git_commit": _git_commit(Path(__file__).resolve().parent),
        "command": sys.argv,
    }
    if device == "cuda":
        import torch

        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None
