"""Small building blocks shared by the generator and the mappers.

Parameter names and initialisation follow the rosinality StyleGAN2 layout, so
checkpoints written by StyleGAN-NADA, e4e, ReStyle and IPL load unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ipltool.kernels.fused_act import fused_leaky_relu


class PixelNorm(nn.Module):
    """Normalise each vector to unit root-mean-square along dim 1: `x / sqrt(mean(x^2) + 1e-8)`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Linear layer with the equalized learning rate of StyleGAN.

    The weight is stored as N(0, 1) / lr_mul and scaled at run time by
    `lr_mul / sqrt(in_dim)`; the bias is stored unscaled and multiplied by `lr_mul`.

    Args:
        in_dim: input features.
        out_dim: output features.
        bias: learn a bias (default True).
        bias_init: initial bias value (the modulation layers use 1).
        lr_mul: learning-rate multiplier (0.01 in the mapping network and the IPL mappers).
        activation: None, or `"fused_lrelu"` for leaky_relu(x + b, 0.2) * sqrt(2).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activation: str | None = None,
    ):
        super().__init__()
        if activation not in (None, "fused_lrelu"):
            raise ValueError(f"EqualLinear activation must be None or 'fused_lrelu', got {activation!r}")
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.activation = activation
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), bias)
        return F.linear(x, self.weight * self.scale, bias=bias)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.weight.shape[1]}, {self.weight.shape[0]}, lr_mul={self.lr_mul})"
