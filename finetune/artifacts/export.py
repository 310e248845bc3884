"""`finetune export RUN_DIR --format adapter`: a clean folder of what a run trained, ready to share.

An adapter export holds exactly the PEFT adapter (config + safetensors), the tokenizer, our model card
and the resolved recipe: no base weights, no optimizer state, no checkpoints, so what is shared is
what `PeftModel.from_pretrained` needs and nothing that could leak or weigh. A full fine-tuning run has
no adapter: its export is the whole model (model/ of the run) with the same card and recipe, and the
export says so.

The folder is written under a temporary name beside the target and renamed into place, so a failed
export never leaves half a folder, and an existing folder is replaced only with `overwrite`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from finetune.errors import FinetuneError, InputError
from finetune.model.methods import method_of
from finetune.recipe.schema import ModelSpec, Recipe
from finetune.run_folder import RunDir, claim_folder, read_trained_recipe, write_folder

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MODEL_FILES = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# What an adapter export must never hold: base (or merged) weights and pickled files.
WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index.json", "*.bin", "*.pt", "*.pth", "*.gguf", "*.ckpt")


@dataclass(frozen=True)
class Export:
    """A written export: where it is, the files in it, and whether it is a whole model (full fine-tuning)."""

    path: Path
    files: list[str]
    whole_model: bool


def export_adapter(
    run_path: str | Path, out: str | Path | None = None, *, overwrite: bool = False, force_unlock: bool = False
) -> Export:
    """Write the run's adapter (or, for full fine-tuning, its whole model) as a clean, loadable folder.

    Args:
        run_path: a finished run folder.
        out: the folder to write; default RUN_DIR/export/adapter (RUN_DIR/export/model for full fine-tuning).
        overwrite: replace a non-empty `out`.
        force_unlock: take over a claim on `out` left by a process on another host (finetune/lock.py).

    Raises:
        InputError: not a finished run folder, or `out` is not empty and `overwrite` is off, or another
            command has claimed `out`.
    """
    from finetune.lock import claim

    run = Path(run_path)
    recipe = read_trained_recipe(run)
    whole_model = recipe.adapter.kind == "none"
    target = Path(out) if out is not None else run / "export" / ("model" if whole_model else "adapter")
    with claim(target, subject="--out", beside=True, force_unlock=force_unlock):
        claim_folder(target, overwrite=overwrite, key="--out", protect=RunDir(run))
        files = write_folder(target, lambda folder: fill_export(run, recipe, folder, served=target.resolve()))
    return Export(target, files, whole_model)


def fill_export(run: Path, recipe: Recipe, folder: Path, *, served: Path | None = None) -> list[str]:
    """Copy the run's artifact, tokenizer, card and recipe into the empty `folder`; returns the file names.

    Args:
        served: where `folder` ends up, which a whole model's card tells vLLM and TGI to serve (None: a hub repo).

    Raises:
        InputError: the run has no finished artifact.
        FinetuneError: the artifact lacks a file that a loadable export needs.
    """
    from finetune.artifacts.card import write_card
    from finetune.progress import progress

    whole_model = recipe.adapter.kind == "none"
    artifact = RunDir(run).path / method_of(recipe.adapter).artifact_folder
    if not artifact.is_dir():
        raise InputError(f"{run}: has no {artifact.name}/; did the run finish?")
    wanted = (MODEL_FILES if whole_model else ADAPTER_FILES) + TOKENIZER_FILES
    copied = [path.name for path in sorted(artifact.iterdir()) if path.is_file() and matches(path.name, wanted)]
    required = ["config.json"] if whole_model else list(ADAPTER_FILES)
    missing = [name for name in required if name not in copied]
    if missing:
        raise FinetuneError(f"{artifact}: {', '.join(missing)} missing; the run's {artifact.name}/ is incomplete")
    # a whole model's weight files take a while to copy; an adapter's few small files copy in an instant
    for name in progress(copied, label="export model: copying files", unit="file", when=whole_model):
        shutil.copyfile(artifact / name, folder / name)  # fresh permissions: peft writes weights owner-only
    if not whole_model:
        point_at_base(folder / "adapter_config.json", recipe.model)
    write_card(run, folder / "README.md", library="transformers" if whole_model else "peft", served=served)
    shutil.copyfile(run / "recipe.yaml", folder / "recipe.yaml")
    return sorted([*copied, "README.md", "recipe.yaml"])


def point_at_base(config_path: Path, model_spec: ModelSpec) -> None:
    """Make base_model_name_or_path the hub id of the base, or its absolute local path."""
    from finetune.artifacts.card import is_hub_id

    config = json.loads(config_path.read_text(encoding="utf-8"))
    if is_hub_id(model_spec.name_or_path):
        config["base_model_name_or_path"] = model_spec.name_or_path
        if model_spec.revision:
            config["revision"] = model_spec.revision
    else:
        # peft saved the absolute path the run loaded; the recipe's path may be relative to another directory
        saved = config.get("base_model_name_or_path")
        if not saved or not Path(saved).is_absolute():
            config["base_model_name_or_path"] = str(Path(model_spec.name_or_path).expanduser().resolve())
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch(name, pattern) for pattern in patterns)
