"""Metrics of `ipl eval`: networks that turn pictures into features, and formulas on features.

`build_extractor(name, device, smoke=..., weights=..., **settings)` gives an `Extractor`
(uint8 pictures -> named CPU feature tensors); `ipltool.metrics.formulas` holds the pure
functions that turn features into IS, FID, KID, SIFID, SCS, ID and CLIP numbers, and
`target_text_embedding` the text side of the CLIP scores.
"""

from __future__ import annotations

from ipltool.metrics.base import Extractor, MetricUnavailable
from ipltool.metrics.clip_features import target_text_embedding
from ipltool.metrics.extractors import EXTRACTORS, build_extractor

__all__ = ["EXTRACTORS", "Extractor", "MetricUnavailable", "build_extractor", "target_text_embedding"]
