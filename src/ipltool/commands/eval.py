"""`ipl eval`: the paper's metrics for adapt runs, checkpoints or image folders, and a report."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from ipltool import console
from ipltool.atomic import atomic_write_bytes
from ipltool.devices import resolve_device
from ipltool.errors import UsageError
from ipltool.metrics.catalog import METRICS
from ipltool.report import format_value, metric_keys, tables, write_report

if TYPE_CHECKING:
    from ipltool.metrics.evaluate import Settings
    from ipltool.metrics.sampling import EvalInput

SAMPLE_COLUMNS = 8


def _parse_metrics(text: str) -> list[str]:
    chosen = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METRICS]
    if unknown or not chosen:
        raise UsageError(f"unknown metric(s): {', '.join(unknown) or text!r}", hint=f"choose from {','.join(METRICS)}")
    return list(dict.fromkeys(chosen))


def _sample_grid(item: EvalInput, settings: Settings, device, report_dir: Path) -> str:
    """Write the input's sample grid (source row over adapted row, or the folder's first pictures)."""
    import torch

    from ipltool.images import load_rgb, png_bytes

    count = SAMPLE_COLUMNS if item.available is None else min(SAMPLE_COLUMNS, item.available)
    if item.kind == "folder":
        from torchvision.transforms.functional import pil_to_tensor

        pictures = [pil_to_tensor(load_rgb(p).resize((128, 128))) for p in item.files[:count]]
        grid = torch.stack(pictures)
    else:
        batch = next(item.batches(0, count, count, settings.truncation, settings.seed, device))
        grid = torch.cat([batch["source"], batch["target"]]).cpu()
    path = report_dir / "samples" / f"{item.name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, png_bytes(grid.float() / 127.5 - 1, nrow=count))
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
    json_output: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Measure adapted generators: IS, FID/KID, SIFID, SCS, ID similarity, CLIP score, diversity.

    Each run renders the same seeded latents through its source and adapted generators;
    features are cached per run (in RUN/eval-cache/), so adding a metric, a run or more
    samples computes only what is new. A metric whose network weights are missing is
    reported as null with the reason, never computed with random weights.

    Examples: ipl eval runs/disney-* --compare   |   ipl eval runs/disney-a runs/disney-b --metrics clip,id --n 200
    """
    # The metric networks import torch: loaded here, so `ipl eval --help` stays instant.
    from ipltool.images import find_images
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ipltool.metrics.evaluate import Evaluator, Settings
    from ipltool.metrics.sampling import resolve_input

    if not inputs:
        raise UsageError("no runs to evaluate", hint="pass `ipl adapt` run folders, e.g. ipl eval runs/disney-*")
    if sifid_layer not in (64, 192):
        raise UsageError(f"--sifid-layer must be 64 or 192, not {sifid_layer}")
    if scs_edge not in ("hed", "sobel"):
        raise UsageError(f"--scs-edge must be hed or sobel, not {scs_edge!r}")
    if id_backbone not in ("dlib", "arcface"):
        raise UsageError(f"--id-backbone must be dlib or arcface, not {id_backbone!r}")
    for path in [reference, *(sifid_ref or [])]:
        if path is not None and not path.exists():
            raise UsageError(f"no such reference: {path}")
    chosen = _parse_metrics(metrics)
    items = [resolve_input(path, domain, report) for path in inputs]
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
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console.err, disable=console.options.quiet or console.options.json,
    )
    with progress:
        tasks: dict[str, int] = {}

        def tick(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=total)
            progress.update(tasks[name], completed=done, total=total)

        evaluator = Evaluator(settings, device, tick)
        for item in items:
            outcome = evaluator.evaluate(item, report)
            outcome.update(
                name=item.name, label=item.label, domain=item.domain.name if item.domain else None,
                kind=item.kind, path=str(item.path), samples=_sample_grid(item, settings, device, report),
            )
            results.append(outcome)
    settings_record = {
        "metrics": chosen, "n": n, "seed": seed, "truncation": truncation, "weights": "random-test" if smoke else "real",
        "reference": str(reference) if reference else None, "sifid_refs": [str(p) for p in settings.sifid_refs],
        "sifid_layer": sifid_layer, "scs_edge": settings.scs_edge, "id_backbone": id_backbone,
    }
    paths = write_report(report, results, settings_record)
    if console.wants_json(json_output):
        console.print_json({"report": {k: str(v) for k, v in paths.items()}, "runs": results})
        return
    _print(results, compare)
    console.out.print(f"report: {paths['index.html']}  (also metrics.json, metrics.csv, metrics.md)")
    missing = {k for r in results for k in r["reasons"]}
    if missing:
        console.out.print(f"[dim]missing values ({', '.join(sorted(missing))}): reasons in {paths['metrics.md']}[/]")


def _print(results: list[dict], compare: bool) -> None:
    if compare:
        for key, (rows, columns, cells) in tables(results).items():
            table = Table(title=key)
            table.add_column("domain")
            for column in columns:
                table.add_column(column, justify="right")
            for row in rows:
                table.add_row(row, *(cells.get((row, c), "") for c in columns))
            console.out.print(table)
        return
    keys = metric_keys(results)
    table = Table(title="ipl eval")
    table.add_column("input")
    for key in keys:
        table.add_column(key, justify="right")
    for r in results:
        table.add_row(r["name"], *(format_value(r, k) for k in keys))
    console.out.print(table)
