"""What the studio offers by name: generators (finished runs, files in a folder) and runs.

Every field of the page that names something takes a **key** from these lists, and the
handlers look keys up here instead of opening paths: a key is never joined to a folder,
so `..`, absolute paths or any other text that is not listed is simply unknown, and no
request can reach a file outside the configured folders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ipltool.errors import UsageError, did_you_mean
from ipltool.render.generators import GeneratorRef, resolve_generator
from ipltool.train.run import GENERATOR_NAME, RunDir, RunInfo


@dataclass(frozen=True)
class Entry:
    """A generator the page can render: its key (what the page sends), label (what it shows) and reference."""

    key: str
    label: str
    ref: GeneratorRef


@dataclass(frozen=True)
class RunEntry:
    """A run folder under the runs root, as the runs list shows it."""

    key: str  # the folder's name
    path: Path
    domain: str
    stage: str
    method: str
    steps: int | None
    finished: bool
    smoke: bool


def _runs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and (p / "config.toml").is_file()), key=lambda p: p.name, reverse=True)


def list_runs(root: Path) -> list[RunEntry]:
    """Every run under `root` (adapt and train-mapper, finished or not), newest name first."""
    entries = []
    for path in _runs(root):
        run = RunDir.open(path)
        try:
            config = run.read_config()
            info = run.read_info()
        except UsageError:
            continue
        adapt = config.get("adapt") if isinstance(config.get("adapt"), dict) else {}
        entries.append(
            RunEntry(
                path.name, path, str(config.get("name", path.name)), info.stage or "?", str(adapt.get("method", "ipl")),
                adapt.get("steps") if isinstance(adapt.get("steps"), int) else None,
                (path / GENERATOR_NAME).is_file() if info.stage == "adapt" else (path / "mapper.pt").is_file(), info.smoke,
            )
        )
    return entries


def list_generators(runs_root: Path, generators_dir: Path | None, smoke: bool) -> list[Entry]:
    """Generators to render: finished adapt runs (only `--smoke` ones when `smoke`, only real ones otherwise)
    and the `.pt` files of `generators_dir`."""
    entries = []
    for run in list_runs(runs_root):
        if run.stage == "adapt" and run.finished and run.smoke == smoke:
            ref = resolve_generator(str(run.path), runs_root)
            entries.append(Entry(f"run:{run.key}", f"{run.domain} · {run.method} · {run.key}", ref))
    if generators_dir is not None and generators_dir.is_dir():
        for path in sorted(generators_dir.glob("*.pt")):
            ref = resolve_generator(str(path), runs_root)
            entries.append(Entry(f"file:{path.name}", f"{path.stem} (file)", ref))
    return entries


def lookup(entries: list, key: str, what: str):
    """The entry of `entries` whose key is `key`.

    Raises:
        UsageError: no such key (a path, `..`, or a name that is not listed).
    """
    for entry in entries:
        if entry.key == key:
            return entry
    raise UsageError(f"unknown {what} {key!r}{did_you_mean(str(key), [e.key for e in entries])}", hint=f"choose a {what} from the list")


def run_metrics(run: Path, reports: list[Path]) -> list[dict]:
    """The `ipl eval` results of `run` found in the `metrics.json` of the report folders `reports`."""
    found = []
    for folder in reports:
        path = folder / "metrics.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for result in data.get("runs", []) if isinstance(data, dict) else []:
            if not (isinstance(result, dict) and result.get("kind") == "run" and result.get("strength", 1) == 1):
                continue  # a run's own numbers: not a strength variant of it
            if result.get("path") and Path(result["path"]).resolve() == run.resolve():
                found.append({"report": str(folder), "label": result.get("label"), "metrics": result.get("metrics", {})})
    return found


def run_details(entry: RunEntry) -> tuple[str, list[Path], RunInfo | None]:
    """(config.toml text, sample grids newest last, run info) of a run."""
    run = RunDir.open(entry.path)
    try:
        text = run.config_path.read_text(encoding="utf-8")
        info = run.read_info()
    except (OSError, UsageError):
        text, info = "", None
    grids = sorted(run.samples_dir.glob("*.png")) if run.samples_dir.is_dir() else []
    return text, grids, info
