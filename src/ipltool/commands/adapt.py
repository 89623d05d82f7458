"""`ipl adapt`: stage 2 of IPL (or the NADA baseline), with stage 1 first when no mapper is given."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ipltool import console
from ipltool.commands.overrides import (
    apply_flags, chunk_option, clip_option, domain_option, runs_option, save_every_option, set_option, smoke_option,
)
from ipltool.commands.resume import continue_run
from ipltool.compiled import COMPILE_HELP
from ipltool.devices import resolve_device
from ipltool.errors import UsageError
from ipltool.interrupt import graceful_stop
from ipltool.outdir import check_output_folder
from ipltool.precision import precision_option
from ipltool.progress import step_progress


def adapt(
    domain: Optional[list[str]] = domain_option("Domain name (`ipl prompts list`) or .toml file; repeat to adapt several domains, one run each (under torchrun, split across the processes)."),
    method: Optional[str] = typer.Option(None, help="ipl (default) or nada (StyleGAN-NADA baseline: one template direction, no mapper; its global term, loss.lambda_global, aims at the sentence \"a TARGET\" and its layer choice at the bare TARGET, as the original)."),
    mapper_path: Optional[Path] = typer.Option(None, "--mapper", help="Trained mapper.pt, or a train-mapper run dir; skips stage 1."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run directory (with --steps: extend it)."),
    steps: Optional[int] = typer.Option(None, help="Adaptation steps (adapt.steps)."),
    batch: Optional[int] = typer.Option(None, help="Latents per step (adapt.batch)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate before the 4/5 ratio (adapt.lr)."),
    seed: Optional[int] = typer.Option(None, help="Random seed of stage 2 (adapt.seed)."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Layers trained per step (adapt.auto_layer_k)."),
    sample_every: Optional[int] = typer.Option(None, help="Write a sample grid every N steps (adapt.sample_every)."),
    sample_size: Optional[int] = typer.Option(None, help="Edge of one sample in the grids, px; 256 by default (adapt.sample_size)."),
    style_images: Optional[Path] = typer.Option(None, help="NADA: folder of style images to aim at instead of the text."),
    clip: Optional[list[str]] = clip_option(),
    sets: Optional[list[str]] = set_option(),
    out: Path = runs_option(),
    save_every: int = save_every_option(),
    precision: Optional[str] = precision_option(),
    compile_renders: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    chunk: int = chunk_option("stage 1, the layer choice and the sample grids", " (e.g. 4 or 2 at 1024 px on an 11-12 GB GPU)"),
    smoke: bool = smoke_option(),
    json_output: bool = console.json_option(),
) -> None:
    """Adapt the domain's generator to its target text and write runs/<domain>-<time>/generator.pt.

    Without --mapper, stage 1 (the prompt mapper) runs first in the same run directory.
    Ctrl-C stops after the current step and saves the state; --resume RUN_DIR continues
    it and ends with exactly the weights of an uninterrupted run.

    Examples: ipl adapt --domain disney --smoke   |   ipl adapt --domain disney --mapper runs/disney-20261121-101500
    """
    # The training stack imports torch: loaded here, so `ipl adapt --help` stays instant.
    from ipltool.domain import load_domain
    from ipltool.train.adapt import RunOptions
    from ipltool.train.adapt import adapt as run_adapt
    from ipltool.train.guard import describe_peak
    from ipltool.train.setup import SMOKE_NOTE, SMOKE_OVERRIDES

    named = {  # domain key: (flag, value); a bad value is reported as the flag
        "adapt.method": ("--method", method),
        "adapt.steps": ("--steps", steps),
        "adapt.batch": ("--batch", batch),
        "adapt.lr": ("--lr", lr),
        "adapt.seed": ("--seed", seed),
        "adapt.auto_layer_k": ("--layers", layers),
        "adapt.sample_every": ("--sample-every", sample_every),
        "adapt.sample_size": ("--sample-size", sample_size),
        "adapt.style_images": ("--style-images", str(style_images) if style_images else None),
    }
    domains = list(dict.fromkeys(domain or []))
    if len(domains) > 1:
        if resume is not None or mapper_path is not None:
            raise UsageError("--resume and --mapper take one domain", hint="adapt the domains in one command, or resume each run on its own")
        _adapt_many(domains, out, named, sets, clip, smoke, precision, save_every, json_output, compile_renders, chunk)
        return
    run = info = None
    if resume is not None:
        given = {"--domain": domains[0] if domains else None, "--mapper": mapper_path, "--clip": clip or None, "--set": sets or None}
        run, resolved, info, precision = continue_run(resume, "adapt", "adapt.steps", given, named, smoke, precision, steps)
        smoke = info.smoke
    else:
        if not domains:
            raise UsageError("missing --domain", hint="e.g. ipl adapt --domain disney --smoke (see ipl prompts list)")
        check_output_folder(out, "--out")
        resolved = apply_flags(load_domain(domains[0]), SMOKE_OVERRIDES if smoke else None, sets, clip, named).resolved()
    if smoke:
        console.info(f"[yellow]{SMOKE_NOTE}[/]")
    with graceful_stop() as stop:
        options = RunOptions(
            smoke, precision, save_every, resolve_device(console.options.device), step_progress, stop, compiled=compile_renders, chunk=chunk
        )
        done = run_adapt(resolved, out, options, run=run, info=info, mapper_path=mapper_path)
    if console.wants_json(json_output):
        console.print_json(_record(done, resolved, smoke))
    else:
        console.out.print(f"adapted generator written to {console.escape(done.run.generator_path)}")
        console.info(describe_peak(options.device, done.peak_memory))


def _record(done, resolved, smoke: bool) -> dict:
    """The JSON summary of one finished adaptation."""
    run, result = done.run, done.stage2
    return {
        "run_dir": str(run.path),
        "generator": str(run.generator_path),
        "mapper": str(run.mapper_path) if resolved.adapt.method == "ipl" else None,
        "samples": [str(p) for p in result.samples],
        "steps": resolved.adapt.steps,
        "resumed_from": result.resumed_from,
        "last": result.last,
        "smoke": smoke,
        "precision": done.precision.name,
        "peak_memory_bytes": done.peak_memory,  # guard.peak_memory: GPU allocator, or resident set on a CPU
    }


def _adapt_many(
    domains: list[str], out: Path, named: dict, sets, clip, smoke: bool, precision, save_every: int, json_output: bool, compiled: bool,
    chunk: int,
) -> None:
    """Adapt several domains, one run directory each; under torchrun each rank takes its share.

    Every domain is checked before any training starts. A domain that fails is reported
    and the others go on; the exit code is then 1. Rank 0 prints the summary of all ranks.
    """
    from ipltool.distributed import all_gather, shard, world
    from ipltool.domain import load_domain
    from ipltool.errors import Interrupted, IplError
    from ipltool.train.adapt import RunOptions
    from ipltool.train.adapt import adapt as run_adapt
    from ipltool.train.setup import SMOKE_NOTE, SMOKE_OVERRIDES

    check_output_folder(out, "--out")
    resolved = {name: apply_flags(load_domain(name), SMOKE_OVERRIDES if smoke else None, sets, clip, named).resolved() for name in domains}
    if smoke:
        console.info(f"[yellow]{SMOKE_NOTE}[/]")
    w = world()
    mine = shard(domains, w)
    records = []
    device = resolve_device(console.options.device)
    with graceful_stop() as stop:
        options = RunOptions(smoke, precision, save_every, device, step_progress, stop, compiled=compiled, chunk=chunk)
        for name in mine:
            try:
                done = run_adapt(resolved[name], out, options)
            except Interrupted:
                raise
            except IplError as err:
                console.err.print(f"[bold red]error:[/] {console.escape(name)}" + (f" (rank {w.rank})" if w.distributed else "") + f": {console.escape(err.message)}")
                records.append({"domain": name, "rank": w.rank, "error": err.message})
                continue
            records.append({"domain": name, "rank": w.rank, **_record(done, resolved[name], smoke)})
    everything = [r for part in all_gather(records) for r in part]
    everything.sort(key=lambda r: domains.index(r["domain"]))
    failed = [r for r in everything if "error" in r]
    if w.main:
        if console.wants_json(json_output):
            console.print_json({"runs": everything})
        else:
            for r in everything:
                where = f"  (rank {r['rank']})" if w.distributed else ""
                line = f"[red]failed[/]: {console.escape(r['error'])}" if "error" in r else console.escape(r["generator"])
                console.out.print(f"{console.escape(r['domain'])}: {line}{where}")
    if failed:
        raise typer.Exit(1)
