"""`ipl eval`: the paper's metrics for adapt runs, checkpoints or image folders, and a report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from ipltool import console
from ipltool.devices import resolve_device
from ipltool.errors import UsageError, unknown_name
from ipltool.metrics.catalog import METRICS
from ipltool.progress import Reporter
from ipltool.report import cell, heading, metric_keys, missing_notes, run_labels, superscript, tables


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


def eval_command(
    inputs: Optional[list[Path]] = typer.Argument(None, help="`ipl adapt` run folders, generator .pt files (with --domain) or image folders.", show_default=False),
    metrics: str = typer.Option(",".join(METRICS), "--metrics", "-m", help="Comma-separated: " + ", ".join(METRICS) + "."),
    n: Optional[int] = typer.Option(None, "--n", "--samples", min=2, help="Samples per metric (default: 5000 IS/FID/KID, 100 SIFID, 500 SCS, 1000 ID/CLIP/diversity)."),
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
    clip_weights: Optional[Path] = typer.Option(None, "--clip-weights", help="CLIP weights file for the CLIP metrics (an OpenAI or open_clip file of the --clip model)."),
    allow_download: bool = typer.Option(False, "--allow-download", help="Download missing metric weights (default: report them as missing, with the `ipl fetch` line)."),
    strength: str = typer.Option("1", "--strength", help="Style strength α of every generator input: weights θ_s + α(θ_t − θ_s); a list, e.g. 0.5,1, measures each."),
    blend: Optional[list[str]] = typer.Option(None, "--blend", help="NAME=WEIGHT (repeat): also measure this blend of adapted generators (domains, run folders or files)."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Where `ipl adapt` wrote its runs (for --blend domain names)."),
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
    from ipltool.metrics.evaluate import Settings
    from ipltool.metrics.pipeline import evaluate_inputs
    from ipltool.render.blend import parse_blend, parse_number_list

    files = {"inception": inception_weights, "sifid": sifid_weights, "edges": hed_weights, "identity": id_weights, "clip": clip_weights}
    weights = {k: v for k, v in files.items() if v}
    settings = Settings(
        metrics=_parse_metrics(metrics), n=n, seed=seed, truncation=truncation, batch=batch, smoke=smoke,
        reference=reference, sifid_refs=list(sifid_ref or []), sifid_layer=sifid_layer, scs_edge=scs_edge,
        id_backbone=id_backbone, clip_models=clip, weights=weights, allow_download=allow_download,
    )
    strengths = list(dict.fromkeys(parse_number_list(strength, "--strength")))
    blend_pairs = parse_blend(list(blend or []))
    device = resolve_device(console.options.device)

    def skip(_entry: dict, message: str) -> None:
        console.err.print(f"[yellow]skipped[/] {console.escape(message)}")

    # A task per input or reference folder, as the Evaluator names them; each metric's pass restarts it.
    with Reporter("sample") as progress:
        outcome = evaluate_inputs(
            list(inputs or []), settings, report, device, domain=domain, on_skip=skip,
            progress=lambda name, done, total: progress.update(f"eval {name}", done, total),
            strengths=strengths, blend=blend_pairs, runs_root=runs,
        )
    from ipltool.distributed import world

    if not world().main:  # rank 0 reports for the run
        raise typer.Exit(0 if outcome.complete else 1)
    if console.wants_json(json_output):
        console.print_json({"report": {k: str(v) for k, v in outcome.report.items()}, "runs": outcome.results, "skipped": outcome.skipped})
    else:
        _print(outcome.results, compare)
        console.out.print(f"report: {console.escape(outcome.report['index.html'])}  (also metrics.json, metrics.csv, metrics.md)")
    for name, key in outcome.nonfinite:
        console.err.print(f"[bold red]error:[/] {console.escape(name)}: {console.escape(key)} is not a finite number (reported as null)")
    if not outcome.complete:
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
