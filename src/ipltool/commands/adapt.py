"""`ipl adapt`: stage 2 of IPL (or the NADA baseline), with stage 1 first when no mapper is given."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from ipltool import console, registry
from ipltool.commands.overrides import apply_flags, clip_option, domain_option, runs_option, save_every_option, set_option, smoke_option
from ipltool.commands.resume import continue_run
from ipltool.devices import resolve_device
from ipltool.errors import CheckpointError, UsageError
from ipltool.interrupt import graceful_stop
from ipltool.outdir import check_output_folder, write_failures
from ipltool.precision import Precision, precision_option
from ipltool.progress import step_progress

if TYPE_CHECKING:
    from ipltool.domain import Domain
    from ipltool.train.setup import Models

def _mapper_file(path: Path) -> Path:
    """`--mapper` accepts a mapper.pt or a run directory holding one."""
    from ipltool.train.run import MAPPER_NAME

    candidate = path / MAPPER_NAME if path.is_dir() else path
    if not candidate.is_file():
        raise UsageError(
            f"no mapper at {candidate}",
            hint="pass a mapper.pt or a run directory made by `ipl train-mapper`",
        )
    return candidate


def _check_mapper(ckpt: dict, domain: Domain, models: Models, path: Path) -> None:
    """Refuse a mapper that cannot drive this domain's prompts and generator; warn on other labels."""
    args = ckpt["init_args"]
    expected = {"n_ctx": models.prompts.n_ctx, "dim": models.prompts.dim, "latent_dim": models.source.style_dim}
    for key, value in expected.items():
        if args.get(key) != value:
            raise CheckpointError(
                f"{path} was trained for {key} = {args.get(key)}, this run needs {value}",
                hint="train a mapper for this domain and CLIP model: ipl train-mapper --domain " + domain.name,
            )
    if ckpt.get("ctx_init") not in (None, domain.ctx_init):
        raise CheckpointError(f"{path} was trained with ctx_init {ckpt['ctx_init']!r}, the domain has {domain.ctx_init!r}")
    if (ckpt.get("source"), ckpt.get("target")) != (domain.source, domain.target):
        trained_for = console.escape(f"{ckpt.get('source')!r} -> {ckpt.get('target')!r}")
        console.info(f"[yellow]note: the mapper was trained for {trained_for}[/]")


def adapt(
    domain: Optional[str] = domain_option(),
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
    from ipltool.train.guard import check_memory
    from ipltool.train.run import RunDir, RunInfo
    from ipltool.train.setup import SMOKE_NOTE, SMOKE_OVERRIDES, build_models, load_mapper
    from ipltool.train.stage1_run import run_stage1
    from ipltool.train.stage2 import check_layer_k
    from ipltool.train.stage2_run import run_stage2

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
    if resume is not None:
        given = {"--domain": domain, "--mapper": mapper_path, "--clip": clip or None, "--set": sets or None}
        run, resolved, info, precision = continue_run(resume, "adapt", "adapt.steps", given, named, smoke, precision, steps)
        smoke = info.smoke
    else:
        if domain is None:
            raise UsageError("missing --domain", hint="e.g. ipl adapt --domain disney --smoke (see ipl prompts list)")
        check_output_folder(out, "--out")
        resolved = apply_flags(load_domain(domain), SMOKE_OVERRIDES if smoke else None, sets, clip, named).resolved()
        run = None
    if smoke:
        console.info(f"[yellow]{SMOKE_NOTE}[/]")
    ipl = resolved.adapt.method == "ipl"
    if ipl and mapper_path is None and (run is None or not run.mapper_path.exists()):
        registry.require("mappers", resolved.mapper.kind)
    device = resolve_device(console.options.device)
    run_precision = Precision.of(precision, device)
    models = build_models(resolved, device, smoke=smoke)  # fails before any run dir exists
    check_layer_k(resolved, models.source)
    stage1 = ipl and mapper_path is None and (run is None or not run.mapper_path.exists())
    check_memory(resolved, models.source, device, ("mapper", "adapt") if stage1 else ("adapt",), command="adapt")

    mapper = ckpt_source = None
    if ipl and mapper_path is not None:
        ckpt_source = _mapper_file(mapper_path)
        mapper, ckpt = load_mapper(ckpt_source, device)
        _check_mapper(ckpt, resolved, models, ckpt_source)
    if run is None:
        info = RunInfo(
            stage="adapt", smoke=smoke, device=str(device), save_every=save_every, precision=run_precision.name,
            mapper_from=str(ckpt_source) if ckpt_source is not None else None,
        )
        with write_failures(out, "--out", "then run the same command again"):
            run = RunDir.create(out, resolved.name, {**resolved.to_toml_dict(), "run": info.table()})
            if ckpt_source is not None:
                shutil.copyfile(ckpt_source, run.mapper_path)  # the run dir stays self-contained
    console.info(f"run directory: {console.escape(run.path)}")

    # A full disk or read-only folder ends the run with one line; state.pt keeps the last saved step.
    then = f"then `ipl adapt --resume {run.path}` continues from the last saved step"
    with graceful_stop() as stop, write_failures(run.path, "--out" if resume is None else "--resume", then):
        if ipl and mapper is None:
            if run.mapper_path.exists():
                mapper, ckpt = load_mapper(run.mapper_path, device)
                _check_mapper(ckpt, resolved, models, run.mapper_path)
            else:  # continues from a stage-1 state.pt of an interrupted attempt, if any
                with step_progress(resolved.mapper.steps, "stage 1: mapper") as update1:
                    run_stage1(
                        resolved, models, run, on_step=update1, precision=run_precision, stop=stop,
                        save_every=info.save_every, command="adapt",
                    )
                mapper, _ = load_mapper(run.mapper_path, device)
        with step_progress(resolved.adapt.steps, f"stage 2: {resolved.adapt.method}") as update2:
            result = run_stage2(
                resolved, models, run, mapper, save_every=info.save_every, on_step=update2, stop=stop,
                precision=run_precision,
            )

    if console.wants_json(json_output):
        console.print_json(
            {
                "run_dir": str(run.path),
                "generator": str(run.generator_path),
                "mapper": str(run.mapper_path) if ipl else None,
                "samples": [str(p) for p in result.samples],
                "steps": resolved.adapt.steps,
                "resumed_from": result.resumed_from,
                "last": result.last,
                "smoke": smoke,
                "precision": run_precision.name,
            }
        )
    else:
        console.out.print(f"adapted generator written to {console.escape(run.generator_path)}")
