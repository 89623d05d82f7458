"""`ipl serve` under a burst of concurrent stylize requests: every one answered, memory settles.

The quick version of `benchmarks/serve_load.py`, with the same code: a real `ipl serve
--smoke` subprocess, one warm-up request, then two rounds of 20 simultaneous requests,
one client session each. Nothing here times the requests (a busy two-core runner may be
slow, not wrong); what must hold is that all are answered, without error, by a server
still running, and that the second round adds little memory to the first.
"""

from __future__ import annotations

import bench
import pytest

pytest.importorskip("gradio", reason="the serve extra (gradio) is not installed")
pytest.importorskip("gradio_client", reason="gradio_client (dev extra) is not installed")

# Same worker as the other `ipl serve` tests: one Gradio server at a time, the other core for the rest.
pytestmark = pytest.mark.xdist_group("serve")

REQUESTS = 20
#: RSS the second round may add to the first, in MiB: the warm-up and first round fill the
#: caches and allocator pools (then ~10 MiB a round); keeping 3 MiB a request (a photo and its results) fails.
MAX_GROWTH_MB = 60
#: RSS a burst may take above the warm server, in MiB: requests queue, so only one runs at a time.
MAX_BURST_MB = 400


def _serve_load():
    """`benchmarks/serve_load.py`, whose `start_server` and `stop_server` run `ipl serve` here too."""
    return bench.load("serve_load")


def test_concurrent_stylize_requests_are_all_answered_and_memory_settles(tmp_path, monkeypatch):
    # Two glibc arenas (instead of 8 per core) for the server's threads: arenas kept by
    # worker threads are not leaks, and without them the growth figure measures the program.
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    figures = _serve_load().run_load(tmp_path, REQUESTS, rounds=2)

    first, second = figures["rounds"]
    for r in (first, second):
        assert r["failures"] == [], r["failures"][:3]
    assert figures["alive"], (tmp_path / "server.log").read_text(errors="replace")[-2000:]
    assert figures["sessions"] == 1 + 2 * REQUESTS  # one folder per client session: no two requests share files
    warm = figures["rss_mb"]["warm"]
    assert second["after_mb"] <= second["peak_mb"] + 5  # nothing keeps growing once the burst is over
    assert second["after_mb"] - first["after_mb"] < MAX_GROWTH_MB, figures
    assert max(first["peak_mb"], second["peak_mb"]) - warm < MAX_BURST_MB, figures
