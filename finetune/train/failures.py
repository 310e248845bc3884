"""What a run leaves when it stops early: training under a stop signal, and the write-failure policy.

A stopped or failed run always ends with a summary.json saying why, and a failure to write the run
folder (a full disk, a read-only mount) becomes one message naming what failed and what is intact.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from finetune.errors import FinetuneError, Interrupted
from finetune.run_folder import RunDir, nearest_existing_folder
from finetune.train.summary import stopped_summary

# errno values of a write that failed for lack of space: disk full, quota exceeded, file size limit
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Under this much free space, a write that failed without saying why is taken to have filled the disk.
LOW_SPACE = 64 * 2**20


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
        FinetuneError: the failure, explained (with the free space where space is short); summary.json says the
            run failed.
    """
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
        # the advice about space only where space is short: a rename onto a folder that another process
        # wrote first (errno 39) is not a full disk
        shortage = lack_of_space(error, run_dir.path)
        when = "once there is room, " if shortage else ""
        kept = (
            f"the newest complete checkpoint, {intact.name}, is intact; {when}resume with: {resume_hint(run_dir.path)}"
            if intact
            else "no checkpoint had been completed"
        )
        raise FinetuneError(
            f"writing {target} failed at step {state.global_step} ({type(error).__name__}: "
            f"{_first_line(error)}); {f'{shortage}; ' if shortage else ''}{kept}"
        ) from error


def lack_of_space(error: BaseException, folder: Path) -> str | None:
    """What was short when a write into `folder` failed with `error`, or None when space was not the cause.

    The cause is read from the errno of an OSError in the exception chain, or from its text (safetensors
    says "os error 28"). torch.save reports a full disk as a RuntimeError without either; such an error
    counts as a lack of space when one is measured: little free space left, or a file size limit.
    """
    chain = _exception_chain(error)
    codes = {e.errno for e in chain if isinstance(e, OSError) and e.errno}
    codes |= {code for code in SPACE_ERRNOS for e in chain if os.strerror(code) in str(e)}
    if codes and not codes & set(SPACE_ERRNOS):
        return None  # an error of another kind, e.g. a rename onto a folder another process wrote
    limit = _file_size_limit()
    if limit is not None and (errno.EFBIG in codes or not codes):
        return f"files may not grow past {limit:,} bytes here (ulimit -f)"
    free = shutil.disk_usage(nearest_existing_folder(folder)).free
    if codes or free < LOW_SPACE:
        return f"{free / 2**20:.0f} MiB free there"
    return None


def _exception_chain(error: BaseException | None) -> list[BaseException]:
    """`error`, the error it was raised from (or during), and so on."""
    chain = []
    while error is not None and error not in chain and len(chain) < 8:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _file_size_limit() -> int | None:
    """The largest file this process may write (`ulimit -f`), or None without a limit."""
    try:
        import resource
    except ImportError:
        return None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if limit == resource.RLIM_INFINITY else limit


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"
