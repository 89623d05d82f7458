"""`ipl train-mapper`: stage 1 of IPL, the prompt mapper."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ipltool import console, registry
from ipltool.commands.overrides import CLIP_HELP, SET_HELP, apply_flags
from ipltool.devices import resolve_device
from ipltool.precision import Precision, precision_option
from ipltool.progress import step_progress


def train_mapper(
    domain: str = typer.Option(..., "--domain", "-d", help="Domain name (`ipl prompts list`) or .toml file."),
    steps: Optional[int] = typer.Option(None, help="Training steps (domain key mapper.steps)."),
    batch: Optional[int] = typer.Option(None, help="Latents per step (mapper.batch)."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate (mapper.lr)."),
    seed: Optional[int] = typer.Option(None, help="Random seed (mapper.seed)."),
    kind: Optional[str] = typer.Option(None, "--mapper-kind", help="Mapper plugin (mapper.kind), e.g. mlp, transformer-v2."),
    clip: Optional[list[str]] = typer.Option(None, "--clip", help=CLIP_HELP),
    sets: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    out: Path = typer.Option(Path("runs"), "--out", help="Parent directory of the run directory."),
    chunk: int = typer.Option(8, min=1, help="Images rendered at once (memory vs speed; results do not change)."),
    precision: Optional[str] = precision_option(),
    smoke: bool = typer.Option(False, "--smoke", help="Run the whole pipeline on tiny random models, in seconds."),
    json_output: bool = console.json_option(),
) -> None:
    """Train the IPL prompt mapper (stage 1) and write runs/<domain>-<time>/mapper.pt.

    Example: ipl train-mapper --domain disney-custom --smoke
    """
    # The training stack imports torch: loaded here, so `ipl train-mapper --help` stays instant.
    from ipltool.domain import load_domain
    from ipltool.train.run import RunDir
    from ipltool.train.setup import SMOKE_NOTE, SMOKE_OVERRIDES, build_models
    from ipltool.train.stage1_run import run_stage1

    named = {  # domain key: (flag, value); a bad value is reported as the flag
        "mapper.steps": ("--steps", steps),
        "mapper.batch": ("--batch", batch),
        "mapper.lr": ("--lr", lr),
        "mapper.seed": ("--seed", seed),
        "mapper.kind": ("--mapper-kind", kind),
    }
    resolved = apply_flags(load_domain(domain), SMOKE_OVERRIDES if smoke else None, sets, clip, named)
    if smoke:
        console.info(f"[yellow]{SMOKE_NOTE}[/]")
    registry.require("mappers", resolved.mapper.kind)  # fail before any run dir exists
    device = resolve_device(console.options.device)
    run_precision = Precision.of(precision, device)
    models = build_models(resolved, device, smoke=smoke)
    run_table = {"stage": "mapper", "smoke": smoke, "device": str(device), "precision": run_precision.name}
    config = {**resolved.resolved().to_toml_dict(), "run": run_table}
    run = RunDir.create(out, resolved.name, config)
    console.info(f"run directory: {console.escape(run.path)}")
    with step_progress(resolved.mapper.steps, "stage 1: mapper") as update:
        last = run_stage1(resolved, models, run, chunk=chunk, on_step=update, precision=run_precision)
    if console.wants_json(json_output):
        console.print_json(
            {"run_dir": str(run.path), "mapper": str(run.mapper_path), "last_step": last, "smoke": smoke, "precision": run_precision.name}
        )
    else:
        console.out.print(f"mapper written to {console.escape(run.mapper_path)}")
