"""The `ipl eval` pipeline as a library call: check the settings, resolve the inputs, measure, write the report.

`ipl eval` translates its flags into a `Settings` and renders the `EvalResult`; scripts
and the web UI call `evaluate_inputs` directly. Inputs with nothing to measure are
skipped with a reason (passed to `on_skip` as they happen) and the rest is evaluated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ipltool import console
from ipltool.atomic import atomic_write_bytes, sweep_stale_temps
from ipltool.distributed import world
from ipltool.errors import CheckpointError, IplError, UsageError, did_you_mean
from ipltool.metrics.evaluate import NONFINITE_REASON, Evaluator, Settings
from ipltool.metrics.sampling import EvalInput, NotEvaluable, blend_input, resolve_input, with_strengths
from ipltool.outdir import check_output_folder, write_failures
from ipltool.report import write_report

SAMPLE_COLUMNS = 6
SAMPLE_TILE = 160  # px: large enough to compare two runs side by side in the report
THEN = "then run the same `ipl eval` again (features already computed are cached)"


@dataclass
class EvalResult:
    """What an evaluation produced: a result per input, what was skipped and why, the report files."""

    results: list[dict]
    skipped: list[dict]
    nonfinite: list[tuple[str, str]]  # (input name, metric key) of values that came out NaN or infinite
    report: dict[str, Path] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Nothing skipped and every value finite (`ipl eval` exits 0)."""
        return not self.skipped and not self.nonfinite


def check_settings(settings: Settings) -> None:
    """Refuse settings that would fail later, in the words of `ipl eval`'s flags.

    Raises:
        UsageError: one line naming the flag.
    """
    from ipltool.models.clip import check_model_name
    from ipltool.render.latents import check_truncation

    s = settings
    if s.sifid_layer not in (64, 192):
        raise UsageError(f"--sifid-layer must be 64 or 192, not {s.sifid_layer}")
    if s.scs_edge not in ("hed", "sobel"):
        raise UsageError(f"--scs-edge must be hed or sobel, not {s.scs_edge!r}{did_you_mean(s.scs_edge, ('hed', 'sobel'))}")
    if s.id_backbone not in ("dlib", "arcface"):
        raise UsageError(f"--id-backbone must be dlib or arcface, not {s.id_backbone!r}{did_you_mean(s.id_backbone, ('dlib', 'arcface'))}")
    check_truncation(s.truncation)
    if not 0 <= s.seed <= 2**63 - 1:  # sample i seeds torch with SEED + i: keep far from torch's 2**64 - 1
        raise UsageError(f"--seed must be between 0 and {2**63 - 1} (got {s.seed})")
    for name in s.clip_models or []:
        check_model_name(name)  # the same check with --smoke, which measures with the tiny CLIP instead
    for path in [s.reference, *s.sifid_refs]:
        if path is not None and not path.exists():
            raise UsageError(f"no such reference: {path}")


def resolve_inputs(paths: list[Path], domain: str | None, report: Path, on_skip: Callable[[dict, str], None]) -> tuple[list[EvalInput], list[dict]]:
    """The evaluable inputs among `paths`, with unique names, and the skipped ones.

    An input with nothing to measure (a train-mapper run matched by runs/disney-*, a
    folder without images) is skipped; so are the picture files Pillow cannot read in a
    folder that is otherwise evaluated. Each skip is a dict with "path" and "reason" (and
    "files"), passed to `on_skip(skip, message)` as it is found, with a one-line message.

    Raises:
        UsageError: no path given, or all of them skipped.
    """
    if not paths:
        raise UsageError("no runs to evaluate", hint="pass `ipl adapt` run folders, e.g. ipl eval runs/disney-*")
    items, skipped = [], []
    for path in paths:
        try:
            item = resolve_input(path, domain, report)
        except NotEvaluable as err:
            skipped.append({"path": str(path), "reason": err.reason})
            on_skip(skipped[-1], f"{path}: {err.reason}")
            continue
        if item.unreadable:
            first, why = item.unreadable[0]
            total = len(item.files) + len(item.unreadable)
            message = f"{len(item.unreadable)} of {total} files in {path} that Pillow cannot read (first: {why})"
            skipped.append({"path": str(path), "reason": f"{len(item.unreadable)} unreadable file(s)", "files": [str(p) for p, _ in item.unreadable]})
            on_skip(skipped[-1], message)
        items.append(item)
    if not items:
        raise UsageError(f"nothing to evaluate: all {len(paths)} input(s) were skipped", hint="pass `ipl adapt` run folders (with generator.pt) or image folders")
    taken: set[str] = set()
    for item in items:  # runs made in the same second under different folders share a name
        base, counter = item.name, 2
        while item.name in taken:
            item.name = f"{base}-{counter}"
            counter += 1
        taken.add(item.name)
    return items, skipped


def settings_for(items: list[EvalInput], settings: Settings) -> Settings:
    """`settings` adjusted to the inputs: `--smoke` runs are measured with tiny random networks.

    Raises:
        UsageError: smoke runs and real runs mixed.
    """
    smoke_runs = {item.smoke for item in items if item.kind != "folder"}
    if smoke_runs == {True, False}:
        raise UsageError("some runs are --smoke runs (tiny random models) and some are real: evaluate them separately")
    smoke = settings.smoke
    if True in smoke_runs and not smoke:
        console.info("[yellow]--smoke runs: measuring with tiny random networks (the numbers mean nothing)[/]")
        smoke = True
    # Smoke runs have no HED weights to fetch: their SCS uses the weight-free edges.
    scs_edge = "sobel" if smoke and settings.scs_edge == "hed" and "edges" not in settings.weights else settings.scs_edge
    return dataclasses.replace(settings, smoke=smoke, scs_edge=scs_edge)


def sample_grid(item: EvalInput, settings: Settings, device, report_dir: Path) -> str:
    """Write the input's labelled sample grid: a "source" row over an "adapted" row of the same latents
    (a folder: one row of its first pictures), `SAMPLE_TILE` px tiles, the input in the caption strip."""
    from PIL import Image

    from ipltool.figures import grid_figure
    from ipltool.images import load_rgb, png_bytes

    count = SAMPLE_COLUMNS if item.available is None else min(SAMPLE_COLUMNS, item.available)
    if item.kind == "folder":
        rows, labels = [[load_rgb(p) for p in item.files[:count]]], ["images"]
    else:
        batch = next(item.batches(0, count, count, settings.truncation, settings.seed, device))
        rows = [[Image.fromarray(image.permute(1, 2, 0).cpu().numpy()) for image in batch[key]] for key in ("source", "target")]
        labels = ["source", "adapted"]
    parts = (item.domain.name if item.domain else "", item.label, item.name)  # a folder's label is its name
    caption = " · ".join(part for part in dict.fromkeys(parts) if part)
    figure = grid_figure(rows, SAMPLE_TILE, row_labels=labels, caption=caption)
    path = report_dir / "samples" / f"{item.name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, png_bytes(figure))
    return path.relative_to(report_dir).as_posix()


def evaluate_inputs(
    paths: list[Path],
    settings: Settings,
    report: Path,
    device,
    domain: str | None = None,
    on_skip: Callable[[dict, str], None] = lambda skip, message: None,
    progress: Callable[[str, int, int], None] | None = None,
    strengths: Sequence[float] = (1.0,),
    blend: Sequence[tuple[str, float]] = (),
    runs_root: Path = Path("runs"),
) -> EvalResult:
    """Measure every input of `paths` with `settings` and write the report to `report`.

    Args:
        paths: `ipl adapt` run folders, generator checkpoints (with `domain`) or image folders.
        settings: what to measure and how (`check_settings` is applied first).
        report: the report folder (metrics.json, .csv, .md, index.html, samples/).
        device: where the networks run.
        domain: the domain of checkpoint files and folders.
        on_skip: called with each skipped input (see `resolve_inputs`).
        progress: `progress(label, done, total)` as batches finish.
        strengths: `--strength`: each generator input at each style strength (`disney-s0.5`).
        blend: `--blend` (name, weight) pairs: one more input, their blend (`render.blend`).
        runs_root: where the blend's domain names find their runs.

    Raises:
        UsageError: bad settings, or nothing to evaluate.
        IplError: every input was skipped while being evaluated.
    """
    check_settings(settings)
    check_output_folder(report, "--report")
    sweep_stale_temps(report)  # temporary files of an eval that was killed mid-write
    items, skipped = resolve_inputs(paths, domain, report, on_skip) if paths or not blend else ([], [])
    if blend:
        items.append(blend_input(list(blend), runs_root, domain, report))
    items = with_strengths(items, list(strengths))
    settings = settings_for(items, settings)
    if settings.reference is not None:
        from ipltool.images import find_images

        find_images(settings.reference)  # an empty folder fails now
    report.mkdir(parents=True, exist_ok=True)
    results = []
    # A full disk or read-only folder (the report, or a run's eval-cache/) ends the run with one line.
    with write_failures(report, "--report", THEN):
        evaluator = Evaluator(settings, device, progress)
        for item in items:
            try:
                outcome = evaluator.evaluate(item, report)
                samples = sample_grid(item, settings, device, report) if world().main else None
            except (NotEvaluable, CheckpointError) as err:  # e.g. a generator rendering NaN pixels: this input only
                reason = err.reason if isinstance(err, NotEvaluable) else err.message
                skipped.append({"path": str(item.path), "reason": reason})
                on_skip(skipped[-1], f"{item.path}: {reason}")
                continue
            outcome.update(
                name=item.name, label=item.label, domain=item.domain.name if item.domain else None,
                kind=item.kind, path=str(item.path), samples=samples, strength=item.strength,
            )
            results.append(outcome)
    if not results:
        raise IplError(f"nothing evaluated: all {len(paths)} input(s) were skipped", hint="the lines above say why")
    # A NaN metric is reported as null with its reason, and fails the command like a skipped input.
    nonfinite = [(r["name"], key) for r in results for key, why in r["reasons"].items() if why.startswith(NONFINITE_REASON)]
    record = {
        "metrics": settings.metrics, "n": settings.n, "seed": settings.seed, "truncation": settings.truncation,
        "weights": "random-test" if settings.smoke else "real", "reference": str(settings.reference) if settings.reference else None,
        "sifid_refs": [str(p) for p in settings.sifid_refs], "sifid_layer": settings.sifid_layer, "scs_edge": settings.scs_edge,
        "id_backbone": settings.id_backbone,
    }
    files = {}
    if world().main:  # under torchrun every rank holds every feature; rank 0 writes the report
        with write_failures(report, "--report", THEN):
            files = write_report(report, results, record)
    return EvalResult(results, skipped, nonfinite, files)
