"""Build what a training run needs from a domain: the source generator, CLIP models, prompts, mapper.

`smoke=True` swaps every pretrained network for the tiny random ones (32 px generator,
tiny CLIP): a plumbing check of the whole pipeline whose pictures mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ipltool import hub, registry
from ipltool.domain import CLIP_CONTEXT, Domain
from ipltool.errors import DomainError
from ipltool.models.clip import Clip, PromptEncoder, check_model_name, domain_models, load_clip
from ipltool.models.stylegan2 import Generator, load_source_generator

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
        hub.ensure_all(domain_models(domain))
    source = load_source_generator("tiny" if smoke else domain.generator, device=device)
    clips = []
    for index, spec in enumerate(domain.clip):
        if smoke:
            clip = load_clip("tiny", None, device=device, seed=index)
        else:
            clip = load_clip(spec.model, spec.pretrained, device=device)
        clips.append((clip, spec.weight))
    check_prompt_lengths(domain, [clip for clip, _ in clips])
    return Models(source, clips, PromptEncoder(clips[0][0], domain.ctx_init))


def check_prompt_lengths(domain: Domain, clips: list[Clip]) -> None:
    """Refuse a text that CLIP would silently cut at its context length, counting the tokens of every sentence a run encodes.

    The sentences: `ctx_init`; for source and target, `ctx_init + " " + label + "."`, the label
    alone and the 79 ImageNet templates filled with it; each custom prompt. The domain schema
    already refused texts too long by their characters alone (`ipltool.domain.MAX_TEXT_CHARS`),
    so no tokenizer ever sees a megabyte. Tokenizers without a BPE `encode` (Hugging Face
    towers) are not checked.

    Raises:
        DomainError: `target makes the sentence 'a photo of a …' 81 tokens long; CLIP ViT-B-32 reads at most 77 ...`.
    """
    from ipltool.train.text import imagenet_templates

    ctx = domain.ctx_init
    texts = [("ctx_init", ctx)]
    for key in ("source", "target"):
        label = getattr(domain, key)
        texts += [(key, f"{ctx} {label}."), (key, label), *((key, t.format(label)) for t in imagenet_templates())]
    texts += [(f"prompts.custom[{i}]", sentence) for i, sentence in enumerate(domain.prompts.custom)]
    for clip in clips:
        encode = getattr(clip.tokenizer, "encode", None)
        if encode is None:
            continue
        limit = int(getattr(clip.tokenizer, "context_length", None) or CLIP_CONTEXT)
        for key, text in texts:
            count = len(encode(text)) + 2  # with the start and end tokens
            if count > limit:
                shown = text if len(text) <= 60 else text[:60] + "…"
                raise DomainError(
                    f"{key} makes the sentence {shown!r} {count} tokens long; CLIP {clip.name} reads at most {limit} (start and end tokens included)",
                    hint=f"shorten {key}",
                )


def new_mapper(domain: Domain, models: Models) -> torch.nn.Module:
    """A fresh mapper of the domain's kind, sized for its prompts and generator."""
    return registry.build_mapper(
        domain.mapper.kind, models.prompts.n_ctx, models.prompts.dim, models.source.style_dim, **domain.mapper.options
    ).to(models.source.device)
