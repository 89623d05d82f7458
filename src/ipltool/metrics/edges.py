"""Edge maps for the structural consistency score SCS (RSSA, CVPR 2022; docs/metrics.md §6).

`HED` is the holistically-nested edge detector (Xie & Tu 2015) with the module names of
sniklaus/pytorch-hed (`netVggOne.0.weight` ... `netCombine.0.bias`), whose BSDS500 file
stores them as `moduleVggOne...` (renamed on load). Input: BGR, x255, minus the Caffe
means; five VGG16 stages, a 1x1 score per stage upsampled bilinearly to the input size,
a 1x1 fusion and a sigmoid. `sobel` is the weight-free fallback (its SCS is not
comparable with published numbers). Both run on pictures resized to `size` x `size`
(antialiased) and return maps quantised to uint8 the way RSSA wrote them to PNG
(`(e * 255).astype(uint8)`, i.e. truncation).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ipltool.metrics.base import Extractor, load_state_dict_file, load_strict, make_key, weights_file, weights_info, weights_tag

HUB_NAME = "hed-bsds500"
MODES = ("hed", "sobel")
BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)  # Caffe VGG means, B, G, R
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights of R, G, B
STAGE_NAMES = ("One", "Two", "Thr", "Fou", "Fiv")
STAGES = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))  # (in, out, convs), VGG16


# ----------------------------------------------------------------------------
# HED


def _vgg_stage(c_in: int, c_out: int, convs: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.MaxPool2d(kernel_size=2, stride=2)] if pool else []
    for i in range(convs):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, kernel_size=3, stride=1, padding=1), nn.ReLU(inplace=False)]
    return nn.Sequential(*layers)


class HED(nn.Module):
    """Holistically-nested edge detection, sniklaus/pytorch-hed layout.

    Parameters: `netVgg{One..Fiv}` (VGG16 stages; stages 2-5 start with a 2x2 max-pool, so
    conv keys are `netVggOne.{0,2}` and `netVggTwo.{1,3}`...), `netScore{One..Fiv}` (1x1
    conv, C -> 1) and `netCombine.0` (1x1 conv, 5 -> 1) followed by a sigmoid.
    """

    def __init__(self):
        super().__init__()
        for i, (name, (c_in, c_out, convs)) in enumerate(zip(STAGE_NAMES, STAGES)):
            setattr(self, f"netVgg{name}", _vgg_stage(c_in, c_out, convs, pool=i > 0))
        for name, (_, c_out, _) in zip(STAGE_NAMES, STAGES):
            setattr(self, f"netScore{name}", nn.Conv2d(c_out, 1, kernel_size=1, stride=1, padding=0))
        self.netCombine = nn.Sequential(nn.Conv2d(5, 1, kernel_size=1, stride=1, padding=0), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) edge probabilities in [0, 1].

        Steps: 1. RGB -> BGR, x255, minus `BGR_MEAN`; 2. the five VGG stages, each feeding
        the next; 3. a 1x1 score of each stage, upsampled bilinearly (align_corners=False)
        to H x W; 4. 1x1 fusion of the five scores and a sigmoid.
        """
        mean = torch.tensor(BGR_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = x.flip(1) * 255.0 - mean
        size = x.shape[2:]
        scores = []
        for name in STAGE_NAMES:
            x = getattr(self, f"netVgg{name}")(x)
            score = getattr(self, f"netScore{name}")(x)
            scores.append(F.interpolate(score, size=size, mode="bilinear", align_corners=False))
        return self.netCombine(torch.cat(scores, dim=1))


def load_hed(path: Path) -> HED:
    """A `HED` with the weights of `path` (keys `module*` or `net*`), loaded strictly."""
    state = {k.replace("module", "net", 1) if k.startswith("module") else k: v for k, v in load_state_dict_file(path).items()}
    net = HED()
    load_strict(net, state, path, "HED (sniklaus/pytorch-hed)")
    return net


# ----------------------------------------------------------------------------
# Sobel


def sobel_edges(gray: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude of grayscale pictures, each divided by its maximum.

    Args:
        gray: (B, 1, H, W) float in [0, 1].

    Returns:
        (B, 1, H, W) in [0, 1]; a flat picture gives zeros. Borders are replicated.
    """
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=gray.dtype, device=gray.device)
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1)  # (2, 1, 3, 3): d/dx, d/dy
    grad = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    magnitude = grad.pow(2).sum(dim=1, keepdim=True).sqrt()
    peak = magnitude.amax(dim=(2, 3), keepdim=True)
    return torch.where(peak > 1e-8, magnitude / peak.clamp_min(1e-8), torch.zeros_like(magnitude))


# ----------------------------------------------------------------------------
# The extractor


def quantize(edges: torch.Tensor) -> torch.Tensor:
    """[0, 1] maps -> uint8 as RSSA's PNGs: `floor(clamp(e, 0, 1) * 255)`."""
    return (edges.clamp(0.0, 1.0) * 255.0).to(torch.uint8)


class EdgeExtractor(Extractor):
    """Edge maps "edges": (N, size, size) uint8 (0 = no edge, 255 = certain edge).

    Args:
        device: where the network runs.
        smoke: force `sobel` (weight-free, so smoke runs are real here).
        weights: sniklaus' `network-bsds500.pytorch`; None: cache entry `hed-bsds500`.
        mode: "hed" (default) or "sobel".
        size: side the pictures are resized to before edge detection (256, as RSSA).
    """

    name = "edges"

    def __init__(self, device: torch.device, smoke: bool = False, weights: str | Path | None = None, mode: str = "hed", size: int = 256):
        self.device = device
        self.mode = "sobel" if smoke else mode
        self.size = size
        self.weights = "real"
        if self.mode == "hed":
            path = weights_file(HUB_NAME, weights)
            self.net: nn.Module | None = load_hed(path).to(device).eval().requires_grad_(False)
            tag = weights_tag(path)
            self.info = {"backbone": "HED (BSDS500, sniklaus/pytorch-hed)", **weights_info(path)}
        else:
            self.net, tag = None, "sobel"
            self.info = {"backbone": "sobel (weight-free; not comparable with published SCS)"}
        self.info.update({"mode": self.mode, "size": size, "quantised": "uint8, truncated as RSSA"})
        self.key = make_key(self.name, {"mode": self.mode, "size": size}, tag)

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.float() / 255
        if tuple(x.shape[2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        if self.net is not None:
            edges = self.net(x)
        else:
            luma = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            edges = sobel_edges((x * luma).sum(dim=1, keepdim=True))
        return {"edges": quantize(edges[:, 0])}
