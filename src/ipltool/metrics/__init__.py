"""Metrics of `ipl eval`: networks that turn pictures into features, and formulas on features.

`build_extractor(name, device, smoke=..., weights=..., **settings)` gives an `Extractor`
(uint8 pictures -> named CPU feature tensors); `ipltool.metrics.formulas` holds the pure
functions that turn features into IS, FID, KID, SIFID, SCS, ID and CLIP numbers, and
`target_text_embedding` the text side of the CLIP scores.
"""

from __future__ import annotations

from ipltool.lazy import lazy_exports

# The networks import torch; the metric names (`catalog`) must not, so the public names
# load on first use.
__getattr__ = lazy_exports(
    __name__,
    {
        "Extractor": "base",
        "MetricUnavailable": "base",
        "target_text_embedding": "clip_features",
        "EXTRACTORS": "extractors",
        "build_extractor": "extractors",
    },
)

__all__ = ["EXTRACTORS", "Extractor", "MetricUnavailable", "build_extractor", "target_text_embedding"]
