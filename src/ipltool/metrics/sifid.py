"""Per-image Inception feature statistics for SIFID (SinGAN, ICCV 2019; docs/metrics.md §5).

The stem of torchvision's ImageNet Inception-v3 runs at the picture's native size (no
resize, no `transform_input`), input `2 * x / 255 - 1`. Every location of the chosen
feature map is one sample; an image is summarised by the mean and (N-1)-normalised
covariance of its H'W' channel vectors. Layer 64 = `Conv2d_2b_3x3` (before the first
max-pool, SinGAN's code); layer 192 = `Conv2d_4a_3x3` (before the second, the paper's
text). Module and parameter names are torchvision's (`Conv2d_1a_3x3.conv.weight`,
`.bn.running_mean`, ...), so the stem loads from `inception_v3_google-0cc3c7bd.pth`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ipltool.metrics.base import (
    RANDOM_TEST,
    Extractor,
    load_state_dict_file,
    load_strict,
    make_key,
    seeded,
    weights_file,
    weights_info,
    weights_tag,
)

HUB_NAME = "inception-v3-torchvision"
LAYERS = (64, 192)
SEED = 0


class BasicConv2d(nn.Module):
    """torchvision's Inception unit: conv (no bias), BatchNorm (eps 0.001), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class InceptionStem(nn.Module):
    """The first five convolutions of Inception-v3, up to `layer` channels.

    64: Conv2d_1a_3x3 (stride 2), Conv2d_2a_3x3, Conv2d_2b_3x3 (pad 1): map (B, 64, ~H/2-2, ~W/2-2).
    192: then max-pool 3/2, Conv2d_3b_1x1, Conv2d_4a_3x3: map (B, 192, ~H/4-5, ~W/4-5).

    Args:
        layer: 64 or 192.
    """

    def __init__(self, layer: int = 64):
        super().__init__()
        self.layer = layer
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        if layer == 192:
            self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, layer, H', W')."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        if self.layer == 192:
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        return x

    def extra_repr(self) -> str:
        return f"layer={self.layer}"


def map_statistics(fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the channel vectors of each feature map.

    Args:
        fmap: (B, C, H', W') feature maps, H'W' >= 2.

    Returns:
        mu (B, C) and sigma (B, C, C), float64, sigma normalised by H'W' - 1 (as `np.cov`).
    """
    b, c, h, w = fmap.shape
    if h * w < 2:
        raise ValueError(f"a {h}x{w} feature map has too few locations for a covariance; use larger pictures")
    samples = fmap.double().reshape(b, c, h * w)
    mu = samples.mean(dim=2)
    centred = samples - mu[:, :, None]
    sigma = centred @ centred.transpose(1, 2) / (h * w - 1)
    return mu, sigma


class SifidExtractor(Extractor):
    """Per-image statistics "mu" (N, C) and "sigma" (N, C, C), float64, C = `layer`.

    Args:
        device: where the network runs.
        smoke: a random-init stem (fixed seed) instead of the ImageNet weights.
        weights: torchvision's `inception_v3_google-0cc3c7bd.pth` (only the stem is read);
            None: cache entry `inception-v3-torchvision`.
        layer: 64 (default, SinGAN's code) or 192 (the paper's text).
    """

    name = "sifid"

    def __init__(self, device: torch.device, smoke: bool = False, weights: str | Path | None = None, layer: int = 64):
        self.device = device
        with seeded(SEED):
            self.net = InceptionStem(layer)
        if smoke:
            self.weights, tag = "random-test", RANDOM_TEST
            self.info = {"backbone": "inception-v3 stem, random init", "weights": RANDOM_TEST}
        else:
            path = weights_file(HUB_NAME, weights)
            own = self.net.state_dict()
            # The file holds the whole classifier; the stem's keys must all be there.
            state = {k: v for k, v in load_state_dict_file(path).items() if k in own}
            load_strict(self.net, state, path, "torchvision Inception-v3")
            self.weights, tag = "real", weights_tag(path)
            self.info = {"backbone": "torchvision inception-v3 (ImageNet) stem", **weights_info(path)}
        self.info.update({"layer": layer, "resolution": "native"})
        self.net.to(device).eval().requires_grad_(False)
        self.key = make_key(self.name, {"layer": layer}, tag)

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float() / 255 * 2 - 1
        mu, sigma = map_statistics(self.net(x))
        return {"mu": mu, "sigma": sigma}
