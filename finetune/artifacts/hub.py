"""`finetune push RUN_DIR --repo-id NAME`: upload a run's adapter (or merged model, or GGUF file) to a hub.

What is uploaded is built first, in a temporary folder, and uploaded with an allow list of exactly
its files: the adapter export (`finetune.artifacts.export`) by default, RUN_DIR/merged with our card
and the recipe, or with `gguf` the run's exported GGUF files with a card saying how llama.cpp runs
them. The card is ours (`PeftModel.push_to_hub` would replace it with a generic one). An adapter push
refuses base-weight files outright (a GGUF file is a whole model too), so a base model is never
published by accident. huggingface_hub sends weights by the LFS protocol and skips files the branch
already holds unchanged, so pushing the same run twice uploads nothing the second time.

The endpoint is HF_ENDPOINT (read when the command runs); the token is HF_TOKEN or the saved login
(huggingface_hub's `get_token`). The token is passed to `HfApi` only: never printed, logged or written.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune.artifacts.export import WEIGHT_FILES, fill_export, matches
from finetune.errors import FinetuneError, InputError
from finetune.recipe.schema import Recipe

Echo = Callable[[str], None]
REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class Upload:
    """What a push sends: a folder, the files in it with their sizes, and what they are."""

    folder: Path
    files: list[tuple[str, int]]
    what: str  # "adapter", "whole model" (full fine-tuning) or "merged model"


def push(
    run_path: str | Path,
    repo_id: str,
    *,
    merged: bool = False,
    gguf: bool = False,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    echo: Echo = print,
) -> str | None:
    """Upload the run's adapter export (with `merged`, RUN_DIR/merged; with `gguf`, its GGUF files) to `repo_id`.

    Args:
        run_path: a finished run folder.
        repo_id: `namespace/name` (or `name`, in the token's own namespace); created if missing.
        merged: upload RUN_DIR/merged (written by `finetune merge`) instead of the adapter.
        gguf: upload RUN_DIR/model-*.gguf (written by `finetune export --format gguf`) instead of the adapter.
        private: create the repo private (an existing repo keeps its visibility).
        revision: the branch to commit to, created from the default branch if missing; default main.
        dry_run: list the files and sizes, and upload nothing (no token needed).

    Returns:
        The commit URL, or None for a dry run.

    Raises:
        InputError: bad repo id, not a finished run, no merged/ folder or GGUF file, or no token.
        FinetuneError: the hub refused the upload, or base weights would be uploaded with an adapter.
    """
    from finetune.run_folder import read_trained_recipe

    run = Path(run_path)
    if not REPO_ID.match(repo_id):
        raise InputError(f"--repo-id: {repo_id!r} is not a repo id (namespace/name)")
    recipe = read_trained_recipe(run)
    token = None if dry_run else require_token()
    with tempfile.TemporaryDirectory(prefix="finetune-push-") as staging:
        upload = stage(run, recipe, Path(staging) / "upload", merged=merged, gguf=gguf)
        echo(f"{upload.what} of {run} -> {repo_id} (branch {revision or 'main'}):")
        for line in format_files(upload.files):
            echo(line)
        left_out = [path.name for path in gguf_files(run)] if not gguf else []
        if left_out:
            echo(
                f"not uploaded: {', '.join(left_out)}: a GGUF file is a whole model, pushed on its own with "
                f"`finetune push {run} --repo-id NAME --gguf`"
            )
        if dry_run:
            echo("dry run: nothing uploaded")
            return None
        url = send(upload, repo_id, token=token, private=private, revision=revision, run_name=run.name)
    echo(f"pushed: {url}")
    return url


def require_token() -> str:
    """The token huggingface_hub would use (HF_TOKEN, else the saved login).

    Raises:
        InputError: there is none, saying how to log in.
    """
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise InputError(
            "no Hugging Face token: set HF_TOKEN to a write token, or log in once with `hf auth login` "
            "(--dry-run needs none)"
        )
    return token


def stage(run: Path, recipe: Recipe, folder: Path, *, merged: bool, gguf: bool = False) -> Upload:
    """Build what the push uploads in `folder` (created here).

    Raises:
        InputError: `merged` without RUN_DIR/merged, or with a full fine-tuning run; `gguf` without a GGUF file.
        FinetuneError: base weights in an adapter upload.
    """
    folder.mkdir(parents=True)
    if gguf:
        stage_gguf(run, folder)
        what = "GGUF model"
    elif not merged:
        fill_export(run, recipe, folder)
        what = "whole model (full fine-tuning)" if recipe.adapter.kind == "none" else "adapter"
        if what == "adapter":
            refuse_base_weights(folder)
    else:
        stage_merged(run, recipe, folder)
        what = "merged model"
    files = sorted((path.name, path.stat().st_size) for path in folder.iterdir() if path.is_file())
    return Upload(folder, files, what)


def stage_merged(run: Path, recipe: Recipe, folder: Path) -> None:
    """RUN_DIR/merged's files (linked, not copied, where the file system allows), our card and the recipe."""
    from finetune.artifacts.card import write_card

    if recipe.adapter.kind == "none":
        raise InputError(
            f"--merged: {run} is a full fine-tuning run, so there is nothing to merge; push without --merged "
            "to upload its whole model"
        )
    source = run / "merged"
    if not (source / "config.json").is_file():
        raise InputError(f"{run}: has no merged model (merged/config.json); run `finetune merge {run}` first")
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name not in ("README.md", "recipe.yaml"):
            link_or_copy(path, folder / path.name)
    write_card(run, folder / "README.md", library="transformers")
    shutil.copyfile(run / "recipe.yaml", folder / "recipe.yaml")


def stage_gguf(run: Path, folder: Path) -> None:
    """The run's GGUF files (RUN_DIR/*.gguf), a card saying how llama.cpp runs them, and the recipe.

    Raises:
        InputError: the run folder holds no GGUF file.
    """
    from finetune.artifacts.card import write_card

    files = gguf_files(run)
    if not files:
        raise InputError(f"{run}: has no GGUF file (model-TYPE.gguf); run `finetune export {run} --format gguf` first")
    for path in files:
        link_or_copy(path, folder / path.name)
    write_card(run, folder / "README.md", library="gguf", files=[path.name for path in files])
    shutil.copyfile(run / "recipe.yaml", folder / "recipe.yaml")


def gguf_files(run: Path) -> list[Path]:
    return sorted(path for path in run.glob("*.gguf") if path.is_file())


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows (weights are large), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def refuse_base_weights(folder: Path) -> None:
    """Raises FinetuneError when an adapter upload holds model weights or pickled files."""
    found = sorted(path.name for path in folder.iterdir() if matches(path.name, WEIGHT_FILES))
    if found:
        raise FinetuneError(f"refusing to upload model weights with an adapter: {', '.join(found)}")


def format_files(files: list[tuple[str, int]]) -> list[str]:
    width = max(len(name) for name, _ in files)
    lines = [f"  {name:<{width}}  {human_size(size):>9}" for name, size in files]
    return [*lines, f"{len(files)} files, {human_size(sum(size for _, size in files))}"]


def human_size(size: int) -> str:
    """
    >>> human_size(999), human_size(134_608), human_size(13_476_839_424)
    ('999 B', '134.6 kB', '13.48 GB')
    """
    if size < 1000:
        return f"{size} B"
    if size < 1e6:
        return f"{size / 1e3:.1f} kB"
    if size < 1e9:
        return f"{size / 1e6:.2f} MB"
    return f"{size / 1e9:.2f} GB"


def send(upload: Upload, repo_id: str, *, token: str, private: bool, revision: str | None, run_name: str) -> str:
    """Create the repo (and branch) if missing and commit exactly the staged files; returns the commit URL.

    Raises:
        FinetuneError: the hub answered with an error or could not be reached (the token never in it).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from finetune.quiet import hub_bars_where_progress_shows

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with hub_bars_where_progress_shows():  # the upload's own bars, per file
            commit = api.upload_folder(
                folder_path=upload.folder,
                repo_id=repo_id,
                revision=revision,
                allow_patterns=[glob.escape(name) for name, _ in upload.files],
                commit_message=f"Upload the {upload.what} of run {run_name} (finetune)",
            )
    except (HfHubHTTPError, OSError, ValueError, *transport_errors()) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FinetuneError(f"push to {repo_id} at {api.endpoint} failed: {message.replace(token, '***')}") from None
    return commit.commit_url


def transport_errors() -> tuple[type[Exception], ...]:
    """The base error of huggingface_hub's HTTP client (httpx2 in huggingface_hub 2, httpx in 1)."""
    import importlib

    errors = []
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except ImportError:
            continue
    return tuple(errors)
