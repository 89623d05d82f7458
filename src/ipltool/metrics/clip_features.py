"""CLIP image and text embeddings for the CLIP score, directional CLIP score and CLIP diversity (docs/metrics.md §8-9).

Weights come from the model cache (OpenAI's files, `clip-vit-b32`...) or a path; open_clip
is never asked to download. Pictures go through `Clip.preprocess` (bicubic resize of the
shorter side, centre crop, CLIP mean/std) with antialiasing on, which is closer to the
PIL resize of CLIP's own preprocessing than the reference training loss' plain bicubic.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.nn import functional as F

from ipltool import hub
from ipltool.metrics.base import RANDOM_TEST, Extractor, MetricUnavailable, make_key, weights_file, weights_info, weights_tag
from ipltool.models.clip import load_clip, normalize_model_name

SMOKE_MODEL = "tiny"
SEED = 0


class ClipExtractor(Extractor):
    """Normalised CLIP image embeddings "emb" (N, D) float32, plus `text()` for prompts.

    Args:
        device: where the model runs.
        smoke: the tiny random CLIP (`load_clip("tiny")`, D = 32) instead of real weights.
        weights: a CLIP weights file (OpenAI's `.pt` or an open_clip checkpoint of `model`);
            None: the cache entry of `model`'s OpenAI weights (`ipl fetch --list`).
        model: architecture ("ViT-B/32" by default, the training judge of IPL and NADA).
        pretrained: "openai" or None (the same: the cached OpenAI weights). Other open_clip
            tags would make open_clip download; give their file as `weights` instead.
    """

    name = "clip"

    def __init__(
        self,
        device: torch.device,
        smoke: bool = False,
        weights: str | Path | None = None,
        model: str = "ViT-B/32",
        pretrained: str | None = None,
    ):
        self.device = device
        if smoke:
            self.clip = load_clip(SMOKE_MODEL, None, device=device, seed=SEED)
            self.weights, tag = "random-test", RANDOM_TEST
            self.info = {"backbone": f"CLIP {self.clip.name} (tiny random)", "weights": RANDOM_TEST}
        else:
            path = self._weights_path(model, pretrained, weights)
            self.clip = load_clip(model, str(path), device=device)
            self.weights, tag = "real", weights_tag(path)
            self.info = {"backbone": f"CLIP {self.clip.name}", **weights_info(path)}
        self.info.update({"image_size": self.clip.image_size, "embed_dim": self.clip.embed_dim, "resize": "bicubic, antialiased"})
        self.key = make_key(self.name, {"model": self.clip.name}, tag)

    @staticmethod
    def _weights_path(model: str, pretrained: str | None, weights: str | Path | None) -> Path:
        entry = hub.clip_entry(normalize_model_name(model), "openai")
        if weights is not None:
            return weights_file(entry.name if entry else "clip", weights)
        if pretrained not in (None, "openai"):
            raise MetricUnavailable(
                f"CLIP {model}/{pretrained} is not in ipltool's model cache, and open_clip is not allowed to download it",
                hint="download the weights file yourself and pass it with --clip-weights",
            )
        if entry is None:
            raise MetricUnavailable(f"no OpenAI weights are registered for CLIP {model}", hint="pass a weights file with --clip-weights")
        return weights_file(entry.name, None)

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float() / 127.5 - 1
        return {"emb": F.normalize(self.clip.encode_image(x, antialias=True).float(), dim=-1)}

    def text(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings.

        Args:
            texts: N sentences, used as they are.

        Returns:
            (N, D) float32 CPU tensor of unit vectors.
        """
        with torch.no_grad():
            return F.normalize(self.clip.encode_text(list(texts)).float(), dim=-1).cpu()


def target_text_embedding(extractor: ClipExtractor, label: str, templates: Sequence[str] | None = None) -> torch.Tensor:
    """The text side of the CLIP score: NADA's template average for a label.

    `n(mean_t n(E_T(t.format(label))))`: every template filled with `label`, embedded and
    normalised, averaged, and the mean normalised again.

    Args:
        extractor: a CLIP extractor.
        label: the domain label ("disney", "photo").
        templates: sentences with one `{}`; None: the 79 ImageNet templates NADA trains with.

    Returns:
        (D,) float32 unit vector.
    """
    if templates is None:
        from ipltool.train.text import imagenet_templates

        templates = imagenet_templates()
    return F.normalize(extractor.text([t.format(label) for t in templates]).mean(dim=0), dim=0)
