"""Running under `torchrun`: who this process is, its device, its share of the work, and gathering.

`torchrun --nproc-per-node N --no-python ipl COMMAND ...` starts N copies of a command with
`RANK`, `WORLD_SIZE` and `LOCAL_RANK` set (and the rendezvous variables torch reads). This
module is the one place that reads them: the pipelines ask `world()` for their rank and
`shard()` for their part, and never parse the environment themselves. Outside torchrun
everything here is the identity (rank 0 of 1), and no process group is created.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ipltool.errors import UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on rank 0, which merges, reports and draws the progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when several processes share the work."""
        return self.size > 1


def _int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name}={value!r} is not a number (set by torchrun?)") from None


def world() -> World:
    """The `World` of this process, from torchrun's variables (rank 0 of 1 without them).

    Raises:
        UsageError: variables that contradict each other.
    """
    size = _int("WORLD_SIZE", 1)
    rank = _int("RANK", 0)
    local = _int("LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size or local < 0:
        raise UsageError(f"RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local} do not fit together", hint="start several processes with torchrun")
    return World(rank, size, local)


def init(device) -> None:
    """Join the process group of this run (once; nothing outside torchrun).

    The backend is NCCL for CUDA devices and gloo otherwise, so CPU runs (and CI) work
    the same way as GPU runs.
    """
    import torch.distributed as dist

    w = world()
    if not w.distributed or dist.is_initialized():
        return
    backend = "nccl" if getattr(device, "type", str(device)) == "cuda" else "gloo"
    dist.init_process_group(backend=backend)


def shard(items: Sequence[T], w: World | None = None) -> list[T]:
    """This rank's part of `items`: every `size`-th item from position `rank`.

    Deterministic for a given order and world size, so the callers sort first (photos by
    path, samples by index): a restart with the same inputs gives each rank the same part.
    """
    w = w or world()
    return list(items[w.rank :: w.size])


def block(total: int, batch: int, w: World | None = None) -> tuple[int, int]:
    """This rank's contiguous part `(start, stop)` of `total` items processed in batches of `batch`.

    Parts are whole batches, so each batch a rank runs is exactly a batch of a single
    process: the results are the same numbers, not only the same within rounding.
    """
    w = w or world()
    size = -(-(-(-total // batch)) // w.size) * batch  # batches per rank, rounded up, in items
    return min(total, w.rank * size), min(total, (w.rank + 1) * size)


def all_gather(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (a list of one outside torchrun)."""
    w = world()
    if not w.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def report_failure(what: str) -> None:
    """On a rank that fails, say which inputs it held (call from an `except` block, then re-raise)."""
    w = world()
    if w.distributed:
        from ipltool import console

        console.err.print(f"[bold red]rank {w.rank} of {w.size} failed[/]; it held {console.escape(what)}")


def barrier() -> None:
    """Wait for every rank (nothing outside torchrun)."""
    if world().distributed:
        import torch.distributed as dist

        dist.barrier()


def finish() -> None:
    """Leave the process group at the end of a command (nothing outside torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # All ranks leave together: a rank tearing its group down while another still talks
        # to it aborts the process (gloo's threads) instead of exiting cleanly.
        dist.barrier()
        dist.destroy_process_group()
