"""StyleGAN2 generator in the rosinality layout.

Module and parameter names match rosinality/stylegan2-pytorch, the layout that
StyleGAN-NADA, e4e, pSp, ReStyle and IPL all read, so a `{"g_ema": ...}` checkpoint
from any of them loads here with `strict=True`. The file reads bottom-up:
primitives first, then `Generator`, then checkpoint helpers (config checks, loading,
and the source generator of a domain from the model registry).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ipltool import checkpoints, hub
from ipltool.errors import CheckpointError, UnknownNameError, UsageError
from ipltool.kernels.fused_act import FusedLeakyReLU
from ipltool.kernels.upfirdn2d import upfirdn2d
from ipltool.models.generator_config import GeneratorConfig
from ipltool.models.layers import EqualLinear, PixelNorm
from ipltool.precision import autocast_layout, is_channels_last

BLUR_KERNEL = (1, 3, 3, 1)


# ----------------------------------------------------------------------------
# Configuration


def build_generator(config: GeneratorConfig, seed: int | None = None, noise_strength: float = 0.0) -> "Generator":
    """A generator with random weights; with `seed`, the same weights on every call.

    The seeded init runs on a forked RNG, so the caller's random stream is untouched.
    `noise_strength` sets every NoiseInjection weight: trained models have non-zero
    ones, and with zeros two renders of one latent are identical, which leaves IPL's
    image directions undefined (0 / 0) on the first step.
    """
    if seed is None:
        generator = Generator.from_config(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            generator = Generator.from_config(config)
    with torch.no_grad():
        for module in generator.modules():
            if isinstance(module, NoiseInjection):
                module.weight.fill_(noise_strength)
    return generator


#: Fixed-seed, few-channel generator used by tests and `--smoke` runs.
TINY_CONFIG = GeneratorConfig(size=32, style_dim=64, n_mlp=2, channel_multiplier=1, channel_max=32)


# ----------------------------------------------------------------------------
# Primitives


def make_kernel(k: Sequence[float]) -> torch.Tensor:
    """Outer product of a 1-D FIR kernel with itself, normalised to sum 1."""
    k = torch.tensor(k, dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


class Upsample(nn.Module):
    """2x upsampling with a FIR filter (used on the RGB skip path)."""

    def __init__(self, kernel: Sequence[float] = BLUR_KERNEL, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * factor**2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, down=1, pad=self.pad)


class Blur(nn.Module):
    """FIR low-pass filter applied after a transposed convolution."""

    def __init__(self, kernel: Sequence[float], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        k = make_kernel(kernel)
        if upsample_factor > 1:
            k = k * upsample_factor**2
        self.register_buffer("kernel", k)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class ModulatedConv2d(nn.Module):
    """Convolution whose weights are scaled per sample by a style (and demodulated).

    Args:
        in_channel, out_channel, kernel_size: as for a convolution.
        style_dim: size of the style vector driving the modulation.
        demodulate: normalise each output filter to unit norm (off for ToRGB).
        upsample: 2x transposed convolution followed by a blur.
        blur_kernel: FIR kernel of the blur.
    """

    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        kernel_size: int,
        style_dim: int,
        demodulate: bool = True,
        upsample: bool = False,
        blur_kernel: Sequence[float] = BLUR_KERNEL,
    ):
        super().__init__()
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.kernel_size = kernel_size
        self.upsample = upsample
        self.demodulate = demodulate
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_channel * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        # Rosinality scales one weight per sample and runs a grouped convolution. Scaling the
        # input channels by the style and the output channels by the demodulation instead is
        # the same linear map with one shared weight: ordinary batched convolutions, several
        # times faster on CPUs (benchmarks/RESULTS.md). Results agree to float rounding.
        batch, in_channel = x.shape[:2]
        # The style and the demodulation are small (B x channels) and set the scale of every
        # activation: they stay float32 under autocast; only the convolution is reduced.
        with torch.autocast(x.device.type, enabled=False):
            s = self.modulation(style.to(self.weight.dtype))
        x = x * s.to(x.dtype).view(batch, in_channel, 1, 1)
        weight, squares = self._weight(x)
        if self.upsample and _upsample_by_phases(x, weight):
            out = upsampling_conv_by_phases(x, weight)
        elif self.upsample:
            out = F.conv_transpose2d(x, weight.transpose(0, 1), padding=0, stride=2)
        else:
            out = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            # rsqrt(sum over in, ky, kx of (scale * w * s_in)^2 + 1e-8), per sample and output channel
            with torch.autocast(x.device.type, enabled=False):
                demod = torch.rsqrt(s.pow(2) @ squares.t() + 1e-8)
            demod = demod.to(out.dtype).view(batch, self.out_channel, 1, 1)
            # Without autograd the fresh output is scaled in place (see StyledConv.forward).
            out = out * demod if torch.is_grad_enabled() else out.mul_(demod)
        if self.upsample:  # the blur is per channel, so demodulating before it changes nothing
            out = self.blur(out)
        return out

    def _weight(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scaled weight (out, in, k, k) for input `x`, and its squares summed over the kernel (out, in).

        A frozen weight under autocast is prepared once and kept until it changes (another
        parameter, its storage or its version counter), in the dtype autocast would cast it
        to at every call:
        G_s, G_ema and the layers of G_t outside the layer choice are then neither rescaled
        nor cast again per call. The values are those of the uncached path exactly. A weight
        that needs a gradient is always recomputed, so autograd sees every use.
        """
        channels_last = is_channels_last(x)
        device_type = x.device.type
        cached = not self.weight.requires_grad and torch.is_autocast_enabled(device_type)
        key = (self.weight.data_ptr(), self.weight._version, torch.get_autocast_dtype(device_type), channels_last) if cached else None
        prepared = getattr(self, "_prepared", None)
        # The parameter itself is kept with its key: a replaced one cannot be mistaken for it
        # by a new tensor that reuses its freed address.
        if key is not None and prepared is not None and prepared[0] is self.weight and prepared[1] == key:
            return prepared[2], prepared[3]
        weight = self.scale * self.weight[0]
        squares = weight.pow(2).sum([2, 3]) if self.demodulate else None
        if channels_last:
            # The weight in the activations' order (autocast_layout): else oneDNN returns its gradient
            # channels-last, and every elementwise op on it in the backward takes a strided path, 10x slower.
            weight = weight.contiguous(memory_format=torch.channels_last)
        if key is not None:
            weight = weight.to(key[2])
            self._prepared = (self.weight, key, weight, squares)
        return weight, squares

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.in_channel}, {self.out_channel}, {self.kernel_size}, "
            f"upsample={self.upsample}, demodulate={self.demodulate})"
        )


#: Largest input side at which `_upsample_by_phases` picks the four convolutions (see there).
PHASES_MAX_SIDE = 32


def _upsample_by_phases(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether an upsampling convolution runs as `upsampling_conv_by_phases` rather than a transposed convolution.

    Measured on CPUs under bf16 autocast with channels-last activations, batch 8 of 512
    channels, without gradients (benchmarks/RESULTS.md): oneDNN's transposed convolution
    takes 11, 17, 30 and 79 ms at 4, 8, 16 and 32 px, the four convolutions 3.0, 4.5, 8.5
    and 33 ms; at 64 px they are even and at 128 px the four are 1.8x slower. With
    gradients the four lose from 32 px on (their backward reads strided slices), so they
    run only under `no_grad`: the renders of stage 1, stylizing, generating.
    fp32 keeps the reference's transposed convolution, so its results stay bit for bit.
    """
    return (
        x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and not torch.is_grad_enabled()
        and weight.shape[-1] == 3
        and max(x.shape[-2:]) <= PHASES_MAX_SIDE
    )


def upsampling_conv_by_phases(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`conv_transpose2d(x, weight.transpose(0, 1), stride=2)` for a 3x3 `weight` (out, in, 3, 3), as four convolutions.

    Output pixel (2i + a, 2j + b) of the stride-2 transposed convolution sums only the
    kernel taps of parity (a, b): rows 2 and 0 (over input rows i - 1 and i) for even
    a, row 1 for odd a, and the same for columns. So each of the four parities is an
    ordinary convolution of `x` with a 2x2, 2x1, 1x2 or 1x1 slice of the flipped kernel,
    written into every other row and column of the (2H + 1) x (2W + 1) result. Same sums
    as the transposed convolution, but as oneDNN's ordinary (faster on CPUs) kernels;
    the result keeps `x`'s memory order. For use without gradients (slice assignment).
    """
    batch, _, height, width = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    even_even = F.conv2d(padded, weight[:, :, ::2, ::2].flip(2, 3))  # (H + 1) x (W + 1)
    memory_format = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    out = torch.empty(
        batch, weight.shape[0], 2 * height + 1, 2 * width + 1, dtype=even_even.dtype, device=x.device, memory_format=memory_format
    )
    out[:, :, 0::2, 0::2] = even_even
    out[:, :, 0::2, 1::2] = F.conv2d(padded[:, :, :, 1:-1], weight[:, :, ::2, 1:2].flip(2))  # (H + 1) x W
    out[:, :, 1::2, 0::2] = F.conv2d(padded[:, :, 1:-1, :], weight[:, :, 1:2, ::2].flip(3))  # H x (W + 1)
    out[:, :, 1::2, 1::2] = F.conv2d(x, weight[:, :, 1:2, 1:2])  # H x W
    return out


class NoiseInjection(nn.Module):
    """Adds per-pixel noise scaled by a learned scalar (`weight`, starts at 0)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return image + self._scaled(image, noise)

    def forward_(self, image: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` added into `image`: only for a tensor nothing else reads, without autograd."""
        return image.add_(self._scaled(image, noise))

    def _scaled(self, image: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        if noise is None:
            batch, _, height, width = image.shape
            noise = image.new_empty(batch, 1, height, width).normal_()
        # In the image's dtype: under autocast the float32 weight would otherwise turn
        # every bf16/fp16 activation after it back into float32 (a no-op in fp32).
        return (self.weight * noise).to(image.dtype)


class ConstantInput(nn.Module):
    """The learned 4x4 constant the synthesis network starts from (key `input.input`)."""

    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.input.repeat(latent.shape[0], 1, 1, 1)


class StyledConv(nn.Module):
    """ModulatedConv2d, then noise, then bias + leaky ReLU."""

    def __init__(
        self,
        in_channel: int,
        out_channel: int,
        kernel_size: int,
        style_dim: int,
        upsample: bool = False,
        blur_kernel: Sequence[float] = BLUR_KERNEL,
    ):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim, upsample=upsample, blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.activate(self.noise(self.conv(x, style), noise=noise))
        # Without autograd (stage 1's renders, sample grids, stylizing, generating) the
        # convolution's fresh output takes the noise, bias and activation in place: the
        # same values bit for bit, and a 256 px render of 8 took 5.8 -> 5.0 s in fp32 and
        # 2.2 -> 1.7 s in bf16 on 2 cores, with a lower peak (benchmarks/RESULTS.md).
        return self.activate.forward_(self.noise.forward_(self.conv(x, style), noise=noise))


class ToRGB(nn.Module):
    """1x1 modulated convolution to RGB, added to the upsampled RGB of the previous level."""

    def __init__(self, in_channel: int, style_dim: int, upsample: bool = True, blur_kernel: Sequence[float] = BLUR_KERNEL):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


# ----------------------------------------------------------------------------
# Generator


class Generator(nn.Module):
    """StyleGAN2 generator: mapping network `style` plus the synthesis layers.

    Args:
        size: output resolution (power of two, 32..1024).
        style_dim: size of z and w (512).
        n_mlp: layers of the mapping network (8).
        channel_multiplier: 2 (config-f) or 1.
        channel_max: channel cap (512 reproduces the released models).
        lr_mlp: learning-rate multiplier of the mapping network.

    Style input `i` of the W+ code drives: 0 -> `conv1`, 1 -> `to_rgb1`, then for each
    resolution level the two `convs` and the `to_rgbs` entry in turn (shared indices:
    `to_rgbs[j]` uses index `2j + 3`, the same as the level's second conv's next input).
    """

    def __init__(
        self,
        size: int,
        style_dim: int = 512,
        n_mlp: int = 8,
        channel_multiplier: int = 2,
        channel_max: int = 512,
        lr_mlp: float = 0.01,
        blur_kernel: Sequence[float] = BLUR_KERNEL,
    ):
        super().__init__()
        self.config = GeneratorConfig(size, style_dim, n_mlp, channel_multiplier, channel_max, lr_mlp)
        self.size = size
        self.style_dim = style_dim
        self.log_size = self.config.log_size
        self.num_layers = self.config.num_layers
        self.n_latent = self.config.n_latent
        self.channels = self.config.channels()

        self.style = nn.Sequential(
            PixelNorm(),
            *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation="fused_lrelu") for _ in range(n_mlp)],
        )

        self.input = ConstantInput(self.channels[4])
        self.conv1 = StyledConv(self.channels[4], self.channels[4], 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(self.channels[4], style_dim, upsample=False)

        self.convs = nn.ModuleList()
        self.upsamples = nn.ModuleList()  # empty; kept because the reference layout has it
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for layer_idx in range(self.num_layers):
            res = 2 ** ((layer_idx + 5) // 2)
            self.noises.register_buffer(f"noise_{layer_idx}", torch.randn(1, 1, res, res))

        in_channel = self.channels[4]
        for i in range(3, self.log_size + 1):
            out_channel = self.channels[2**i]
            self.convs.append(StyledConv(in_channel, out_channel, 3, style_dim, upsample=True, blur_kernel=blur_kernel))
            self.convs.append(StyledConv(out_channel, out_channel, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_channel, style_dim))
            in_channel = out_channel

    @classmethod
    def from_config(cls, config: GeneratorConfig) -> "Generator":
        """Build a generator (random weights) from a `GeneratorConfig`."""
        return cls(
            config.size,
            style_dim=config.style_dim,
            n_mlp=config.n_mlp,
            channel_multiplier=config.channel_multiplier,
            channel_max=config.channel_max,
            lr_mlp=config.lr_mlp,
        )

    @property
    def device(self) -> torch.device:
        """Where the generator's weights are (that of its learned constant input)."""
        return self.input.input.device

    # -- latents ---------------------------------------------------------------

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """Map z (B, style_dim) to w (B, style_dim) through PixelNorm and the MLP."""
        return self.style(z)

    get_latent = mapping  # the reference name

    @torch.no_grad()
    def mean_latent(self, n: int = 4096, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean of `n` mapped samples, shape (1, style_dim): the truncation centre."""
        z = torch.randn(n, self.style_dim, device=self.device, generator=generator)
        return self.style(z).mean(0, keepdim=True)

    def noise_list(self, randomize: bool = True) -> list[torch.Tensor | None]:
        """Per-layer noise: None everywhere (fresh noise each call) or the stored constant buffers."""
        if randomize:
            return [None] * self.num_layers
        return [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]

    def draw_noise(self, batch: int) -> list[torch.Tensor]:
        """Fresh per-layer noise for a whole batch, drawn in the order the layers draw it themselves.

        Rendering in chunks with slices of these gives the same images (and consumes the
        same random numbers) as one full-batch call with `noise_list(randomize=True)`.
        """
        noise = []
        for layer in range(self.num_layers):
            res = 2 ** ((layer + 5) // 2)
            noise.append(torch.randn(batch, 1, res, res, device=self.device))
        return noise

    def to_w_plus(self, styles: Sequence[torch.Tensor], inject_index: int | None = None) -> torch.Tensor:
        """Broadcast one w (B, D) or mix two of them into a W+ code (B, n_latent, D).

        A (B, n_latent, D) input is returned unchanged.
        """
        if len(styles) < 2:
            w = styles[0]
            if w.ndim == 3:
                if w.shape[1] != self.n_latent:
                    raise UsageError(f"W+ code has {w.shape[1]} style vectors, the generator needs {self.n_latent}")
                return w
            return w.unsqueeze(1).repeat(1, self.n_latent, 1)
        if inject_index is None:
            inject_index = random.randint(1, self.n_latent - 1)
        first = styles[0].unsqueeze(1).repeat(1, inject_index, 1)
        second = styles[1].unsqueeze(1).repeat(1, self.n_latent - inject_index, 1)
        return torch.cat([first, second], 1)

    # -- synthesis ---------------------------------------------------------------

    def synthesis(self, latent: torch.Tensor, noise: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Render a W+ code (B, n_latent, style_dim) into images (B, 3, size, size), nominally in [-1, 1]."""
        if noise is None:
            noise = self.noise_list(randomize=True)
        out = autocast_layout(self.input(latent))
        out = self.conv1(out, latent[:, 0], noise=noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for conv_up, conv, noise1, noise2, to_rgb in zip(self.convs[::2], self.convs[1::2], noise[1::2], noise[2::2], self.to_rgbs):
            out = conv_up(out, latent[:, i], noise=noise1)
            out = conv(out, latent[:, i + 1], noise=noise2)
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return skip.contiguous()  # channels-last under autocast (see autocast_layout); 3 channels, a cheap copy

    def forward(
        self,
        styles: torch.Tensor | Sequence[torch.Tensor],
        return_latents: bool = False,
        inject_index: int | None = None,
        truncation: float = 1.0,
        truncation_latent: torch.Tensor | None = None,
        input_is_latent: bool = False,
        noise: Sequence[torch.Tensor | None] | None = None,
        randomize_noise: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Generate images; the signature of the reference generator.

        Args:
            styles: z (B, D), or a list of one or two z's (two = style mixing); with
                `input_is_latent`, w (B, D) or W+ (B, n_latent, D) instead.
            return_latents: also return the W+ code used.
            inject_index: crossover index for style mixing (random if None).
            truncation: psi; < 1 pulls every w towards `truncation_latent`.
            truncation_latent: (1, D) mean latent, required when truncation < 1.
            input_is_latent: `styles` are w / W+ codes rather than z.
            noise: explicit per-layer noise list (overrides `randomize_noise`).
            randomize_noise: fresh noise each call (True) or the constant `noises` buffers.

        Returns:
            (images (B, 3, size, size), W+ code or None).
        """
        if isinstance(styles, torch.Tensor):
            styles = [styles]
        if not input_is_latent:
            styles = [self.style(s) for s in styles]
        if noise is None:
            noise = self.noise_list(randomize=randomize_noise)
        if truncation < 1:
            if truncation_latent is None:
                raise UsageError("truncation < 1 needs a truncation_latent (see Generator.mean_latent)")
            styles = [truncation_latent + truncation * (s - truncation_latent) for s in styles]
        latent = self.to_w_plus(styles, inject_index)
        image = self.synthesis(latent, noise)
        return image, (latent if return_latents else None)

    def layer_for_style_index(self, index: int) -> nn.Module:
        """Layer trained when W+ index `index` is chosen (IPL's mapping, a kept quirk).

        0 -> `conv1`, 1 -> `to_rgb1`, i >= 2 -> `convs[i - 2]`.
        """
        if not 0 <= index < self.n_latent:
            raise IndexError(f"style index {index} out of range 0..{self.n_latent - 1}")
        if index == 0:
            return self.conv1
        if index == 1:
            return self.to_rgb1
        return self.convs[index - 2]


# ----------------------------------------------------------------------------
# Checkpoints


def config_from_state_dict(state: dict[str, torch.Tensor]) -> GeneratorConfig:
    """Infer the architecture of a rosinality-layout generator state dict.

    The size comes from the number of `to_rgbs`, `style_dim` and `n_mlp` from the
    mapping network, the channel multiplier from the channels at 64 px (2 when the
    generator is smaller than 64 px and it cannot be seen), the cap from the widest layer.
    """
    try:
        style_keys = [k for k in state if k.startswith("style.") and k.endswith(".weight")]
        n_mlp = len(style_keys)
        style_dim = state["style.1.weight"].shape[1]
        n_levels = len({k.split(".")[1] for k in state if k.startswith("to_rgbs.")})
        size = 2 ** (n_levels + 2)
        widths = {4: state["conv1.conv.weight"].shape[1]}
        for level in range(n_levels):
            widths[2 ** (level + 3)] = state[f"convs.{2 * level}.conv.weight"].shape[1]
    except KeyError as err:
        raise CheckpointError(f"not a StyleGAN2 generator state dict in the rosinality layout (no key {err})") from None
    except (IndexError, AttributeError):  # a tensor of the wrong rank, or not a tensor
        raise CheckpointError("not a StyleGAN2 generator state dict in the rosinality layout (a tensor of the wrong shape)") from None
    channel_max = max(widths.values())
    multiplier = 2
    if 64 in widths and widths[64] < 512:
        multiplier = max(1, widths[64] // 256)
    elif 128 in widths:
        multiplier = max(1, min(2, widths[128] // 128))
    return GeneratorConfig(size, style_dim, n_mlp, multiplier, channel_max)


def generator_config(raw: Any, where: str | os.PathLike) -> GeneratorConfig:
    """The `GeneratorConfig` stored in a checkpoint, validated before anything is built.

    Unknown keys, wrong types (a string, a bool, NaN) and values outside
    `checkpoints.GENERATOR_LIMITS` are refused; `size` must also be a power of two.

    Args:
        raw: the checkpoint's `config` entry.
        where: the file, for messages.

    Raises:
        CheckpointError: one line naming the file and the field.
    """
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: its generator config is a {type(raw).__name__}, not a table of settings")
    unknown = sorted(map(str, set(raw) - set(checkpoints.GENERATOR_LIMITS)))
    if unknown:
        raise CheckpointError(
            f"{where}: unknown key(s) in its generator config: {', '.join(unknown)}",
            hint=f"known: {', '.join(checkpoints.GENERATOR_LIMITS)}",
        )
    if "size" not in raw:
        raise CheckpointError(f"{where}: its generator config has no size")
    for key, value in raw.items():
        kind, low, high = checkpoints.GENERATOR_LIMITS[key]
        checkpoints.check_number(str(where), key, value, kind, low, high, power_of_two=key == "size")
    try:
        return GeneratorConfig(**raw)
    except UsageError as err:
        raise CheckpointError(f"{where}: {err.message}") from None


def check_generator_config(config: GeneratorConfig, where: str | os.PathLike) -> None:
    """`generator_config` on a `GeneratorConfig` already built (inferred from weights, or given)."""
    generator_config(config.to_dict(), where)


def check_generator_fits(config: GeneratorConfig, state: Mapping[str, torch.Tensor], where: str | os.PathLike) -> None:
    """Refuse a config that does not describe the weights in `state`, before building it.

    The architecture the tensors describe is read off their shapes
    (`config_from_state_dict`); it must have the config's size, style width, mapping depth
    and channels per resolution. The module built from the config then holds what the file
    holds, and the file's tensors are bounded by its size, so nothing larger is allocated.

    Raises:
        CheckpointError: `{where} does not fit a Npx generator: ...`.
    """
    try:
        found = config_from_state_dict(dict(state))
    except (CheckpointError, UsageError) as err:
        raise CheckpointError(f"{where} does not fit a {config.size}px generator: {err.message}") from None

    def layout(c) -> tuple:
        return c.size, c.style_dim, c.n_mlp, tuple(ch for res, ch in sorted(c.channels().items()) if res <= c.size)

    if layout(found) != layout(config):
        raise CheckpointError(
            f"{where} does not fit a {config.size}px generator (style_dim {config.style_dim}, n_mlp {config.n_mlp}): "
            f"its weights are those of a {found.size}px one (style_dim {found.style_dim}, n_mlp {found.n_mlp}, "
            f"channels {list(layout(found)[3])})"
        )


def load_generator(path: str | Path, key: str = "g_ema", config: GeneratorConfig | None = None, map_location="cpu") -> Generator:
    """Load a generator checkpoint (`{"g_ema": state_dict, ...}`) with strict key matching.

    Args:
        path: a `.pt` file written by torch.save (read by `checkpoints.read`: weights only,
            bounded sizes).
        key: which entry holds the generator (`g_ema` in every released file).
        config: the expected architecture; else the file's `config` entry (validated by
            `generator_config`), else inferred from the weights.
        map_location: where the generator goes.

    Returns:
        The generator, in eval mode, on `map_location`.

    Raises:
        CheckpointError: unreadable or unsafe file, missing key, a config with unknown keys,
            wrong types or values outside real models' ranges, non-finite weights, or
            weights that do not fit; checked before the generator is built.
    """
    path = Path(path)
    ckpt = checkpoints.read(path, "checkpoint")
    if key not in ckpt:
        raise CheckpointError(f"{path} has no {key!r} entry (found: {', '.join(sorted(map(str, ckpt)))})")
    what = f"{path}[{key!r}]"
    state = checkpoints.tensor_dict(ckpt[key], what, "generator state dict")
    if config is None:
        if ckpt.get("config") is not None:
            config = generator_config(ckpt["config"], path)
        else:
            try:
                config = config_from_state_dict(state)
            except (CheckpointError, UsageError) as err:
                raise CheckpointError(f"{what}: {err.message}") from None
    checkpoints.check_finite(state, what)
    return build_from_state(config, state, what).eval().to(map_location)


def build_from_state(config: GeneratorConfig, state: dict[str, torch.Tensor], what: str) -> Generator:
    """A `Generator` of `config` with `state` loaded strictly.

    Before anything is built, the config must be within real models' ranges and describe
    the weights in `state` (`check_generator_fits`), so no config can make this
    allocate more than the weights it is given.

    Raises:
        CheckpointError: one line naming `what` and the first mismatching keys.
    """
    check_generator_config(config, what)
    check_generator_fits(config, state, what)
    generator = Generator.from_config(config)
    checkpoints.load_strict(generator, state, what, f"a {config.size}px generator")
    return generator


def generator_checkpoint(generator: Generator, **extra) -> dict:
    """The dict to `torch.save`: `{"g_ema": state_dict, "config": ..., **extra}`.

    The reference code reads only `g_ema`; the `config` entry lets ipltool rebuild the
    architecture without guessing.
    """
    return {"g_ema": generator.state_dict(), "config": generator.config.to_dict(), **extra}


def load_source_generator(spec: str, device="cpu", seed: int = 0) -> Generator:
    """The source generator of a domain: `tiny`, a registry name, or a path to a `.pt` file.

    Args:
        spec: the domain's `generator` value.
        device: where to put it.
        seed: seed of the synthetic `tiny` generator.

    Returns:
        A frozen `Generator` in eval mode.

    Raises:
        UsageError: a registry file that is not in the cache (the message says where it
            is expected), or a missing path.
    """
    try:
        entry = hub.get_model(spec)
    except UnknownNameError:
        entry = None
    if entry is not None and entry.synthetic:
        # Non-zero noise strengths, like a trained model (see build_generator).
        generator = build_generator(GeneratorConfig.of_entry(entry), seed=seed, noise_strength=0.1)
    elif entry is not None:
        generator = load_generator(hub.ensure(spec), config=GeneratorConfig.of_entry(entry))
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UsageError(f"generator checkpoint not found: {path}")
        generator = load_generator(path)
    return generator.to(device).eval().requires_grad_(False)
