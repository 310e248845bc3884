"""What a run leaves when it stops early: training under a stop signal, and the write-failure policy.

A stopped or failed run always ends with a summary.json saying why, and a failure to write the run
folder (a full disk, a read-only mount) becomes one message naming what failed and what is intact.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from finetune.errors import FinetuneError, Interrupted
from finetune.run_folder import RunDir
from finetune.train.summary import stopped_summary


def train_until_stopped(trainer, run_dir: RunDir, resume_from: Path | None, stop, started: float) -> None:
    """trainer.train(), from the checkpoint `resume_from` when given; a stopped run leaves a summary saying why.

    Args:
        stop: the run's StopOnSignalCallback: a signal ends training after a checkpoint is saved.
        started: the run's start (time.time()), for the summary's wall time.

    Raises:
        Interrupted: a signal stopped training after a checkpoint was saved.
        FinetuneError: writing into the run folder failed.
    """
    from finetune.train.resume import resume_hint

    checkpoint = str(resume_from) if resume_from is not None else None
    stop.install()
    try:
        # with eval data, the Trainer also evaluates (and saves) after the last step
        guard_writes(lambda: trainer.train(resume_from_checkpoint=checkpoint), run_dir, trainer, started)
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


def guard_writes(write: Callable[[], object], run_dir: RunDir, trainer, started: float, *, saving: Path | None = None):
    """Run `write`; a failure to write the run folder becomes one message naming what failed and what is intact.

    `trainer.state` is read after the failure: `Trainer.train()` replaces the state object it started with.

    A failure counts as a write failure when it is an OSError, or any error while saving the folder `saving`
    or while the current step's checkpoint is on disk but not complete: torch.save reports a full disk as a
    RuntimeError, safetensors as a SafetensorError. `saving` names the folder `write` writes, if it is known.

    Raises:
        FinetuneError: the failure, explained; summary.json says the run failed.
    """
    import shutil

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
