"""A linear prompt mapper: PixelNorm, then one equalized linear layer.

Smaller and faster than the built-in `mlp`; shows the mapper factory contract:
`factory(n_ctx, dim, latent_dim, **options) -> nn.Module` mapping (B, latent_dim)
to (B, n_ctx, dim).
"""

from __future__ import annotations

import torch
from torch import nn

from ipltool.models.layers import EqualLinear, PixelNorm


class LinearMapper(nn.Module):
    """w (B, latent_dim) -> prompt context vectors (B, n_ctx, dim)."""

    kind = "linear"

    def __init__(self, n_ctx: int, dim: int, latent_dim: int = 512, lr_mul: float = 0.01):
        super().__init__()
        self.n_ctx, self.dim = n_ctx, dim
        self.init_args = {"n_ctx": n_ctx, "dim": dim, "latent_dim": latent_dim, "lr_mul": lr_mul}
        self.net = nn.Sequential(PixelNorm(), EqualLinear(latent_dim, n_ctx * dim, lr_mul=lr_mul))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.net(w).view(w.shape[0], self.n_ctx, self.dim)


def build_linear_mapper(n_ctx: int, dim: int, latent_dim: int = 512, **options) -> LinearMapper:
    """Entry point of the `linear` mapper; accepts the option `lr_mul` (default 0.01)."""
    unknown = set(options) - {"lr_mul"}
    if unknown:
        raise ValueError(f"linear mapper: unknown option(s) {sorted(unknown)}; it takes lr_mul")
    return LinearMapper(n_ctx, dim, latent_dim, **options)
