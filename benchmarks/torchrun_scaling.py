"""Throughput of `ipl stylize --smoke` and `ipl eval --smoke` with 1 and 2 processes under torchrun (CPU, gloo).

    python benchmarks/torchrun_scaling.py                 # prints a table, appends it to RESULTS.md
    python benchmarks/torchrun_scaling.py --no-write

Each case runs in a fresh temporary folder with one thread per process (OMP_NUM_THREADS=1),
so that N processes use N cores. The point on a 2-core machine is correctness at scale, not
speed: the figures show what the split costs and gains.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def _run(root: Path, ranks: int, *args: str) -> float:
    env = {**os.environ, "IPL_CACHE": str(root / "cache"), "IPL_OFFLINE": "1", "IPL_PLUGINS": "", "OMP_NUM_THREADS": "1"}
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    command = [torchrun, "--standalone", f"--nproc-per-node={ranks}", "--no-python", "ipl", *args] if ranks > 1 else ["ipl", *args]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=48)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    import numpy as np
    from PIL import Image
    from skimage import data

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photos = root / "photos"
        photos.mkdir()
        face = data.astronaut()
        for i in range(args.photos):
            Image.fromarray(np.roll(face, 3 * i, axis=1)).save(photos / f"p{i:03d}.png")
        _run(root, 1, "--quiet", "adapt", "-d", "disney", "--smoke", "--out", "runs")
        run = next((root / "runs").iterdir())
        for ranks in (1, 2):
            seconds = _run(root, ranks, "--quiet", "stylize", "photos", "--smoke", "-d", "disney", "--runs", "runs", "--out", f"st{ranks}")
            rows.append(("stylize", ranks, args.photos, "photos", seconds))
            shutil.rmtree(run / "eval-cache", ignore_errors=True)
            seconds = _run(root, ranks, "--quiet", "eval", str(run), "--smoke", "--metrics", "clip,is", "--samples", str(args.samples), "--report", f"rep{ranks}")
            rows.append(("eval", ranks, args.samples, "samples", seconds))
    lines = ["| command | processes | items | wall s (incl. start-up) | items/s |", "|---|---|---|---|---|"]
    for command, ranks, items, unit, seconds in rows:
        lines.append(f"| {command} --smoke | {ranks} | {items} {unit} | {seconds:.1f} | {items / seconds:.1f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        cpu = os.cpu_count()
        text = (f"\n## torchrun scaling, {date.today().isoformat()}, CPU ({cpu} cores), gloo, one thread per process\n\n"
                f"`python benchmarks/torchrun_scaling.py` (tiny `--smoke` models; wall time includes each process's start-up)\n\n{table}\n")
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(text)
        print(f"appended to {RESULTS}")
    print(json.dumps([dict(zip(("command", "ranks", "items", "unit", "seconds"), r)) for r in rows]))


if __name__ == "__main__":
    main()
