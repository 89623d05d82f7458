"""Inception features for IS, FID and KID, computed by torch-fidelity (docs/metrics.md §1-4).

The real network is torch-fidelity's `inception-v3-compat` (TF 2015-12-05 Inception-v3,
299 px TF1-style bilinear resize, `(x - 128) / 128`), built with
`feature_extractor_weights_path` pointing at our cache so torch-fidelity never downloads.
torch-fidelity reads that file with `torch.load(weights_only=False)`, which would run any
code pickled into it; so it never gets the file: `VerifiedInceptionV3` (registered as
"ipl-inception-v3-compat") reads it with `checkpoints.read` (weights only, finite) and
hands torch-fidelity the checked tensors, re-serialized in memory.
Smoke runs use `RandomTestExtractor`, a tiny fixed random network registered in
torch-fidelity's registry as "ipl-random-test", so the very same torch-fidelity code
path can be driven end to end on CPU in milliseconds.

This module imports torch-fidelity (and through it torchvision) at import time; import it
lazily.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from ipltool.errors import CheckpointError, UsageError
from ipltool.metrics.base import RANDOM_TEST, Extractor, load_state_dict_file, make_key, seeded, weights_file, weights_info, weights_tag

REAL_NAME = "inception-v3-compat"  # torch-fidelity's own registry name
VERIFIED_NAME = "ipl-inception-v3-compat"  # the same network, its weights file read by ipltool
RANDOM_NAME = "ipl-random-test"
HUB_NAME = "inception-fid"
FEATURES = ("logits_unbiased", "2048")  # IS reads the first, FID and KID the second
LAYERS = {"isc": "logits_unbiased", "fid": "2048", "kid": "2048", "prc": "2048"}


class RandomTestExtractor(FeatureExtractorBase):
    """A tiny fixed random stand-in for Inception: "logits_unbiased" (N, 10) and "2048" (N, 16).

    Pictures are resized to 32x32, scaled as Inception's `(x - 128) / 128`, passed through
    two strided 3x3 convolutions with ReLU and averaged ("2048"), then a linear layer
    ("logits_unbiased"). The weights are drawn from a fixed seed in `__init__`, so every
    instance (also those torch-fidelity builds itself) computes the same function.
    Meaningless numbers, for tests and `--smoke` only.

    Args:
        name: registry name (`RANDOM_NAME`).
        features_list: requested features, a subset of `FEATURES`.
        **kwargs: the rest of torch-fidelity's `calculate_metrics` arguments (ignored).
    """

    SIZE = 32
    SEED = 2020

    def __init__(self, name: str, features_list: list[str], **kwargs: Any):
        super().__init__(name, features_list)
        with seeded(self.SEED):
            self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.fc = nn.Linear(16, 10)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return LAYERS[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, RandomTestExtractor.SIZE, RandomTestExtractor.SIZE, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, 3, H, W) uint8 -> the requested features, in `features_list` order."""
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) uint8 pictures, got {tuple(x.shape)} {x.dtype}")
        x = F.interpolate(x.float(), size=(self.SIZE, self.SIZE), mode="bilinear", align_corners=False, antialias=True)
        x = (x - 128) / 128
        pooled = F.relu(self.conv2(F.relu(self.conv1(x)))).mean(dim=(2, 3))
        features = {"2048": pooled, "logits_unbiased": self.fc(pooled) * 10}  # x10: spread-out softmax
        return tuple(features[name] for name in self.features_list)


def register_random_test() -> str:
    """Register `RandomTestExtractor` in torch-fidelity once per process; returns its name."""
    if RANDOM_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(RANDOM_NAME, RandomTestExtractor)
    return RANDOM_NAME


class VerifiedInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's `inception-v3-compat`, whose weights file only ipltool reads.

    torch-fidelity's own constructor loads `feature_extractor_weights_path` with
    `torch.load(weights_only=False)`, which runs whatever code is pickled into the file.
    This one reads the file with `load_state_dict_file` (`torch.load(weights_only=True)`,
    bounded sizes, finite values), then passes torch-fidelity an in-memory `torch.save`
    of those tensors only, which nothing can make run code. Registered as
    `VERIFIED_NAME`, so `torch_fidelity.calculate_metrics(**fidelity_kwargs)` builds
    this class too.

    Args:
        name: registry name (`VERIFIED_NAME`).
        features_list: requested features.
        feature_extractor_weights_path: the weights file (required: no download).
        **kwargs: the rest of torch-fidelity's arguments.

    Raises:
        UsageError: no weights file.
        CheckpointError: the file is unsafe, unreadable, not finite, or not Inception-v3 weights.
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | Path | None = None, **kwargs: Any):
        if feature_extractor_weights_path is None:
            raise UsageError(f"{VERIFIED_NAME} needs a weights file (it never downloads)")
        path = Path(feature_extractor_weights_path)
        state = load_state_dict_file(path)
        buffer = io.BytesIO()
        torch.save(dict(state), buffer)  # tensors only: safe for torch-fidelity's unrestricted torch.load
        buffer.seek(0)
        try:
            super().__init__(name, features_list, feature_extractor_weights_path=buffer, **kwargs)
        except RuntimeError as err:  # load_state_dict: missing, unexpected or mis-shaped keys
            lines = [line.strip() for line in str(err).splitlines()[1:3] if line.strip()]
            raise CheckpointError(
                f"{path} is not torch-fidelity Inception-v3 weights: {' '.join(lines)[:300]}",
                hint="give torch-fidelity's weights-inception-2015-12-05-6726825d.pth, or leave --inception-weights out to use the cache",
            ) from None


def register_verified() -> str:
    """Register `VerifiedInceptionV3` in torch-fidelity once per process; returns its name."""
    if VERIFIED_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(VERIFIED_NAME, VerifiedInceptionV3)
    return VERIFIED_NAME


class InceptionExtractor(Extractor):
    """Features "logits_unbiased" (N, 1008) and "2048" (N, 2048) float32 (smoke: (N, 10) and (N, 16)).

    Attributes:
        fidelity_kwargs: arguments that make `torch_fidelity.calculate_metrics` use this
            very network (`feature_extractor`, `feature_extractor_weights_path` and the
            per-metric layers); add inputs, `cuda`, `cache=False` and the metric flags.

    Args:
        device: where the network runs.
        smoke: the tiny random network instead of the real one.
        weights: path of the torch-fidelity Inception weights; None: cache entry `inception-fid`.
    """

    name = "inception"

    def __init__(self, device: torch.device, smoke: bool = False, weights: str | Path | None = None):
        self.device = device
        if smoke:
            fidelity_name, path = register_random_test(), None
            self.net: nn.Module = RandomTestExtractor(fidelity_name, list(FEATURES))
            self.weights, tag = "random-test", RANDOM_TEST
            self.info = {"backbone": fidelity_name, "weights": RANDOM_TEST}
        else:
            fidelity_name, path = register_verified(), weights_file(HUB_NAME, weights)
            self.net = VerifiedInceptionV3(fidelity_name, list(FEATURES), feature_extractor_weights_path=str(path))
            self.weights, tag = "real", weights_tag(path)
            self.info = {"backbone": "torch-fidelity inception-v3-compat (TF 2015-12-05)", **weights_info(path)}
        self.info.update({"is_layer": LAYERS["isc"], "fid_layer": LAYERS["fid"], "kid_layer": LAYERS["kid"]})
        self.net.to(device).eval()
        self.key = make_key(self.name, {}, tag)
        self.fidelity_kwargs = {
            "feature_extractor": fidelity_name,
            "feature_extractor_weights_path": str(path) if path else None,
            "feature_layer_isc": LAYERS["isc"],
            "feature_layer_fid": LAYERS["fid"],
            "feature_layer_kid": LAYERS["kid"],
        }

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(images)
        return {name: value.float() for name, value in zip(FEATURES, out)}
