"""A complete stage-1 run: models, seeding, training, logging, resume state and the mapper checkpoint.

Resume is exact, as in stage 2: `state.pt` (with `"stage": "mapper"`) holds the mapper,
its optimizer, the step, the fp16 loss scaler and every random generator's state, so a
run resumed from step k ends with the mapper an uninterrupted run reaches.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ipltool import checkpoints
from ipltool.compiled import compiled_renders
from ipltool.domain import Domain, Mapper
from ipltool.errors import Interrupted, UsageError
from ipltool.interrupt import StopRequest
from ipltool.models.mappers import mapper_checkpoint
from ipltool.precision import FP32, Precision
from ipltool.train.guard import StepGuard
from ipltool.atomic import atomic_torch_save
from ipltool.train.run import RunDir, capture_rng_state, restore_rng_state
from ipltool.train.setup import Models, new_mapper
from ipltool.train.stage1 import Stage1State, stage1_step, stage1_targets
from ipltool.train.text import TextFeatures

STAGE = "mapper"


@dataclass
class Stage1Result:
    """What a finished stage 1 leaves: the last step's log record and the step it resumed from."""

    last: dict
    resumed_from: int = 0


def _save(run: RunDir, step: int, mapper: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    saved = {
        "stage": STAGE,
        "step": step,
        "mapper": mapper.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": capture_rng_state(),
    }
    if scaler.is_enabled():
        saved["scalers"] = {"step": scaler.state_dict()}
    run.save_state(saved)


def _restore(run: RunDir, mapper: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> int | None:
    """Load `state.pt` into the mapper, optimizer and scaler when it holds a stage-1 state; its step, else None."""
    saved = run.load_state(map_location=next(mapper.parameters()).device)
    if saved is None or checkpoints.state_stage(saved, run.state_path) != STAGE:
        return None
    # A foreign or planted file is refused here, before any of it is used; the step guard
    # checks the restored weights for non-finite values with its own message.
    checkpoints.validate_state(
        saved, run.state_path, stage=STAGE, modules={"mapper": mapper}, optimizers={"optimizer": optimizer},
        scalers={"step": scaler} if scaler.is_enabled() else {}, finite=False,
    )
    mapper.load_state_dict(saved["mapper"])
    optimizer.load_state_dict(saved["optimizer"])
    if scaler.is_enabled() and "step" in saved.get("scalers", {}):
        scaler.load_state_dict(saved["scalers"]["step"])
    restore_rng_state(saved["rng"])
    return int(saved["step"])


def run_stage1(
    domain: Domain,
    models: Models,
    run: RunDir,
    chunk: int = 8,
    on_step: Callable[[int, dict], None] | None = None,
    precision: Precision = FP32,
    stop: StopRequest | None = None,
    save_every: int = 50,
    command: str = "train-mapper",
    compiled: bool = False,
) -> Stage1Result:
    """Train the domain's mapper, continuing from `run/state.pt` when it holds a stage-1 state.

    The RNG is seeded with `domain.mapper.seed` after the networks are built, as the
    reference does. Writes per step a `log.jsonl` record; every `save_every` steps
    `state.pt`; at the end `mapper.pt` and a final `state.pt` (so `--resume --steps N`
    can extend the run). When `stop` is raised between steps, the state is saved and
    `Interrupted` is raised. `precision` sets the autocast of the forward passes (see
    `ipltool.precision`); the saved mapper weights are float32 either way. `compiled`
    runs the renders and CLIP's image encodings through `torch.compile` (`--compile`).

    Args:
        command: the command whose `--resume` continues the run ("train-mapper" or "adapt"), for messages.

    Raises:
        NonFiniteError: a non-finite loss or mapper weight (nothing non-finite is saved).
        UsageError: out of memory during a step; a saved state past `mapper.steps`.
        Interrupted: `stop` was requested.
    """
    steps = domain.mapper.steps
    torch.manual_seed(domain.mapper.seed)
    mapper = new_mapper(domain, models)
    targets = stage1_targets(TextFeatures(models.prompts.clip), domain)
    optimizer = torch.optim.Adam(mapper.parameters(), lr=domain.mapper.lr)
    scaler = precision.scaler()
    restored = _restore(run, mapper, optimizer, scaler)
    step = restored or 0
    if step > steps:
        raise UsageError(
            f"{run.path} is already at step {step}, past mapper.steps = {steps}",
            hint="a run can be extended with a larger --steps, never shortened",
        )
    guard = StepGuard(
        "stage 1",
        lambda: list(mapper.parameters()),
        lr=domain.mapper.lr,
        reference_lr=Mapper.model_fields["lr"].default,
        lr_flag="--lr" if command == "train-mapper" else "mapper.lr",  # adapt's --lr is stage 2's
        precision=precision,
        scaler=scaler,
        inputs={"the source generator": models.source, **{f"CLIP {clip.name}": clip.model for clip, _ in models.clips}},
        lower="--batch or --chunk" if command == "train-mapper" else "--chunk or --set mapper.batch=N",
    )
    if restored is not None:
        guard.check_start(str(run.state_path), {"optimizer state": optimizer.state_dict()["state"]})
        guard.saved_step = step
    run.truncate_log(step, stage=STAGE)  # steps logged after the saved state run again
    result = Stage1Result(last={}, resumed_from=step)
    state = Stage1State(mapper, optimizer, targets, precision, scaler, step)
    # --compile: the renders and image encodings of the loop compiled (`ipltool.compiled`).
    renders = compiled_renders(models.source, [clip for clip, _ in models.clips]) if compiled else contextlib.nullcontext()
    with renders:
        while step < steps:
            if stop is not None and stop.requested:
                _save(run, step, mapper, optimizer, scaler)
                raise Interrupted(
                    f"stopped at step {step} of {steps} of stage 1; the state is saved",
                    hint=f"continue with: ipl {command} --resume {run.path}",
                )
            started = time.perf_counter()
            with guard.step(step + 1):
                terms = stage1_step(state, models.source, models.prompts, domain, chunk)
            step += 1
            guard.check(step, terms["loss"])  # before anything is logged or saved
            result.last = {"stage": STAGE, "step": step, **terms, "seconds": round(time.perf_counter() - started, 4)}
            run.log(result.last)
            if on_step is not None:
                on_step(step, terms)
            if step % save_every == 0 and step < steps:
                _save(run, step, mapper, optimizer, scaler)
                guard.saved_step = step
    atomic_torch_save(mapper_checkpoint(mapper, domain, optimizer), run.mapper_path)
    _save(run, step, mapper, optimizer, scaler)  # the final state lets `--resume --steps N` extend the run
    return result
