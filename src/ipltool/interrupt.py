"""Stopping long runs cleanly: the first Ctrl-C (or SIGTERM) asks the loop to stop.

A training loop checks `StopRequest.requested` between steps, so it can save a
consistent state (never one cut in the middle of an optimizer step) and exit. A
second Ctrl-C aborts at once; the last saved state is then what a resume uses.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from typing import Iterator

from ipltool import console


@dataclass
class StopRequest:
    """Set by the signal handler; read by the loop between steps."""

    requested: bool = False
    signal_name: str = ""


@contextlib.contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """Within the block, SIGINT/SIGTERM set the yielded flag instead of raising.

    Outside the main thread (where Python cannot install handlers) the flag is
    yielded unchanged and signals keep their usual effect.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum, frame):
        if request.requested:
            raise KeyboardInterrupt
        request.requested = True
        request.signal_name = signal.Signals(signum).name
        console.err.print("[yellow]stopping after this step and saving the state; press Ctrl-C again to abort now[/]")

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
