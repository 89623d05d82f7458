"""The training pipelines as library calls: `adapt` (stage 1 unless a mapper is given, then stage 2)
and `train_mapper` (stage 1 alone), each in one run directory.

`ipl adapt` and `ipl train-mapper` resolve the domain from their flags (or `--resume`)
and render the result; scripts and the web UI call these with a resolved `Domain`. A stop
request (Ctrl-C) saves the state between steps, and `adapt(..., run=RunDir.open(path))`
with the run's `RunInfo` continues it to exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch

from ipltool import console, registry
from ipltool.domain import Domain
from ipltool.errors import CheckpointError, UsageError
from ipltool.interrupt import StopRequest
from ipltool.models.mappers import load_mapper
from ipltool.outdir import write_failures
from ipltool.precision import Precision
from ipltool.train.guard import check_memory, peak_memory, reset_peak_memory
from ipltool.train.run import MAPPER_NAME, RunDir, RunInfo
from ipltool.train.setup import Models, build_models
from ipltool.train.stage1_run import Stage1Result, run_stage1
from ipltool.train.stage2 import check_layer_k
from ipltool.train.stage2_run import Stage2Result, run_stage2

#: `stage_progress(total, description)`: a context yielding `on_step(step, terms)` (e.g. `progress.step_progress`).
StageProgress = Callable[[int, str], ContextManager[Callable[[int, dict], None]]]


@contextlib.contextmanager
def _no_progress(total: int, description: str):
    yield lambda step, terms: None


@dataclass
class RunOptions:
    """How a training run runs: what `ipl adapt` and `ipl train-mapper` share beyond the domain.

    Attributes:
        smoke: the models are the tiny random ones.
        precision: fp32 (None), bf16 or fp16; refused where the device lacks it.
        save_every: steps between resume states of a new run.
        device: where the models run.
        stage_progress: progress of each stage (see `StageProgress`).
        stop: a stop request polled between steps (`interrupt.graceful_stop`).
        compiled: stage 1's renders through `torch.compile` (`--compile`, `ipltool.compiled`).
        chunk: images rendered at once by stage 1, the layer choice and the sample grids
            (`--chunk`): memory against speed; the results agree to float rounding.
    """

    smoke: bool = False
    precision: str | None = None
    save_every: int = 50
    device: torch.device | str = "cpu"
    stage_progress: StageProgress = _no_progress
    stop: StopRequest | None = None
    compiled: bool = False
    chunk: int = 8


@dataclass
class AdaptResult:
    """A finished adaptation: its run directory, what stage 2 reported, the precision it ran in, its peak memory in bytes (`guard.peak_memory`)."""

    run: RunDir
    stage2: Stage2Result
    precision: Precision
    peak_memory: int | None = None


def mapper_file(path: Path) -> Path:
    """`--mapper` accepts a mapper.pt or a run directory holding one.

    Raises:
        UsageError: neither is there.
    """
    candidate = path / MAPPER_NAME if path.is_dir() else path
    if not candidate.is_file():
        raise UsageError(
            f"no mapper at {candidate}",
            hint="pass a mapper.pt or a run directory made by `ipl train-mapper`",
        )
    return candidate


def check_mapper(ckpt: dict, domain: Domain, models: Models, path: Path) -> None:
    """Refuse a mapper that cannot drive this domain's prompts and generator; warn on other labels.

    A file without labels (the IPL authors' mapper.pt, a bare state dict) is used with the
    domain's ctx_init, and a note says so.

    Raises:
        CheckpointError: other sizes or another `ctx_init` than the domain's.
    """
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
    if ckpt.get("format", "ipltool") != "ipltool":
        console.info(f"[yellow]note: {console.escape(path)} stores no ctx_init or labels; it is used with ctx_init {console.escape(repr(domain.ctx_init))}[/]")
    elif (ckpt.get("source"), ckpt.get("target")) != (domain.source, domain.target):
        trained_for = console.escape(f"{ckpt.get('source')!r} -> {ckpt.get('target')!r}")
        console.info(f"[yellow]note: the mapper was trained for {trained_for}[/]")


def adapt(
    domain: Domain, out: Path | None = None, options: RunOptions | None = None, *,
    run: RunDir | None = None, info: RunInfo | None = None, mapper_path: Path | None = None,
) -> AdaptResult:
    """Adapt `domain`'s generator to its target text; returns the run with `generator.pt` written.

    Args:
        domain: the resolved domain (flags and `--smoke` settings applied).
        out: parent folder of a new run directory (ignored when `run` is given).
        options: smoke, precision, device, progress, stop (`RunOptions`; None: the defaults).
        run, info: an existing run to continue (`RunDir.read`), e.g. after a stop.
        mapper_path: a stage-1 mapper.pt (or a train-mapper run) to use instead of stage 1;
            it is copied into the run, which stays self-contained.

    Raises:
        UsageError: nothing to write to, a bad setting, out of memory; the message says what to do.
        CheckpointError: a mapper that does not fit this domain.
        Interrupted: `stop` was requested; the state is saved.
        NonFiniteError: a step produced NaN or inf (nothing non-finite is saved).
    """
    if run is None and out is None:
        raise UsageError("adapt needs a run directory to continue or an output folder for a new one")
    o = options or RunOptions()
    device, smoke, stage_progress, stop = torch.device(o.device), o.smoke, o.stage_progress, o.stop
    ipl = domain.adapt.method == "ipl"
    stage1 = ipl and mapper_path is None and (run is None or not run.mapper_path.exists())
    if stage1:
        registry.require("mappers", domain.mapper.kind)
    elif o.compiled:  # said, not silently ignored: only stage 1 is compiled
        why = "method nada has no stage 1" if not ipl else "--mapper replaces stage 1" if mapper_path is not None else "this run's stage 1 is done"
        console.info(f"[yellow]--compile does nothing here: {why}, and stage 2 is never compiled[/]")
    run_precision = Precision.of(o.precision, device)
    reset_peak_memory(device)
    models = build_models(domain, device, smoke=smoke)  # fails before any run dir exists
    check_layer_k(domain, models.source)
    check_memory(domain, models.source, device, ("mapper", "adapt") if stage1 else ("adapt",), command="adapt", chunk=o.chunk)

    mapper = ckpt_source = None
    if ipl and mapper_path is not None:
        ckpt_source = mapper_file(mapper_path)
        mapper, ckpt = load_mapper(ckpt_source, device, n_ctx=models.prompts.n_ctx, dim=models.prompts.dim)
        check_mapper(ckpt, domain, models, ckpt_source)
    resumed = run is not None
    if run is None:
        info = RunInfo(
            stage="adapt", smoke=smoke, device=str(device), save_every=o.save_every, precision=run_precision.name,
            mapper_from=str(ckpt_source) if ckpt_source is not None else None,
        )
        with write_failures(out, "--out", "then run the same command again"):
            run = RunDir.create(out, domain.name, {**domain.to_toml_dict(), "run": info.table()})
            if ckpt_source is not None:
                shutil.copyfile(ckpt_source, run.mapper_path)  # the run dir stays self-contained
    info = info or run.read_info()
    console.info(f"run directory: {console.escape(run.path)}")

    # A full disk or read-only folder ends the run with one line; state.pt keeps the last saved step.
    then = f"then `ipl adapt --resume {run.path}` continues from the last saved step"
    with write_failures(run.path, "--resume" if resumed else "--out", then):
        if ipl and mapper is None:
            if run.mapper_path.exists():
                mapper, ckpt = load_mapper(run.mapper_path, device, n_ctx=models.prompts.n_ctx, dim=models.prompts.dim)
                check_mapper(ckpt, domain, models, run.mapper_path)
            else:  # continues from a stage-1 state.pt of an interrupted attempt, if any
                with stage_progress(domain.mapper.steps, "stage 1: mapper") as on_step:
                    run_stage1(
                        domain, models, run, chunk=o.chunk, on_step=on_step, precision=run_precision, stop=stop,
                        save_every=info.save_every, command="adapt", compiled=o.compiled,
                    )
                mapper, _ = load_mapper(run.mapper_path, device, n_ctx=models.prompts.n_ctx, dim=models.prompts.dim)
        with stage_progress(domain.adapt.steps, f"stage 2: {domain.adapt.method}") as on_step:
            result = run_stage2(
                domain, models, run, mapper, save_every=info.save_every, on_step=on_step, stop=stop, precision=run_precision, chunk=o.chunk
            )
    return AdaptResult(run, result, run_precision, peak_memory(device))


@dataclass
class MapperResult:
    """A finished stage-1 run: its run directory (holding `mapper.pt`), what stage 1 reported, the precision, the peak memory."""

    run: RunDir
    stage1: Stage1Result
    precision: Precision
    peak_memory: int | None = None


def train_mapper(
    domain: Domain, out: Path | None = None, options: RunOptions | None = None, *,
    run: RunDir | None = None, info: RunInfo | None = None,
) -> MapperResult:
    """Train `domain`'s prompt mapper (stage 1) and write `mapper.pt`; arguments as for `adapt`.

    Raises:
        UsageError, NonFiniteError, Interrupted: as `adapt`.
    """
    if run is None and out is None:
        raise UsageError("train_mapper needs a run directory to continue or an output folder for a new one")
    o = options or RunOptions()
    device, smoke = torch.device(o.device), o.smoke
    registry.require("mappers", domain.mapper.kind)  # fail before any run dir exists
    run_precision = Precision.of(o.precision, device)
    reset_peak_memory(device)
    models = build_models(domain, device, smoke=smoke)
    check_memory(domain, models.source, device, ("mapper",), command="train-mapper", chunk=o.chunk)
    resumed = run is not None
    if run is None:
        info = RunInfo(stage="mapper", smoke=smoke, device=str(device), save_every=o.save_every, precision=run_precision.name)
        with write_failures(out, "--out", "then run the same command again"):
            run = RunDir.create(out, domain.name, {**domain.resolved().to_toml_dict(), "run": info.table()})
    info = info or run.read_info()
    console.info(f"run directory: {console.escape(run.path)}")
    # A full disk or read-only folder ends the run with one line; state.pt keeps the last saved step.
    then = f"then `ipl train-mapper --resume {run.path}` continues from the last saved step"
    with write_failures(run.path, "--resume" if resumed else "--out", then), o.stage_progress(domain.mapper.steps, "stage 1: mapper") as on_step:
        result = run_stage1(
            domain, models, run, chunk=o.chunk, on_step=on_step, precision=run_precision, stop=o.stop, save_every=info.save_every,
            compiled=o.compiled,
        )
    return MapperResult(run, result, run_precision, peak_memory(device))
