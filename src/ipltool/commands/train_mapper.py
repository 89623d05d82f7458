"""`ipl train-mapper`: stage 1 of IPL, the prompt mapper."""

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


def train_mapper(
    domain: Optional[str] = domain_option(),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted train-mapper run directory (with --steps: extend it)."),
    steps: Optional[int] = typer.Option(None, help="Training steps (domain key mapper.steps)."),
    batch: Optional[int] = typer.Option(None, help="Latents per step (mapper.batch)."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate (mapper.lr)."),
    seed: Optional[int] = typer.Option(None, help="Random seed (mapper.seed)."),
    kind: Optional[str] = typer.Option(None, "--mapper-kind", help="Mapper plugin (mapper.kind), e.g. mlp, transformer-v2."),
    clip: Optional[list[str]] = clip_option(),
    sets: Optional[list[str]] = set_option(),
    out: Path = runs_option(),
    chunk: int = chunk_option("stage 1"),
    save_every: int = save_every_option(),
    precision: Optional[str] = precision_option(),
    compile_renders: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    smoke: bool = smoke_option(),
    json_output: bool = console.json_option(),
) -> None:
    """Train the IPL prompt mapper (stage 1) and write runs/<domain>-<time>/mapper.pt.

    Ctrl-C (or SIGTERM) stops after the current step and saves the state; --resume RUN_DIR
    continues it and ends with exactly the mapper of an uninterrupted run.

    Examples: ipl train-mapper --domain disney-custom --smoke   |   ipl train-mapper --resume runs/disney-20261121-101500
    """
    # The training stack imports torch: loaded here, so `ipl train-mapper --help` stays instant.
    from ipltool.domain import load_domain
    from ipltool.train.adapt import RunOptions
    from ipltool.train.adapt import train_mapper as run_train_mapper
    from ipltool.train.guard import describe_peak
    from ipltool.train.setup import SMOKE_NOTE, SMOKE_OVERRIDES

    named = {  # domain key: (flag, value); a bad value is reported as the flag
        "mapper.steps": ("--steps", steps),
        "mapper.batch": ("--batch", batch),
        "mapper.lr": ("--lr", lr),
        "mapper.seed": ("--seed", seed),
        "mapper.kind": ("--mapper-kind", kind),
    }
    run = info = None
    if resume is not None:
        given = {"--domain": domain, "--clip": clip or None, "--set": sets or None}
        run, resolved, info, precision = continue_run(resume, "mapper", "mapper.steps", given, named, smoke, precision, steps)
        smoke = info.smoke
    else:
        if domain is None:
            raise UsageError("missing --domain", hint="e.g. ipl train-mapper --domain disney --smoke (see ipl prompts list)")
        check_output_folder(out, "--out")
        resolved = apply_flags(load_domain(domain), SMOKE_OVERRIDES if smoke else None, sets, clip, named)
    if smoke:
        console.info(f"[yellow]{SMOKE_NOTE}[/]")
    with graceful_stop() as stop:
        options = RunOptions(
            smoke, precision, save_every, resolve_device(console.options.device), step_progress, stop, compiled=compile_renders, chunk=chunk
        )
        done = run_train_mapper(resolved, out, options, run=run, info=info)
    run, result, run_precision = done.run, done.stage1, done.precision
    if console.wants_json(json_output):
        console.print_json(
            {
                "run_dir": str(run.path), "mapper": str(run.mapper_path), "last_step": result.last, "steps": resolved.mapper.steps,
                "resumed_from": result.resumed_from, "smoke": smoke, "precision": run_precision.name,
                "peak_memory_bytes": done.peak_memory,
            }
        )
    else:
        console.out.print(f"mapper written to {console.escape(run.mapper_path)}")
        console.info(describe_peak(options.device, done.peak_memory))
