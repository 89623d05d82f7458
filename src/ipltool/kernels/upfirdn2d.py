"""upfirdn2d: zero-insertion upsampling, padding, 2-D FIR filtering, downsampling."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ipltool.kernels import build
from ipltool.kernels.dispatch import kernel_choice, resolve_impl


def _pair(value: int | tuple[int, ...], name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value, value)
    if len(value) not in (2, 4):
        raise ValueError(f"{name} takes 1, 2 or 4 integers, got {value!r}")
    return tuple(value)


def _upfirdn2d_native(x, kernel, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1):
    n, c, h, w = x.shape

    # 1. Upsample by inserting (up - 1) zeros after every sample.
    if up_x > 1 or up_y > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up_x - 1, 0, 0, 0, up_y - 1])
        x = x.reshape(n, c, h * up_y, w * up_x)

    # 2. Pad (positive) or crop (negative) each border.
    x = F.pad(x, [max(pad_x0, 0), max(pad_x1, 0), max(pad_y0, 0), max(pad_y1, 0)])
    x = x[
        :,
        :,
        max(-pad_y0, 0) : x.shape[2] - max(-pad_y1, 0),
        max(-pad_x0, 0) : x.shape[3] - max(-pad_x1, 0),
    ]

    # 3. Convolve every channel with the kernel (a true convolution, hence the flip). A
    # depthwise convolution (groups = channels) runs several times faster on CPUs than
    # one single-channel convolution over (N*C, 1, H, W), with the same result.
    weight = torch.flip(kernel, [0, 1]).to(x.dtype).expand(c, 1, *kernel.shape).contiguous()
    x = F.conv2d(x, weight, groups=c)

    # 4. Downsample by keeping every down-th sample.
    return x[:, :, ::down_y, ::down_x]


class _Upfirdn2dCuda(torch.autograd.Function):
    """The compiled op. upfirdn2d is linear in x, and its adjoint is again an upfirdn2d
    (flipped kernel, up and down swapped, shifted pads), so the backward calls this same
    Function and every order of derivative comes out right."""

    @staticmethod
    def forward(ctx, x, kernel, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1):
        out = build.extension().upfirdn2d(x, kernel, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1)
        ctx.save_for_backward(kernel)
        ctx.geometry = (up_x, up_y, down_x, down_y, pad_x0, pad_y0)
        ctx.in_size = x.shape[2:]
        return out

    @staticmethod
    def backward(ctx, grad):
        (kernel,) = ctx.saved_tensors
        up_x, up_y, down_x, down_y, pad_x0, pad_y0 = ctx.geometry
        (in_h, in_w), (out_h, out_w) = ctx.in_size, grad.shape[2:]
        k_h, k_w = kernel.shape
        # Output o, tap t read input i where i * up = o * down + t - pad0; read backwards,
        # input i gathers output o with tap k - 1 - t: pad0' = k - 1 - pad0, and pad1' is
        # what makes the result exactly in_size long.
        grad_pads = (
            k_w - 1 - pad_x0,
            in_w * up_x - out_w * down_x + pad_x0,
            k_h - 1 - pad_y0,
            in_h * up_y - out_h * down_y + pad_y0,
        )
        flipped = torch.flip(kernel, [0, 1])
        grad_x = _Upfirdn2dCuda.apply(grad.contiguous(), flipped, down_x, down_y, up_x, up_y, *grad_pads)
        return (grad_x,) + (None,) * 9


def upfirdn2d(
    x: torch.Tensor,
    kernel: torch.Tensor,
    up: int | tuple[int, int] = 1,
    down: int | tuple[int, int] = 1,
    pad: int | tuple[int, ...] = (0, 0),
    impl: str | None = None,
) -> torch.Tensor:
    """Upsample, pad, FIR-filter and downsample a batch of images.

    Steps: 1. insert `up - 1` zeros between samples; 2. pad (or crop, when negative)
    by `pad`; 3. convolve every channel with `kernel`; 4. keep every `down`-th sample.

    Args:
        x: (N, C, H, W) input.
        kernel: (kh, kw) FIR filter.
        up: upsampling factor, an int or (up_x, up_y).
        down: downsampling factor, an int or (down_x, down_y).
        pad: (pad0, pad1) applied to both axes, or (x0, x1, y0, y1).
        impl: implementation name (see `ipltool.kernels.resolve_impl`).

    Returns:
        (N, C, H_out, W_out) with `H_out = (H*up_y + pad_y0 + pad_y1 - kh) // down_y + 1`.
    """
    up_x, up_y = _pair(up, "up")
    down_x, down_y = _pair(down, "down")
    pads = _pair(pad, "pad")
    if len(pads) == 2:
        pads = (pads[0], pads[1], pads[0], pads[1])
    if kernel.requires_grad:
        # The compiled op treats the filter as a constant (StyleGAN2's are buffers).
        if kernel_choice(impl) == "cuda":
            raise ValueError("the compiled upfirdn2d computes no gradient for the kernel; use impl='native'")
    elif resolve_impl(impl, x) == "cuda":
        return _Upfirdn2dCuda.apply(x.contiguous(), kernel, up_x, up_y, down_x, down_y, *pads)
    return _upfirdn2d_native(x, kernel, up_x, up_y, down_x, down_y, *pads)
