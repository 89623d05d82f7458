"""A complete stage-2 run: seeding, the loop, samples, resume state and the adapted checkpoint.

Resume is exact: `state.pt` holds G_t, G_ema, the optimizer, the fixed z's, the step,
the fp16 loss scalers and every random generator's state, and nothing outside the
training steps draws from those generators. A run resumed from step k therefore ends with the weights an
uninterrupted run with the same seed reaches on the same device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ipltool import checkpoints
from ipltool.domain import Domain
from ipltool.errors import Interrupted, UsageError
from ipltool.images import find_images, load_rgb, to_tensor
from ipltool.interrupt import StopRequest
from ipltool.models.stylegan2 import generator_checkpoint
from ipltool.precision import FP32, Precision
from ipltool.train.guard import StepGuard
from ipltool.atomic import atomic_torch_save
from ipltool.train.run import RunDir, capture_rng_state, restore_rng_state
from ipltool.train.samples import SampleGrid
from ipltool.train.setup import Models
from ipltool.train.stage2 import Stage2State, check_layer_k, clip_terms, stage2_step, start_stage2, style_image_direction

STAGE = "adapt"
# What lowers a stage-2 step's memory, first what leaves the results as they are: the layer
# choice's renders set the peak (config-f at 1024 px in bf16: 11.9 GiB at its batch of 8,
# 6.6 GiB by 4, benchmarks/RESULTS.md).
LOWER_STAGE2 = "--chunk (images the layer choice renders at once; same results) or --batch (adapt.batch)"


@dataclass
class Stage2Result:
    """What a finished stage 2 leaves: the last step's terms and the sample files written."""

    last: dict
    samples: list[Path] = field(default_factory=list)
    resumed_from: int = 0


def _scalers(state: Stage2State) -> dict:
    """The enabled loss scalers of `state` by their `state.pt` key (none unless fp16)."""
    scalers = {"step": state.scaler, "layer_choice": state.layer_scaler}
    return {key: scaler for key, scaler in scalers.items() if scaler is not None and scaler.is_enabled()}


def _save(run: RunDir, state: Stage2State) -> None:
    saved = {
        "stage": STAGE,
        "step": state.step,
        "trainable": state.trainable.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "fixed_z": state.fixed_z,
        "rng": capture_rng_state(),
    }
    scalers = _scalers(state)
    if scalers:
        saved["scalers"] = {key: scaler.state_dict() for key, scaler in scalers.items()}
    run.save_state(saved)


def _restore(run: RunDir, state: Stage2State) -> bool:
    """Load `state.pt` into `state` when it holds a stage-2 state; True if it did."""
    device = state.fixed_z.device
    saved = run.load_state(map_location=device)
    if saved is None or checkpoints.state_stage(saved, run.state_path) != STAGE:
        return False
    # A foreign or planted file is refused here, before any of it is used; the step guard
    # checks the restored weights for non-finite values with its own message.
    checkpoints.validate_state(
        saved, run.state_path, stage=STAGE, modules={"trainable": state.trainable, "ema": state.ema},
        optimizers={"optimizer": state.optimizer}, tensors={"fixed_z": state.fixed_z}, scalers=_scalers(state), finite=False,
    )
    state.trainable.load_state_dict(saved["trainable"])
    state.ema.load_state_dict(saved["ema"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.fixed_z = saved["fixed_z"].to(device)
    state.step = int(saved["step"])
    # States saved before --precision existed (or by fp32/bf16 runs) have no scalers.
    for key, scaler in _scalers(state).items():
        if key in saved.get("scalers", {}):
            scaler.load_state_dict(saved["scalers"][key])
    restore_rng_state(saved["rng"])
    return True


def _guard(state: Stage2State, domain: Domain, models: Models, run: RunDir, mapper: torch.nn.Module | None) -> StepGuard:
    """The non-finite guard of stage 2: the layers each step trained, and the frozen inputs to blame."""
    inputs: dict[str, object] = {"the source generator": models.source}
    if mapper is not None:
        inputs[f"the mapper ({run.mapper_path})"] = mapper
    inputs.update({f"CLIP {clip.name}": clip.model for clip, _ in models.clips})
    return StepGuard(
        "stage 2",
        lambda: [p for p in state.trainable.parameters() if p.requires_grad],  # frozen layers did not change
        lr=domain.adapt.lr,
        reference_lr=type(domain.adapt).model_fields["lr"].default,
        precision=state.precision,
        scaler=state.scaler,
        inputs=inputs,
        lower=LOWER_STAGE2,
    )


def _use_style_images(terms, models: Models, domain: Domain) -> None:
    """Point every CLIP term's NADA direction at the style images of `adapt.style_images`."""
    pictures = [to_tensor(load_rgb(path)) for path in find_images(domain.adapt.style_images)]
    for term in terms:
        rng = torch.Generator(device=models.source.device).manual_seed(domain.adapt.seed)
        term.nada_direction = style_image_direction(term.clip, models.source, pictures, rng)


def run_stage2(
    domain: Domain,
    models: Models,
    run: RunDir,
    mapper: torch.nn.Module | None,
    save_every: int = 50,
    on_step: Callable[[int, dict], None] | None = None,
    stop: StopRequest | None = None,
    precision: Precision = FP32,
    chunk: int | None = None,
) -> Stage2Result:
    """Adapt the generator, continuing from `run/state.pt` when it holds a stage-2 state.

    Writes per step a `log.jsonl` record; every `adapt.sample_every` steps and at the end
    a grid in `samples/`; every `save_every` steps `state.pt`; at the end `generator.pt`
    (`{"g_ema": ...}`). When `stop` is raised between steps, the state is saved and
    `Interrupted` is raised.

    Args:
        mapper: the stage-1 mapper (None for method "nada").
        on_step: called as `on_step(step, terms)` after each step.
        precision: autocast and loss scaling of the steps (the run's stored precision
            when resuming); sample grids always render in float32.
        chunk: images rendered at once by the layer choice and the sample grids (None:
            the layer choice's whole batch, grids 8 at a time); memory only, the results
            agree to float rounding.
    """
    cfg = domain.adapt
    check_layer_k(domain, models.source)
    terms = clip_terms(models.clips, domain)
    if cfg.style_images is not None:
        _use_style_images(terms, models, domain)
    torch.manual_seed(cfg.seed)
    state = start_stage2(models.source, domain, precision, chunk)
    resumed = _restore(run, state)
    guard = _guard(state, domain, models, run, mapper)
    if resumed:
        guard.check_start(str(run.state_path), {"EMA weights": state.ema, "optimizer state": state.optimizer.state_dict()["state"]})
        guard.saved_step = state.step
    if state.step > cfg.steps:
        raise UsageError(
            f"{run.path} is already at step {state.step}, past adapt.steps = {cfg.steps}",
            hint="a run can be extended with a larger --steps, never shortened",
        )
    run.truncate_log(state.step if resumed else 0, stage=STAGE)
    grid = SampleGrid(
        models.source, state.fixed_z, cfg.truncation, cfg.seed, chunk=chunk or SampleGrid.CHUNK, tile=cfg.sample_size,
        title=f"{domain.name} · {cfg.method}",
    )
    result = Stage2Result(last={}, resumed_from=state.step)

    def write_samples() -> None:
        result.samples.append(grid.write(run.samples_dir / f"step-{state.step:06d}.png", state.ema, step=state.step))

    while state.step < cfg.steps:
        if stop is not None and stop.requested:
            _save(run, state)
            raise Interrupted(
                f"stopped at step {state.step} of {cfg.steps}; the state is saved",
                hint=f"continue with: ipl adapt --resume {run.path}",
            )
        started = time.perf_counter()
        with guard.step(state.step + 1):
            terms_of_step = stage2_step(state, models.source, terms, domain, mapper, models.prompts if mapper else None)
        guard.check(state.step, terms_of_step["loss"])  # before anything is logged, sampled or saved
        result.last = {"stage": STAGE, "step": state.step, **terms_of_step, "seconds": round(time.perf_counter() - started, 4)}
        run.log(result.last)
        if on_step is not None:
            on_step(state.step, terms_of_step)
        if state.step % cfg.sample_every == 0 or state.step == cfg.steps:
            write_samples()
        if state.step % save_every == 0 and state.step < cfg.steps:
            _save(run, state)
            guard.saved_step = state.step

    if not result.samples and not (run.samples_dir / f"step-{state.step:06d}.png").exists():
        write_samples()  # a finished run resumed again still shows its final grid
    atomic_torch_save(generator_checkpoint(state.ema, domain=domain.name, steps=state.step), run.generator_path)
    _save(run, state)  # the final state lets `--resume --steps N` extend the run
    return result
