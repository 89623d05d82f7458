"""Atomic file writes: readers see the old file or the new one, never a part.

Used for every checkpoint, config, sample and cache record ipltool writes. The
temporary name `.<name>.<pid>.<random>.tmp` carries the writer's process id, so that
`sweep_stale_temps` can remove what a killed writer left without touching a live one's.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

#: A temporary file whose name holds no live owner pid (older names, Windows) is stale after this many seconds.
STALE_AFTER = 3600.0


def temp_name(path: Path) -> Path:
    """A fresh temporary name beside `path`: `.<name>.<pid>.<8 hex>.tmp`."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def _atomic_open(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces `path` only when the block completes."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = temp_name(path)
        try:
            # Mode 0o666 lets the umask decide, as for any ordinary new file.
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno is not None and err.filename in (None, os.fspath(tmp)):
            err.filename = os.fspath(path)  # name the file the user asked for, not the hidden temporary
        raise
    fsync_dir(path.parent)


def _temp_owner(filename: str) -> int | None:
    """The pid in a temporary name of `_atomic_open`; 0 for the older names without one; None if not such a name."""
    if not (filename.startswith(".") and filename.endswith(".tmp")):
        return None
    parts = filename[1 : -len(".tmp")].rsplit(".", 2)
    if len(parts) < 2 or len(parts[-1]) != 8 or any(c not in "0123456789abcdef" for c in parts[-1]) or not parts[0]:
        return None
    if len(parts) == 3 and parts[1].isdigit() and int(parts[1]) > 0:
        return int(parts[1])
    return 0


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a zombie counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def sweep_stale_temps(folder: str | os.PathLike, stale_after: float | None = None) -> list[Path]:
    """Remove the temporary files of atomic writes that were killed, under `folder` (recursively).

    A file named `.<name>.<pid>.<8 hex>.tmp` is removed when process `pid` no longer
    runs; one from a live process is never touched, however old. Older names without
    a pid, and every name on Windows (where probing a pid could end the process), are
    removed when untouched for `stale_after` seconds. Symlinks, other hidden files and
    anything that cannot be removed (a read-only folder) are left alone.

    Args:
        folder: a run directory or output folder; a missing one is fine.
        stale_after: seconds; default `STALE_AFTER` (one hour).

    Returns:
        The paths removed.
    """
    limit = STALE_AFTER if stale_after is None else stale_after
    now = time.time()
    removed: list[Path] = []
    for directory, _, files in os.walk(folder):  # a missing folder yields nothing
        for filename in files:
            owner = _temp_owner(filename)
            if owner is None:
                continue
            path = Path(directory) / filename
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            if owner and os.name != "nt":
                stale = not _alive(owner)
            else:
                stale = now - info.st_mtime > limit
            if stale:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    removed.append(path)
    return removed


def fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX only; a no-op where directories cannot be opened)."""
    if os.name == "nt":  # pragma: no cover
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old or the new file, never a part.

    The bytes go to `.<name>.<pid>.<random>.tmp` in the same directory, are flushed and
    fsynced, then renamed over `path` with `os.replace`. On any error the temporary
    file is removed, `path` is left as it was, and the error is re-raised (an `OSError`
    names `path`, not the temporary file).

    Args:
        path: final file name; its directory must exist.
        data: the full new content.
    """
    with _atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Text version of `atomic_write_bytes` (no newline translation).

    Args:
        path: final file name; its directory must exist.
        text: the full new content.
        encoding: text encoding, default UTF-8.
    """
    atomic_write_bytes(path, text.encode(encoding))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)` through a temporary file and a rename (see `atomic_write_bytes`).

    Args:
        obj: anything `torch.save` accepts; keep it to tensors and plain Python
            containers so that `torch.load(weights_only=True)` can read it back.
        path: final file name; its directory must exist.
    """
    import torch  # here, not at the top: the light commands import this module too

    with _atomic_open(path) as f:
        torch.save(obj, f)
