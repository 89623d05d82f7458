"""Progress of long jobs, visible wherever stderr goes.

On an interactive terminal a rich bar is redrawn in place. When stderr is a file or a
pipe (nohup, cluster job logs, CI) a bar would show nothing until the job ends, so plain
lines are printed instead, each flushed at once so that `tail -f` sees it:

    stage 2: ipl  step 40/300  loss 0.8123  1.52 steps/s  eta 2m51s

A task prints its first update, then the next one as soon as a tenth of its total has
passed or `IPL_PROGRESS_SECONDS` seconds have (default 15; 0 prints every update),
whichever comes first, and always its last one (also when the job stops early). Rates
and ETAs are measured from a task's first update, so the steps a resumed run did before
do not count. Nothing is shown with `--quiet` or `--json`.

The API is plain callbacks, for the commands and any other front end alike:

    with progress.track(300, "stage 2: ipl") as update:
        for step in range(1, 301):
            update(step, loss=0.81)

`Reporter` follows several named tasks (its `update(name, done, total)` fits the
Evaluator's callback); `step_progress` fits `track` to the training loops'
`on_step(step, terms)`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator

from ipltool import console
from ipltool.errors import UsageError

if TYPE_CHECKING:
    from rich.progress import Progress

#: Environment variable: the most seconds between two plain progress lines.
ENV_VAR = "IPL_PROGRESS_SECONDS"
DEFAULT_SECONDS = 15.0
#: The `unit` of byte counts, shown in MB and MB/s.
BYTES = "byte"


def interval_seconds() -> float:
    """The most seconds between two plain lines of a task: `$IPL_PROGRESS_SECONDS`, else 15.

    Raises:
        UsageError: the variable holds something other than a number of seconds >= 0.
    """
    text = os.environ.get(ENV_VAR, "").strip()
    if not text:
        return DEFAULT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0:  # also refuses nan
        raise UsageError(f"{ENV_VAR} must be a number of seconds (0 or more), not {text!r}", hint=f"e.g. {ENV_VAR}=30, or 0 for every update")
    return seconds


def _draws_bar() -> bool:
    """True when stderr is an interactive terminal, the one place where rich redraws a bar in place,
    and this is rank 0 of a torchrun run (the other ranks print plain lines with their rank)."""
    from ipltool.distributed import world

    if not world().main:
        return False
    try:
        return bool(console.err.file.isatty()) and console.err.is_interactive
    except (AttributeError, ValueError):  # a stream without isatty, or a closed one
        return False


def _new_bar(unit: str) -> Progress:
    from rich.progress import (
        BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn,
    )

    name = TextColumn("[bold]{task.description}")
    if unit == BYTES:
        return Progress(name, BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(), console=console.err)
    return Progress(
        name, BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[text]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console.err,
    )


def _fields_text(fields: dict[str, Any]) -> str:
    """`loss 0.8123 · ok 3`: floats with 4 decimals, other values as they are, None left out."""
    return " · ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}" for key, value in fields.items() if value is not None)


def _duration(seconds: float) -> str:
    """`2m51s`, `1h05m` or `14s`."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass
class _Task:
    """What a `Reporter` remembers of one task."""

    total: float | None
    bar_id: int | None = None
    done: float = 0
    start: tuple[float, float] | None = None  # (done, time) of the pass's first update: rates count from it
    shown: tuple[float, float] | None = None  # (done, time) of the last printed line
    pending: str | None = None  # the last update's line while it is not printed

    @property
    def finished(self) -> bool:
        """True once an update reached the total."""
        return self.start is not None and self.total is not None and self.done >= self.total


class Reporter:
    """Progress of named tasks on stderr: a rich bar on a terminal, plain lines elsewhere, nothing with --quiet/--json.

    Use it as a context manager (or call `close`), so that the last line of every task is
    printed and the bar stops.

    Args:
        unit: what is counted, in the singular ("step", "photo", "sample"; shown as
            `step 40/300` and `steps/s`), or `BYTES` (shown in MB and MB/s).
        interval: the most seconds between two plain lines of a task (default: `interval_seconds()`).
        clock: seconds, monotonic (tests pass a fake one).
        stream: where plain lines go (default: stderr as it is when each line is written).
        bar: True for the rich bar, False for plain lines (default: the bar when stderr is an interactive terminal).
    """

    def __init__(
        self, unit: str = "step", *, interval: float | None = None, clock: Callable[[], float] = time.monotonic,
        stream: IO[str] | None = None, bar: bool | None = None,
    ):
        self.unit = unit
        self.silent = console.options.quiet or console.options.json  # read once: a job is silent from start to end
        self.interval = interval_seconds() if interval is None else interval
        self.clock = clock
        self._stream = stream
        self._tasks: dict[str, _Task] = {}
        self._bar = _new_bar(unit) if not self.silent and (_draws_bar() if bar is None else bar) else None

    def __enter__(self) -> Reporter:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def add(self, name: str, total: float | None) -> None:
        """Declare task `name` before its first update (a bar shows it at 0 meanwhile)."""
        task = self._tasks[name] = _Task(total)
        if self._bar is not None:  # names and fields are text (paths, run names), not rich markup
            task.bar_id = self._bar.add_task(console.escape(name), total=total, text="")

    def update(self, name: str, done: float, total: float | None = None, **fields: Any) -> None:
        """Task `name` has `done` of `total` units (None: the total known before, or unknown).

        `fields` are shown after the count, e.g. `loss=0.81` as `loss 0.8100`. An update after
        the last one, or below the previous one, starts the task over (another pass of the same
        name, a restarted download): its rate and line cadence restart.
        """
        if self.silent:
            return
        if name not in self._tasks:
            self.add(name, total)
        task = self._tasks[name]
        if task.finished or done < task.done:
            self._flush(task)
            task.start = task.shown = None
            if self._bar is not None:
                self._bar.reset(task.bar_id, total=total if total is not None else task.total)
        if total is not None:
            task.total = total
        task.done = done
        now = self.clock()
        if task.start is None:
            task.start = (done, now)
        if self._bar is not None:
            self._bar.update(task.bar_id, completed=done, total=task.total, text=console.escape(_fields_text(fields)))
            return
        line = self._line(name, task, fields, now)
        if self._due(task, now):
            task.shown, task.pending = (done, now), None
            self._write(line)
        else:
            task.pending = line

    def close(self) -> None:
        """Print the last update of every task that is not printed yet, and stop the bar."""
        for task in self._tasks.values():
            self._flush(task)
        if self._bar is not None:
            self._bar.stop()

    def _due(self, task: _Task, now: float) -> bool:
        """Whether this update gets a line: the first, every tenth of the total, every `interval` seconds, the last."""
        if task.shown is None or task.finished:
            return True
        if task.total and task.done - task.shown[0] >= max(1, task.total // 10):
            return True
        return now - task.shown[1] >= self.interval

    def _line(self, name: str, task: _Task, fields: dict[str, Any], now: float) -> str:
        if self.unit == BYTES:
            amount = f"{task.done / 1e6:.1f}" + (f"/{task.total / 1e6:.1f}" if task.total else "") + " MB"
        else:
            amount = f"{self.unit} {task.done}" + (f"/{task.total}" if task.total is not None else "")
        parts = [name, amount]
        if fields:
            parts.append(_fields_text(fields))
        start_done, start_time = task.start
        if now > start_time and task.done > start_done:  # the first update has no rate yet
            rate = (task.done - start_done) / (now - start_time)
            parts.append(f"{rate / 1e6:.2f} MB/s" if self.unit == BYTES else f"{rate:.2f} {self.unit}s/s")
            if task.total is not None:
                parts.append(f"eta {_duration(max(task.total - task.done, 0) / rate)}")
        return "  ".join(parts)

    def _flush(self, task: _Task) -> None:
        if task.pending is not None:
            self._write(task.pending)
            task.pending = None

    def _write(self, line: str) -> None:
        from ipltool.distributed import world

        w = world()
        if w.distributed:  # several ranks share one terminal or log: say whose line it is
            line = f"[rank {w.rank}] {line}"
        stream = self._stream or console.err.file
        stream.write(line + "\n")
        stream.flush()  # a log file read with `tail -f` sees the line now, not when a buffer fills


@contextlib.contextmanager
def track(total: float | None, description: str, unit: str = "step") -> Iterator[Callable[..., None]]:
    """Progress of one task; yields `update(done, total=None, **fields)` (see `Reporter.update`).

    Args:
        total: units of the whole task (None: unknown).
        description: the task's name, first on each line (e.g. "stage 2: ipl").
        unit: see `Reporter`.

    Example:
        with track(len(photos), "stylize", unit="photo") as update:
            update(3, ok=2, error=1)
    """
    with Reporter(unit) as reporter:
        reporter.add(description, total)
        yield functools.partial(reporter.update, description)


@contextlib.contextmanager
def step_progress(total: int, description: str) -> Iterator[Callable[[int, dict], None]]:
    """`track` for a training loop: yields `on_step(step, terms)` and shows `terms["loss"]`."""
    with track(total, description) as update:
        yield lambda step, terms: update(step, loss=terms.get("loss"))
