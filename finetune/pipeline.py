"""recipe -> data -> model -> adapter -> train -> run folder: the order of the steps, and nothing else.

Everything that can fail on bad input (recipe, output folder, tokenizer, data rows, model folder)
fails before the run folder is touched, so a failed command never changes an earlier run; only its
claim (finetune/lock.py) comes first, and goes when the command ends. What each step does lives in its
package: the run folder in `run_folder.py`, batch sizing, training, write failures, summaries and the
saved artifact in train/, exact match in eval/, report.html in report/.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from finetune.model.methods import method_of
from finetune.recipe.load import recipe_to_yaml
from finetune.recipe.schema import Recipe
from finetune.run_folder import RunDir

Echo = Callable[[str], None]


@dataclass(frozen=True)
class RunResult:
    path: Path
    summary: dict
    model: object  # the trained model, still in memory


def run(
    recipe: Recipe, *, overwrite: bool = False, resume: bool = False, force_unlock: bool = False, echo: Echo = print
) -> RunResult:
    """Train the recipe and write its run folder, or continue it from its newest complete checkpoint.

    output.dir is claimed first (finetune/lock.py), so a second command on the same folder is refused before
    it looks at the folder, and released however the run ends.

    Raises:
        InputError: a tracker's package is missing; output.dir is claimed by another command; bad output folder,
            tokenizer, data or model, or a run folder that this recipe cannot resume (nothing written yet).
        Interrupted: Ctrl-C; a checkpoint was saved first.
    """
    from finetune.lock import claim
    from finetune.run_folder import is_main_process
    from finetune.train.trackers import check_tracker_packages

    check_tracker_packages(recipe.output.trackers)  # before any model loads, and before the claim
    if not is_main_process():  # it writes nothing to the folder
        return run_claimed(recipe, overwrite=overwrite, resume=resume, echo=echo)
    # under a launch, the main process writes under the claim of the command that launched it
    with claim(recipe.output.dir, subject="output.dir", force_unlock=force_unlock, echo=echo):
        return run_claimed(recipe, overwrite=overwrite, resume=resume, echo=echo)


def run_claimed(recipe: Recipe, *, overwrite: bool, resume: bool, echo: Echo) -> RunResult:
    """`run`, once output.dir is claimed."""
    from transformers import set_seed

    from finetune.model.adapters import count_parameters, wrap_adapter
    from finetune.model.load import fetch_model, fetch_tokenizer, load_model, pick_device, resolve_source
    from finetune.model.shape import read_shape
    from finetune.run_folder import is_main_process
    from finetune.train.artifact import save_artifact
    from finetune.train.batch import size_batches, with_batch
    from finetune.train.callbacks import StopOnSignalCallback
    from finetune.train.checkpoints import estimate_checkpoint_bytes
    from finetune.train.failures import guard_writes, train_until_stopped
    from finetune.train.launch import check_fsdp_launch, check_trainer_distribution, close_process_group
    from finetune.train.resume import check_same_data, check_same_hub_inputs, find_resume_point
    from finetune.train.summary import summarize
    from finetune.train.trackers import tracking
    from finetune.train.trainer import build_trainer, mixed_precision

    started = time.time()
    if not is_main_process():  # every process trains; one prints and writes the run folder
        echo = lambda _: None  # noqa: E731
    run_dir = RunDir(Path(recipe.output.dir)) if resume else RunDir.claim(recipe.output.dir, overwrite=overwrite)
    device = pick_device(recipe.train.use_cpu)
    check_fsdp_launch(recipe, mixed_precision(recipe.train, device), device)  # raises now, not after loading
    auto = recipe.train.micro_batch_size == "auto"  # sized from the model's shape, read from config.json alone
    shape = read_shape(recipe.model.name_or_path, recipe.model.revision) if auto else None
    # from here on the recipe holds the batch numbers, as recipe.yaml records them (and a resume compares them)
    recipe = with_batch(recipe, size_batches(recipe, shape, device, echo))
    checkpoints = find_resume_point(run_dir, recipe) if resume else None
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
    resume_from = checkpoints.complete if checkpoints else None
    with tracking(recipe, run_dir, resumed_from=resume_from and resume_from.name, echo=echo):
        trainer = build_trainer(
            model, tokenizer, data.train, data.eval, recipe, run_dir, device=device, callbacks=[stop]
        )
        check_trainer_distribution(trainer)
        train_until_stopped(trainer, run_dir, resume_from, stop, started)
    artifact = run_dir.path / method_of(recipe.adapter).artifact_folder
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


def open_run_folder(
    run_dir: RunDir, recipe: Recipe, data, device: str, checkpoints, echo: Echo, hub_inputs: dict
) -> None:
    """A new run: empty the folder and write recipe, environment and data report. A resumed one: tidy it.

    `hub_inputs`: repo id, revision and commit of the model and tokenizer read from a hub, by role.
    """
    from finetune.run_folder import is_main_process
    from finetune.train.environment import environment_info
    from finetune.train.resume import prepare_for_resume

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


def finish(model, tokenizer, recipe: Recipe, data, run_dir: RunDir, summary: dict, echo: Echo) -> None:
    """What follows training: sample generations, exact match, report.html."""
    from finetune.run_folder import is_main_process

    if recipe.eval.samples:
        from finetune.train.artifact import write_samples

        write_samples(model, tokenizer, data, run_dir, recipe.eval.samples)
    if recipe.eval.exact_match:
        from finetune.eval.exact_match import score_exact_match
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
