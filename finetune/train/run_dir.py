"""The run folder: everything needed to understand, resume, merge or export a run, and nothing else.

recipe.yaml        the resolved recipe, every default filled in
environment.json   library versions, Python, platform, device, git commit of finetune
data.json          data report: source hash, rows kept/dropped/truncated, held-out rows, token counts, fingerprint
metrics.jsonl      one JSON object per logging step (train loss, lr, eval loss, ...)
tensorboard/       TensorBoard event files of the same metrics
checkpoints/       Trainer checkpoints (adapter, optimizer, scheduler, RNG states)
adapter/           the final PEFT adapter and the tokenizer (LoRA, prefix, prompt)
model/             the whole fine-tuned model and the tokenizer (adapter.kind: none)
summary.json       status, wall time, first/last losses, parameter counts (and exact match, if scored)
eval.json          Goat exact match per operation x digit lengths (eval.exact_match or finetune eval)
samples.json       a few greedy generations next to their references (eval.samples)
report.html        the run on one page: curves, tables, samples (plots/*.png hold the same figures)
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from finetune.errors import InputError

# The layout of a run folder, recorded in environment.json. A folder written in another layout is refused
# by the commands that read one (eval, resume), rather than misread. Folders without it predate it and
# are read as layout 1.
RUN_FORMAT = 1

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


def is_main_process() -> bool:
    """True in the process that writes the run folder and prints: rank 0 of a launch, or the only process.

    Every process of a launch builds the same data and trains; the others write nothing here.
    """
    return int(os.environ.get("RANK", "0")) == 0


def write_problem(folder: Path) -> str | None:
    """Why nothing can be created in `folder`, or None. Tried for real (a folder made and removed at once):
    permission bits do not stop root, and a read-only or pseudo file system only says so when written."""
    if not os.access(folder, os.W_OK):
        return "not writable"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".finetune-probe-", dir=folder))
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


@dataclass(frozen=True)
class RunDir:
    path: Path

    recipe = property(lambda self: self.path / "recipe.yaml")
    environment = property(lambda self: self.path / "environment.json")
    data = property(lambda self: self.path / "data.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    tensorboard = property(lambda self: self.path / "tensorboard")
    checkpoints = property(lambda self: self.path / "checkpoints")
    adapter = property(lambda self: self.path / "adapter")
    model = property(lambda self: self.path / "model")
    summary = property(lambda self: self.path / "summary.json")
    eval = property(lambda self: self.path / "eval.json")
    samples = property(lambda self: self.path / "samples.json")
    report = property(lambda self: self.path / "report.html")

    def artifact(self, adapter_kind: str) -> Path:
        """Where the trained result lives, as its kind's method says: model/ for full fine-tuning, adapter/ else."""
        from finetune.model.methods import METHODS

        return self.path / METHODS[adapter_kind].artifact_folder

    @classmethod
    def claim(cls, path: str | Path, *, overwrite: bool) -> RunDir:
        """Check, without writing anything, that a run may be written to `path`.

        Raises:
            InputError: the folder holds files and `overwrite` is off, or it cannot be written.
        """
        run = cls(Path(path))
        if not is_main_process():
            # The other processes of a launch may start after the main one began writing (or emptying) the
            # folder, and their own probe would show up in its listing; the launching command and the main
            # process check it, the others only name it.
            return run
        if run.path.exists() and not run.path.is_dir():
            raise InputError(f"output.dir: {run.path} exists and is not a folder")
        if run.path.is_dir() and any(run.path.iterdir()) and not overwrite:
            raise InputError(
                f"output.dir: {run.path} is not empty; pass --overwrite to replace it, or choose another output.dir"
            )
        nearest = run.nearest_existing_folder()
        problem = write_problem(nearest)
        if problem:
            raise InputError(f"output.dir: {run.path} cannot be written ({nearest}: {problem})")
        return run

    def create(self) -> list[str]:
        """Make the (empty) folder, removing a previous run's files; returns what was removed."""
        removed = []
        if not is_main_process():
            return removed
        if self.path.is_dir():
            for child in sorted(self.path.iterdir()):
                removed.append(child.name)
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        return removed

    def nearest_existing_folder(self) -> Path:
        """The run folder, or its closest ancestor that exists yet: where it will be created."""
        return next(p for p in [self.path, *self.path.absolute().parents] if p.exists())

    def check_free_space(self, needed: int) -> None:
        """Raises InputError when the file system of the run folder has less than `needed` bytes free."""
        free = shutil.disk_usage(self.nearest_existing_folder()).free
        if free < needed:
            raise InputError(
                f"output.dir: {self.path} has {_size(free)} free; the run needs about {_size(needed)} for its "
                "checkpoints and final weights. Free some space or choose another output.dir"
            )

    def write_json(self, target: Path, payload: dict) -> None:
        """Write JSON atomically: a reader never sees a half-written file. Only the main process writes."""
        if not is_main_process():
            return
        partial = target.with_name(target.name + ".partial")
        partial.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
        partial.replace(target)

    def write_text(self, target: Path, text: str) -> None:
        if not is_main_process():
            return
        partial = target.with_name(target.name + ".partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(target)


def environment_info(device: str) -> dict:
    """Versions and machine facts that decide whether a run can be reproduced."""
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


def check_run_format(run: RunDir) -> None:
    """Raises InputError when the run folder was written in another layout than this version reads."""
    try:
        found = json.loads(run.environment.read_text(encoding="utf-8")).get("run_format", 1)
    except (OSError, ValueError, AttributeError):
        return  # no environment.json (the run stopped before writing it): nothing says otherwise
    if found != RUN_FORMAT:
        raise InputError(
            f"{run.environment}: run_format {found!r}: the folder was written by an incompatible version of "
            f"finetune (this version reads run_format {RUN_FORMAT})"
        )


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def read_metrics(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl file (none if the run has not logged yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
