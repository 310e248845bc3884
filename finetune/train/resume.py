"""`finetune run ... --resume`: may this run folder be continued with this recipe, and from where.

The Trainer restores the adapter (or model), optimizer, scheduler, RNG states and data position from the
checkpoint (`resume_from_checkpoint`); this module decides whether resuming is sound and tidies the
folder so that it reads as one run: metrics.jsonl and samples.jsonl keep only records up to the checkpoint's
step (the steps after it are trained again), and checkpoints that never completed are removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from finetune.errors import InputError
from finetune.recipe.schema import Recipe
from finetune.run_folder import RunDir, check_run_format, read_json, read_recipe, read_summary, write_text
from finetune.train.checkpoints import Checkpoints, scan_checkpoints

# Keys that do not change what is trained: they may differ between the run folder's recipe and the
# recipe of the resumed run. Every other key must be equal.
KEYS_FREE_ON_RESUME = (
    "output.dir",
    "output.report",
    "output.trackers",
    "train.save_total_limit",
    "data.cache",
    "eval.",
)


def resume_hint(run_dir: Path) -> str:
    return f"finetune run {run_dir} --resume"


def find_resume_point(run_dir: RunDir, recipe: Recipe) -> Checkpoints:
    """The checkpoints of a run folder that `recipe` may continue.

    Raises:
        InputError: not a run folder, another version's folder, a finished run, a recipe that differs in
            keys that change training, or no complete checkpoint.
    """
    if not run_dir.recipe.is_file():
        raise InputError(f"{run_dir.path}: not a run folder (no recipe.yaml); nothing to resume")
    check_run_format(run_dir)
    if read_summary(run_dir).get("status") == "finished":
        raise InputError(f"{run_dir.path}: the run has finished; there is nothing to resume")
    stored = read_recipe(run_dir.path, check_files=True)
    differing = changed_keys(stored.model_dump(mode="json"), recipe.model_dump(mode="json"))
    if differing:
        raise InputError(
            f"--resume: the recipe differs from {run_dir.recipe} in {', '.join(differing)}; a resumed run must "
            "train as the interrupted one did (start a new run in another output.dir to change them)"
        )
    checkpoints = scan_checkpoints(run_dir.checkpoints)
    if checkpoints.complete is None:
        raise InputError(
            f"{run_dir.path}: no complete checkpoint under {run_dir.checkpoints.name}/ to resume from; "
            "run again with --overwrite to start over"
        )
    return checkpoints


def check_same_data(run_dir: RunDir, fingerprint: str) -> None:
    """The resumed run must see the tokens the interrupted one saw (data.json's fingerprint)."""
    stored = read_json(run_dir.data).get("fingerprint")
    if stored is None:
        return  # no data report to compare with: the run stopped before writing it
    if stored != fingerprint:
        raise InputError(
            f"--resume: the training data differ from the interrupted run's (data.json fingerprint {stored}, "
            f"now {fingerprint}); a resumed run must train on the same samples"
        )


def check_same_hub_inputs(run_dir: RunDir, model_inputs: dict, data_inputs: list[dict]) -> None:
    """The resumed run must read the hub commits the interrupted one read (environment.json, data.json).

    Raises:
        InputError: naming each input whose branch or tag now points at another commit.
    """
    stored_model = read_json(run_dir.environment).get("hub_inputs", {})
    stored_data = read_json(run_dir.data).get("hub_inputs", [])
    moved = [
        _moved(role, stored_model[role], now)
        for role, now in model_inputs.items()
        if role in stored_model and stored_model[role]["commit"] != now["commit"]
    ]
    moved += [
        _moved("dataset", before, now)
        for before, now in zip(stored_data, data_inputs, strict=False)
        if before["commit"] != now["commit"]
    ]
    if moved:
        raise InputError(
            f"--resume: hub inputs moved since the interrupted run: {'; '.join(moved)}; a resumed run must train "
            "on what the interrupted one read (start a new run in another output.dir)"
        )


def _moved(role: str, before: dict, now: dict) -> str:
    revision = f" ({now['revision']})" if now.get("revision") else ""
    return f"{role} {now['repo_id']}{revision} was at commit {before['commit']}, now {now['commit']}"


def prepare_for_resume(run_dir: RunDir, checkpoints: Checkpoints, echo) -> None:
    """Drop what the steps after the checkpoint left behind: their metrics and any unfinished checkpoint."""
    for folder in checkpoints.incomplete:
        echo(f"resume: ignoring {folder.name} (incomplete: the run stopped while saving it); removed")
        shutil.rmtree(folder)
    dropped = truncate_metrics(run_dir.metrics, checkpoints.step)
    if dropped:
        echo(f"resume: {dropped} metrics record(s) after step {checkpoints.step} dropped; those steps run again")
    dropped = truncate_metrics(run_dir.sample_steps, checkpoints.step)
    if dropped:
        echo(f"resume: {dropped} samples.jsonl record(s) after step {checkpoints.step} dropped")


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the records of steps up to `step` in a JSON-lines file of step records (metrics.jsonl, samples.jsonl);
    returns how many were dropped."""
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
    write_text(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def changed_keys(stored: dict, given: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe dumps, less KEYS_FREE_ON_RESUME."""
    changed = []
    for key in sorted(set(stored) | set(given)):
        dotted = prefix + key
        a, b = stored.get(key), given.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_keys(a, b, dotted + ".")
        elif a != b and not dotted.startswith(KEYS_FREE_ON_RESUME):
            changed.append(dotted)
    return changed
