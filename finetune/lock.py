"""One writer per folder: a claim that only one process at a time holds.

`finetune run`, `eval`, `report`, `merge` and `export` claim what they write before writing anything and
give the claim up when they end, normally, on Ctrl-C or on an error. The claim is a small JSON file that
names its holder (pid, host, command, start time):

- `FOLDER/.claim`, inside a folder written in place (a run folder): only the folder need be writable;
- `PARENT/.NAME.claim`, beside an output written under a temporary name and renamed into place (merge and
  export): its parent must be writable anyway, and the output itself is replaced whole.

Taking it is atomic: the record is written to a private file, then hard-linked to the claim's name, which
fails when the name exists (on NFS too). The holder keeps an OS lock (`flock`) on the file for its life,
and the kernel drops that lock when the process ends, however it ends. A claim whose lock is free was
therefore left behind; on this host the record confirms it (its pid no longer runs, or now names a process
started later, or the machine has rebooted since) and the claim is taken over with a one-line notice. A
claim from another host cannot be checked from here: it is taken over only with `--force-unlock`.

Under `accelerate launch` the launching command claims once for all its processes and hands the claim's
token down in FINETUNE_CLAIM; a process that finds that token in the claim file writes under it.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shlex
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from finetune.errors import InputError

CLAIM_ENV = "FINETUNE_CLAIM"
CLAIM_NAME = ".claim"
# Another process may release, take over or replace the claim between two looks at it; each change means
# the next look sees a settled state, so a few tries are plenty.
_ATTEMPTS = 10


@dataclass(frozen=True)
class Holder:
    """Who holds a claim. `boot_id` and `process_start` (Linux /proc) tell a reused pid or a reboot apart."""

    pid: int
    host: str
    command: str
    started: str
    token: str
    boot_id: str | None = None
    process_start: int | None = None

    @classmethod
    def this_process(cls) -> Holder:
        pid = os.getpid()
        return cls(
            pid=pid,
            host=socket.gethostname(),
            command=shlex.join(["finetune", *sys.argv[1:]]),
            started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            token=secrets.token_hex(8),
            boot_id=_boot_id(),
            process_start=_process_start(pid),
        )

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host} ({self.command}, since {self.started})"

    def is_running_here(self) -> bool:
        """On this host: the holder's process still runs (no reboot since, same pid, same start time)."""
        if self.boot_id and _boot_id() not in (None, self.boot_id):
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's process: it exists
        started = _process_start(self.pid)
        return self.process_start is None or started is None or started == self.process_start


class Claim:
    """A claim this process holds (or writes under, for the command that launched it); `release()` gives it
    up, as does the end of a `with` block."""

    def __init__(self, path: Path, file: Path, holder: Holder, fd: int | None, made: list[Path]):
        self.path, self.file, self.holder = path, file, holder
        self._fd, self._made = fd, made

    def environment(self) -> dict[str, str]:
        """Environment variables under which processes this one starts write under its claim."""
        return {CLAIM_ENV: self.holder.token}

    def release(self) -> None:
        """Remove the claim file (if it is still ours) and the folders made for it (if still empty)."""
        if self._fd is None:
            return  # released already, or held by the launching command
        try:
            if _same_file(self._fd, self.file):
                self.file.unlink()
        except OSError:
            pass  # the folder went away with the claim in it: nothing left to release
        finally:
            os.close(self._fd)
            self._fd = None
            _remove_empty(self._made)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(
    path: str | Path,
    *,
    subject: str | None,
    beside: bool = False,
    force_unlock: bool = False,
    echo: Callable[[str], None] = print,
) -> Claim:
    """Claim `path` for this process before writing it.

    Args:
        path: the folder to write (or, with `beside`, the folder or file to rename into place).
        subject: how the user named `path` (`output.dir`, `--out`), for messages; None for a RUN_DIR argument.
        beside: keep the claim file beside `path` rather than inside it.
        force_unlock: also take over a claim from another host (or one whose holder seems to run although it
            holds no lock), as `--force-unlock` asks.
        echo: where the notice of a claim taken over goes.

    Raises:
        InputError: another running process holds the claim; a process on another host holds it and
            `force_unlock` is off; or the claim cannot be written where it belongs.
    """
    target = Path(path)
    where = f"{subject}: {target}" if subject else str(target)
    if not beside and target.exists() and not target.is_dir():
        raise InputError(f"{where} exists and is not a folder")
    file = claim_file(target, beside=beside)
    inherited = _inherited(target, file)
    if inherited is not None:
        return inherited
    me = Holder.this_process()
    made = _make_folders(file.parent, where)
    draft = file.with_name(f"{file.name}.{me.token}")
    try:
        fd = _write_draft(draft, me)
    except OSError as error:
        _remove_empty(made)
        raise InputError(f"{where} cannot be written ({file.parent}: {error.strerror})") from None
    try:
        for _ in range(_ATTEMPTS):
            if _link(draft, file, where) or _take_over(file, draft, me, where, force_unlock, echo):
                return Claim(target, file, me, fd, made)
            time.sleep(0.05)
        raise InputError(f"{where}: its claim {file} kept changing while this command tried to take it; try again")
    except BaseException:
        os.close(fd)
        _remove_empty(made)
        raise
    finally:
        draft.unlink(missing_ok=True)


def claim_file(path: str | Path, *, beside: bool = False) -> Path:
    """Where the claim on `path` is kept."""
    absolute = Path(os.path.abspath(path))
    return absolute.parent / f".{absolute.name}.claim" if beside else absolute / CLAIM_NAME


def read_holder(file: Path) -> Holder | None:
    """The holder a claim file names; None when there is no such file or it does not parse."""
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
        holder = Holder(**{field.name: record[field.name] for field in fields(Holder) if field.name in record})
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(holder.pid, int) or holder.pid <= 0 or not isinstance(holder.host, str):
        return None
    return holder


def _inherited(target: Path, file: Path) -> Claim | None:
    """The launching command's claim, when this process was started to write under it."""
    token = os.environ.get(CLAIM_ENV)
    holder = read_holder(file) if token else None
    return Claim(target, file, holder, None, []) if holder is not None and holder.token == token else None


def _write_draft(draft: Path, me: Holder) -> int:
    """Write this process's record to a private file and lock it; its descriptor, kept for the claim's life."""
    fd = os.open(draft, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, (json.dumps(asdict(me), indent=2) + "\n").encode())
        os.fsync(fd)
        _try_lock(fd)  # nobody else knows this file yet: the lock is ours, where the file system has locks
    except BaseException:
        os.close(fd)
        raise
    return fd


def _link(draft: Path, file: Path, where: str) -> bool:
    """Give the draft the claim's name unless that name exists; True when it did."""
    try:
        os.link(draft, file)
    except FileExistsError:
        return False
    except OSError as error:
        raise InputError(f"{where} cannot be claimed ({file.parent}: {error.strerror})") from None
    return True


def _take_over(file: Path, draft: Path, me: Holder, where: str, force_unlock: bool, echo) -> bool:
    """Replace a claim that was left behind by the draft; True when it did, False to look again.

    Raises:
        InputError: the claim is held (see `claim`).
    """
    try:
        fd = os.open(file, os.O_RDWR)  # exclusive locks on NFS need a file open for writing
    except FileNotFoundError:
        return False  # released meanwhile
    try:
        locked = _try_lock(fd)
        if not _same_file(fd, file):
            return False  # replaced meanwhile
        holder = read_holder(file)
        here = holder is not None and holder.host == me.host
        if locked is False:
            if here and not holder.is_running_here():
                return False  # left behind, and another process is taking it over right now
            raise InputError(_in_use(where, holder))
        if holder is None:
            echo(f"note: {where}: taking over an unreadable claim ({file})")
        elif not here or holder.is_running_here():
            if not force_unlock:
                raise InputError(_in_use(where, holder) if here else _elsewhere(where, holder))
            echo(f"note: --force-unlock: {where}: taking over the claim of {holder}")
        else:
            echo(f"note: {where}: taking over the claim of {holder}, which is no longer running")
        os.replace(draft, file)  # atomic, and under the old claim's lock: no other process decides meanwhile
        return True
    finally:
        os.close(fd)


def _in_use(where: str, holder: Holder | None) -> str:
    who = holder or "another process (its claim cannot be read)"
    return f"{where} is in use by {who}; wait for it to end, or stop it first"


def _elsewhere(where: str, holder: Holder) -> str:
    return (
        f"{where} is claimed by {holder}, a process on another machine that this one cannot check; if it has "
        "ended, pass --force-unlock to take the claim over"
    )


def _try_lock(fd: int) -> bool | None:
    """flock the file without waiting: True, False when another process holds it, None without OS locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None  # e.g. ENOLCK on a file system without locks: the record alone decides
    return True


def _same_file(fd: int, file: Path) -> bool:
    try:
        named, opened = os.stat(file), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _make_folders(folder: Path, where: str) -> list[Path]:
    """Create `folder` and its missing parents; those that were missing, outermost first: made for a claim,
    by this process or another claiming at the same time, and removed by whichever holds the claim last.

    Raises:
        InputError: one of them cannot be created.
    """
    missing = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    for level in missing:
        try:
            level.mkdir(exist_ok=True)
        except OSError as error:
            _remove_empty(missing)
            nearest = next(p for p in [level, *level.parents] if p.exists())
            raise InputError(f"{where} cannot be written ({nearest}: {error.strerror})") from None
    return missing


def _remove_empty(made: list[Path]) -> None:
    """Remove the folders made for a claim, innermost first, while they are empty (another process's claim may
    be in them)."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            return


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (field 22 of /proc/PID/stat); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # the name in parentheses may hold spaces
    except (OSError, IndexError, ValueError):
        return None
