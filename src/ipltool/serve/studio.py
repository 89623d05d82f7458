"""The studio's work, without the page: stylize an upload, explore seeds, adapt, list runs.

`serve.app` lays these out with Gradio; tests and scripts call them directly. Each method
takes what a page field holds (catalog keys, numbers, text) and returns plain values
(file paths, dicts, messages). Models are loaded once and kept per device; the calls
that use them hold one lock, so two requests never share a batch on the device.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ipltool.errors import UsageError
from ipltool.serve import catalog
from ipltool.serve.jobs import Jobs

#: Largest upload the page accepts (Gradio refuses larger files before they reach us).
MAX_UPLOAD_MB = 20
#: Pictures `explore` renders at most in one request.
MAX_EXPLORE_SEEDS = 16
#: Target sets (generators at a strength) kept loaded.
TARGET_CACHE = 4
#: Seconds a request's result files are kept in the work folder.
KEEP_RESULTS = 3600


@dataclass
class StudioConfig:
    """Where the studio reads and writes, and with which models.

    Attributes:
        runs: the runs folder (listed, and where adaptations go).
        work: the folder of per-session temporary files (uploads, results).
        generators: a folder of generator .pt files to offer too (optional).
        reports: `ipl eval` report folders whose metrics the runs list shows.
        smoke: tiny random models (a page that works without weights).
        encoder: the encoder plugin for stylize.
        device: where models run.
    """

    runs: Path = Path("runs")
    work: Path | None = None
    generators: Path | None = None
    reports: list[Path] = field(default_factory=list)
    smoke: bool = False
    encoder: str = "e4e"
    device: str = "cpu"


@dataclass
class StylizeView:
    """What the stylize panel shows: the aligned face, its reconstruction, the stylized faces and paste-backs."""

    message: str
    faces: int = 0
    aligned: str | None = None
    reconstruction: str | None = None
    stylized: list[tuple[str, str]] = field(default_factory=list)  # (path, label)
    pasted: list[tuple[str, str]] = field(default_factory=list)


class Studio:
    """The state of one server: configuration, loaded models, adaptation jobs."""

    def __init__(self, config: StudioConfig):
        import torch

        self.config = config
        self.device = torch.device(config.device)
        self.work = Path(config.work) if config.work else Path(tempfile.mkdtemp(prefix="ipl-serve-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()  # one model call on the device at a time
        self._inverter = None
        self._detector = None
        self._targets: dict[tuple, list] = {}
        self._loader = None  # render.generate.Loader of explore and interpolate, made on first use
        self.jobs = Jobs(config.runs, config.smoke, self.device)

    # -- catalog ---------------------------------------------------------------

    def generators(self) -> list[catalog.Entry]:
        """The generators the page offers (see `catalog.list_generators`)."""
        return catalog.list_generators(self.config.runs, self.config.generators, self.config.smoke)

    def runs(self) -> list[catalog.RunEntry]:
        """Every run under the runs folder."""
        return catalog.list_runs(self.config.runs)

    def _entries(self, keys: list[str] | str | None) -> list[catalog.Entry]:
        keys = [keys] if isinstance(keys, str) else list(keys or [])
        if not keys:
            raise UsageError("choose at least one generator")
        available = self.generators()
        return [catalog.lookup(available, key, "generator") for key in dict.fromkeys(keys)]

    def session_dir(self, session: str) -> Path:
        """The temporary folder of one browser session (created; a safe name whatever `session` holds).

        Results older than `KEEP_RESULTS` seconds, of any session, are removed on the way:
        a long-running server keeps an hour of files, not everything it ever made.
        """
        import hashlib
        import time

        folder = self.work / hashlib.sha256(session.encode()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - KEEP_RESULTS
        for result in self.work.glob("*/*-*"):
            with contextlib.suppress(OSError):
                if result.is_dir() and result.stat().st_mtime < cutoff:
                    shutil.rmtree(result, ignore_errors=True)
        return folder

    # -- stylize ---------------------------------------------------------------

    def _load_inverter(self):
        if self._inverter is None:
            from ipltool.invert.pipeline import load_inverter

            self._inverter = load_inverter(self.config.encoder, None, self.config.smoke, {}, self.device)
        return self._inverter

    def _load_detector(self):
        if self._detector is None:
            from ipltool.invert.landmarks import FaceDetector

            self._detector = FaceDetector().load()
        return self._detector

    def _load_targets(self, entries: list[catalog.Entry], strength: float) -> list:
        from ipltool.invert.targets import TargetSpec, load_targets

        key = (tuple(e.key for e in entries), strength, tuple(os.stat(e.ref.path).st_mtime_ns for e in entries if e.ref.path))
        if key not in self._targets:
            specs = [TargetSpec(e.ref.label, e.ref.path, e.ref.origin) for e in entries]
            if len(self._targets) >= TARGET_CACHE:
                self._targets.pop(next(iter(self._targets)))
            self._targets[key] = load_targets(specs, self.device, self._load_inverter().decoder, [strength])
        return self._targets[key]

    def stylize(self, upload: str | os.PathLike, keys: list[str], strength: float = 1.0, session: str = "default") -> StylizeView:
        """Align, invert and stylize the largest face of an uploaded picture with each chosen generator.

        Args:
            upload: the uploaded file (Gradio's copy of it).
            keys: generator keys from `generators()`.
            strength: style strength α (`render.blend`), 0..2.
            session: the browser session; its files go to its own folder.

        Returns:
            A `StylizeView`; "no face" is a message, not an error.

        Raises:
            UsageError: no picture, an unreadable or oversized one (decompression bombs
                included), an unknown generator key, a strength out of range.
        """
        from ipltool.images import load_rgb, png_bytes
        from ipltool.invert.inputs import Photo
        from ipltool.invert.outputs import OK
        from ipltool.invert.pipeline import stylize_photos
        from ipltool.invert.stylize import StylizeOptions

        if not upload:
            raise UsageError("upload a photo first")
        if not (0 <= strength <= 2):
            raise UsageError(f"strength must be between 0 and 2 (got {strength})")
        entries = self._entries(keys)
        picture = load_rgb(upload)  # the same checks as `ipl stylize`: unreadable files, decompression bombs
        folder = Path(tempfile.mkdtemp(prefix="stylize-", dir=self.session_dir(session)))
        photo = folder / "upload.png"
        photo.write_bytes(png_bytes(picture))
        with self.lock:
            inverter = self._load_inverter()
            targets = self._load_targets(entries, strength)
            options = StylizeOptions(paste_back=True, batch=1)
            result = stylize_photos([Photo(photo, "photo")], folder / "out", inverter, targets, options, self.device, self._load_detector())
        record = result.stylizer.manifest.read().get(str(photo), {})
        out = folder / "out"
        if record.get("status") == "no face":  # the manifest's reason names the server's temporary path: not shown
            return StylizeView("No face found in this photo: try a photo where the face is larger, frontal and well lit")
        if record.get("status") != OK:
            reason = str(record.get("error") or record.get("status") or "nothing was written").replace(str(folder), "upload")
            return StylizeView(f"Could not stylize this photo: {reason}")
        face = record["outputs"][0]
        view = StylizeView(
            f"{record['faces']} face(s) found; showing the largest", record["faces"], str(out / face["aligned"]), str(out / face["reconstruction"]),
            [(str(out / path), label) for label, path in face["stylized"].items()],
            [(str(out / path), label) for label, path in record.get("pasted", {}).items()],
        )
        return view

    # -- explore ---------------------------------------------------------------

    def explore(self, seeds: str, keys: list[str], truncation: float = 0.7, strength: float = 1.0, session: str = "default") -> str:
        """A grid of `seeds` (rows) by the source and each chosen generator (columns); returns its PNG path.

        Raises:
            UsageError: bad seeds (or more than `MAX_EXPLORE_SEEDS`), truncation or key.
        """
        from ipltool.precision import FP32
        from ipltool.render.generate import RenderOptions, generate_pictures, seed_rows
        from ipltool.render.latents import check_truncation
        from ipltool.render.seeds import parse_seeds

        chosen = parse_seeds(str(seeds))
        if len(chosen) > MAX_EXPLORE_SEEDS:
            raise UsageError(f"at most {MAX_EXPLORE_SEEDS} seeds at a time (got {len(chosen)})")
        check_truncation(truncation)
        columns = self._columns(keys, strength)
        folder = Path(tempfile.mkdtemp(prefix="explore-", dir=self.session_dir(session)))
        with self.lock:
            result = generate_pictures(columns, seed_rows(chosen), folder, RenderOptions(truncation, 0, 8, FP32), grid=True, pictures=False)
        return str(result.grid)

    def interpolate(self, first: int, second: int, keys: list[str], truncation: float = 0.7, frames: int = 16, session: str = "default") -> str:
        """An animated GIF walking from seed `first` to `second` and back, every chosen generator side by side.

        Raises:
            UsageError: bad seeds, frames or key.
        """
        from ipltool.render.generate import RenderOptions, WalkOptions, interpolation_video
        from ipltool.render.latents import check_truncation

        check_truncation(truncation)
        if not 2 <= int(frames) <= 60:
            raise UsageError(f"frames must be between 2 and 60 (got {frames})")
        columns = self._columns(keys, 1.0)
        walk = WalkOptions([int(first), int(second)], int(frames), 12.0, loop=True)
        path = Path(tempfile.mkdtemp(prefix="walk-", dir=self.session_dir(session))) / "walk.gif"
        with self.lock:
            interpolation_video(columns, walk, path, RenderOptions(truncation=truncation))
        return str(path)

    def _columns(self, keys: list[str], strength: float) -> list:
        from ipltool.render.generate import Loader, build_columns

        if self._loader is None:  # one per server: each generator file is read once, not per request
            self._loader = Loader(self.device)
        if not (0 <= strength <= 2):
            raise UsageError(f"strength must be between 0 and 2 (got {strength})")
        refs = [entry.ref for entry in self._entries(keys)]
        return build_columns(refs, self._loader, [strength], with_source=True)

    # -- adapt -----------------------------------------------------------------

    def domain_text(self, name: str) -> str:
        """The complete TOML of a domain, as `ipl prompts show NAME` prints it (the editor's start)."""
        from ipltool import tomlio
        from ipltool.domain import load_domain

        return tomlio.dumps(load_domain(_domain_name(name)).resolved().to_toml_dict())

    def check_domain(self, text: str):
        """Validate domain TOML from the editor; returns the resolved `Domain` (with `--smoke` settings when smoke).

        Raises:
            DomainError: every problem, one line each with its line number.
            UsageError: a `generator` that is a path (the studio takes registry names only).
        """
        from ipltool.domain import parse_domain
        from ipltool.train.setup import SMOKE_OVERRIDES

        domain = parse_domain(text, "domain")
        if any(sep in domain.generator for sep in ("/", "\\")) or domain.generator.endswith((".pt", ".pkl", ".pth")):
            raise UsageError("generator: the studio takes registry generator names, not paths", hint="e.g. generator = \"stylegan2-ffhq-1024\"")
        if self.config.smoke:
            domain = domain.with_overrides(SMOKE_OVERRIDES)
        return domain.resolved()

    def start_adapt(self, text: str) -> dict:
        """Validate the domain TOML and queue its adaptation; returns the job."""
        return self.jobs.submit(self.check_domain(text)).as_dict()

    def stop_job(self, job_id: int) -> dict:
        """Stop a queued or running adaptation.

        Raises:
            UsageError: no such job.
        """
        try:
            return self.jobs.stop(int(job_id)).as_dict()
        except (KeyError, StopIteration, ValueError, TypeError):
            raise UsageError(f"no adaptation job {job_id!r}") from None

    def job_status(self) -> tuple[list[dict], str | None]:
        """(every job, newest first; the newest sample grid of the latest job's run, if any)."""
        jobs = self.jobs.list()
        grid = None
        for job in jobs:
            run = job.run or self._run_of(job)
            if run is not None:
                samples = sorted((run / "samples").glob("*.png")) if (run / "samples").is_dir() else []
                grid = str(samples[-1]) if samples else None
                break
        rows = []
        for job in jobs:
            row = job.as_dict()
            if row["run"] is None and job.state == "running":
                run = self._run_of(job)
                row["run"] = run.name if run is not None else None
            rows.append(row)
        return rows, grid

    def _run_of(self, job) -> Path | None:
        """The run folder a running job writes (the newest of its domain started after it)."""
        if job.started_at is None:
            return None
        candidates = [r.path for r in self.runs() if r.domain == job.domain.name and r.path.stat().st_mtime >= job.started_at - 1]
        return candidates[0] if candidates else None

    # -- runs ------------------------------------------------------------------

    def run_details(self, key: str) -> dict:
        """A run's config, sample grids and `ipl eval` numbers.

        Raises:
            UsageError: no run of that name under the runs folder.
        """
        entry = catalog.lookup(self.runs(), key, "run")
        text, grids, _ = catalog.run_details(entry)
        return {"config": text, "samples": [str(p) for p in grids], "metrics": catalog.run_metrics(entry.path, self.config.reports)}

    def close(self) -> None:
        """Remove the session files (the runs stay)."""
        shutil.rmtree(self.work, ignore_errors=True)


def _domain_name(name: str) -> str:
    """A domain *name* from the page: never a path (`ipl prompts` would take one)."""
    from ipltool.domain import discover_domains

    names = [entry.name for entry in discover_domains() if not entry.error]
    if name not in names:
        from ipltool.errors import did_you_mean

        raise UsageError(f"unknown domain {name!r}{did_you_mean(str(name), names)}", hint="choose a domain from the list")
    return name
