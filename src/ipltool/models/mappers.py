"""Latent mappers of IPL: w (B, latent_dim) -> prompt vectors P (B, n_ctx, dim).

Both built-in mappers register through the `ipltool.mappers` entry-point group, like
third-party ones. A factory is called as `factory(n_ctx, dim, latent_dim=512, **options)`
and returns a module with `kind` (its registered name) and `init_args` (the keyword
arguments that rebuild it), so a checkpoint can store both and `adapt` needs no flags.
"""

from __future__ import annotations

import torch
from torch import nn

from ipltool.errors import UsageError
from ipltool.models.layers import EqualLinear, PixelNorm

LR_MUL = 0.01


def _check_sizes(kind: str, n_ctx: int, dim: int, latent_dim: int) -> None:
    for label, value in (("n_ctx", n_ctx), ("dim", dim), ("latent_dim", latent_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"mapper {kind!r}: {label} must be a positive integer, got {value!r}")


def _reject_unknown(kind: str, options: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise UsageError(
            f"mapper {kind!r} got unknown option(s): {', '.join(unknown)}",
            hint=f"options accepted by {kind!r}: {accepted}",
        )


# ----------------------------------------------------------------------------
# mlp: the reference mapper


class MLPMapper(nn.Module):
    """The reference IPL mapper: PixelNorm, 3 hidden EqualLinear layers, one output layer.

    Every EqualLinear has lr_mul 0.01 and the fused leaky ReLU (x + b, slope 0.2, gain
    sqrt 2). **Quirk** of the reference: the output layer is activated too. The
    layers sit in `mapping` (keys `mapping.1.weight` ... `mapping.4.bias`), the layout
    of the reference `Mapper`.

    Args:
        n_ctx: number of context vectors per sample.
        dim: width of each vector (CLIP text width d).
        latent_dim: size of w (512).
    """

    kind = "mlp"

    def __init__(self, n_ctx: int, dim: int, latent_dim: int = 512):
        super().__init__()
        _check_sizes(self.kind, n_ctx, dim, latent_dim)
        self.n_ctx, self.dim, self.latent_dim = n_ctx, dim, latent_dim
        self.init_args = {"n_ctx": n_ctx, "dim": dim, "latent_dim": latent_dim}
        layers: list[nn.Module] = [PixelNorm()]
        for _ in range(3):
            layers.append(EqualLinear(latent_dim, latent_dim, lr_mul=LR_MUL, activation="fused_lrelu"))
        layers.append(EqualLinear(latent_dim, n_ctx * dim, lr_mul=LR_MUL, activation="fused_lrelu"))
        self.mapping = nn.Sequential(*layers)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Map latents to prompt vectors.

        Args:
            w: (B, latent_dim) latents.

        Returns:
            (B, n_ctx, dim) prompt vectors.
        """
        return self.mapping(w).reshape(w.shape[0], self.n_ctx, self.dim)

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim} -> ({self.n_ctx}, {self.dim})"


def build_mlp_mapper(n_ctx: int, dim: int, latent_dim: int = 512, **options) -> MLPMapper:
    """Factory of the `mlp` mapper (entry point `ipltool.mappers:mlp`); it takes no options.

    Args:
        n_ctx: number of context vectors per sample.
        dim: width of each vector.
        latent_dim: size of w (512).
        **options: must be empty.

    Returns:
        An `MLPMapper` mapping (B, latent_dim) to (B, n_ctx, dim).

    Raises:
        UsageError: an option was given, or a size is not a positive integer.
    """
    _reject_unknown(MLPMapper.kind, options, ())
    return MLPMapper(n_ctx, dim, latent_dim)


# ----------------------------------------------------------------------------
# transformer-v2: the thesis mapper


class TransformerMapperV2(nn.Module):
    """The thesis mapper: a 2-layer transformer encoder on w, then PixelNorm and two EqualLinear.

    Encoder layers: d_model latent_dim, `nhead` heads, feed-forward 1024, dropout 0.1,
    post-norm, ReLU. Head: PixelNorm, EqualLinear(latent_dim -> latent_dim) and
    EqualLinear(latent_dim -> n_ctx * dim), both lr_mul 0.01 with the fused leaky ReLU.
    No PixelNorm at the input.

    **Quirk** of the thesis code, kept as the default (`per_sample=False`): the encoder
    gets the 2-D (B, latent_dim) batch as ONE unbatched sequence of length B, so
    attention mixes the samples of a batch and a sample's output depends on its
    batch-mates. `per_sample=True` makes each w its own length-1 sequence. Both modes
    have the same parameters, so a checkpoint loads in either.

    Args:
        n_ctx: number of context vectors per sample.
        dim: width of each vector.
        latent_dim: size of w (512); must be divisible by `nhead`.
        nhead: attention heads (4; the thesis code's 3 cannot divide 512).
        per_sample: attend within each sample only, instead of across the batch.
    """

    kind = "transformer-v2"

    def __init__(self, n_ctx: int, dim: int, latent_dim: int = 512, nhead: int = 4, per_sample: bool = False):
        super().__init__()
        _check_sizes(self.kind, n_ctx, dim, latent_dim)
        if isinstance(nhead, bool) or not isinstance(nhead, int) or nhead < 1:
            raise UsageError(f"mapper {self.kind!r}: nhead must be a positive integer, got {nhead!r}")
        if latent_dim % nhead:
            raise UsageError(
                f"mapper {self.kind!r}: latent_dim {latent_dim} is not divisible by nhead {nhead}",
                hint="pick nhead among the divisors of latent_dim (4 for 512)",
            )
        if not isinstance(per_sample, bool):
            raise UsageError(f"mapper {self.kind!r}: per_sample must be true or false, got {per_sample!r}")
        self.n_ctx, self.dim, self.latent_dim = n_ctx, dim, latent_dim
        self.nhead, self.per_sample = nhead, per_sample
        self.init_args = {
            "n_ctx": n_ctx,
            "dim": dim,
            "latent_dim": latent_dim,
            "nhead": nhead,
            "per_sample": per_sample,
        }
        layer = nn.TransformerEncoderLayer(d_model=latent_dim, nhead=nhead, dim_feedforward=1024, dropout=0.1)
        # Nested tensors only change speed, and warn with batch_first=False.
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.mapping = nn.Sequential(
            PixelNorm(),
            EqualLinear(latent_dim, latent_dim, lr_mul=LR_MUL, activation="fused_lrelu"),
            EqualLinear(latent_dim, n_ctx * dim, lr_mul=LR_MUL, activation="fused_lrelu"),
        )

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """Map latents to prompt vectors.

        Args:
            w: (B, latent_dim) latents.

        Returns:
            (B, n_ctx, dim) prompt vectors.
        """
        if self.per_sample:
            # (seq 1, batch B, E) with the encoder's batch_first=False layout.
            x = self.encoder(w.unsqueeze(0)).squeeze(0)
        else:
            x = self.encoder(w)  # 2-D input: one sequence of the B samples
        return self.mapping(x).reshape(w.shape[0], self.n_ctx, self.dim)

    def extra_repr(self) -> str:
        mode = "per_sample" if self.per_sample else "across_batch"
        return f"latent_dim={self.latent_dim} -> ({self.n_ctx}, {self.dim}), nhead={self.nhead}, {mode}"


def build_transformer_v2_mapper(n_ctx: int, dim: int, latent_dim: int = 512, **options) -> TransformerMapperV2:
    """Factory of the `transformer-v2` mapper (entry point `ipltool.mappers:transformer-v2`).

    Args:
        n_ctx: number of context vectors per sample.
        dim: width of each vector.
        latent_dim: size of w (512).
        **options: `nhead` (int, default 4) and `per_sample` (bool, default False).

    Returns:
        A `TransformerMapperV2` mapping (B, latent_dim) to (B, n_ctx, dim).

    Raises:
        UsageError: an unknown or invalid option, or latent_dim not divisible by nhead.
    """
    _reject_unknown(TransformerMapperV2.kind, options, ("nhead", "per_sample"))
    return TransformerMapperV2(n_ctx, dim, latent_dim, **options)
