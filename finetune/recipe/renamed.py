"""Recipe keys that older versions wrote and this one spells differently.

A run folder's recipe.yaml is a record: it is read in the new spelling, so that eval, merge, export and
--resume keep working on folders written before the change. A recipe the user edits (a file or an override)
is refused instead, in one line saying what to write: two spellings of one setting would both have to be
documented, and could disagree.
"""

from __future__ import annotations

from finetune.recipe.checks import KeyProblem

# output.tensorboard: true/false became a list of trackers, of which tensorboard is one.
OLD_TENSORBOARD = ("output", "tensorboard")


def upgrade_record(raw: dict) -> None:
    """Rewrite, in place, the old keys of a run folder's stored recipe into their current form."""
    output = raw.get("output")
    if not isinstance(output, dict) or "tensorboard" not in output:
        return
    enabled = output.pop("tensorboard")
    output.setdefault("trackers", ["tensorboard"] if enabled else [])


def refuse_old_keys(raw: dict) -> list[KeyProblem]:
    """Take the old keys out of a recipe the user wrote, with one problem for each saying what replaces it
    (and no second one calling it unknown)."""
    output = raw.get("output")
    if not isinstance(output, dict) or "tensorboard" not in output:
        return []
    replacement = "[tensorboard]" if output.pop("tensorboard") is not False else "[]"
    return [
        KeyProblem(
            OLD_TENSORBOARD,
            "replaced by output.trackers, a list",
            f"use output.trackers: {replacement} instead (the list may also name wandb and mlflow)",
        )
    ]
