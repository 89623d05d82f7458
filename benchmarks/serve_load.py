"""Load `ipl serve`: concurrent stylize requests, their latency, and the server's memory before and after.

The server is the real command (`ipl serve --smoke`, tiny random models) in a subprocess on
127.0.0.1. A warm-up round loads the models; then each timed round fires `--requests`
stylize calls at once, one `gradio_client.Client` (one browser session) per thread, and
waits for every answer. The page queues model calls one at a time (`concurrency_limit=1`),
so latency grows with a request's place in the queue: the figures show queueing, not
parallel speed-up.

Memory is the resident set (RSS) of the server process: psutil when installed, else
`/proc/PID/status`. It is sampled every 20 ms during a round (the peak), and read again
once the round is over (after). With no leak, a second round ends where the first did.

    python benchmarks/serve_load.py                        # 20 requests x 2 rounds, appends to RESULTS.md
    python benchmarks/serve_load.py --requests 8 --rounds 1 --no-write
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVER_START_S = 90  # imports, Gradio start-up on a slow two-core machine
REQUEST_TIMEOUT_S = 300  # one request, its wait in the queue included


# -- the server ------------------------------------------------------------------


def server_env(root: Path) -> dict[str, str]:
    """An offline, plugin-free environment with its cache under `root` (the tests' `isolated_env`)."""
    return {
        **os.environ, "IPL_OFFLINE": "1", "IPL_CACHE": str(root / "cache"), "IPL_PLUGINS": "",
        "IPL_DOMAINS_DIR": str(root / "user-domains"), "GRADIO_ANALYTICS_ENABLED": "False",
    }


def ipl_command(*args: str) -> list[str]:
    """`ipl ARGS` with this Python (no reliance on the `ipl` script being on PATH)."""
    return [sys.executable, "-c", "from ipltool.cli import run; run()", *args]


def make_smoke_run(root: Path) -> str:
    """A finished `--smoke` disney run under `root/runs`; returns its generator key (`run:NAME`)."""
    command = ipl_command("--quiet", "adapt", "--domain", "disney", "--smoke", "--steps", "2", "--out", str(root / "runs"))
    done = subprocess.run(command, check=False, env=server_env(root), cwd=root, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ipl adapt --smoke failed:\n{done.stdout}{done.stderr}")
    (run,) = [p for p in (root / "runs").iterdir() if (p / "generator.pt").is_file()]
    return f"run:{run.name}"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, *extra: str, timeout: float = SERVER_START_S) -> tuple[subprocess.Popen, str]:
    """`ipl serve --smoke --runs ROOT/runs EXTRA...` on a free port; returns (process, url) once the page answers.

    The server's output goes to `ROOT/server.log`, which the error quotes when it never comes up.
    """
    import httpx

    port = free_port()
    with open(root / "server.log", "wb") as log:
        command = ipl_command("--quiet", "serve", "--smoke", "--runs", str(root / "runs"), "--port", str(port), *extra)
        process = subprocess.Popen(command, env=server_env(root), stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}/"
    end = time.monotonic() + timeout
    while time.monotonic() < end and process.poll() is None:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)  # the port is not open yet: nothing to wait on but time
    stop_server(process)
    raise RuntimeError(f"ipl serve did not answer on {url}:\n{(root / 'server.log').read_text(errors='replace')[-3000:]}")


def stop_server(process: subprocess.Popen) -> None:
    """End a server started by `start_server` (terminate, then kill)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# -- memory ----------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MiB."""
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for process {pid}") from None
    return psutil.Process(pid).memory_info().rss / 2**20


class PeakRss:
    """Samples `rss_mb(pid)` in a thread while the `with` block runs; `.peak` is the largest sample."""

    def __init__(self, pid: int, every: float = 0.02):
        self.pid, self.every, self.peak = pid, every, 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mb(self.pid))
            if self._done.wait(self.every):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


# -- the load ----------------------------------------------------------------------


def burst(url: str, photo: Path, key: str, requests: int, downloads: Path) -> tuple[list[float], list[str], float]:
    """Fire `requests` stylize calls at once, one client (session) each; returns (seconds, messages, wall seconds).

    A call that fails puts `error: ...` in place of its message. Clients connect before the
    start line, so the timed part is the calls alone.
    """
    from gradio_client import Client, handle_file

    clients = [Client(url, verbose=False, download_files=str(downloads), analytics_enabled=False) for _ in range(requests)]
    start = threading.Barrier(requests + 1)
    seconds, messages = [0.0] * requests, [""] * requests

    def call(i: int) -> None:
        start.wait()
        began = time.perf_counter()
        try:
            job = clients[i].submit(handle_file(str(photo)), [key], 1.0, api_name="/stylize")
            messages[i] = job.result(timeout=REQUEST_TIMEOUT_S)[0]
        except Exception as err:  # every failure is a figure of the test, not a crash of it
            messages[i] = f"error: {type(err).__name__}: {err}"
        seconds[i] = time.perf_counter() - began

    threads = [threading.Thread(target=call, args=(i,)) for i in range(requests)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    for client in clients:
        client.close()
    return seconds, messages, wall


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile (0..1) of `values`, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def folder_mb(folder: Path) -> float:
    """Size of the files under `folder`, in MiB."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20 if folder.is_dir() else 0.0


def run_load(root: Path, requests: int, rounds: int) -> dict:
    """Start a smoke server under `root`, warm it up, fire `rounds` bursts of `requests`; returns the figures.

    Returns:
        A dict: `rss_mb` (start, warm), `rounds` (per round: latency figures, failures,
        RSS peak and after), `alive` (the server outlived the load), `work_mb` and
        `sessions` (the session files the requests left, and their session folders).
    """
    import numpy as np
    from PIL import Image
    from skimage import data

    root.mkdir(parents=True, exist_ok=True)
    key = make_smoke_run(root)
    photo = root / "astronaut.png"
    Image.fromarray(np.asarray(data.astronaut())).save(photo)
    process, url = start_server(root, "--work", str(root / "work"))
    try:
        figures = {"requests": requests, "key": key, "rss_mb": {"start": rss_mb(process.pid)}, "rounds": []}
        _, messages, _ = burst(url, photo, key, 1, root / "downloads")  # loads the encoder, detector and targets
        if "face(s) found" not in messages[0]:
            raise RuntimeError(f"the warm-up request failed: {messages[0]}")
        figures["rss_mb"]["warm"] = rss_mb(process.pid)
        for _ in range(rounds):
            with PeakRss(process.pid) as peak:
                seconds, messages, wall = burst(url, photo, key, requests, root / "downloads")
            time.sleep(1.0)  # let the server finish its bookkeeping (queue, temporary uploads) before reading RSS
            failures = [m for m in messages if "face(s) found" not in m]
            figures["rounds"].append({
                "min": min(seconds), "median": statistics.median(seconds), "p95": percentile(seconds, 0.95), "max": max(seconds),
                "wall": wall, "failures": failures, "peak_mb": peak.peak, "after_mb": rss_mb(process.pid),
            })
        figures["alive"] = process.poll() is None
        figures["work_mb"] = folder_mb(root / "work")
        figures["sessions"] = sum(1 for p in (root / "work").iterdir() if p.is_dir())
        return figures
    finally:
        stop_server(process)


# -- report ------------------------------------------------------------------------


def table(figures: dict) -> list[str]:
    """The figures as Markdown table lines."""
    rss = figures["rss_mb"]
    lines = [
        f"Server RSS: {rss['start']:.0f} MiB once up, {rss['warm']:.0f} MiB after the warm-up request (models loaded).\n",
        "| round | requests | answered | errors | min s | median s | p95 s | max s | wall s | RSS peak MiB | RSS after MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(figures["rounds"], 1):
        n = figures["requests"]
        lines.append(
            f"| {i} | {n} | {n - len(r['failures'])} | {len(r['failures'])} | {r['min']:.2f} | {r['median']:.2f} | {r['p95']:.2f} | {r['max']:.2f} "
            f"| {r['wall']:.2f} | {r['peak_mb']:.0f} | {r['after_mb']:.0f} |"
        )
    return lines


def write_results(figures: dict, command: str) -> Path:
    """Append a dated section to benchmarks/RESULTS.md (append only: other sections stay as they are)."""
    import gradio

    rounds = figures["rounds"]
    lines = [
        f"\n## ipl serve under load, {date.today().isoformat()}, cpu\n",
        f"Command: `{command}`; {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, Gradio {gradio.__version__}.",
        (
            f"`ipl serve --smoke` (tiny random models) on 127.0.0.1; each round fires {figures['requests']} `/stylize` calls at once "
            "(skimage's astronaut, one `gradio_client.Client` per request, so one session each) after one warm-up request. "
            "The queue runs one model call at a time, so a request's latency is mostly its wait in the queue.\n"
        ),
        *table(figures),
        "",
        (
            f"RSS after the last round is {rounds[-1]['after_mb'] - figures['rss_mb']['warm']:+.0f} MiB from the warm server; "
            f"the session files of all {len(rounds) * figures['requests'] + 1} requests take {figures['work_mb']:.1f} MiB "
            "in the work folder (kept until the server exits)."
        ),
    ]
    path = HERE / "RESULTS.md"
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20, help="concurrent stylize calls per round")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up")
    parser.add_argument("--no-write", action="store_true", help="print the figures without touching RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ipl-serve-load-") as tmp:
        figures = run_load(Path(tmp), args.requests, args.rounds)
    print("\n".join(table(figures)))
    for i, r in enumerate(figures["rounds"], 1):
        for failure in r["failures"]:
            print(f"round {i}: {failure}")
    if not args.no_write:
        arenas = os.environ.get("MALLOC_ARENA_MAX")  # the server inherits it: it changes the memory figures
        command = f"{f'MALLOC_ARENA_MAX={arenas} ' if arenas else ''}python benchmarks/serve_load.py --requests {args.requests} --rounds {args.rounds}"
        print(f"written to {write_results(figures, command)}")
    if any(r["failures"] for r in figures["rounds"]) or not figures["alive"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
