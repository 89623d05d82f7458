"""Time the commands that compute nothing (help, listings, `kernels info`) and record them in RESULTS.md.

Each command runs as a user runs it, through the installed `ipl` console script in a new
process, `--repeat` times after one warm-up (which also writes the .pyc files); the figure
is the median wall time. A second table lists the largest imports of `ipltool.cli`
(`python -X importtime`) and whether torch was among them.

    python benchmarks/startup.py                 # measure and append to RESULTS.md
    python benchmarks/startup.py --no-write      # only print
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOMAIN_FILE = HERE.parent / "src" / "ipltool" / "domains" / "disney.toml"
COMMANDS = [
    "--help", "--version", "adapt --help", "stylize --help", "eval --help", "train-mapper --help", "fetch --help",
    "prompts list", "prompts show disney", f"prompts validate {DOMAIN_FILE}", "plugins", "fetch --list", "kernels info",
]


def time_command(ipl: str, args: str, repeat: int, env: dict) -> float:
    """Median seconds of `ipl ARGS` over `repeat` runs, after one warm-up run."""
    times = []
    for attempt in range(repeat + 1):
        start = time.perf_counter()
        subprocess.run([ipl, *args.split()], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        if attempt:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def largest_imports(count: int) -> tuple[list[tuple[str, float]], bool]:
    """The `count` slowest top-level imports under `ipltool.cli` (cumulative ms), and whether torch was imported."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import ipltool.cli"], capture_output=True, text=True, check=True)
    rows = []
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( +)(\S+)", line)
        if match:
            rows.append((match.group(3), int(match.group(1)) / 1000, len(match.group(2))))
    imported_torch = any(name == "torch" for name, _, _ in rows)
    top = sorted(((name, ms) for name, ms, depth in rows if depth <= 3), key=lambda r: -r[1])
    return top[:count], imported_torch


def write_results(rows: list[tuple[str, float]], imports: list[tuple[str, float]], imported_torch: bool, repeat: int) -> None:
    """Append a dated section to benchmarks/RESULTS.md."""
    lines = [
        f"## Start-up of the commands that compute nothing, {date.today().isoformat()}",
        "",
        f"Command: `python benchmarks/startup.py` (each command {repeat} times through the installed `ipl` script after a "
        f"warm-up; median wall time). Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}.",
        "",
        "| command | seconds |",
        "|---|---|",
        *(f"| `ipl {args.replace(str(DOMAIN_FILE), 'disney.toml')}` | {seconds:.2f} |" for args, seconds in rows),
        "",
        f"`python -X importtime -c 'import ipltool.cli'`: torch imported: {'yes' if imported_torch else 'no'}; largest imports (cumulative ms):",
        "",
        "| module | ms |",
        "|---|---|",
        *(f"| {name} | {ms:.1f} |" for name, ms in imports),
        "",
    ]
    path = HERE / "RESULTS.md"
    path.write_text(path.read_text().rstrip("\n") + "\n\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print the figures without touching RESULTS.md")
    args = parser.parse_args()
    ipl = shutil.which("ipl", path=os.path.dirname(sys.executable)) or shutil.which("ipl")
    if ipl is None:
        sys.exit("no `ipl` script: install the package first (see the README)")
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "IPL_CACHE": f"{tmp}/cache", "IPL_DOMAINS_DIR": f"{tmp}/domains"}
        rows = [(command, time_command(ipl, command, args.repeat, env)) for command in COMMANDS]
    imports, imported_torch = largest_imports(8)
    for command, seconds in rows:
        print(f"{seconds:6.2f} s  ipl {command}")
    print(f"torch imported by `import ipltool.cli`: {imported_torch}")
    for name, ms in imports:
        print(f"{ms:8.1f} ms  {name}")
    if not args.no_write:
        write_results(rows, imports, imported_torch, args.repeat)


if __name__ == "__main__":
    main()
