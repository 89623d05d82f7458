"""Build what a training run needs from a domain: the source generator, CLIP models, prompts, mapper.

`smoke=True` swaps every pretrained network for the tiny random ones (32 px generator,
tiny CLIP): a plumbing check of the whole pipeline whose pictures mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ipltool import hub, registry
from ipltool.domain import Domain
from ipltool.errors import CheckpointError
from ipltool.models.clip import Clip, PromptEncoder, check_model_name, load_clip
from ipltool.models.stylegan2 import Generator

SMOKE_NOTE = "--smoke: tiny random models, a plumbing check; its pictures and losses mean nothing"

#: Overrides a `--smoke` run applies on top of the domain: tiny models, few short steps.
SMOKE_OVERRIDES = {
    "generator": "tiny",
    "mapper.steps": 3,
    "mapper.batch": 4,
    "adapt.steps": 3,
    "adapt.batch": 2,
    "adapt.auto_layer_batch": 2,
    "adapt.auto_layer_k": 5,  # int(2 * 8 / 3): the tiny generator has 8 W+ entries
    "adapt.n_sample": 4,
    "adapt.sample_every": 2,
}


@dataclass
class Models:
    """The frozen networks of a run; `prompts` belongs to the first CLIP model."""

    source: Generator
    clips: list[tuple[Clip, float]]
    prompts: PromptEncoder


def build_models(domain: Domain, device: torch.device, smoke: bool = False) -> Models:
    """Load the domain's generator and CLIP models (tiny random ones with `smoke`).

    Files missing from the cache are announced together, then downloaded (or, offline,
    named in one error with the `ipl fetch` line that provides them).

    Raises:
        UsageError: an empty CLIP model name; UnknownNameError: an unknown one, or an
            unknown weights tag. Both are checked first, and also with `smoke`, which
            does not use them.
    """
    for spec in domain.clip:
        check_model_name(spec.model, spec.pretrained)
    if not smoke:
        hub.ensure_all(hub.domain_models(domain))
    source = hub.load_generator_by_name("tiny" if smoke else domain.generator, device=device)
    clips = []
    for index, spec in enumerate(domain.clip):
        if smoke:
            clip = load_clip("tiny", None, device=device, seed=index)
        else:
            clip = load_clip(spec.model, spec.pretrained, device=device)
        clips.append((clip, spec.weight))
    return Models(source, clips, PromptEncoder(clips[0][0], domain.ctx_init))


def new_mapper(domain: Domain, models: Models) -> torch.nn.Module:
    """A fresh mapper of the domain's kind, sized for its prompts and generator."""
    return registry.build_mapper(
        domain.mapper.kind, models.prompts.n_ctx, models.prompts.dim, models.source.style_dim, **domain.mapper.options
    ).to(models.source.input.input.device)


def mapper_checkpoint(mapper: torch.nn.Module, domain: Domain, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """What `mapper.pt` holds: the plugin name and constructor arguments, weights, and context."""
    from ipltool import __version__

    return {
        "kind": getattr(mapper, "kind", domain.mapper.kind),
        "init_args": dict(getattr(mapper, "init_args", {})),
        "state_dict": mapper.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "ctx_init": domain.ctx_init,
        "source": domain.source,
        "target": domain.target,
        "clip": domain.clip[0].model,
        "ipltool_version": __version__,
    }


def load_mapper(path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a mapper from `mapper.pt` without flags: its kind and arguments are stored in it.

    Returns:
        (mapper in eval mode, the checkpoint dict).

    Raises:
        CheckpointError: unreadable file, or weights that do not fit the stored arguments.
    """
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        kind, args = ckpt["kind"], dict(ckpt["init_args"])
    except FileNotFoundError:
        raise CheckpointError(f"mapper checkpoint not found: {path}") from None
    except Exception as err:
        raise CheckpointError(f"cannot read mapper checkpoint {path}: {str(err).splitlines()[0]}") from None
    n_ctx, dim, latent_dim = args.pop("n_ctx"), args.pop("dim"), args.pop("latent_dim")
    mapper = registry.build_mapper(kind, n_ctx, dim, latent_dim, **args)
    try:
        mapper.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit a {kind!r} mapper: {str(err).splitlines()[0]}") from None
    return mapper.to(device).eval(), ckpt
