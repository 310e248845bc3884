"""recipe -> data -> model -> adapter -> train -> run folder.

Everything that can fail on bad input (recipe, output folder, tokenizer, data rows, model folder)
fails before the run folder is touched, so a failed command never changes an earlier run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune.recipe.load import recipe_to_yaml
from finetune.recipe.schema import Recipe

Echo = Callable[[str], None]


@dataclass(frozen=True)
class RunResult:
    path: Path
    summary: dict
    model: object  # the trained model, still in memory


def run(recipe: Recipe, *, overwrite: bool = False, resume: bool = False, echo: Echo = print) -> RunResult:
    """Train the recipe and write its run folder, or continue it from its newest complete checkpoint.

    Raises:
        InputError: bad output folder, tokenizer, data or model, or a run folder that this recipe cannot
            resume (nothing written yet).
        Interrupted: Ctrl-C; a checkpoint was saved first.
    """
    from transformers import set_seed

    from finetune.model.adapters import count_parameters, wrap_adapter
    from finetune.model.load import fetch_model, fetch_tokenizer, load_model, pick_device, resolve_source
    from finetune.train.batch import size_batches
    from finetune.train.callbacks import StopOnSignalCallback
    from finetune.train.checkpoints import estimate_checkpoint_bytes
    from finetune.train.launch import check_trainer_distribution, close_process_group
    from finetune.train.resume import check_same_data, check_same_hub_inputs, find_resume_point
    from finetune.train.run_dir import RunDir, is_main_process
    from finetune.train.trainer import build_trainer, mixed_precision

    started = time.time()
    if not is_main_process():  # every process trains; one prints and writes the run folder
        echo = lambda _: None  # noqa: E731
    if resume:
        run_dir = RunDir(Path(recipe.output.dir))
        checkpoints = find_resume_point(run_dir, recipe)
    else:
        run_dir, checkpoints = RunDir.claim(recipe.output.dir, overwrite=overwrite), None
    device = pick_device(recipe.train.use_cpu)
    check_fsdp_launch(recipe, mixed_precision(recipe.train, device), device)  # raises now, not after loading
    recipe = size_batches(recipe, device, echo)
    tokenizer_files = fetch_tokenizer(recipe.model)
    tokenizer, data = prepare_data(recipe, tokenizer_files)
    echo_data_report(data.report, echo)
    model_files = fetch_model(recipe.model, tokenizer_files)
    fetched = {"model": model_files, "tokenizer": tokenizer_files}
    hub_inputs = {role: files.record() for role, files in fetched.items() if files is not None}
    if resume:
        check_same_hub_inputs(run_dir, hub_inputs, data.report.hub_inputs)
        check_same_data(run_dir, data.report.fingerprint)
    if data.chat_template is not None:
        tokenizer.chat_template = data.chat_template  # saved with the tokenizer: inference formats alike

    set_seed(recipe.train.seed)
    model = load_model(recipe.model, recipe.quant, device=device, tokenizer=tokenizer, files=model_files)
    model = wrap_adapter(
        model,
        recipe.adapter,
        gradient_checkpointing=recipe.gradient_checkpointing,
        tokenizer_source=resolve_source(recipe.model.tokenizer or recipe.model.name_or_path),
    )
    trainable, total = count_parameters(model)
    echo(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%) on {device}")
    # a new checkpoint is written before the oldest is removed, and the final weights come on top
    run_dir.check_free_space(3 * estimate_checkpoint_bytes(model))

    open_run_folder(run_dir, recipe, data, device, checkpoints, echo, hub_inputs)
    stop = StopOnSignalCallback()
    trainer = build_trainer(model, tokenizer, data.train, data.eval, recipe, run_dir, device=device, callbacks=[stop])
    check_trainer_distribution(trainer)
    train(trainer, run_dir, checkpoints, stop, started)
    artifact = run_dir.artifact(recipe.adapter.kind)
    # Under FSDP each process holds a shard: gather the whole state dict (every process takes part) so the
    # saved adapter is an ordinary PEFT folder that merge and export read as they are.
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if is_main_process():
        guard_writes(
            lambda: save_artifact(model, tokenizer, artifact, state_dict=state_dict),
            run_dir,
            trainer,
            started,
            saving=artifact,
        )

    summary = summarize(trainer.state, artifact, trainable, total, time.time() - started)
    if checkpoints is not None:
        summary["resumed_from"] = checkpoints.complete.name
    run_dir.write_json(run_dir.summary, summary)  # the run is finished even if what follows fails
    finish(model, tokenizer, recipe, data, run_dir, summary, echo)
    close_process_group()
    return RunResult(run_dir.path, summary, model)


def open_run_folder(run_dir, recipe: Recipe, data, device: str, checkpoints, echo: Echo, hub_inputs: dict) -> None:
    """A new run: empty the folder and write recipe, environment and data report. A resumed one: tidy it.

    `hub_inputs`: repo id, revision and commit of the model and tokenizer read from a hub, by role.
    """
    from finetune.train.resume import prepare_for_resume
    from finetune.train.run_dir import environment_info, is_main_process

    if checkpoints is not None:
        echo(f"resume: continuing {run_dir.path} from {checkpoints.complete.name}")
        if is_main_process():
            prepare_for_resume(run_dir, checkpoints, echo)
        return
    removed = run_dir.create()
    if removed:
        echo(f"--overwrite: removed the previous contents of {run_dir.path}: {', '.join(removed)}")
    run_dir.write_text(run_dir.recipe, recipe_to_yaml(recipe))
    run_dir.write_json(run_dir.environment, environment_info(device) | {"hub_inputs": hub_inputs})
    run_dir.write_json(run_dir.data, asdict(data.report))


def train(trainer, run_dir, checkpoints, stop, started: float) -> None:
    """trainer.train(), from the checkpoint when resuming; a stopped run leaves a summary saying why.

    Raises:
        Interrupted: a signal stopped training after a checkpoint was saved.
        FinetuneError: writing into the run folder failed.
    """
    from finetune.errors import FinetuneError, Interrupted
    from finetune.train.resume import resume_hint

    resume_from = str(checkpoints.complete) if checkpoints is not None else None
    stop.install()
    try:
        # with eval data, the Trainer also evaluates (and saves) after the last step
        guard_writes(lambda: trainer.train(resume_from_checkpoint=resume_from), run_dir, trainer, started)
    except FinetuneError:
        raise  # guard_writes has written the summary
    except BaseException as error:
        run_dir.write_json(run_dir.summary, stopped_summary(error, trainer.state, time.time() - started))
        raise
    finally:
        stop.uninstall()
    if stop.received is not None:
        step = trainer.state.global_step
        summary = stopped_summary(KeyboardInterrupt("stopped by a signal"), trainer.state, time.time() - started)
        run_dir.write_json(run_dir.summary, summary)
        raise Interrupted(
            f"interrupted at step {step}: checkpoint saved to {run_dir.checkpoints / f'checkpoint-{step}'}\n"
            f"resume with: {resume_hint(run_dir.path)}"
        )


def guard_writes(write: Callable[[], object], run_dir, trainer, started: float, *, saving: Path | None = None):
    """Run `write`; a failure to write the run folder becomes one message naming what failed and what is intact.

    `trainer.state` is read after the failure: `Trainer.train()` replaces the state object it started with.

    A failure counts as a write failure when it is an OSError, or any error while saving the folder `saving`
    or while the current step's checkpoint is on disk but not complete: torch.save reports a full disk as a
    RuntimeError, safetensors as a SafetensorError. `saving` names the folder `write` writes, if it is known.

    Raises:
        FinetuneError: the failure, explained; summary.json says the run failed.
    """
    import shutil

    from finetune.errors import FinetuneError
    from finetune.train.checkpoints import is_complete, scan_checkpoints
    from finetune.train.resume import resume_hint

    try:
        return write()
    except Exception as error:
        state = trainer.state
        checkpoint = run_dir.checkpoints / f"checkpoint-{state.global_step}"
        if not isinstance(error, OSError) and not saving and not (checkpoint.is_dir() and not is_complete(checkpoint)):
            raise
        target = saving or (checkpoint if checkpoint.is_dir() else run_dir.path)
        run_dir.write_json(run_dir.summary, stopped_summary(error, state, time.time() - started))
        intact = scan_checkpoints(run_dir.checkpoints).complete
        kept = (
            f"the newest complete checkpoint, {intact.name}, is intact; once there is room, resume with: "
            f"{resume_hint(run_dir.path)}"
            if intact
            else "no checkpoint had been completed"
        )
        free = shutil.disk_usage(run_dir.path).free / 2**20
        raise FinetuneError(
            f"writing {target} failed at step {state.global_step} ({type(error).__name__}: "
            f"{_first_line(error)}); {free:.0f} MiB free there; {kept}"
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"


def finish(model, tokenizer, recipe: Recipe, data, run_dir, summary: dict, echo: Echo) -> None:
    """What follows training: sample generations, exact match, report.html."""
    from finetune.train.run_dir import is_main_process

    if recipe.eval.samples:
        write_samples(model, tokenizer, data, run_dir, recipe.eval.samples)
    if recipe.eval.exact_match:
        from finetune.eval.goat import format_table

        scored = score_exact_match(
            model, tokenizer, recipe, run_dir, n=recipe.eval.exact_match, batch_size=recipe.eval.batch_size, echo=echo
        )
        echo(format_table(scored))
        summary["exact_match"] = scored.accuracy
        run_dir.write_json(run_dir.summary, summary)
    if recipe.output.report and is_main_process():
        from finetune.report.html import build_report

        echo(f"report: {build_report(run_dir.path)}")


def check_fsdp_launch(recipe: Recipe, precision: str, device: str) -> None:
    """In a process accelerate launched with an FSDP config: refuse what it would not shard.

    Raises:
        InputError: no GPU (accelerate would train unsharded), or recipe keys FSDP cannot shard.
    """
    from finetune.errors import InputError
    from finetune.train.launch import fsdp_problems, fsdp_requested

    if not fsdp_requested():
        return
    if device != "cuda":
        raise InputError(
            "accelerate was asked for FSDP, which needs CUDA GPUs, and this process trains on CPU; accelerate "
            "would train unsharded without saying so. On CPU use accelerate_configs/cpu_ddp.yaml"
        )
    problems = fsdp_problems(recipe, precision)
    if problems:
        raise InputError("\n".join(f"FSDP: {line}" for line in problems))


def stopped_summary(error: BaseException, state, wall_time: float) -> dict:
    """summary.json of a run that did not finish: how far it got and why it stopped."""
    return {
        "status": "interrupted" if isinstance(error, KeyboardInterrupt) else "failed",
        "error": f"{type(error).__name__}: {error}",
        "steps": state.global_step,
        "wall_time_s": round(wall_time, 2),
    }


def write_samples(model, tokenizer, data, run_dir, n: int) -> None:
    """A few greedy generations next to their references, for report.html."""
    from finetune.eval.generate import sample_generations

    source, samples = ("held-out rows", data.eval) if data.eval else ("training rows (no eval split)", data.train)
    run_dir.write_json(
        run_dir.samples, {"source": source, "samples": sample_generations(model, tokenizer, samples, n=n)}
    )


def save_artifact(model, tokenizer, target: Path, *, state_dict: dict | None = None) -> None:
    """Write the adapter (or whole model) and tokenizer under a temporary name, then rename: never half a folder.

    `state_dict`: the model's full state dict where the model itself holds shards (FSDP).
    """
    import shutil

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, state_dict=state_dict)
    tokenizer.save_pretrained(partial)
    partial.rename(target)


def summarize(state, artifact: Path, trainable: int, total: int, wall_time: float) -> dict:
    from finetune.train.metrics import peak_memory

    history = state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    runtime = next((entry["train_runtime"] for entry in reversed(history) if "train_runtime" in entry), 0)
    # the last step is always logged (MetricsFileCallback), so its record counts every token of the run
    real_tokens = next((int(entry["num_tokens"]) for entry in reversed(history) if "num_tokens" in entry), 0)
    processed = state.num_input_tokens_seen
    return {
        "status": "finished",
        "steps": state.global_step,
        "epochs": state.epoch,
        "first_train_loss": losses[0] if losses else None,
        "last_train_loss": losses[-1] if losses else None,
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "tokens_seen": real_tokens,  # non-padding tokens through the model
        "tokens_processed": processed,  # padding included
        "padding_share": round(1 - real_tokens / processed, 4) if processed else None,
        "tokens_per_s": round(real_tokens / runtime, 1) if runtime else None,
        "train_runtime_s": round(runtime, 2),
        "peak_rss_mib": peak_memory()["peak_rss_mib"],
        "trainable_params": trainable,
        "total_params": total,
        "wall_time_s": round(wall_time, 2),
        "artifact": str(artifact),
    }


def echo_data_report(report, echo: Echo) -> None:
    echo(
        f"data: {report.rows_read} rows from {report.source} -> {report.train_rows} train, {report.eval_rows} eval; "
        f"{report.train_tokens:,} train tokens ({report.trained_tokens:,} trained)"
    )
    for warning in report.warnings:
        echo(f"data: warning: {warning}")
    if report.duplicate_rows:
        echo(
            f"data: {len(report.duplicate_rows)} duplicate row(s) removed (data.dedup), e.g. {report.duplicate_rows[0]}"
        )
    if report.truncated_rows:
        echo(
            f"data: {len(report.truncated_rows)} row(s) truncated to data.max_seq_len, e.g. {report.truncated_rows[0]}"
        )
    for dropped in report.dropped_rows[:5]:
        echo(f"data: dropped {dropped['row']}: {dropped['reason']}")
    if len(report.dropped_rows) > 5:
        echo(f"data: ... {len(report.dropped_rows) - 5} more dropped rows are listed in data.json")


def prepare_data(recipe: Recipe, tokenizer_files=None):
    """(tokenizer, built data): the samples exactly as training will see them, without loading the model.

    `tokenizer_files`: the tokenizer's hub snapshot when already fetched (`fetch_tokenizer`).
    """
    from finetune.data.build import build_datasets
    from finetune.model.load import load_tokenizer

    tokenizer = load_tokenizer(recipe.model, tokenizer_files)
    return tokenizer, build_datasets(recipe.data, tokenizer, recipe.train.seed)


def evaluate(run_path: str | Path, *, n: int = 500, batch_size: int = 32, echo: Echo = print):
    """Score a finished Goat run by exact match on held-out problems; writes eval.json into its folder.

    Raises:
        InputError: not a run folder, or not a Goat run.
    """
    from finetune.errors import InputError
    from finetune.eval.generate import load_trained, read_run_recipe
    from finetune.model.load import pick_device
    from finetune.train.run_dir import RunDir

    run_dir = RunDir(Path(run_path))
    recipe = read_run_recipe(run_dir.path)
    formats = recipe.data.formats
    if "goat" not in formats:
        raise InputError(
            f"{run_dir.path}: finetune eval scores exact match for data.format: goat runs; this run's data.format "
            f"is {', '.join(formats)} (its eval loss is in metrics.jsonl)"
        )
    model, tokenizer = load_trained(run_dir.path, recipe, device=pick_device(recipe.train.use_cpu))
    return score_exact_match(model, tokenizer, recipe, run_dir, n=n, batch_size=batch_size, echo=echo)


def score_exact_match(model, tokenizer, recipe: Recipe, run_dir, *, n: int, batch_size: int, echo: Echo):
    """Greedy answers of `model` to `n` held-out Goat problems, scored and written to the run's eval.json."""
    from finetune.data.formats.goat import format_prompt
    from finetune.eval.generate import generate_greedy
    from finetune.eval.goat import held_out_rows, score

    rows, source = held_out_rows(recipe.data, n, run_dir.data)
    echo(f"eval: {len(rows)} problems from {source}")
    longest = max(len(tokenizer(row["output"], add_special_tokens=False).input_ids) for row in rows)
    prompts = [format_prompt(row["instruction"]) for row in rows]
    model.eval()
    completions = generate_greedy(model, tokenizer, prompts, max_new_tokens=longest + 8, batch_size=batch_size)
    result = score(rows, completions, source)
    run_dir.write_json(run_dir.eval, result.to_json())
    return result
