"""Adaptations started from the page: one at a time in a background thread, the rest queued.

A job runs `train.adapt.adapt`, the call `ipl adapt` makes, with a progress callback that
records step, loss and speed, and a `StopRequest` the Stop button sets: the run then saves
its state between steps exactly as Ctrl-C does, and `ipl adapt --resume RUN` continues it.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ipltool.domain import Domain
from ipltool.errors import Interrupted, IplError, first_line
from ipltool.interrupt import StopRequest

QUEUED, RUNNING, DONE, STOPPED, FAILED = "queued", "running", "done", "stopped", "failed"


@dataclass
class Job:
    """One adaptation: its domain, state and progress."""

    id: int
    domain: Domain
    state: str = QUEUED
    stage: str = ""
    step: int = 0
    total: int = 0
    loss: float | None = None
    started: float | None = None
    started_at: float | None = None  # wall clock, to recognise the run folder it creates
    stage_started: float | None = None
    finished: float | None = None
    run: Path | None = None
    message: str = ""
    stop: StopRequest = field(default_factory=StopRequest)

    @property
    def eta(self) -> float | None:
        """Seconds left in the current stage, from its speed so far (None before the first step)."""
        if not self.step or self.stage_started is None or self.state != RUNNING:
            return None
        rate = (time.monotonic() - self.stage_started) / self.step
        return rate * max(0, self.total - self.step)

    def as_dict(self) -> dict:
        """The job as the page and the API show it."""
        return {
            "id": self.id, "domain": self.domain.name, "state": self.state, "stage": self.stage, "step": self.step,
            "total": self.total, "loss": self.loss, "eta_seconds": None if self.eta is None else round(self.eta, 1),
            "run": self.run.name if self.run else None, "message": self.message,
        }


class Jobs:
    """The adaptation queue of one server: `submit`, `stop`, `list`; one job runs at a time.

    Args:
        runs_root: where runs are written (the studio's runs folder).
        smoke: tiny random models (`ipl adapt --smoke`).
        device: where the jobs train.
    """

    def __init__(self, runs_root: Path, smoke: bool, device):
        self.runs_root = runs_root
        self.smoke = smoke
        self.device = device
        self._jobs: list[Job] = []
        self._pending: deque[Job] = deque()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._worker = threading.Thread(target=self._work, name="ipl-adapt-jobs", daemon=True)
        self._worker.start()

    def submit(self, domain: Domain) -> Job:
        """Queue an adaptation of the resolved `domain`; it starts when the jobs before it end."""
        with self._lock:
            job = Job(next(self._ids), domain)
            self._jobs.append(job)
            self._pending.append(job)
            self._wake.notify()
        return job

    def stop(self, job_id: int) -> Job:
        """Stop a job: a queued one is dropped, a running one saves its state and ends.

        Raises:
            KeyError: no such job.
        """
        with self._lock:
            job = next(j for j in self._jobs if j.id == job_id)
            if job.state == QUEUED:
                self._pending.remove(job)
                job.state, job.message = STOPPED, "removed from the queue"
            elif job.state == RUNNING:
                job.stop.requested = True
                job.message = "stopping after this step..."
        return job

    def list(self) -> list[Job]:
        """Every job of this server, newest first."""
        with self._lock:
            return list(reversed(self._jobs))

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no job is queued or running (tests, shutdown); False on timeout."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if not self._pending and all(j.state != RUNNING for j in self._jobs):
                    return True
            time.sleep(0.05)
        return False

    # -- the worker ------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._pending:
                    self._wake.wait()
                job = self._pending.popleft()
                job.state, job.started, job.started_at = RUNNING, time.monotonic(), time.time()
            self._run(job)

    def _run(self, job: Job) -> None:
        from ipltool.train.adapt import RunOptions, adapt

        @contextlib.contextmanager
        def stage_progress(total: int, description: str):
            job.stage, job.total, job.step, job.stage_started = description, total, 0, time.monotonic()

            def on_step(step: int, terms: dict) -> None:
                job.step = step
                loss = terms.get("loss")
                job.loss = float(loss) if loss is not None else job.loss

            yield on_step

        options = RunOptions(smoke=self.smoke, device=self.device, stage_progress=stage_progress, stop=job.stop)
        try:
            result = adapt(job.domain, self.runs_root, options)
            job.run, job.state, job.message = result.run.path, DONE, "finished"
        except Interrupted as err:
            job.state, job.message = STOPPED, f"{first_line(err.message)}; {err.hint}" if err.hint else first_line(err.message)
            job.run = _run_named_in(err.hint or "", self.runs_root) or job.run
        except IplError as err:
            job.state, job.message = FAILED, first_line(err.message)
        except Exception as err:  # the server outlives a failing job; the page shows why
            job.state, job.message = FAILED, f"{type(err).__name__}: {first_line(str(err))}"
        finally:
            job.finished = time.monotonic()


def _run_named_in(message: str, root: Path) -> Path | None:
    """The run folder an `Interrupted` hint names ("continue with: ipl adapt --resume RUN")."""
    for word in message.replace("`", " ").split():
        path = Path(word.rstrip(".,:;"))
        if path.parent.resolve() == root.resolve() and path.is_dir():
            return path
    return None
