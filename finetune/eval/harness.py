"""Benchmark tasks of lm-evaluation-harness on a finished run: `finetune eval RUN_DIR --tasks NAME[,NAME...]`.

The model is the one the run produced, loaded as `finetune generate` loads it (the adapter on its base at the
recorded hub commit, or RUN_DIR/merged with `--model merged`), and handed to lm_eval's HFLM as an object:
lm_eval never loads weights of its own. Tasks are lm_eval's own or the task YAML files of `--include-path`;
they are built (datasets read) before the model loads, so a wrong name or an unreadable dataset fails fast.

Chat template: `auto` applies the chat template saved with the run's tokenizer to every request when each
data source of the run trained through one (lima, sharegpt), as `finetune generate` prompts such runs; runs
trained on a plain-text template (alpaca, goat) see the task's text as it is, as lm_eval scores base models.

Each task's metrics go into eval.json's `tasks`, next to Goat exact match (written under the folder's claim).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import InputError
from finetune.recipe.schema import Recipe
from finetune.run_folder import RunDir, read_json, read_trained_recipe

MISSING = "finetune eval --tasks needs lm-evaluation-harness: pip install 'finetune[lm-eval]'"


@dataclass(frozen=True)
class TaskRequest:
    """What `finetune eval --tasks` evaluates, and how."""

    tasks: tuple[str, ...]
    include_path: Path | None = None
    limit: int | None = None  # rows per task; None: all
    batch_size: int = 32
    model: str = "adapter"  # adapter: the run's adapter on its base; merged: RUN_DIR/merged
    chat_template: str = "auto"

    def check(self) -> None:
        """Raises InputError naming the first option that cannot be used."""
        if not self.tasks or not all(self.tasks):
            raise InputError("--tasks: give task names separated by commas, e.g. --tasks arc_easy,my_task")
        if self.include_path is not None and not self.include_path.is_dir():
            raise InputError(f"--include-path: {self.include_path}: no such folder")
        if self.limit is not None and self.limit <= 0:
            raise InputError(f"--limit: must be greater than 0 (got {self.limit})")
        if self.batch_size <= 0:
            raise InputError(f"--batch-size: must be greater than 0 (got {self.batch_size})")


def evaluate_tasks(run_path: str | Path, request: TaskRequest, *, force_unlock: bool = False) -> dict[str, dict]:
    """Run lm_eval `request.tasks` on a finished run's model; their entries are added to eval.json's `tasks`.

    Returns:
        {task or group name: entry} as written (see `task_entries`).

    Raises:
        InputError: lm_eval is not installed, a bad option or task, not a run folder, no such model in it,
            or the folder is claimed by another command.
    """
    from finetune.eval.generate import load_folder, load_trained
    from finetune.lock import claim
    from finetune.model.load import pick_device
    from finetune.quiet import quiet_libraries

    version = lm_eval_version()
    request.check()
    run_dir = RunDir(Path(run_path))
    recipe = read_trained_recipe(run_dir.path)
    merged = run_dir.path / "merged"
    if request.model == "merged" and not (merged / "config.json").is_file():
        raise InputError(
            f"{run_dir.path}: has no merged model (merged/config.json); write it with `finetune merge "
            f"{run_dir.path}` first, or evaluate the adapter with --model adapter"
        )
    with quiet_lm_eval():
        manager, tasks = load_tasks(request.tasks, request.include_path)
    with claim(run_dir.path, subject=None, force_unlock=force_unlock), quiet_libraries(), quiet_lm_eval():
        device = pick_device(recipe.train.use_cpu)
        if request.model == "merged":
            model, tokenizer = load_folder(merged, recipe, device=device)
        else:
            model, tokenizer = load_trained(run_dir.path, recipe, device=device)
        chat = applies_chat_template(request.chat_template, recipe, tokenizer)
        results = run_tasks(model, tokenizer, manager, tasks, request, chat=chat)
        entries = task_entries(results, request, chat=chat, version=version)
        previous = read_json(run_dir.eval)
        run_dir.write_json(run_dir.eval, previous | {"tasks": previous.get("tasks", {}) | entries})
    return entries


def lm_eval_version() -> str:
    """The installed lm_eval's version. Raises InputError naming the extra to install when it is missing."""
    from importlib import metadata

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise InputError(MISSING) from None
    return metadata.version("lm_eval")


@contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm_eval's own log lines (its advice on passing a model object, default aggregations) say nothing a user
    of this command can act on; its errors still show."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_tasks(names: tuple[str, ...], include_path: Path | None):
    """(lm_eval TaskManager, the named tasks and groups, built with their datasets).

    Scanning lm_eval's own catalogue (some 15,000 task files) takes seconds, so tasks that the include path
    defines are looked up there alone; anything else (a group or tag may name catalogue tasks) uses both.

    Raises:
        InputError: a name neither defines, or a task that cannot be built (its dataset unreadable).
    """
    from lm_eval.tasks import TaskManager

    folder = str(include_path.resolve()) if include_path is not None else None  # config_source names it whole
    if folder is not None:
        local = TaskManager(include_path=folder, include_defaults=False)
        if all(name in local.all_subtasks for name in names):
            return local, build_tasks(local, names)
    manager = TaskManager(include_path=folder)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise InputError(unknown_tasks_message(unknown, manager.all_tasks, include_path))
    return manager, build_tasks(manager, names)


def unknown_tasks_message(unknown: list[str], known: list[str], include_path: Path | None) -> str:
    import difflib

    where = f"lm_eval's catalogue or {include_path}" if include_path is not None else "lm_eval's catalogue"
    close = [match for name in unknown for match in difflib.get_close_matches(name, known, n=1)]
    suggestion = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    return (
        f"--tasks: no task named {', '.join(map(repr, unknown))} in {where}{suggestion}; `lm-eval ls tasks` lists "
        "the catalogue's names, and --include-path DIR adds the task YAML files of a folder"
    )


def build_tasks(manager, names: tuple[str, ...]) -> list:
    """The Task or Group object of each name (a tag: its tasks), datasets read.

    Raises:
        InputError: naming the task's YAML file and what went wrong.
    """
    built = []
    for name in names:
        try:
            loaded = manager.load([name])
        except Exception as e:  # lm_eval and datasets raise many kinds; the first line says what
            source = getattr(manager.task_index.get(name), "yaml_path", None)
            detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise InputError(
                f"{source or '--tasks'}: task {name!r} cannot be built: {type(e).__name__}: {detail}"
            ) from e
        built += [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
    return built


def applies_chat_template(choice: str, recipe: Recipe, tokenizer) -> bool:
    """Whether requests go through the tokenizer's chat template (see the module doc for `auto`).

    Raises:
        InputError: `on` for a tokenizer without a chat template.
    """
    from finetune.data.formats import CHAT, prompt_format

    if choice == "auto":
        has_template = bool(getattr(tokenizer, "chat_template", None))
        return has_template and all(prompt_format(name) == CHAT for name in recipe.data.formats)
    if choice == "on" and not getattr(tokenizer, "chat_template", None):
        raise InputError("--chat-template on: the model's tokenizer has no chat template")
    return choice == "on"


def run_tasks(model, tokenizer, manager, tasks: list, request: TaskRequest, *, chat: bool) -> dict:
    """lm_eval's results dict for `tasks` on the loaded model (per-row samples are not kept).

    Set up as `lm_eval.simple_evaluate` sets up a run (its seeds; 0-shot unless a task's config says
    otherwise), without what it adds around: the git commit of the current folder (git complains on the
    terminal outside a repository) and a system survey that runs pip and nvidia-smi.
    """
    import random

    import numpy as np
    import torch
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)
    loaded = manager.load(tasks)  # the built objects are taken as they are
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=request.batch_size)
    return evaluate(
        lm=lm,
        task_dict=loaded,
        limit=request.limit,
        log_samples=False,
        apply_chat_template=chat,
        fewshot_as_multiturn=chat,
    )


def task_entries(results: dict, request: TaskRequest, *, chat: bool, version: str) -> dict[str, dict]:
    """eval.json's entry of each task and group lm_eval scored.

    An entry: `metrics` and `stderr` by metric name (`acc`; `acc,FILTER` for a filter other than none;
    stderr null where lm_eval computed none), `samples` scored and `samples_total`, `num_fewshot`, the task
    config's `config_source` and `config_sha256` (of the config as lm_eval ran it), and how it was run.
    """
    entries = {}
    for name, scores in results["results"].items():
        metrics, stderr = {}, {}
        for key, value in scores.items():
            if "," not in key:  # alias, name, sample_len
                continue
            metric, filter_name = key.split(",", 1)
            base = metric.removesuffix("_stderr")
            label = base if filter_name == "none" else f"{base},{filter_name}"
            if metric.endswith("_stderr"):
                stderr[label] = value if isinstance(value, int | float) else None
            else:
                metrics[label] = value
        counts = results.get("n-samples", {}).get(name, {})
        config = results.get("configs", {}).get(name)
        entries[name] = {
            "metrics": metrics,
            "stderr": {label: stderr.get(label) for label in metrics},
            "samples": counts.get("effective"),
            "samples_total": counts.get("original"),
            "num_fewshot": results.get("n-shot", {}).get(name),
            "version": results.get("versions", {}).get(name),
            "config_source": (config or {}).get("metadata", {}).get("config_source"),
            "config_sha256": config_hash(config) if config is not None else None,
            "model": request.model,
            "chat_template": chat,
            "limit": request.limit,
            "lm_eval": version,
        }
    return entries


def config_hash(config: dict) -> str:
    """sha256 of a task config as lm_eval ran it: a change of prompt, split or metric changes it."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def format_task_table(entries: dict[str, dict]) -> str:
    """One line per task and metric: value and standard error (4 significant digits), samples scored."""
    rows = [("task", "metric", "value", "stderr", "samples")]
    for name, entry in entries.items():
        for metric, value in entry["metrics"].items():
            stderr = entry["stderr"].get(metric)
            samples = entry["samples"]
            rows.append(
                (
                    name,
                    metric,
                    f"{value:.4g}" if isinstance(value, int | float) else str(value),
                    f"{stderr:.4g}" if stderr is not None else "-",
                    str(samples) if samples is not None else "-",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)
