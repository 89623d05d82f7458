"""Stage 1 of IPL: train the latent mapper that writes image-specific prompts (docs/method.md §1).

Only the mapper learns; the source generator and CLIP are frozen. Images are
rendered and encoded in chunks under `no_grad`, and only their CLIP features are
kept, so memory does not grow with the batch at large generator sizes. The random
draws happen in the reference's order (z, then the mapper, then per-layer noise for
the whole batch), so a seeded run reproduces the authors' numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ipltool.domain import Domain, Mapper
from ipltool.models.clip import Clip, PromptEncoder
from ipltool.models.stylegan2 import Generator
from ipltool.precision import FP32, Precision, backward_step
from ipltool.train import losses
from ipltool.train.guard import StepGuard
from ipltool.train.text import TextFeatures


@dataclass
class Stage1Targets:
    """The fixed text features of stage 1, computed once per run.

    Attributes:
        add_source, add_target: raw `E_T(ctx_init + " " + label + ".")` (note the period).
        mean_source, mean_target: `mean_T(label)` over the ImageNet templates.
        mean_custom: `mean_C` of the custom prompts, or None when the domain has none.
    """

    add_source: torch.Tensor
    add_target: torch.Tensor
    mean_source: torch.Tensor
    mean_target: torch.Tensor
    mean_custom: torch.Tensor | None


def stage1_targets(text: TextFeatures, domain: Domain) -> Stage1Targets:
    """Encode every fixed sentence stage 1 needs for `domain`, once."""
    ctx = domain.ctx_init
    custom = domain.prompts.custom
    return Stage1Targets(
        add_source=text.sentence(f"{ctx} {domain.source}."),
        add_target=text.sentence(f"{ctx} {domain.target}."),
        mean_source=text.template_mean(domain.source),
        mean_target=text.template_mean(domain.target),
        mean_custom=text.custom_mean(custom) if custom else None,
    )


@torch.no_grad()
def encode_generated(
    generator: Generator,
    w: torch.Tensor,
    clip: Clip,
    noise: list[torch.Tensor] | None = None,
    chunk: int = 8,
) -> torch.Tensor:
    """Render latents and return their normalised CLIP image features, chunk by chunk.

    Args:
        generator: a frozen generator.
        w: (B, style_dim) latents (or (B, n_latent, style_dim) W+ codes).
        clip: the CLIP model.
        noise: per-layer noise for the whole batch (see `Generator.draw_noise`); None for the
            generator's constant noise buffers.
        chunk: images rendered at once; only their features are kept.

    Returns:
        (B, embed_dim) unit-norm features.
    """
    features = []
    for start in range(0, w.shape[0], chunk):
        stop = start + chunk
        layer_noise = [n[start:stop] for n in noise] if noise is not None else generator.noise_list(randomize=False)
        images = generator.synthesis(generator.to_w_plus([w[start:stop]]), layer_noise)
        features.append(losses.unit(clip.encode_image(images).float()))
    return torch.cat(features)


@dataclass
class Stage1Loss:
    """The stage-1 loss and its terms for one batch (the terms as floats, for the log)."""

    total: torch.Tensor
    terms: dict[str, float]


def stage1_loss(
    P: torch.Tensor,
    prompts: PromptEncoder,
    image_features: torch.Tensor,
    targets: Stage1Targets,
    domain: Domain,
    precision: Precision = FP32,
) -> Stage1Loss:
    """`L_con + lambda_l * (L_tgt + lambda_src * L_src + lambda_custom * L_cus)` (spec section 1).

    Args:
        P: (B, n_ctx, d) prompt vectors the mapper wrote for the batch.
        prompts: the learned-prompt encoder of the first CLIP model.
        image_features: (B, D) normalised float32 features of the same latents' images.
        targets: the fixed text features (`stage1_targets`).
        domain: labels and loss weights.
        precision: the text tower runs under its autocast; the loss terms are float32.
    """
    batch = P.shape[0]
    # Source and target prompts go through the text tower in one call.
    with precision.autocast():
        u = prompts.encode(torch.cat([P, P]), [domain.source] * batch + [domain.target] * batch)
    u = u.float()
    s = losses.prompt_features(u[:batch], targets.add_source)
    t = losses.prompt_features(u[batch:], targets.add_target)
    loss_cfg = domain.loss
    l_con = losses.contrastive_loss(image_features, s, prompts.clip.logit_scale)
    l_tgt = losses.mean_cosine_distance(t, targets.mean_target)
    regular = l_tgt
    terms = {"contrastive": l_con.item(), "target_reg": l_tgt.item()}
    if loss_cfg.lambda_src:
        l_src = losses.mean_cosine_distance(s, targets.mean_source)
        regular = regular + loss_cfg.lambda_src * l_src
        terms["source_reg"] = l_src.item()
    if targets.mean_custom is not None and loss_cfg.lambda_custom:
        l_cus = losses.mean_cosine_distance(t, targets.mean_custom)
        regular = regular + loss_cfg.lambda_custom * l_cus
        terms["custom_reg"] = l_cus.item()
    total = l_con + loss_cfg.lambda_l * regular
    terms["loss"] = total.item()
    return Stage1Loss(total, terms)


@dataclass
class Stage1State:
    """Everything stage 1 updates or keeps fixed across its steps (as `Stage2State` for stage 2).

    Attributes:
        mapper: the mapper being trained.
        optimizer: its Adam.
        targets: the fixed text features (`stage1_targets`).
        precision: autocast of the forward passes.
        scaler: the loss scaler (None: `precision.scaler()`, enabled for fp16 only).
        step: steps taken.
    """

    mapper: torch.nn.Module
    optimizer: torch.optim.Optimizer
    targets: Stage1Targets
    precision: Precision = FP32
    scaler: torch.amp.GradScaler | None = None
    step: int = 0


def stage1_step(state: Stage1State, generator: Generator, prompts: PromptEncoder, domain: Domain, chunk: int = 8) -> dict[str, float]:
    """One optimisation step of the mapper on a batch of `domain.mapper.batch`; returns the loss terms.

    Random draws, in the reference's order: z (B, style_dim); the mapper's own
    randomness (dropout of transformer mappers); the per-layer image noise.
    The mapper, the rendering and CLIP run under the state's autocast (the mapping
    network stays float32: w is also the mapper's input); the backward pass and the
    step go through the state's scaler. `chunk` images are rendered at once.
    """
    mapper, optimizer, targets, precision = state.mapper, state.optimizer, state.targets, state.precision
    batch = domain.mapper.batch
    device = next(mapper.parameters()).device
    z = torch.randn(batch, generator.style_dim, device=device)
    with torch.no_grad():
        w = generator.mapping(z)
    mapper.train()
    with precision.autocast():
        P = mapper(w)
        noise = generator.draw_noise(batch)
        image_features = encode_generated(generator, w, prompts.clip, noise, chunk)
    result = stage1_loss(P, prompts, image_features, targets, domain, precision)
    optimizer.zero_grad(set_to_none=True)
    backward_step(result.total, optimizer, state.scaler if state.scaler is not None else precision.scaler())
    state.step += 1
    return result.terms


def train_mapper(
    mapper: torch.nn.Module,
    generator: Generator,
    prompts: PromptEncoder,
    domain: Domain,
    steps: int | None = None,
    chunk: int = 8,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    precision: Precision = FP32,
) -> torch.optim.Optimizer:
    """Train `mapper` for `steps` (default `domain.mapper.steps`) with Adam(lr from the domain).

    The caller seeds the RNG (`domain.mapper.seed`) before calling.

    Args:
        mapper: the mapper to train (its parameters are the only ones updated).
        generator: the frozen source generator.
        prompts: learned-prompt encoder of the first CLIP model.
        domain: labels, weights and the [mapper] settings.
        steps: number of steps.
        chunk: images rendered at once.
        on_step: called as `on_step(step, terms)` after every step (1-based step).
        precision: autocast of the forward passes; fp16 adds one loss scaler for the run.

    Returns:
        The optimizer (its state goes into the mapper checkpoint).

    Raises:
        NonFiniteError: a non-finite loss or mapper weight (see `ipltool.train.guard`).
    """
    optimizer = torch.optim.Adam(mapper.parameters(), lr=domain.mapper.lr)
    scaler = precision.scaler()
    state = Stage1State(mapper, optimizer, stage1_targets(TextFeatures(prompts.clip), domain), precision, scaler)
    guard = StepGuard(
        "stage 1", lambda: list(mapper.parameters()), lr=domain.mapper.lr, reference_lr=Mapper.model_fields["lr"].default,
        precision=precision, scaler=scaler, inputs={"the source generator": generator, f"CLIP {prompts.clip.name}": prompts.clip.model},
    )
    for step in range(1, (steps or domain.mapper.steps) + 1):
        with guard.step(step):
            terms = stage1_step(state, generator, prompts, domain, chunk)
        guard.check(step, terms["loss"])
        if on_step is not None:
            on_step(step, terms)
    return optimizer
