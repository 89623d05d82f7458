"""The loss terms of IPL (docs/method.md §1 and §2) and of the NADA baseline.

Pure functions of features: no model is called here, so each formula can be tested
against a hand computation. `unit(x)` is the n(x) of the spec.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def unit(x: torch.Tensor) -> torch.Tensor:
    """n(x) = x / ||x|| along the last axis (no epsilon, as the reference)."""
    return x / x.norm(dim=-1, keepdim=True)


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Symmetric InfoNCE between images and their own source prompts (stage 1, step 4).

    Args:
        image_features: (B, D) normalised image features f_img.
        text_features: (B, D) normalised prompt features s.
        logit_scale: exp(CLIP's logit_scale), 100 for OpenAI weights.

    Returns:
        Scalar `(CE(L, labels) + CE(L^T, labels)) / 2` with `L = logit_scale * f_img @ s^T`.
    """
    logits = logit_scale * image_features @ text_features.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def mean_cosine_distance(features: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """`mean_b(1 - cos(features_b, anchor))`: the domain and custom-prompt regularizers.

    Args:
        features: (B, D), normalised or not.
        anchor: (D,) or (1, D), normalised or not (cosine normalises both).
    """
    return (1 - F.cosine_similarity(features, anchor.reshape(1, -1).expand_as(features), dim=-1)).mean()


def prompt_features(learned: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """`n(u + a)`: learned-prompt features plus a fixed sentence feature, normalised.

    Args:
        learned: (B, D) E_P outputs u.
        fixed: (D,) or (1, D) unnormalised sentence feature a (stage 1: with label and
            period; stage 2: bare `ctx_init`, a kept quirk).
    """
    return unit(learned + fixed.reshape(1, -1))


def text_directions(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample text directions `D_b = n(t_b - s_b)` from normalised prompt features (B, D)."""
    return unit(target - source)


def image_directions(source_features: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
    """`I_b = n(n(f_t_b) - n(f_s_b))` from raw CLIP image features (B, D).

    A sample whose two feature vectors are equal (G_t still equals G_s and both render the
    same picture, e.g. at step 0 with zero noise strengths, or in bf16 where the rounding
    hides a small change) has no direction yet: its I_b is 0, so the directional loss
    counts it as orthogonal (1) and it sends no gradient. The reference divides 0 by 0
    there, and the NaN spoils every later step. Every other row is `unit(...)` exactly.
    """
    diff = unit(target_features) - unit(source_features)
    norm = diff.norm(dim=-1, keepdim=True)
    none = norm == 0
    return torch.where(none, torch.zeros_like(diff), diff / torch.where(none, torch.ones_like(norm), norm))


def directional_loss(image_dirs: torch.Tensor, text_dirs: torch.Tensor) -> torch.Tensor:
    """`mean_b(1 - cos(I_b, D_b))`; `text_dirs` may be (B, D) or one shared (1, D) direction."""
    return (1 - F.cosine_similarity(image_dirs, text_dirs.expand_as(image_dirs), dim=-1)).mean()


def nada_direction(source_templates: torch.Tensor, target_templates: torch.Tensor) -> torch.Tensor:
    """StyleGAN-NADA's single text direction: `n(mean_templates(F_T(target) - F_T(source)))`.

    Args:
        source_templates, target_templates: (T, D) normalised template features.

    Returns:
        (1, D) unit direction.
    """
    return unit((target_templates - source_templates).mean(dim=0, keepdim=True))


def global_clip_loss(image_features: torch.Tensor, text_feature: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """`mean(1 - logit_scale * cos(f_img, f_text) / 100)`: CLIP's logits over 100.

    Used by the adaptive layer choice (stage 2, step 1) and by NADA's global loss.

    Args:
        image_features: (B, D) raw image features.
        text_feature: (D,) or (1, D) raw text feature: of the bare target label for the
            layer choice, of the sentence "a {target}" for NADA's global term.
        logit_scale: exp(CLIP's logit_scale), taken from the model.
    """
    cos = unit(image_features) @ unit(text_feature.reshape(1, -1)).t()
    return (1 - logit_scale * cos / 100).mean()
