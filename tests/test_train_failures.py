"""A write into the run folder that fails says why: the free-space advice only where space is short."""

from __future__ import annotations

import errno
import re
import resource
import time
from types import SimpleNamespace

import pytest
from transformers import TrainerState

from finetune.errors import FinetuneError
from finetune.run_folder import RunDir
from finetune.train.checkpoints import COMPLETE_MARKER, TRAINER_STATE
from finetune.train.failures import guard_writes, lack_of_space


@pytest.fixture
def run_dir(tmp_path) -> RunDir:
    """A run folder at step 12 whose newest complete checkpoint is checkpoint-9."""
    run = RunDir(tmp_path / "run")
    checkpoint = run.checkpoints / "checkpoint-9"
    checkpoint.mkdir(parents=True)
    (checkpoint / TRAINER_STATE).write_text("{}")
    (checkpoint / COMPLETE_MARKER).write_text("{}")
    return run


def failure(write, run_dir: RunDir) -> str:
    """The message of guard_writes when `write` fails while saving the adapter."""
    trainer = SimpleNamespace(state=TrainerState(global_step=12))
    with pytest.raises(FinetuneError) as raised:
        guard_writes(write, run_dir, trainer, time.time(), saving=run_dir.adapter)
    return str(raised.value)


def rename_onto_a_written_folder(run_dir: RunDir) -> None:
    """What a second writer met: another process had already put adapter/ in place."""
    run_dir.adapter.mkdir()
    (run_dir.adapter / "adapter_config.json").write_text("{}")
    partial = run_dir.path / "adapter.partial"
    partial.mkdir()
    partial.rename(run_dir.adapter)


def test_a_rename_onto_a_folder_another_process_wrote_is_not_a_full_disk(run_dir):
    message = failure(lambda: rename_onto_a_written_folder(run_dir), run_dir)
    assert message == (
        f"writing {run_dir.adapter} failed at step 12 (OSError: [Errno {errno.ENOTEMPTY}] Directory not empty: "
        f"'{run_dir.path / 'adapter.partial'}' -> '{run_dir.adapter}'); the newest complete checkpoint, "
        f"checkpoint-9, is intact; resume with: finetune run {run_dir.path} --resume"
    )


def test_a_full_disk_gives_the_free_space(run_dir):
    def fill_the_disk():
        raise OSError(errno.ENOSPC, "No space left on device")

    assert re.fullmatch(
        rf"writing {re.escape(str(run_dir.adapter))} failed at step 12 \(OSError: \[Errno {errno.ENOSPC}\] No space "
        r"left on device\); \d+ MiB free there; the newest complete checkpoint, checkpoint-9, is intact; once there "
        rf"is room, resume with: finetune run {re.escape(str(run_dir.path))} --resume",
        failure(fill_the_disk, run_dir),
    )


def test_the_cause_is_read_from_the_error_chain_and_its_text(run_dir):
    # safetensors says "os error 28" in a SafetensorError; torch.save raises a RuntimeError from an OSError
    safetensors = RuntimeError("I/O error: No space left on device (os error 28)")
    assert "MiB free there" in lack_of_space(safetensors, run_dir.path)
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as quota:
            raise RuntimeError("file write failed") from quota
    except RuntimeError as chained:
        assert "MiB free there" in lack_of_space(chained, run_dir.path)
    assert lack_of_space(FileExistsError(errno.EEXIST, "File exists"), run_dir.path) is None


def test_an_error_without_a_cause_is_a_lack_of_space_only_where_one_is_measured(run_dir, monkeypatch):
    silent = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # torch.save
    assert lack_of_space(silent, run_dir.path) is None  # the disk of the tests has room, files no size limit
    monkeypatch.setattr("finetune.train.failures.LOW_SPACE", 2**62)
    assert re.fullmatch(r"\d+ MiB free there", lack_of_space(silent, run_dir.path))
    monkeypatch.undo()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10**12, hard))
    try:
        limited = lack_of_space(silent, run_dir.path)
        assert limited == "files may not grow past 1,000,000,000,000 bytes here (ulimit -f)"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
