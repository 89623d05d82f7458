"""IR-SE50 backbone and the map-to-style block shared by the pSp, e4e and ReStyle encoders.

Module and parameter names follow the reference encoders (docs/inversion.md §4), so the
official FFHQ checkpoints load with `strict=True`:
`input_layer.{0,1,2}`, `body.K.res_layer.{0..5}`, `body.K.shortcut_layer.{0,1}` and
`styles.N.{convs.K, linear}`. Every size is a parameter so that tests and `--smoke`
runs can build a few-channel copy with the same layout. The file reads bottom-up:
primitives first, then the backbone builders, then `GradualStyleBlock`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ipltool.errors import UsageError
from ipltool.models.layers import EqualLinear

# ----------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class BackboneConfig:
    """Shape of an IR-SE backbone; the defaults are IR-SE50 as used by every FFHQ encoder.

    Args:
        in_nc: input channels: 3 (pSp, e4e) or 6 (ReStyle: image + previous reconstruction).
        widths: output channels of the four stages (64, 128, 256, 512). The stem
            (`input_layer`) has `widths[0]` channels.
        units: bottleneck units per stage (3, 4, 14, 3): 24 units, `body.0` .. `body.23`.
        se_reduction: channel reduction inside the squeeze-excitation module (16).
    """

    in_nc: int = 3
    widths: tuple[int, ...] = (64, 128, 256, 512)
    units: tuple[int, ...] = (3, 4, 14, 3)
    se_reduction: int = 16

    def __post_init__(self):
        if len(self.widths) != 4 or len(self.units) != 4:
            raise UsageError(f"an IR-SE backbone has 4 stages, got widths {self.widths} and units {self.units}")
        if min(self.units) < 1 or self.in_nc < 1 or self.se_reduction < 1:
            raise UsageError("backbone units, input channels and SE reduction must be positive")
        if min(self.widths) < self.se_reduction:
            raise UsageError(f"every stage width must be at least the SE reduction {self.se_reduction}, got {self.widths}")

    @property
    def stage_ends(self) -> tuple[int, ...]:
        """Index in `body` of the last unit of each stage ((2, 6, 20, 23) for IR-SE50)."""
        ends, total = [], 0
        for n in self.units:
            total += n
            ends.append(total - 1)
        return tuple(ends)

    @property
    def downsampling(self) -> int:
        """Total stride of the backbone: every stage halves the resolution (16)."""
        return 2 ** len(self.units)


# ----------------------------------------------------------------------------
# Primitives


class SEModule(nn.Module):
    """Squeeze-and-excitation: scale each channel by a gate computed from the global mean.

    `x * sigmoid(fc2(relu(fc1(mean_hw(x)))))`, with `fc1` / `fc2` bias-free 1x1 convolutions
    (keys `fc1.weight` [C/r, C, 1, 1], `fc2.weight` [C, C/r, 1, 1]).
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, padding=0, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, padding=0, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * gate


class BottleneckIRSE(nn.Module):
    """One IR-SE unit (the reference `bottleneck_IR_SE`): `shortcut_layer(x) + res_layer(x)`.

    `res_layer` = BN(in), conv3x3(in->depth), PReLU, conv3x3(depth->depth, stride), BN, SE.
    `shortcut_layer` = a parameter-free 1x1 max-pool with the stride when `in == depth`,
    else a strided 1x1 conv + BN. Only the first unit of a stage strides.

    Args:
        in_channel: input channels.
        depth: output channels.
        stride: 1, or 2 for the first unit of a stage.
        se_reduction: SE channel reduction (16).
    """

    def __init__(self, in_channel: int, depth: int, stride: int, se_reduction: int = 16):
        super().__init__()
        self.in_channel, self.depth, self.stride = in_channel, depth, stride
        if in_channel == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channel, depth, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(depth),
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, kernel_size=3, stride=1, padding=1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth, se_reduction),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut_layer(x) + self.res_layer(x)

    def extra_repr(self) -> str:
        return f"{self.in_channel} -> {self.depth}, stride={self.stride}"


# ----------------------------------------------------------------------------
# Backbone builders (the encoders own `input_layer` and `body` directly: that is
# where the reference puts them, so the state-dict keys have no extra prefix)


def make_input_layer(config: BackboneConfig) -> nn.Sequential:
    """The stem: conv3x3(in_nc -> widths[0], no bias), BatchNorm, PReLU; keeps the resolution."""
    width = config.widths[0]
    return nn.Sequential(
        nn.Conv2d(config.in_nc, width, kernel_size=3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.PReLU(width),
    )


def make_body(config: BackboneConfig) -> nn.Sequential:
    """All bottleneck units of the four stages in one flat Sequential (`body.0` .. `body.N-1`).

    Stage `s` maps `widths[s-1]` (the stem width for s = 0) to `widths[s]`; its first unit
    has stride 2, the rest stride 1 with `in == depth`.
    """
    units: list[nn.Module] = []
    in_channel = config.widths[0]
    for depth, count in zip(config.widths, config.units):
        units.append(BottleneckIRSE(in_channel, depth, 2, config.se_reduction))
        units.extend(BottleneckIRSE(depth, depth, 1, config.se_reduction) for _ in range(count - 1))
        in_channel = depth
    return nn.Sequential(*units)


# ----------------------------------------------------------------------------
# Map to style


class GradualStyleBlock(nn.Module):
    """Reduce a (B, in_c, spatial, spatial) map to one style vector (B, out_c).

    `convs` = log2(spatial) x [conv3x3 stride 2 (with bias), LeakyReLU(0.01)] (conv keys at
    even indices), down to 1x1; then flatten and `linear` = EqualLinear(out_c, out_c), i.e.
    `y = x @ (W / sqrt(out_c))^T + b`.

    Args:
        in_c: channels of the input map (the backbone's last stage width, 512).
        out_c: style width (512).
        spatial: side of the input map, a power of two >= 2; the map must be exactly this size.
    """

    def __init__(self, in_c: int, out_c: int, spatial: int):
        super().__init__()
        if spatial < 2 or spatial & (spatial - 1):
            raise UsageError(f"GradualStyleBlock needs a power-of-two spatial size >= 2, got {spatial}")
        self.in_c, self.out_c, self.spatial = in_c, out_c, spatial
        layers: list[nn.Module] = []
        for i in range(int(math.log2(spatial))):
            layers += [nn.Conv2d(in_c if i == 0 else out_c, out_c, kernel_size=3, stride=2, padding=1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_c, out_c, lr_mul=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_c, spatial, spatial) -> (B, out_c)."""
        x = self.convs(x)
        return self.linear(x.reshape(-1, self.out_c))

    def extra_repr(self) -> str:
        return f"{self.in_c} -> {self.out_c}, spatial={self.spatial}"
