"""Stage 2 of IPL: adapt a copy of the generator along per-sample text directions (docs/method.md §2).

`G_t` (trainable) and `G_ema` start as copies of the frozen source `G_s`. Each step
picks the layers to train (adaptive layer choice), turns the mapper's prompts into
one text direction per sample, and pulls the CLIP direction between `G_s(w)` and
`G_t(w)` towards it. `method="nada"` replaces the per-sample directions by
StyleGAN-NADA's single template direction.

Random draws follow the reference order within a step: the batch z (two per sample
when style mixing fires); the layer choice's z and noise; the noise of `G_s`; the
noise of `G_t`.

Under `--precision bf16|fp16` the generators, CLIP and the mapper run under autocast
(`ipltool.precision`); the mapping network, the loss terms, the optimizer and the EMA
stay float32, and so does CLIP's encoding of the step's two image batches, whose
difference is the image direction. fp16 scales the losses of the step and of the layer
choice. The layer choice is a ranking, and where bf16/fp16 cannot tell two layers apart it
is confirmed in fp32 (`choose_layers`).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch

from ipltool import console
from ipltool.domain import Adapt, Domain
from ipltool.errors import UsageError
from ipltool.models.clip import Clip, PromptEncoder
from ipltool.models.stylegan2 import Generator
from ipltool.precision import FP32, Precision, backward_step
from ipltool.train import losses
from ipltool.train.run import capture_rng_state, restore_rng_state
from ipltool.train.text import TextFeatures

# StyleGAN2's lazy-regularization ratio (g_reg_every = 4), which the reference keeps for Adam.
G_REG_RATIO = 4 / 5
LAYER_CHOICE_LR = 0.01
# Generated source images behind NADA's image-guided direction (its img2img batch).
STYLE_SOURCE_SAMPLES = 16


@dataclass
class ClipTerm:
    """One CLIP model of the directional loss: the model, its weight, its fixed text features."""

    clip: Clip
    weight: float
    text: TextFeatures
    context: torch.Tensor  # a0 = E_T(ctx_init), raw (quirk: no label, no period)
    target_label: torch.Tensor  # E_T(target), raw: the layer choice's text
    nada_direction: torch.Tensor | None = None  # (1, D), for method "nada"
    nada_global: torch.Tensor | None = None  # E_T("a " + target), raw: NADA's global term, for method "nada"


def nada_global_sentence(target: str) -> str:
    """The sentence NADA's global CLIP term encodes for `target`: "a disney" for "disney"."""
    return f"a {target}"


def clip_terms(clips: list[tuple[Clip, float]], domain: Domain) -> list[ClipTerm]:
    """Compute every fixed text feature stage 2 needs, once, for each configured CLIP model."""
    terms = []
    for clip, weight in clips:
        text = TextFeatures(clip)
        term = ClipTerm(clip, weight, text, text.sentence(domain.ctx_init), text.sentence(domain.target))
        if domain.adapt.method == "nada":
            term.nada_direction = losses.nada_direction(text.templates(domain.source), text.templates(domain.target))
            # StyleGAN-NADA aims its global term at the sentence "a {target}", while its
            # layer choice uses the bare label (`target_label`): two different features.
            term.nada_global = text.sentence(nada_global_sentence(domain.target))
        terms.append(term)
    return terms


@torch.no_grad()
def style_image_direction(
    clip: Clip, source: Generator, style_images: list[torch.Tensor], generator: torch.Generator
) -> torch.Tensor:
    """NADA's image-guided target: `n(mean n(E_I(style)) - mean n(E_I(G_s(z))))`, shape (1, D).

    The style pictures (each (3, H, W) in [-1, 1], any size) are resized with
    antialiasing, as CLIP's PIL preprocessing does. The `STYLE_SOURCE_SAMPLES` source
    images use `generator` for their z and constant noise, so the training draws stay
    those of a text-guided run with the same seed.
    """
    device = source.device
    style = torch.cat([losses.unit(clip.encode_image(x[None].to(device), antialias=True).float()) for x in style_images])
    z = torch.randn(STYLE_SOURCE_SAMPLES, source.style_dim, generator=generator, device=generator.device).to(device)
    generated = source.synthesis(source.to_w_plus([source.mapping(z)]), source.noise_list(randomize=False))
    made = losses.unit(clip.encode_image(generated).float())
    return losses.unit(style.mean(dim=0, keepdim=True) - made.mean(dim=0, keepdim=True))


def draw_latents(batch: int, dim: int, mixing: float, device: torch.device) -> list[torch.Tensor]:
    """The step's z: one (batch, dim) tensor, or two when style mixing fires.

    As StyleGAN2's `mixing_noise`: Python's `random` decides (only when `mixing > 0`),
    and both z's come from one (2, batch, dim) draw.
    """
    if mixing > 0 and random.random() < mixing:
        return list(torch.randn(2, batch, dim, device=device).unbind(0))
    return [torch.randn(batch, dim, device=device)]


def _features(clip: Clip, images: torch.Tensor, precision: Precision) -> torch.Tensor:
    """CLIP image features (B, D) of `images`, encoded under `precision`'s autocast, as float32 for the losses."""
    with precision.autocast():
        return clip.encode_image(images).float()


# ----------------------------------------------------------------------------
# Adaptive layer choice


def choose_layers(
    source: Generator,
    trainable: Generator,
    terms: list[ClipTerm],
    k: int,
    iters: int,
    batch: int,
    precision: Precision = FP32,
    scaler: torch.amp.GradScaler | None = None,
    chunk: int | None = None,
) -> list[int]:
    """Pick the `k` W+ indices whose codes move most when optimised towards the target text.

    Steps: 1. z (batch), w0 = W+ of `source.mapping(z)`; 2. `iters` SGD(lr 0.01) steps on
    w alone, minimising the weighted CLIP global loss of `trainable(w)` (random noise);
    3. score each index by `mean |w - w0|` over batch and channels; 4. top k.
    Only w is differentiated: no gradient is computed for the generator or CLIP.
    The synthesis and CLIP run under `precision`'s autocast, the loss in float32;
    `scaler` (None: `precision.scaler()`) scales it for fp16. In bf16/fp16, when the
    k-th and (k+1)-th scores are too close for the reduced precision to order them
    (`LAYER_CHOICE_MARGIN`), the scores are computed again in fp32 from the same z and
    noise, so the layers are the ones fp32 would pick. `chunk` renders that many of the
    batch at a time (None: all at once; see `layer_scores`): the memory of the choice,
    which sets the peak of a stage-2 step at 1024 px, without changing its arithmetic.

    Returns:
        The chosen W+ indices (see `Generator.layer_for_style_index`).
    """
    device = source.device
    z = torch.randn(batch, source.style_dim, device=device)
    # Drawn up front, in the order the loop used to draw them (nothing else draws in
    # between), so that an fp32 confirmation sees the same noise.
    noises = [trainable.draw_noise(batch) for _ in range(iters)]
    scores = layer_scores(source, trainable, terms, z, noises, precision, scaler, chunk)
    if precision.reduced and ambiguous(scores, k):
        # Half the reduced pass's chunk: fp32 activations take twice the memory, and at the
        # same chunk the confirmation would lift the peak of a bf16 run above that of an
        # fp32 run (stage 2 @ 256: 7.9 against 7.3 GB, benchmarks/RESULTS.md).
        scores = layer_scores(source, trainable, terms, z, noises, FP32, chunk=max(min(chunk or batch, batch) // 2, 1))
    return torch.topk(scores, k).indices.tolist()


# How close (relative to the k-th score) the k-th and (k+1)-th layer-choice scores may be
# before bf16/fp16 cannot be trusted to order them. Measured on config-f at 256 px with the
# full ViT-B/32 (benchmarks/RESULTS.md, "Layer choice in bf16" and "confirmed in fp32"):
# bf16 moves the scores against each other by up to 0.45 %, so two scores can swap when
# they are within about 0.9 % of each other; from the same weights the gap itself came
# out up to 0.56 points off fp32's. 2 % leaves twice the worst of these; it sent 6 of 20
# steps of a 256 px run to fp32.
LAYER_CHOICE_MARGIN = 0.02


def ambiguous(scores: torch.Tensor, k: int) -> bool:
    """True when the k-th and (k+1)-th largest of `scores` are within `LAYER_CHOICE_MARGIN` of each other."""
    if k >= scores.numel():
        return False  # every index is chosen: nothing to order
    top = torch.topk(scores, k + 1).values
    return bool(top[k - 1] - top[k] <= LAYER_CHOICE_MARGIN * top[k - 1].abs())


def layer_scores(
    source: Generator,
    trainable: Generator,
    terms: list[ClipTerm],
    z: torch.Tensor,
    noises: list[list[torch.Tensor]],
    precision: Precision = FP32,
    scaler: torch.amp.GradScaler | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """The layer choice's score of every W+ index: `mean |w - w0|` after one SGD step on w per entry of `noises`.

    `chunk` renders the batch that many samples at a time (None, or the batch or more: all
    at once, the reference's arithmetic). The loss is a mean over samples that never
    interact, so the gradient is the same sum in parts (each part's mean weighted by its
    share of the batch), with a part's activations held at a time; the scores agree with
    the whole batch's to float rounding.
    """
    scaler = scaler if scaler is not None else precision.scaler()
    batch = z.shape[0]
    parts = [slice(start, start + chunk) for start in range(0, batch, chunk)] if chunk and chunk < batch else [slice(None)]
    with torch.no_grad():
        w0 = source.to_w_plus([source.mapping(z)])
    w = w0.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([w], lr=LAYER_CHOICE_LR)
    for noise in noises:
        grad = None
        for part in parts:
            with precision.autocast():
                images = trainable.synthesis(w[part], [n[part] for n in noise])
            loss = sum(
                t.weight * losses.global_clip_loss(_features(t.clip, images, precision), t.target_label, t.clip.logit_scale)
                for t in terms
            )
            if len(parts) > 1:
                loss = loss * (images.shape[0] / batch)
            # Only w is differentiated, so the scaled gradient is set by hand; the scaler
            # unscales it and skips the step when it overflowed (a no-op unless fp16).
            (part_grad,) = torch.autograd.grad(scaler.scale(loss), [w])
            grad = part_grad if grad is None else grad + part_grad
        w.grad = grad
        scaler.step(optimizer)
        scaler.update()
    return (w.detach() - w0).abs().mean(dim=-1).mean(dim=0)


def check_layer_k(domain: Domain, generator: Generator) -> None:
    """Refuse an `adapt.auto_layer_k` larger than the generator's W+ (a domain made for a bigger model).

    Raises:
        UsageError: with the reference default for this generator as the hint.
    """
    n_latent = generator.n_latent
    if domain.adapt.auto_layer_iters > 0 and domain.adapt.layer_k(n_latent) > n_latent:
        raise UsageError(
            f"adapt.auto_layer_k = {domain.adapt.layer_k(n_latent)} but the generator has only {n_latent} W+ layers",
            hint=f"use --layers {Adapt.default_layer_k(n_latent)} (the reference default for this size)",
        )


def train_only(generator: Generator, indices: list[int] | None) -> None:
    """Freeze all of `generator`, then unfreeze the layers of the chosen W+ indices.

    With `indices=None` (adaptive choice off) the reference's default phase trains the
    constant `input`, `conv1` and every `convs` layer. The mapping network and the
    `to_rgbs` stay frozen either way (`to_rgb1` can be chosen, a kept quirk).
    """
    generator.requires_grad_(False)
    if indices is None:
        for module in (generator.input, generator.conv1, generator.convs):
            module.requires_grad_(True)
        return
    for index in indices:
        generator.layer_for_style_index(index).requires_grad_(True)


# ----------------------------------------------------------------------------
# The step


def make_optimizer(generator: Generator, lr: float) -> torch.optim.Adam:
    """Adam over all of G_t with the StyleGAN2 ratio: lr * 4/5, betas (0, 0.99 ** (4/5))."""
    return torch.optim.Adam(generator.parameters(), lr=lr * G_REG_RATIO, betas=(0.0**G_REG_RATIO, 0.99**G_REG_RATIO))


@torch.no_grad()
def update_ema(ema: Generator, trainable: Generator, decay: float) -> None:
    """`ema = ema * decay + trainable * (1 - decay)` for every state-dict entry (buffers too)."""
    source = trainable.state_dict()
    for key, value in ema.state_dict().items():
        value.copy_(value * decay + source[key] * (1 - decay))


@dataclass
class Stage2State:
    """Everything stage 2 updates: the trainable copy, its EMA, the optimizer, the step."""

    trainable: Generator
    ema: Generator
    optimizer: torch.optim.Optimizer
    step: int = 0
    fixed_z: torch.Tensor | None = None
    precision: Precision = FP32
    scaler: torch.amp.GradScaler | None = None  # the step's loss scaling (enabled for fp16 only)
    layer_scaler: torch.amp.GradScaler | None = None  # the layer choice's, which has its own loss
    chunk: int | None = None  # images the layer choice renders at once (None: its whole batch)


def start_stage2(source: Generator, domain: Domain, precision: Precision = FP32, chunk: int | None = None) -> Stage2State:
    """Copy G_s into G_t and G_ema, build the optimizer, and draw the fixed sample z's.

    The fixed z's are drawn first, as in the reference, so the training draws that
    follow match it for the same seed. `precision` sets the autocast of every step and
    provides its loss scalers; `chunk` the images the layer choice renders at once.
    """
    device = source.device
    fixed_z = torch.randn(domain.adapt.n_sample, source.style_dim, device=device)
    trainable = copy.deepcopy(source).train()
    ema = copy.deepcopy(source).eval().requires_grad_(False)
    trainable.requires_grad_(True)
    optimizer = make_optimizer(trainable, domain.adapt.lr)
    return Stage2State(trainable, ema, optimizer, 0, fixed_z, precision, precision.scaler(), precision.scaler(), chunk)


def _choose_layers_fitting(state: Stage2State, source: Generator, terms: list[ClipTerm], cfg: Adapt) -> list[int]:
    """`choose_layers` for the step; when the device runs out of memory, again with half the chunk.

    The layer choice's images with their gradients set the peak of a large run (8 at
    1024 px: 11.9 GiB of tensors in bf16, benchmarks/RESULTS.md), and its parts add up to
    the same sums. So an out-of-memory error there halves `state.chunk` for this step and
    the rest of the run, with the random generators put back first: the step is the one
    a run started at the smaller `--chunk` takes. One line says so. At a chunk of 1 the
    error goes on to the step guard, which names the flags to lower.
    """
    batch = cfg.auto_layer_batch
    rng = capture_rng_state()
    scaler = state.layer_scaler.state_dict() if state.layer_scaler is not None else None  # fp16's scale, as the step found it
    while True:
        try:
            return choose_layers(
                source, state.trainable, terms, cfg.layer_k(source.n_latent), cfg.auto_layer_iters, batch,
                state.precision, state.layer_scaler, state.chunk,
            )
        except torch.OutOfMemoryError:
            at_once = min(state.chunk or batch, batch)
            if at_once <= 1:
                raise
        # Outside the handler, so the failed attempt's tensors (held by its traceback) are gone.
        state.chunk = at_once // 2
        if source.device.type == "cuda":
            torch.cuda.empty_cache()
        restore_rng_state(rng)
        if scaler:
            state.layer_scaler.load_state_dict(scaler)
        console.info(
            f"[yellow]stage 2: the layer choice ran out of memory rendering {at_once} images at once; "
            f"it renders {state.chunk} from now on (as --chunk {state.chunk}: the same results)[/]"
        )


def text_directions(term: ClipTerm, learned: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The text direction(s) one CLIP model's loss aims at.

    IPL: `D_b = n(n(u_t + a0) - n(u_s + a0))` per sample, with the first model's learned
    features u and this model's a0. NADA: the single template direction, (1, D).
    """
    if learned is None:
        return term.nada_direction
    u_s, u_t = learned
    return losses.text_directions(losses.prompt_features(u_s, term.context), losses.prompt_features(u_t, term.context))


def stage2_step(
    state: Stage2State,
    source: Generator,
    terms: list[ClipTerm],
    domain: Domain,
    mapper: torch.nn.Module | None = None,
    prompts: PromptEncoder | None = None,
) -> dict:
    """One adaptation step; returns the loss terms and the chosen layers for the log.

    Args:
        state: G_t, G_ema, optimizer and step counter (updated in place).
        source: the frozen G_s.
        terms: the CLIP models of the loss (`clip_terms`).
        domain: labels and the [adapt] and [loss] settings.
        mapper, prompts: the stage-1 mapper and the first model's prompt encoder
            (both None for method "nada").
    """
    cfg = domain.adapt
    precision = state.precision
    device = source.device
    batch = cfg.batch
    zs = draw_latents(batch, source.style_dim, cfg.mixing, device)
    with torch.no_grad():
        ws = [source.mapping(z) for z in zs]
        learned = None
        if mapper is not None:
            mapper.eval()
            with precision.autocast():
                P = mapper(ws[0])  # with style mixing, the prompts follow the first style
                u = prompts.encode(torch.cat([P, P]), [domain.source] * batch + [domain.target] * batch)
            u = u.float()
            learned = (u[:batch], u[batch:])

    chosen = _choose_layers_fitting(state, source, terms, cfg) if cfg.auto_layer_iters > 0 else None
    train_only(state.trainable, chosen)

    w_plus = source.to_w_plus(ws)  # one crossover index, shared by G_s and G_t
    with precision.autocast():
        with torch.no_grad():
            x_s = source.synthesis(w_plus, source.draw_noise(batch))
        x_t = state.trainable.synthesis(w_plus, state.trainable.draw_noise(batch))

    loss = torch.zeros((), device=device)
    record: dict = {}
    for i, term in enumerate(terms):
        # CLIP encodes these two in float32 whatever the precision: the image direction is
        # the difference of two nearly equal features (G_t starts as G_s), and bf16's
        # rounding of each feature would decide it (the first loss at 256 px: 0.48 % off fp32,
        # with float32 CLIP 0.017 %, benchmarks/RESULTS.md). The generators stay reduced.
        f_s = _features(term.clip, x_s, FP32)
        f_t = _features(term.clip, x_t, FP32)
        directional = losses.directional_loss(losses.image_directions(f_s, f_t), text_directions(term, learned))
        model_loss = domain.loss.lambda_direction * directional
        record[f"directional_{i}"] = directional.item()
        if cfg.method == "nada" and domain.loss.lambda_global:
            global_term = losses.global_clip_loss(f_t, term.nada_global, term.clip.logit_scale)
            model_loss = model_loss + domain.loss.lambda_global * global_term
            record[f"global_{i}"] = global_term.item()
        loss = loss + term.weight * model_loss

    state.optimizer.zero_grad(set_to_none=True)
    backward_step(loss, state.optimizer, state.scaler if state.scaler is not None else precision.scaler())
    update_ema(state.ema, state.trainable, cfg.ema)
    state.step += 1
    record["loss"] = loss.item()
    record["layers"] = sorted(chosen) if chosen is not None else None
    return record
