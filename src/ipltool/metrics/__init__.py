"""Metrics of `ipl eval`: networks that turn pictures into features, and formulas on features.

`build_extractor(name, device, smoke=..., weights=..., **settings)` gives an `Extractor`
(uint8 pictures -> named CPU feature tensors); `ipltool.metrics.formulas` holds the pure
functions that turn features into IS, FID, KID, SIFID, SCS, ID and CLIP numbers, and
`target_text_embedding` the text side of the CLIP scores.
"""

from __future__ import annotations

import importlib

# The networks import torch; the metric names (`catalog`) must not, so the public names
# load on first use (PEP 562).
_LAZY = {
    "Extractor": "base",
    "MetricUnavailable": "base",
    "target_text_embedding": "clip_features",
    "EXTRACTORS": "extractors",
    "build_extractor": "extractors",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"ipltool.metrics.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ipltool.metrics' has no attribute {name!r}")


__all__ = ["EXTRACTORS", "Extractor", "MetricUnavailable", "build_extractor", "target_text_embedding"]
