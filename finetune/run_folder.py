"""The run folder's one owner: its layout, claiming an output folder, atomic writes, and reading a run back.

Everything a run leaves is here, and every command (run, resume, eval, generate, merge, export, push,
report, runs, compare) reads it through this module:

recipe.yaml        the resolved recipe, every default filled in (batch sizes as numbers)
environment.json   library versions, Python, platform, device, git commit of finetune, run_format, and the
                   hub commits the model and tokenizer were read at (hub_inputs)
data.json          data report: source hash, rows kept/dropped/truncated, token counts, fingerprint, and the
                   hub commit of each data set (hub_inputs)
metrics.jsonl      one JSON object per logging step (train loss, lr, eval loss, ...)
tensorboard/       TensorBoard event files of the same metrics
checkpoints/       Trainer checkpoints (adapter, optimizer, scheduler, RNG states)
adapter/           the final PEFT adapter and the tokenizer (LoRA, prefix, prompt)
model/             the whole fine-tuned model and the tokenizer (adapter.kind: none)
summary.json       status, wall time, first/last losses, parameter counts (and exact match, if scored)
eval.json          Goat exact match per operation x digit lengths (eval.exact_match or finetune eval)
samples.json       a few greedy generations next to their references (eval.samples)
report.html        the run on one page: curves, tables, samples (plots/*.png hold the same figures)
.claim             only while a command writes the folder: which process (finetune/lock.py)

Imports recipe/, lock and errors only, so any package may use it without importing a sibling.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml

from finetune.errors import InputError
from finetune.lock import CLAIM_NAME
from finetune.recipe.load import load_recipe
from finetune.recipe.schema import Recipe

T = TypeVar("T")

# The layout of a run folder, recorded in environment.json. A folder written in another layout is refused
# by the commands that read one (eval, resume, merge, export), rather than misread. Folders without it
# predate it and are read as layout 1.
RUN_FORMAT = 1

# What `finetune export --out` may never point into: the run's own results.
OWN_RESULTS = ("adapter", "model", "checkpoints", "merged")


def is_main_process() -> bool:
    """True in the process that writes the run folder and prints: rank 0 of a launch, or the only process.

    Every process of a launch builds the same data and trains; the others write nothing here.
    """
    return int(os.environ.get("RANK", "0")) == 0


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

    @classmethod
    def claim(cls, path: str | Path, *, overwrite: bool) -> RunDir:
        """Check, without writing anything, that a run may be written to `path` (see `claim_folder`).

        Raises:
            InputError: the folder holds files and `overwrite` is off, or it cannot be written.
        """
        run = cls(Path(path))
        if is_main_process():
            # The other processes of a launch may start after the main one began writing (or emptying) the
            # folder, and their own probe would show up in its listing; the launching command and the main
            # process check it, the others only name it.
            claim_folder(run.path, overwrite=overwrite, key="output.dir")
        return run

    def create(self) -> list[str]:
        """Make the (empty) folder, removing a previous run's files (not the claim); returns what was removed."""
        removed = []
        if not is_main_process():
            return removed
        if self.path.is_dir():
            for child in sorted(p for p in self.path.iterdir() if p.name != CLAIM_NAME):
                removed.append(child.name)
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        return removed

    def check_free_space(self, needed: int) -> None:
        """Raises InputError when the file system of the run folder has less than `needed` bytes free."""
        free = shutil.disk_usage(nearest_existing_folder(self.path)).free
        if free < needed:
            raise InputError(
                f"output.dir: {self.path} has {_size(free)} free; the run needs about {_size(needed)} for its "
                "checkpoints and final weights. Free some space or choose another output.dir"
            )

    def write_json(self, target: Path, payload: dict) -> None:
        """Write JSON atomically (see `write_json`). Only the main process writes."""
        if is_main_process():
            write_json(target, payload)

    def write_text(self, target: Path, text: str) -> None:
        """Write text atomically (see `write_text`). Only the main process writes."""
        if is_main_process():
            write_text(target, text)


# --- claiming an output folder ------------------------------------------------------------------------------


def claim_folder(target: Path, *, overwrite: bool, key: str, protect: RunDir | None = None) -> None:
    """Check, without writing anything, that `target` may be filled: the one refusal of every output folder
    (a run's output.dir, `finetune merge --out`, `finetune export --out`). The command holds the folder's
    claim (finetune/lock.py) first, so that no other command fills it between this check and its writes;
    the claim file in a run folder does not count as content.

    Args:
        target: the folder a command will write.
        overwrite: a folder that holds files may be replaced.
        key: how the user named the folder (recipe key or option), to begin the message with.
        protect: a run whose folder and results `target` must not be, nor lie in.

    Raises:
        InputError: `target` is a file, holds files and `overwrite` is off, would overwrite `protect`'s
            results, or cannot be written.
    """
    if protect is not None and _inside_run(target, protect):
        raise InputError(f"{key}: {target} would overwrite the run folder's own files; choose another folder")
    if target.exists() and not target.is_dir():
        raise InputError(f"{key}: {target} exists and is not a folder")
    if target.is_dir() and any(p.name != CLAIM_NAME for p in target.iterdir()) and not overwrite:
        raise InputError(f"{key}: {target} is not empty; pass --overwrite to replace it, or choose another folder")
    nearest = nearest_existing_folder(target)
    problem = write_problem(nearest)
    if problem:
        raise InputError(f"{key}: {target} cannot be written ({nearest}: {problem})")


def _inside_run(target: Path, run: RunDir) -> bool:
    resolved, run_path = target.resolve(), run.path.resolve()
    return _within(run_path, resolved) or any(_within(resolved, run_path / name) for name in OWN_RESULTS)


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def nearest_existing_folder(path: Path) -> Path:
    """`path`, or its closest ancestor that exists yet: where it will be created."""
    return next(p for p in [path, *path.absolute().parents] if p.exists())


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


# --- atomic writes ------------------------------------------------------------------------------------------


def write_atomically(target: Path, fill: Callable[[Path], T], *, partial: Path | None = None) -> T:
    """Write `target` (a file or a folder) so that no reader ever sees half of it; returns what `fill` returns.

    `fill(partial)` writes the whole content at `TARGET.partial`; only then does it take `target`'s place.
    If `fill` fails, the partial content is removed and `target` is as it was. A previous folder at
    `target` is removed only after the new one is complete. `partial` names another place to write first,
    beside `target`, where several processes may write the same target at once.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = partial or target.with_name(target.name + ".partial")
    _remove(partial)
    try:
        result = fill(partial)
    except BaseException:
        _remove(partial)
        raise
    if partial.is_dir() and target.exists():
        old = target.with_name(target.name + ".old")
        _remove(old)
        target.rename(old)
        partial.rename(target)
        _remove(old)
    else:
        partial.replace(target)
    return result


def write_folder(target: Path, fill: Callable[[Path], T]) -> T:
    """`write_atomically` for a folder: `fill` receives the empty folder to fill."""

    def make_and_fill(partial: Path) -> T:
        partial.mkdir()
        return fill(partial)

    return write_atomically(target, make_and_fill)


def write_text(target: Path, text: str) -> None:
    write_atomically(target, lambda partial: partial.write_text(text, encoding="utf-8"))


def write_json(target: Path, payload: dict) -> None:
    write_text(target, json.dumps(payload, indent=2, default=str) + "\n")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# --- reading a run back -------------------------------------------------------------------------------------


def open_run(path: str | Path) -> RunDir:
    """The run folder at `path`.

    Raises:
        InputError: `path` has no recipe.yaml.
    """
    run = RunDir(Path(path))
    if not run.recipe.is_file():
        raise InputError(f"{run.path}: not a run folder (no recipe.yaml)")
    return run


def read_recipe(path: str | Path, overrides: list[str] = (), *, check_files: bool = False) -> Recipe:
    """The resolved recipe a run folder was trained with, with `output.dir` set to where the folder is now.

    Args:
        path: the run folder.
        overrides: `key=value` changes, as on the command line (a resumed run may change a few keys).
        check_files: require the files it names to exist. Off for reading a finished run: the run is a record,
            and its relative paths were relative to the directory it was trained from.

    Raises:
        InputError: not a run folder, or one written by an incompatible version.
        RecipeError: the stored recipe (with the overrides) is not valid.
    """
    run = open_run(path)
    check_run_format(run)
    return load_recipe(run.recipe, [*overrides, f"output.dir={json.dumps(str(run.path))}"], check_files=check_files)


def read_trained_recipe(path: str | Path) -> Recipe:
    """`read_recipe` of a finished run, its hub base model and hub tokenizer pinned to the commits the run
    trained on (environment.json's hub_inputs): merge, export, eval and generate then load the weights the
    adapter was trained against even after the recipe's branches moved. A local base or tokenizer, or a run
    without the record: as stored.

    Raises:
        InputError: not a run folder, or one written by an incompatible version.
        RecipeError: the stored recipe is not valid.
    """
    recipe = read_recipe(path)
    read = read_json(open_run(path).environment).get("hub_inputs", {})
    model, pins = recipe.model, {}
    if read.get("model", {}).get("repo_id") == model.name_or_path:
        pins["revision"] = read["model"]["commit"]
    separate_tokenizer = model.tokenizer not in (None, model.name_or_path)
    if separate_tokenizer and read.get("tokenizer", {}).get("repo_id") == model.tokenizer:
        pins["tokenizer_revision"] = read["tokenizer"]["commit"]
    elif separate_tokenizer and "revision" in pins:
        pins["tokenizer_revision"] = model.tokenizer_revision or model.revision  # what it read: not the pin
    return recipe.model_copy(update={"model": model.model_copy(update=pins)}) if pins else recipe


def read_recipe_mapping(path: str | Path) -> dict:
    """The stored recipe as plain YAML, not validated: for listings, which must not fail on an old run whose
    data or base model has since moved."""
    return yaml.safe_load(open_run(path).recipe.read_text(encoding="utf-8")) or {}


def check_run_format(run: RunDir) -> None:
    """Raises InputError when the run folder was written in another layout than this version reads."""
    found = read_json(run.environment).get("run_format", 1)
    if found != RUN_FORMAT:
        raise InputError(
            f"{run.environment}: run_format {found!r}: the folder was written by an incompatible version of "
            f"finetune (this version reads run_format {RUN_FORMAT})"
        )


def read_json(path: Path) -> dict:
    """A JSON object of the run folder; {} when it is missing or unreadable (the run stopped before it)."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def read_summary(run: RunDir) -> dict:
    """summary.json; {} for a run that stopped before writing one."""
    return read_json(run.summary)


def read_metrics(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl file (none if the run has not logged yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass(frozen=True)
class RunRecord:
    """A run folder read back whole, as `finetune runs`, `compare`, `report` and model cards show it."""

    path: Path
    recipe: dict
    summary: dict
    metrics: list[dict]
    exact_match: float | None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def status(self) -> str:
        """finished / failed / interrupted from summary.json; a folder without one stopped before writing it."""
        return self.summary.get("status", "interrupted")

    @property
    def base(self) -> str:
        return str((self.recipe.get("model") or {}).get("name_or_path", "?"))

    @property
    def steps(self) -> int | None:
        if "steps" in self.summary:
            return self.summary["steps"]
        return max((r["step"] for r in self.metrics), default=None)

    def last(self, key: str) -> float | None:
        return next((r[key] for r in reversed(self.metrics) if key in r), None)


def read_run(path: str | Path) -> RunRecord:
    """What a run folder holds, for listings, reports and cards. Its recipe is plain YAML, not validated: a
    listing must not fail on an old run whose data or base model has since moved.

    Raises:
        InputError: `path` is not a run folder.
    """
    run = open_run(path)
    return RunRecord(
        path=run.path,
        recipe=read_recipe_mapping(run.path),
        summary=read_summary(run),
        metrics=read_metrics(run.metrics),
        exact_match=read_json(run.eval).get("accuracy"),
    )


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
