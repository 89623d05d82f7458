"""Output folders (`--out`, `--report`): checked before a run, locked while one writes, and
write failures (a full disk, a read-only folder) turned into one line that says what to do.

Used by `ipl adapt`, `ipl train-mapper`, `ipl stylize` and `ipl eval`. A run that hits a
full disk stops at once instead of failing file after file; what it finished stays
consistent because every file is written atomically (see `atomic.py`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ipltool.atomic import atomic_write_text, temp_name
from ipltool.errors import IplError, UsageError

#: errno values after which no later write into the folder can succeed either.
_FOLDER_WIDE = {errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}
#: errno values that mean the same when they concern a file inside the output folder.
_DENIED = {errno.EACCES, errno.EPERM}


class OutputError(IplError):
    """An output folder cannot take more files (full disk, read-only, no permission) or is in use by another run."""


def _reason(err: OSError) -> str:
    """'no space left on device', 'read-only file system', 'permission denied', ..."""
    text = err.strerror or (os.strerror(err.errno) if err.errno else str(err))
    return text[:1].lower() + text[1:]


def _inside(path: str | os.PathLike, folder: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(folder))
        return True
    except ValueError:
        return False


def check_output_folder(path: Path, flag: str) -> None:
    """Refuse, before any work, an output folder that cannot be written.

    Checks that `path` is not a file (nor lies under one), and that it, or the nearest
    folder above it that exists, takes a new file. An existing folder is tested by
    creating and removing an empty hidden file, which also catches a read-only mount
    where `os.access` says yes (as it does for root). Nothing is created otherwise.

    Args:
        path: the folder given with `flag`.
        flag: the option as the user typed it (`--out`, `--report`, `--resume`).

    Raises:
        UsageError: `path` is a file, lies under a file, or cannot be written.
    """
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder", hint=f"choose a folder for {flag}, or move the file away")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise UsageError(f"{flag} {path} cannot be made: {existing} is a file", hint=f"choose a folder for {flag}")
    denied = f"choose a folder you can write to for {flag}"
    if existing != path:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"cannot create {flag} {path}: {existing} is not writable", hint=denied)
        return
    probe = temp_name(path / "write-check")  # the name of an atomic write's temporary: a sweep removes a leftover
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        raise UsageError(f"cannot write into {flag} {path}: {_reason(err)}", hint=denied) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def is_write_failure(err: OSError, folder: Path | None = None) -> bool:
    """True when `err` means the folder takes no more files: disk full, quota, read-only, or
    permission denied on a file inside `folder` (not a problem of one input or one name)."""
    if err.errno in _FOLDER_WIDE:
        return True
    if err.errno in _DENIED:
        return err.filename is None or folder is None or _inside(err.filename, folder)
    return False


def write_error(err: OSError, folder: Path, flag: str, then: str) -> OutputError:
    """The one-line error for a write failure under `folder` (see `is_write_failure`).

    Args:
        err: the failure.
        folder: the output folder (used when the error names no file).
        flag: its option, for the advice (`--out`, `--report`).
        then: what to run once there is room, e.g. "then `ipl adapt --resume RUN` continues".
    """
    path = err.filename or folder
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return OutputError(f"no space left to write {path} ({_reason(err)})", hint=f"free some space or choose another {flag}; {then}")
    return OutputError(f"cannot write {path}: {_reason(err)}", hint=f"choose a folder you can write to for {flag}; {then}")


@contextlib.contextmanager
def write_failures(folder: Path, flag: str, then: str) -> Iterator[None]:
    """Turn a write failure inside the block (see `is_write_failure`) into `write_error`'s one line.

    Other `OSError`s pass through unchanged: they are not about the output folder.
    """
    try:
        yield
    except OSError as err:
        if not is_write_failure(err, folder):
            raise
        raise write_error(err, folder, flag, then) from err


@contextlib.contextmanager
def exclusive(folder: Path, command: str, flag: str) -> Iterator[None]:
    """Hold the lock of `folder` for the block: one `command` at a time writes into it.

    The lock is `folder/.ipl-<command>.lock` (an OS file lock, released even when the
    process is killed); the holder's pid is kept beside it in `.ipl-<command>.owner`
    for the message a second run gets. `folder` is created.

    Args:
        folder: the output folder.
        command: the subcommand (`stylize`), named in the lock file and the message.
        flag: its option, for the advice.

    Raises:
        OutputError: another process holds the lock; the message names it.
    """
    from filelock import FileLock, Timeout  # here: only the writing commands need it

    from ipltool.distributed import world

    folder.mkdir(parents=True, exist_ok=True)
    w = world()
    # The ranks of one torchrun run share the folder (each writes its own part): a lock per rank.
    name = f".ipl-{command}" + (f".rank{w.rank}" if w.distributed else "")
    owner = folder / f"{name}.owner"
    lock = FileLock(str(folder / f"{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        pid = _owner_pid(owner)
        holder = f" (pid {pid})" if pid else ""
        raise OutputError(
            f"another ipl {command} is writing into {folder}{holder}", hint=f"wait for it to finish, or choose another {flag}"
        ) from None
    try:
        atomic_write_text(owner, json.dumps({"pid": os.getpid(), "since": time.time()}) + "\n")
        yield
    finally:
        with contextlib.suppress(OSError):
            owner.unlink()
        lock.release()


def _owner_pid(path: Path) -> int | None:
    try:
        pid = json.loads(path.read_text(encoding="utf-8")).get("pid")
    except (OSError, ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) and pid > 0 else None
