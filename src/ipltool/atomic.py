"""Atomic file writes: readers see the old file or the new one, never a part.

Used for every checkpoint, config, sample and cache record ipltool writes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def _atomic_open(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces `path` only when the block completes."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
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
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


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

    The bytes go to `.<name>.<random>.tmp` in the same directory, are flushed and
    fsynced, then renamed over `path` with `os.replace`. On any error the temporary
    file is removed, `path` is left as it was, and the error is re-raised.

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
