"""A complete stage-1 run: models, seeding, training, logging and the mapper checkpoint."""

from __future__ import annotations

import time
from typing import Callable

import torch

from ipltool.domain import Domain
from ipltool.precision import FP32, Precision
from ipltool.train.run import RunDir, atomic_torch_save
from ipltool.train.setup import Models, mapper_checkpoint, new_mapper
from ipltool.train.stage1 import train_mapper


def run_stage1(
    domain: Domain,
    models: Models,
    run: RunDir,
    chunk: int = 8,
    on_step: Callable[[int, dict], None] | None = None,
    precision: Precision = FP32,
) -> dict:
    """Train the domain's mapper, log every step to `run`, and write `run/mapper.pt`.

    The RNG is seeded with `domain.mapper.seed` after the networks are built, as the
    reference does. `precision` sets the autocast of the forward passes (see
    `ipltool.precision`); the saved mapper weights are float32 either way.

    Returns:
        The terms of the last step.
    """
    torch.manual_seed(domain.mapper.seed)
    mapper = new_mapper(domain, models)
    last: dict = {}
    started = time.perf_counter()

    def step_done(step: int, terms: dict) -> None:
        nonlocal last, started
        now = time.perf_counter()
        last = {"stage": "mapper", "step": step, **terms, "seconds": round(now - started, 4)}
        started = now
        run.log(last)
        if on_step is not None:
            on_step(step, terms)

    optimizer = train_mapper(mapper, models.source, models.prompts, domain, chunk=chunk, on_step=step_done, precision=precision)
    atomic_torch_save(mapper_checkpoint(mapper, domain, optimizer), run.mapper_path)
    return last
