"""`ipl generate`: pictures, comparison grids and interpolation videos from adapted generators."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ipltool import console
from ipltool.devices import resolve_device
from ipltool.errors import Interrupted, UsageError
from ipltool.interrupt import graceful_stop
from ipltool.outdir import check_output_folder, exclusive, write_failures
from ipltool.precision import Precision, precision_option
from ipltool.progress import track

THEN = "then run the same command again (pictures already written are kept)"


def generate(
    generator: Optional[list[str]] = typer.Option(None, "--generator", "-g", help="A domain (its newest finished run), a run folder, a generator .pt file or a registry generator (repeatable).", show_default=False),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Seeds and ranges: 0-63, 1,5,9 (default: --n from --seed)."),
    n: Optional[int] = typer.Option(None, "--n", "--count", help="Render N seeds from --seed (default 8; spelled --count under torchrun, which takes --n... for itself)."),
    seed: int = typer.Option(0, "--seed", help="First seed of --n, and the seed of the truncation centre (as `ipl eval --seed`)."),
    latents: Optional[list[Path]] = typer.Option(None, "--latents", help="Render saved W+ codes (files or the latents/ folder of `ipl stylize --save-latents`) instead of seeds."),
    truncation: float = typer.Option(0.7, "--truncation", help="Truncation ψ towards the source generator's mean w (1: off)."),
    source: bool = typer.Option(False, "--source", help="Also render the source generator (the first column)."),
    grid: bool = typer.Option(False, "--grid", help="Also write grid.png: a row per seed, a column per generator, with headers (the paper's figure)."),
    strength: str = typer.Option("1", "--strength", help="Style strength α: weights θ_s + α(θ_t − θ_s); a list renders a strip, e.g. 0,0.5,1 (0: source, >1: exaggerated)."),
    blend: Optional[list[str]] = typer.Option(None, "--blend", help="NAME=WEIGHT (repeat): one generator mixing adapted generators of one source, e.g. --blend disney=0.5 --blend pixar=0.5."),
    source_generator: Optional[str] = typer.Option(None, "--source-generator", help="Source generator of .pt files outside run folders (registry name or file), for --source, --strength and --blend."),
    interpolate: Optional[str] = typer.Option(None, "--interpolate", help="Make a latent-walk video through these seeds, e.g. 0,3,7,0."),
    frames: int = typer.Option(60, "--frames", help="Video frames from one seed to the next."),
    fps: float = typer.Option(30.0, "--fps", help="Video frame rate."),
    loop: bool = typer.Option(False, "--loop", help="Walk back from the last seed to the first, for a seamless loop."),
    space: str = typer.Option("z", "--space", help="z: spherical interpolation of z codes; w: linear interpolation of truncated w codes."),
    video: Optional[Path] = typer.Option(None, "--video", help="Video file of --interpolate: .mp4 (H.264) or .gif (default OUT/walk.mp4)."),
    out: Path = typer.Option(Path("generated"), "--out", "-o", help="Output folder: OUT/<generator>/seed0042.png, OUT/grid.png."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Where `ipl adapt` wrote its runs (for domain names)."),
    batch: int = typer.Option(8, "--batch", min=1, help="Pictures per generator call."),
    precision: Optional[str] = precision_option(),
    json_output: bool = console.json_option("Print what was written as JSON."),
) -> None:
    """Render pictures, comparison grids and latent-walk videos from adapted generators.

    Seed S renders the same face as sample S of `ipl eval` (same z, truncation centre and
    constant noise). Existing files are never overwritten: a different picture of the same
    name is written beside it (seed0042-2.png); an identical one is left as it is.

    Examples: ipl generate -g disney --seeds 0-7 --source --grid   |   ipl generate -g disney --strength 0,0.5,1 --seeds 1,5 --grid
    |   ipl generate -g disney -g pixar --interpolate 0,3,7 --loop --video walk.mp4   |   ipl generate --blend disney=0.5 --blend pixar=0.5 --n 4
    """
    from ipltool.render.blend import parse_blend, parse_number_list
    from ipltool.render.generate import RenderOptions, WalkOptions, check_walk, generate_pictures, interpolation_video, latent_rows, plan_columns, seed_rows
    from ipltool.render.latents import check_truncation
    from ipltool.render.seeds import parse_seeds, seed_range

    check_truncation(truncation)
    strengths = list(dict.fromkeys(parse_number_list(strength, "--strength")))
    blend_pairs = parse_blend(list(blend or []))
    if seeds is not None and n is not None:
        raise UsageError("give --seeds or --n, not both")
    if latents and (seeds is not None or n is not None):
        raise UsageError("--latents renders saved codes: drop --seeds and --n")
    if latents and interpolate:
        raise UsageError("--interpolate walks between seeds: drop --latents")
    walk = None
    if interpolate is not None:
        walk = WalkOptions([int(item) for item in _seed_items(interpolate)], frames, fps, loop, space)
        check_walk(walk)
    elif video is not None:
        raise UsageError("--video writes the walk of --interpolate: add --interpolate SEEDS")
    target = (video or out / "walk.mp4") if walk is not None else None
    check_output_folder(target.parent if target else out, "--video" if video else "--out")
    device = resolve_device(console.options.device)
    options = RenderOptions(truncation=truncation, centre_seed=seed, batch=batch, precision=Precision.of(precision, device))
    columns = plan_columns(list(generator or []), runs, device, strengths, blend_pairs, source, source_generator)
    for column in columns:
        console.info(f"[dim]{console.escape(column.label)}: {console.escape(column.origin)}[/]")

    if target is not None:  # a new file under a free name: no folder lock needed
        with write_failures(target.parent, "--video" if video else "--out", THEN), graceful_stop() as stop, track(None, "video", unit="frame") as update:
            result = interpolation_video(columns, walk, target, options, lambda done, total: update(done, total=total), stop)
    else:
        with exclusive(out, "generate", "--out"), write_failures(out, "--out", THEN), graceful_stop() as stop:
            rows = latent_rows(list(latents)) if latents else seed_rows(parse_seeds(seeds) if seeds is not None else seed_range(n or 8, seed))
            with track(len(rows), "generate", unit="row") as update:
                result = generate_pictures(columns, rows, out, options, grid=grid, on_progress=lambda done, total: update(done), stop=stop)
    _summary(result)
    if result.stopped:
        raise Interrupted(f"stopped after {len({p['row'] for p in result.written})} of {result.rows} rows; the pictures written are kept", hint=THEN.removeprefix("then "))


def _seed_items(text: str) -> list[str]:
    """`--interpolate` keys: seeds in order, repeats allowed (0,3,0 walks back)."""
    items = [item.strip() for item in text.split(",")]
    if not all(item.isdigit() for item in items):
        raise UsageError(f"--interpolate takes seeds separated by commas, e.g. 0,3,7 (got {text!r})")
    return items


def _summary(result) -> None:
    from ipltool.distributed import world

    if not world().main:  # rank 0 reports for the run
        return
    if console.wants_json():
        console.print_json(result.as_dict())
        return
    if result.video is not None:
        console.out.print(f"video: {console.escape(result.video)}  ({result.frames} frames, {len(result.columns)} generators, {result.seconds:.1f} s)")
        return
    written = sum(1 for p in result.written if p["status"] == "written")
    unchanged = len(result.written) - written
    folders = sorted({str(Path(p["path"]).parent) for p in result.written})
    line = f"{written} pictures written" + (f", {unchanged} unchanged" if unchanged else "") + f" in {result.seconds:.1f} s"
    console.out.print(line + (f": {console.escape(', '.join(folders))}" if folders else ""))
    if result.grid is not None:
        console.out.print(f"grid: {console.escape(result.grid)}")
