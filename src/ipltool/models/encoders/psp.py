"""The four FFHQ image encoders: pSp, e4e, ReStyle-pSp and ReStyle-e4e (docs/inversion.md §5).

Class names are the reference `opts["encoder_type"]` strings, and state-dict keys are
the reference ones (`input_layer`, `body`, `styles.N.convs.K`, `styles.N.linear`,
`latlayer1`, `latlayer2`), so official checkpoints load with `strict=True`.

| class | input | styles read from | output |
|---|---|---|---|
| GradualStyleEncoder (pSp) | 3 ch | c3 (coarse), p2 (middle), p1 (fine) | stack of blocks |
| Encoder4Editing (e4e) | 3 ch | same | block 0 repeated + deltas |
| BackboneEncoder (ReStyle-pSp) | 6 ch | c3 only | stack of blocks |
| ProgressiveBackboneEncoder (ReStyle-e4e) | 6 ch | c3 only | block 0 repeated + deltas |

c1, c2, c3 are the outputs of backbone stages 2, 3, 4 (input/4, input/8, input/16);
`p2 = up(c3) + latlayer1(c2)`, `p1 = up(p2) + latlayer2(c1)`. Every size is a parameter,
so tests build few-channel copies; the defaults are the released FFHQ models.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ipltool.errors import UsageError
from ipltool.models.encoders.irse import BackboneConfig, GradualStyleBlock, make_body, make_input_layer
from ipltool.precision import autocast_layout

#: Style indices below COARSE_IND read c3, below MIDDLE_IND p2, the rest p1 (reference values).
COARSE_IND = 3
MIDDLE_IND = 7


def n_styles_for(size: int) -> int:
    """Number of W+ style vectors of a generator of resolution `size`: `2*log2(size) - 2` (18 at 1024)."""
    return 2 * (int(size).bit_length() - 1) - 2


def _upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bilinear upsampling of `x` to the size of `y` (align_corners=True, as the reference), plus `y`."""
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


# ----------------------------------------------------------------------------
# Shared backbone


class _IRSEEncoder(nn.Module):
    """IR-SE backbone plus the bookkeeping every encoder shares.

    Args:
        n_styles: number of style vectors produced (18 for a 1024 generator).
        style_dim: width of each style vector (512).
        input_size: side of the square input (256); must be a power of two >= 32.
        backbone: backbone shape; `in_nc` is 3 for pSp/e4e and 6 for ReStyle.
    """

    def __init__(self, n_styles: int, style_dim: int, input_size: int, backbone: BackboneConfig):
        super().__init__()
        if n_styles < 1 or style_dim < 1:
            raise UsageError(f"n_styles and style_dim must be positive, got {n_styles} and {style_dim}")
        if input_size & (input_size - 1) or input_size < 2 * backbone.downsampling:
            raise UsageError(f"encoder input size must be a power of two >= {2 * backbone.downsampling}, got {input_size}")
        self.n_styles = n_styles
        self.style_dim = style_dim
        self.input_size = input_size
        self.backbone = backbone
        self.input_layer = make_input_layer(backbone)
        self.body = make_body(backbone)

    @property
    def in_nc(self) -> int:
        return self.backbone.in_nc

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_nc, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise UsageError(f"{type(self).__name__} expects (B, {', '.join(map(str, expected))}) input, got {tuple(x.shape)}")

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run the backbone; return the output of each stage (4 maps, strides 2, 4, 8, 16)."""
        self._check_input(x)
        x = self.input_layer(autocast_layout(x))
        ends = set(self.backbone.stage_ends)
        outputs = []
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in ends:
                outputs.append(x)
        return outputs

    def _block_spatials(self) -> list[int]:
        raise NotImplementedError

    def _make_styles(self) -> nn.ModuleList:
        width = self.backbone.widths[-1]
        return nn.ModuleList(GradualStyleBlock(width, self.style_dim, s) for s in self._block_spatials())

    def extra_repr(self) -> str:
        return f"n_styles={self.n_styles}, style_dim={self.style_dim}, input={self.input_size}, in_nc={self.in_nc}"


# ----------------------------------------------------------------------------
# pSp / e4e: feature pyramid over stages 2-4


class _PyramidEncoder(_IRSEEncoder):
    """Styles 0-2 from c3 (input/16), 3-6 from p2 (input/8), 7+ from p1 (input/4).

    With fewer than 8 styles (tiny generators) the same split points are clipped to
    `n_styles`, so the fine group may be empty.
    """

    def __init__(self, n_styles: int = 18, style_dim: int = 512, input_size: int = 256, backbone: BackboneConfig | None = None):
        super().__init__(n_styles, style_dim, input_size, backbone or BackboneConfig(in_nc=3))
        self.coarse_ind = min(COARSE_IND, n_styles)
        self.middle_ind = min(MIDDLE_IND, n_styles)
        self.styles = self._make_styles()
        widths = self.backbone.widths
        # Lateral 1x1 convs bring c2 and c1 to the width of c3 (with bias).
        self.latlayer1 = nn.Conv2d(widths[2], widths[3], kernel_size=1, stride=1, padding=0)
        self.latlayer2 = nn.Conv2d(widths[1], widths[3], kernel_size=1, stride=1, padding=0)

    def _block_spatials(self) -> list[int]:
        c3 = self.input_size // self.backbone.downsampling
        return [c3 if i < self.coarse_ind else 2 * c3 if i < self.middle_ind else 4 * c3 for i in range(self.n_styles)]

    def _pyramid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c3, p2, p1): the coarse, middle and fine feature maps, all `widths[3]` channels."""
        _, c1, c2, c3 = self._stages(x)
        p2 = _upsample_add(c3, self.latlayer1(c2))
        p1 = _upsample_add(p2, self.latlayer2(c1))
        return c3, p2, p1

    def _features_for(self, i: int, c3: torch.Tensor, p2: torch.Tensor, p1: torch.Tensor) -> torch.Tensor:
        return c3 if i < self.coarse_ind else p2 if i < self.middle_ind else p1


class GradualStyleEncoder(_PyramidEncoder):
    """pSp encoder: each style vector is its own GradualStyleBlock output.

    Args:
        n_styles: style vectors (18 for a 1024 generator).
        style_dim: style width (512).
        input_size: side of the input images (256).
        backbone: IR-SE shape (IR-SE50 with 3 input channels by default).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, input_size, input_size) in [-1, 1] -> codes (B, n_styles, style_dim), without latent_avg."""
        c3, p2, p1 = self._pyramid(x)
        return torch.stack([block(self._features_for(i, c3, p2, p1)) for i, block in enumerate(self.styles)], dim=1)


class Encoder4Editing(_PyramidEncoder):
    """e4e encoder: one base code w0 = styles[0](c3) for every layer, plus per-layer deltas.

    `progressive_stage` is the reference training switch (not in the state dict): deltas
    1 .. progressive_stage are added; it is `n_styles` (the reference `Inference` stage),
    i.e. all deltas.
    """

    def __init__(self, n_styles: int = 18, style_dim: int = 512, input_size: int = 256, backbone: BackboneConfig | None = None):
        super().__init__(n_styles, style_dim, input_size, backbone)
        self.progressive_stage = n_styles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, input_size, input_size) in [-1, 1] -> codes (B, n_styles, style_dim), without latent_avg."""
        c3, p2, p1 = self._pyramid(x)
        w = self.styles[0](c3).unsqueeze(1).repeat(1, self.n_styles, 1)
        for i in range(1, min(self.progressive_stage + 1, self.n_styles)):
            w[:, i] += self.styles[i](self._features_for(i, c3, p2, p1))
        return w


# ----------------------------------------------------------------------------
# ReStyle: every style from the final map, 6-channel input


class _FlatEncoder(_IRSEEncoder):
    def __init__(self, n_styles: int = 18, style_dim: int = 512, input_size: int = 256, backbone: BackboneConfig | None = None):
        super().__init__(n_styles, style_dim, input_size, backbone or BackboneConfig(in_nc=6))
        self.styles = self._make_styles()

    def _block_spatials(self) -> list[int]:
        return [self.input_size // self.backbone.downsampling] * self.n_styles

    def _c3(self, x: torch.Tensor) -> torch.Tensor:
        return self._stages(x)[-1]


class BackboneEncoder(_FlatEncoder):
    """ReStyle-pSp encoder: all GradualStyleBlocks read the final input/16 map; no latlayers.

    Args:
        n_styles: style vectors (18).
        style_dim: style width (512).
        input_size: side of the input images (256).
        backbone: IR-SE shape (IR-SE50 with 6 input channels by default).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 6, input_size, input_size): image and current reconstruction -> residual codes (B, n_styles, style_dim)."""
        c3 = self._c3(x)
        return torch.stack([block(c3) for block in self.styles], dim=1)


class ProgressiveBackboneEncoder(_FlatEncoder):
    """ReStyle-e4e encoder: styles[0](c3) repeated, plus deltas styles[i](c3) (stage `Inference`)."""

    def __init__(self, n_styles: int = 18, style_dim: int = 512, input_size: int = 256, backbone: BackboneConfig | None = None):
        super().__init__(n_styles, style_dim, input_size, backbone)
        self.progressive_stage = n_styles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 6, input_size, input_size): image and current reconstruction -> residual codes (B, n_styles, style_dim)."""
        c3 = self._c3(x)
        w = self.styles[0](c3).unsqueeze(1).repeat(1, self.n_styles, 1)
        for i in range(1, min(self.progressive_stage + 1, self.n_styles)):
            w[:, i] += self.styles[i](c3)
        return w


#: `opts["encoder_type"]` -> class. Key sets cannot tell pSp from e4e, nor the two ReStyles apart.
ENCODER_CLASSES: dict[str, type[_IRSEEncoder]] = {
    "GradualStyleEncoder": GradualStyleEncoder,
    "Encoder4Editing": Encoder4Editing,
    "BackboneEncoder": BackboneEncoder,
    "ProgressiveBackboneEncoder": ProgressiveBackboneEncoder,
}
