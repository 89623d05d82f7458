"""Fixed text features, computed once per run and reused (the reference re-encodes them every step)."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import torch

from ipltool.models.clip import Clip
from ipltool.train.losses import unit


@lru_cache(maxsize=1)
def imagenet_templates() -> tuple[str, ...]:
    """The 79 ImageNet prompt templates ("a bad photo of a {}.", ...), in the reference order."""
    text = (resources.files("ipltool") / "data" / "imagenet_templates.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line and not line.startswith("#"))


class TextFeatures:
    """Cache of fixed CLIP text features for one model.

    Args:
        clip: the frozen CLIP model.
    """

    def __init__(self, clip: Clip):
        self.clip = clip
        self._cache: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def sentences(self, texts: tuple[str, ...] | list[str]) -> torch.Tensor:
        """Raw features (N, D) of sentences used as they are, encoded in one batched call."""
        key = ("raw",) + tuple(texts)
        if key not in self._cache:
            self._cache[key] = self.clip.encode_text(list(texts)).float()
        return self._cache[key]

    def sentence(self, text: str) -> torch.Tensor:
        """Raw feature (D,) of one sentence, e.g. `a_t = E_T("a photo of a disney.")`."""
        return self.sentences((text,))[0]

    def templates(self, label: str) -> torch.Tensor:
        """F_T(label): normalised features (79, D) of every ImageNet template filled with `label`."""
        return unit(self.sentences(tuple(t.format(label) for t in imagenet_templates())))

    def template_mean(self, label: str) -> torch.Tensor:
        """mean_T(label): the row mean of F_T(label), (D,), NOT re-normalised."""
        return self.templates(label).mean(dim=0)

    def custom_mean(self, prompts: list[str]) -> torch.Tensor:
        """mean_C: row mean (D,) of the normalised features of custom sentences (no `{}`)."""
        return unit(self.sentences(tuple(prompts))).mean(dim=0)
