"""A rich progress bar for training loops: running loss and ETA, silent with --quiet/--json."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ipltool import console


@contextlib.contextmanager
def step_progress(total: int, description: str) -> Iterator[Callable[[int, dict], None]]:
    """Yield `update(step, terms)`; shows a bar on stderr unless `--quiet` or `--json`."""
    if console.options.quiet or console.options.json:
        yield lambda step, terms: None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console.err,
    )
    with progress:
        task = progress.add_task(description, total=total, loss="-")

        def update(step: int, terms: dict) -> None:
            progress.update(task, completed=step, loss=f"{terms.get('loss', float('nan')):.4f}")

        yield update
