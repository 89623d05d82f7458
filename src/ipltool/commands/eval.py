"""`ipl eval`: the paper's metrics for adapt runs, checkpoints or image folders, and a report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich import box
from rich.table import Table

from ipltool import console
from ipltool.atomic import atomic_write_bytes, sweep_stale_temps
from ipltool.devices import resolve_device
from ipltool.errors import CheckpointError, IplError, UsageError, did_you_mean, unknown_name
from ipltool.metrics.catalog import METRICS
from ipltool.outdir import check_output_folder, write_failures
from ipltool.progress import Reporter
from ipltool.report import cell, heading, metric_keys, missing_notes, run_labels, superscript, tables, write_report

if TYPE_CHECKING:
    from ipltool.metrics.evaluate import Settings
    from ipltool.metrics.sampling import EvalInput

SAMPLE_COLUMNS = 6
SAMPLE_TILE = 160  # px: large enough to compare two runs side by side in the report


def _parse_metrics(text: str) -> list[str]:
    """`--metrics` as a list of known names, without repeats.

    Raises:
        UsageError: an empty list, or unknown names (each with its closest known name).
    """
    chosen = [m.strip().lower() for m in text.split(",") if m.strip()]
    if not chosen:
        raise UsageError(f"--metrics names no metric (got {text!r})", hint=f"choose from: {', '.join(METRICS)}")
    unknown = list(dict.fromkeys(m for m in chosen if m not in METRICS))
    if unknown:  # each name with its own suggestion: "unknown metric 'isc' — did you mean 'is'?; unknown metric ..."
        raise UsageError("; ".join(unknown_name("metric", m, METRICS).message for m in unknown), hint=f"choose from: {', '.join(METRICS)}")
    return list(dict.fromkeys(chosen))


def _sample_grid(item: EvalInput, settings: Settings, device, report_dir: Path) -> str:
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


def eval_command(
    inputs: Optional[list[Path]] = typer.Argument(None, help="`ipl adapt` run folders, generator .pt files (with --domain) or image folders.", show_default=False),
    metrics: str = typer.Option(",".join(METRICS), "--metrics", "-m", help="Comma-separated: " + ", ".join(METRICS) + "."),
    n: Optional[int] = typer.Option(None, "--n", min=2, help="Samples per metric (default: 5000 IS/FID/KID, 100 SIFID, 500 SCS, 1000 ID/CLIP/diversity)."),
    seed: int = typer.Option(0, help="Sample i uses latent seed SEED + i (the same pairs for every run)."),
    truncation: float = typer.Option(0.7, help="Truncation ψ towards the source generator's mean w."),
    batch: int = typer.Option(8, min=1, help="Images per generator and network call."),
    domain: Optional[str] = typer.Option(None, "--domain", "-d", help="Domain of checkpoint files and folders (source generator and texts)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Folder of real target-domain images for FID and KID."),
    sifid_ref: Optional[list[Path]] = typer.Option(None, "--sifid-ref", help="Reference image for SIFID (repeatable)."),
    sifid_layer: int = typer.Option(64, "--sifid-layer", help="SIFID Inception layer: 64 (SinGAN's code) or 192 (SinGAN's paper)."),
    scs_edge: str = typer.Option("hed", "--scs-edge", help="SCS edges: hed (needs its weights) or sobel (weight-free, not comparable)."),
    id_backbone: str = typer.Option("dlib", "--id-backbone", help="ID similarity network: dlib (ships with the align extra) or arcface (IR-SE50)."),
    clip: Optional[list[str]] = typer.Option(None, "--clip", help="CLIP model for the CLIP metrics (repeatable; default: the domain's)."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="torch-fidelity Inception weights file."),
    sifid_weights: Optional[Path] = typer.Option(None, "--sifid-weights", help="torchvision Inception-v3 weights file for SIFID."),
    hed_weights: Optional[Path] = typer.Option(None, "--hed-weights", help="HED (BSDS500) weights file for SCS."),
    id_weights: Optional[Path] = typer.Option(None, "--id-weights", help="ArcFace IR-SE50 weights file (model_ir_se50.pth)."),
    allow_download: bool = typer.Option(False, "--allow-download", help="Download missing metric weights (default: report them as missing, with the `ipl fetch` line)."),
    report: Path = typer.Option(Path("report"), "--report", help="Report folder (metrics.json, .csv, .md, index.html)."),
    compare: bool = typer.Option(False, "--compare", help="Print the paper-style table: a row per domain, a column per method."),
    smoke: bool = typer.Option(False, "--smoke", help="Tiny random networks, 16 samples: a plumbing check (implied by --smoke runs)."),
    json_output: bool = console.json_option("Print the results as JSON."),
) -> None:
    """Measure adapted generators: IS, FID/KID, SIFID, SCS, ID similarity, CLIP score, diversity.

    Each run renders the same seeded latents through its source and adapted generators;
    features are cached per run (in RUN/eval-cache/), so adding a metric, a run or more
    samples computes only what is new. A metric whose network weights are missing is
    reported as null with the reason, never computed with random weights.

    An input with nothing to measure (a train-mapper or unfinished run, a folder without
    images, a generator that renders NaN pixels) and picture files Pillow cannot read are
    skipped with one line each; the rest is evaluated, and the exit code is 1 when anything
    was skipped or a metric came out NaN (reported as null, never as a number).

    Examples: ipl eval runs/disney-* --compare   |   ipl eval runs/disney-a runs/disney-b --metrics clip,id --n 200
    """
    # The metric networks import torch: loaded here, so `ipl eval --help` stays instant.
    from ipltool.images import find_images
    from ipltool.metrics.evaluate import NONFINITE_REASON, Evaluator, Settings
    from ipltool.metrics.sampling import NotEvaluable, resolve_input
    from ipltool.models.clip import check_model_name

    if not inputs:
        raise UsageError("no runs to evaluate", hint="pass `ipl adapt` run folders, e.g. ipl eval runs/disney-*")
    if sifid_layer not in (64, 192):
        raise UsageError(f"--sifid-layer must be 64 or 192, not {sifid_layer}")
    if scs_edge not in ("hed", "sobel"):
        raise UsageError(f"--scs-edge must be hed or sobel, not {scs_edge!r}{did_you_mean(scs_edge, ('hed', 'sobel'))}")
    if id_backbone not in ("dlib", "arcface"):
        raise UsageError(f"--id-backbone must be dlib or arcface, not {id_backbone!r}{did_you_mean(id_backbone, ('dlib', 'arcface'))}")
    if not (math.isfinite(truncation) and 0 <= truncation <= 1):
        raise UsageError(f"--truncation must be a number in [0, 1] (got {truncation})", hint="0.7 is the papers' value; 1 turns truncation off")
    if not 0 <= seed <= 2**63 - 1:  # sample i seeds torch with SEED + i: keep far from torch's 2**64 - 1
        raise UsageError(f"--seed must be between 0 and {2**63 - 1} (got {seed})")
    for name in clip or []:
        check_model_name(name)  # the same check with --smoke, which measures with the tiny CLIP instead
    for path in [reference, *(sifid_ref or [])]:
        if path is not None and not path.exists():
            raise UsageError(f"no such reference: {path}")
    chosen = _parse_metrics(metrics)
    check_output_folder(report, "--report")
    sweep_stale_temps(report)  # temporary files of an eval that was killed mid-write
    # An input with nothing to measure (a train-mapper run matched by runs/disney-*, a folder
    # without images) is skipped with one line; the others are evaluated, and the exit code says so.
    items, skipped = [], []
    for path in inputs:
        try:
            item = resolve_input(path, domain, report)
        except NotEvaluable as err:
            skipped.append({"path": str(path), "reason": err.reason})
            console.err.print(f"[yellow]skipped[/] {console.escape(path)}: {console.escape(err.reason)}")
            continue
        if item.unreadable:
            first, why = item.unreadable[0]
            skipped.append({"path": str(path), "reason": f"{len(item.unreadable)} unreadable file(s)", "files": [str(p) for p, _ in item.unreadable]})
            total = len(item.files) + len(item.unreadable)
            console.err.print(
                f"[yellow]skipped[/] {len(item.unreadable)} of {total} files in {console.escape(path)} that Pillow cannot read "
                f"(first: {console.escape(why)})"
            )
        items.append(item)
    if not items:
        raise UsageError(f"nothing to evaluate: all {len(inputs)} input(s) were skipped", hint="pass `ipl adapt` run folders (with generator.pt) or image folders")
    taken: set[str] = set()
    for item in items:  # runs made in the same second under different folders share a name
        base, counter = item.name, 2
        while item.name in taken:
            item.name = f"{base}-{counter}"
            counter += 1
        taken.add(item.name)
    smoke_runs = {item.smoke for item in items if item.kind != "folder"}
    if smoke_runs == {True, False}:
        raise UsageError("some runs are --smoke runs (tiny random models) and some are real: evaluate them separately")
    if True in smoke_runs and not smoke:
        console.info("[yellow]--smoke runs: measuring with tiny random networks (the numbers mean nothing)[/]")
        smoke = True
    if reference is not None:
        find_images(reference)  # an empty folder fails now
    weights = {k: v for k, v in {"inception": inception_weights, "sifid": sifid_weights, "edges": hed_weights, "identity": id_weights}.items() if v}
    settings = Settings(
        metrics=chosen,
        n=n,
        seed=seed,
        truncation=truncation,
        batch=batch,
        smoke=smoke,
        reference=reference,
        sifid_refs=list(sifid_ref or []),
        sifid_layer=sifid_layer,
        # Smoke runs have no HED weights to fetch: their SCS uses the weight-free edges.
        scs_edge="sobel" if smoke and scs_edge == "hed" and hed_weights is None else scs_edge,
        id_backbone=id_backbone,
        clip_models=clip,
        weights=weights,
        allow_download=allow_download,
    )
    device = resolve_device(console.options.device)
    report.mkdir(parents=True, exist_ok=True)

    results = []
    # A full disk or read-only folder (the report, or a run's eval-cache/) ends the run with one line.
    then = "then run the same `ipl eval` again (features already computed are cached)"
    with write_failures(report, "--report", then), Reporter("sample") as progress:
        # A task per input or reference folder, as the Evaluator names them; each metric's pass restarts it.
        evaluator = Evaluator(settings, device, lambda name, done, total: progress.update(f"eval {name}", done, total))
        for item in items:
            try:
                outcome = evaluator.evaluate(item, report)
                samples = _sample_grid(item, settings, device, report)
            except (NotEvaluable, CheckpointError) as err:  # e.g. a generator rendering NaN pixels: this input only
                reason = err.reason if isinstance(err, NotEvaluable) else err.message
                skipped.append({"path": str(item.path), "reason": reason})
                console.err.print(f"[yellow]skipped[/] {console.escape(item.path)}: {console.escape(reason)}")
                continue
            outcome.update(
                name=item.name, label=item.label, domain=item.domain.name if item.domain else None,
                kind=item.kind, path=str(item.path), samples=samples,
            )
            results.append(outcome)
    if not results:
        raise IplError(f"nothing evaluated: all {len(inputs)} input(s) were skipped", hint="the lines above say why")
    # A NaN metric is reported as null with its reason, and fails the command like a skipped input.
    nonfinite = [(r["name"], key) for r in results for key, why in r["reasons"].items() if why.startswith(NONFINITE_REASON)]
    settings_record = {
        "metrics": chosen, "n": n, "seed": seed, "truncation": truncation, "weights": "random-test" if smoke else "real",
        "reference": str(reference) if reference else None, "sifid_refs": [str(p) for p in settings.sifid_refs],
        "sifid_layer": sifid_layer, "scs_edge": settings.scs_edge, "id_backbone": id_backbone,
    }
    with write_failures(report, "--report", then):
        paths = write_report(report, results, settings_record)
    if console.wants_json(json_output):
        console.print_json({"report": {k: str(v) for k, v in paths.items()}, "runs": results, "skipped": skipped})
    else:
        _print(results, compare)
        console.out.print(f"report: {console.escape(paths['index.html'])}  (also metrics.json, metrics.csv, metrics.md)")
    for name, key in nonfinite:
        console.err.print(f"[bold red]error:[/] {console.escape(name)}: {console.escape(key)} is not a finite number (reported as null)")
    if skipped or nonfinite:
        raise typer.Exit(1)  # the report covers the rest; the lines above name what was left out


def _print(results: list[dict], compare: bool) -> None:
    """The results as terminal tables, then the numbered reasons for missing values.

    By default a metric per row and an input per column under its short label (`disney·ipl`),
    split into several tables when the inputs do not fit the terminal's width; with
    `compare` the paper's layout: per metric, a row per domain and a column per method.
    """
    esc = console.escape
    notes = missing_notes(results)
    if compare:
        paper = tables(results)
        columns = next(iter(paper.values()))[1] if paper else []
        table = Table(title="ipl eval --compare", box=box.SIMPLE_HEAD, title_justify="left")
        table.add_column("metric")
        table.add_column("domain")
        for column in columns:
            table.add_column(esc(column), justify="right")
        for key, (rows, _, cells) in paper.items():
            for j, row in enumerate(rows):
                table.add_row(esc(heading(key)) if j == 0 else "", esc(row), *(esc(cells.get((row, c), "")) for c in columns))
            if len(rows) > 1:
                table.add_section()  # several domains: keep each metric's rows together
        console.out.print(table)
    else:
        labels, keys = run_labels(results), metric_keys(results)
        texts = {k: [cell(results, i, k, notes) for i in range(len(results))] for k in keys}
        # Each column takes its text, 2 cells of padding and 1 of separator; the table's edges 2 more.
        first = max([len("metric"), *(len(heading(k)) for k in keys)]) + 5
        chunks: list[list[int]] = [[]]
        used = first
        for i, label in enumerate(labels):
            width = max([len(label), *(len(texts[k][i]) for k in keys)]) + 3
            if chunks[-1] and used + width > console.out.width:
                chunks.append([])
                used = first
            chunks[-1].append(i)
            used += width
        for part, chunk in enumerate(chunks, 1):
            title = "ipl eval" if len(chunks) == 1 else f"ipl eval ({part}/{len(chunks)})"
            table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
            table.add_column("metric")
            for i in chunk:
                table.add_column(esc(labels[i]), justify="right")
            for key in keys:
                table.add_row(esc(heading(key)), *(esc(texts[key][i]) for i in chunk))
            console.out.print(table)
    for number, why in enumerate(notes.reasons, 1):
        console.out.print(f"[dim]{superscript(number)} {esc(why)}[/]")
