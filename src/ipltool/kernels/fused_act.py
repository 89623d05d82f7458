"""Fused bias + leaky ReLU + gain, the activation of every StyleGAN2 layer."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ipltool.kernels import build
from ipltool.kernels.dispatch import kernel_choice, resolve_impl

# Defaults shared by every implementation (StyleGAN2's "lrelu" entry).
NEGATIVE_SLOPE = 0.2
GAIN = math.sqrt(2.0)


def _fused_leaky_relu_native(x: torch.Tensor, bias: torch.Tensor | None, negative_slope: float, scale: float):
    if bias is not None:
        # The bias runs along dim 1 (channels) whatever the rank of x. It takes x's dtype
        # so that, under autocast, a bf16 activation stays bf16 as with the compiled op.
        shape = (1, bias.shape[0]) + (1,) * (x.ndim - 2)
        x = x + bias.to(x.dtype).view(shape)
    return F.leaky_relu(x, negative_slope=negative_slope) * scale


class _BiasActCuda(torch.autograd.Function):
    """The compiled forward; the backward keeps only the output (no copy of x + bias)."""

    @staticmethod
    def forward(ctx, x, bias, negative_slope, scale):
        empty = x.new_empty(0)
        y = build.extension().bias_act(x, empty if bias is None else bias, negative_slope, scale)
        ctx.save_for_backward(y)
        ctx.options = (negative_slope, scale)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        grad_x = _BiasActGradCuda.apply(grad.contiguous(), y, *ctx.options)
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_x.sum(dim=[0, *range(2, grad_x.ndim)])
        return grad_x, grad_bias, None, None


class _BiasActGradCuda(torch.autograd.Function):
    """`grad * f'(x + bias)`. Its own derivative: the same map of the incoming gradient
    (f' is piecewise constant, so nothing flows to y), which gives exact second order."""

    @staticmethod
    def forward(ctx, grad, y, negative_slope, scale):
        ctx.save_for_backward(y)
        ctx.options = (negative_slope, scale)
        return build.extension().bias_act_grad(grad, y, negative_slope, scale)

    @staticmethod
    def backward(ctx, grad_grad):
        (y,) = ctx.saved_tensors
        return _BiasActGradCuda.apply(grad_grad.contiguous(), y, *ctx.options), None, None, None


def _fused_leaky_relu_cuda(x: torch.Tensor, bias: torch.Tensor | None, negative_slope: float, scale: float):
    if bias is not None:
        bias = bias.to(x.dtype)  # an autocast bf16 x with an fp32 parameter: autograd casts the gradient back
    return _BiasActCuda.apply(x.contiguous(), bias, float(negative_slope), float(scale))


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
    if not (negative_slope >= 0 and scale != 0 and x.ndim >= 2):
        # The compiled op reads the activation's sign from its output, which needs
        # slope >= 0 and scale != 0; other (never used) settings run natively.
        if kernel_choice(impl) == "cuda":
            raise ValueError("the compiled fused_leaky_relu needs negative_slope >= 0, scale != 0 and x of shape (N, C, ...)")
    elif resolve_impl(impl, x) == "cuda":
        return _fused_leaky_relu_cuda(x, bias, negative_slope, scale)
    return _fused_leaky_relu_native(x, bias, negative_slope, scale)


def fused_leaky_relu_(
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    negative_slope: float = NEGATIVE_SLOPE,
    scale: float = GAIN,
    impl: str | None = None,
) -> torch.Tensor:
    """`fused_leaky_relu` written into `x` where the native ops run; for tensors autograd does not follow.

    The same elementwise operations in the same order, so the values are those of
    `fused_leaky_relu` bit for bit, without allocating three activations. Where the
    compiled kernel runs, its single pass (out of place) is the cheaper one and is used.
    """
    if not (negative_slope >= 0 and scale != 0 and x.ndim >= 2) or resolve_impl(impl, x) == "cuda":
        return fused_leaky_relu(x, bias, negative_slope, scale, impl)
    if bias is not None:
        x.add_(bias.to(x.dtype).view((1, bias.shape[0]) + (1,) * (x.ndim - 2)))
    return F.leaky_relu_(x, negative_slope).mul_(scale)


class FusedLeakyReLU(nn.Module):
    """A learned per-channel bias followed by `fused_leaky_relu` (state dict key: `bias`)."""

    def __init__(self, channel: int, bias: bool = True, negative_slope: float = NEGATIVE_SLOPE, scale: float = GAIN):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel)) if bias else None
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale)

    def forward_(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` written into `x` (see `fused_leaky_relu_`): only for a tensor nothing else reads, without autograd."""
        return fused_leaky_relu_(x, self.bias, self.negative_slope, self.scale)
