"""Fused bias + leaky ReLU + gain, the activation of every StyleGAN2 layer."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ipltool.kernels.dispatch import resolve_impl

# Defaults shared by every implementation (StyleGAN2's "lrelu" entry).
NEGATIVE_SLOPE = 0.2
GAIN = math.sqrt(2.0)


def _fused_leaky_relu_native(x: torch.Tensor, bias: torch.Tensor | None, negative_slope: float, scale: float):
    if bias is not None:
        # The bias runs along dim 1 (channels) whatever the rank of x.
        shape = (1, bias.shape[0]) + (1,) * (x.ndim - 2)
        x = x + bias.view(shape)
    return F.leaky_relu(x, negative_slope=negative_slope) * scale


def fused_leaky_relu(
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    negative_slope: float = NEGATIVE_SLOPE,
    scale: float = GAIN,
    impl: str | None = None,
) -> torch.Tensor:
    """`leaky_relu(x + bias, negative_slope) * scale`, with the bias along dim 1.

    Args:
        x: input of shape (N, C, ...), any float dtype.
        bias: (C,) or None.
        negative_slope: slope for x < 0 (default 0.2).
        scale: gain applied after the activation (default sqrt(2)).
        impl: implementation name (see `ipltool.kernels.resolve_impl`).

    Returns:
        Tensor of the shape and dtype of `x`.
    """
    resolve_impl(impl)  # only "native" exists in this version
    return _fused_leaky_relu_native(x, bias, negative_slope, scale)


class FusedLeakyReLU(nn.Module):
    """A learned per-channel bias followed by `fused_leaky_relu` (state dict key: `bias`)."""

    def __init__(self, channel: int, bias: bool = True, negative_slope: float = NEGATIVE_SLOPE, scale: float = GAIN):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel)) if bias else None
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale)
