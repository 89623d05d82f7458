"""Latent mappers of IPL: w (B, latent_dim) -> prompt vectors P (B, n_ctx, dim).

Both built-in mappers register through the `ipltool.mappers` entry-point group, like
third-party ones. A factory is called as `factory(n_ctx, dim, latent_dim=512, **options)`
and returns a module with `kind` (its registered name) and `init_args` (the keyword
arguments that rebuild it), so a checkpoint can store both and `adapt` needs no flags.

`mapper_checkpoint` writes that checkpoint (`mapper.pt`); `load_mapper` reads it back, and
also reads the IPL authors' mapper files and bare mlp / transformer-v2 state dicts.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ipltool.errors import CheckpointError, UsageError
from ipltool.models.layers import EqualLinear, PixelNorm

if TYPE_CHECKING:
    from ipltool.domain import Domain

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


# ----------------------------------------------------------------------------
# Checkpoints: ipltool's mapper.pt, the authors' mapper files, bare state dicts

#: What `load_mapper` reads, as its refusals list them.
MAPPER_FORMATS = (
    "ipltool's mapper.pt (kind, init_args, state_dict)",
    "the IPL authors' mapper.pt ({'m': SingleMapper state dict, 'm_optim': ...})",
    "a bare mlp or transformer-v2 state dict",
)

#: Key of each layout's first layer (gives latent_dim) and last layer (gives n_ctx * dim).
_LAYOUT_LAYERS = {"mlp": ("mapping.1.weight", "mapping.4.weight"), "transformer-v2": ("mapping.1.weight", "mapping.2.weight")}


def mapper_checkpoint(mapper: torch.nn.Module, domain: Domain, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """What `mapper.pt` holds: the plugin name and constructor arguments, weights, and context."""
    from ipltool import __version__

    return {
        "kind": getattr(mapper, "kind", domain.mapper.kind),
        "init_args": dict(getattr(mapper, "init_args", {})),
        "state_dict": mapper.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "ctx_init": domain.ctx_init,
        "source": domain.source,
        "target": domain.target,
        "clip": domain.clip[0].model,
        "ipltool_version": __version__,
    }


def _layout(state: dict[str, torch.Tensor]) -> str | None:
    """The mapper kind whose parameter names `state` uses ('mlp', 'transformer-v2'), else None."""
    if any(key.startswith("encoder.") for key in state):
        return "transformer-v2"
    if "mapping.4.weight" in state:
        return "mlp"
    return None


def _unwrap(state: dict[str, torch.Tensor]) -> tuple[str | None, dict[str, torch.Tensor]]:
    """`(kind, state)` of a bare state dict, its 'mapping.' prefix (the authors' `SingleMapper`) stripped."""
    if state and all(key.startswith("mapping.") for key in state):
        inner = {key[len("mapping."):]: value for key, value in state.items()}
        kind = _layout(inner)
        if kind is not None:
            return kind, inner
    return _layout(state), state


def _split_outputs(out: int, n_ctx: int | None, dim: int | None, path: str | os.PathLike) -> tuple[int, int]:
    """`(n_ctx, dim)` of a last layer with `out = n_ctx * dim` outputs, split by what the caller expects.

    Raises:
        CheckpointError: `out` does not split by `dim` (or `n_ctx`), the split gives
            another n_ctx than the caller's, or neither was given.
    """
    train = "or train one for this domain: ipl train-mapper --domain DOMAIN"
    if dim is not None:
        if out % dim:
            raise CheckpointError(
                f"{path}: its last layer has {out} outputs, not a multiple of this run's prompt width {dim} (the CLIP text width)",
                hint=f"the mapper was trained for another CLIP model; use the model it was trained with, {train}",
            )
        if n_ctx is not None and out // dim != n_ctx:
            raise CheckpointError(
                f"{path} maps to {out // dim} context vectors of width {dim}; this run's ctx_init has n_ctx {n_ctx} (BPE tokens)",
                hint=f"the authors' n_ctx counts the words of ctx_init, ipltool its BPE tokens: set ctx_init to the phrase the mapper was trained with (e.g. --set 'ctx_init=\"a photo of a\"'), {train}",
            )
        return out // dim, dim
    if n_ctx is not None:
        if out % n_ctx:
            raise CheckpointError(
                f"{path}: its last layer has {out} outputs, not a multiple of this run's n_ctx {n_ctx}",
                hint=f"set ctx_init to the phrase the mapper was trained with (e.g. --set 'ctx_init=\"a photo of a\"'), {train}",
            )
        return n_ctx, out // n_ctx
    raise CheckpointError(
        f"{path}: its last layer has {out} outputs (n_ctx x dim), which a file without init_args cannot split",
        hint="pass dim (the prompt encoder's dim, the CLIP text width: 512 for ViT-B/32) or n_ctx to load_mapper",
    )


def _foreign_args(
    state: dict[str, torch.Tensor], kind: str, n_ctx: int | None, dim: int | None, path: str | os.PathLike
) -> tuple[int, int, int, dict]:
    """`(n_ctx, dim, latent_dim, options)` of a state dict without init_args, read from its shapes.

    Raises:
        CheckpointError: a layer is missing or not a matrix, the sizes do not split or
            lie outside `checkpoints.MAPPER_LIMITS`, or no nhead fits (transformer-v2).
    """
    from ipltool import checkpoints

    shapes = []
    for key in _LAYOUT_LAYERS[kind]:
        weight = state.get(key)
        if weight is None or weight.ndim != 2:
            found = "missing" if weight is None else f"of shape {list(weight.shape)}"
            raise CheckpointError(f"{path} does not fit a {kind!r} mapper: {key} is {found}, not an (out, in) matrix")
        shapes.append(tuple(weight.shape))
    latent_dim = shapes[0][1]
    n_ctx, dim = _split_outputs(shapes[1][0], n_ctx, dim, path)
    for key, value in (("n_ctx", n_ctx), ("dim", dim), ("latent_dim", latent_dim)):
        low, high = checkpoints.MAPPER_LIMITS[key]
        checkpoints.check_number(str(path), f"inferred {key}", value, int, low, high)
    options: dict[str, Any] = {}
    if kind == TransformerMapperV2.kind:
        nhead = 4  # the class default: a state dict does not record it
        if latent_dim % nhead:
            raise CheckpointError(
                f"{path}: a transformer-v2 state dict of latent_dim {latent_dim} needs the nhead it was trained with, "
                f"which a bare state dict does not store (the default {nhead} does not divide {latent_dim})",
                hint="save it as an ipltool mapper.pt with its init_args (see mapper_checkpoint)",
            )
    return n_ctx, dim, latent_dim, options


def load_mapper(
    path: str | os.PathLike, device: torch.device | str = "cpu", *, n_ctx: int | None = None, dim: int | None = None
) -> tuple[nn.Module, dict]:
    """Rebuild a mapper from a file without flags: ipltool's `mapper.pt`, the authors', or a bare state dict.

    The formats (`MAPPER_FORMATS`):

    1. ipltool's `mapper.pt` (`mapper_checkpoint`): the kind and constructor arguments are
       stored in it; `n_ctx` and `dim` are not used (callers compare `init_args`).
    2. The IPL authors' `mapper.pt`, `{"m": SingleMapper.state_dict(), "m_optim": ...}`
       (`m_optim` is not read, and may be absent): keys `mapping.mapping.{1..4}.weight/bias`,
       their `Mapper` (PixelNorm, 4 EqualLinear), which is the `mlp` mapper. latent_dim is
       the first layer's input width; the last layer's outputs are n_ctx * dim, split by
       the caller's `dim` (or `n_ctx`). The authors count n_ctx as the words of ctx_init,
       ipltool as its BPE tokens (`PromptEncoder`), so a file whose n_ctx is not the run's
       is refused.
    3. A bare state dict (at the top level or under "m", with or without the `mapping.`
       prefix of `SingleMapper`): `mapping.{1..4}.*` is an `mlp` mapper, `encoder.layers.*`
       plus `mapping.{1,2}.*` a `transformer-v2` one, sized as in 2. Shapes do not tell
       transformer-v2's `nhead` nor `per_sample`: the class defaults are used (nhead 4,
       per_sample False as in the thesis). The parameter shapes are the same for every
       nhead, so a file trained with another one loads but computes other outputs; store
       such a mapper as an ipltool `mapper.pt`, whose init_args keep nhead.

    Everything is checked before the mapper is built: the file is read weights-only
    (`checkpoints.read`), `kind` must be a name, the sizes within
    `checkpoints.MAPPER_LIMITS` and the options of plain types, the weights finite, and their
    keys and shapes those of the mapper the sizes build on the meta device (no memory), so
    a file cannot make a mapper larger than itself.

    Args:
        path: the file.
        device: where the mapper goes.
        n_ctx: the run's number of context vectors (`PromptEncoder.n_ctx`; optional).
        dim: the run's prompt width (`PromptEncoder.dim`, CLIP's text width; optional).

    Returns:
        (mapper in eval mode, the checkpoint dict). The dict has `format`: "ipltool",
        "ipl-official" (an `mlp` file without init_args) or "state-dict" (a bare
        transformer-v2); the last two have `kind`, `init_args` and `state_dict` filled in
        and None for `ctx_init`, `source`, `target`, `clip` and `optimizer`.

    Raises:
        CheckpointError: unreadable or unsafe file, an unknown layout, bad kind or
            arguments, sizes that do not split by `dim`/`n_ctx`, non-finite weights, or
            weights that do not fit the stored (or inferred) arguments.
    """
    from ipltool import checkpoints, registry
    from ipltool.errors import UnknownNameError

    ckpt = checkpoints.read(path, "mapper checkpoint", mmap=False)
    if "kind" in ckpt:
        kind = ckpt.get("kind")
        if not isinstance(kind, str) or not kind:
            raise CheckpointError(f"{path}: not a mapper checkpoint (its 'kind' is {kind!r:.40}, not a mapper name)")
        n_ctx, dim, latent_dim, options = checkpoints.mapper_args(ckpt.get("init_args"), path)
        state = checkpoints.tensor_dict(ckpt.get("state_dict"), path, "mapper state dict")
        checkpoints.check_finite(state, path, prefix="state_dict")
        source = "its init_args"
        ckpt = {**ckpt, "format": "ipltool"}
    else:
        if "m" in ckpt:
            state = checkpoints.tensor_dict(ckpt["m"], path, "mapper state dict ('m')")
            checkpoints.check_finite(state, path, prefix="m")
        elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            state = checkpoints.tensor_dict(ckpt, path, "mapper state dict")
            checkpoints.check_finite(state, path)
        else:
            state = {}
        kind, state = _unwrap(state)
        if kind is None:
            shown = ", ".join(f"{key!s:.40}" for key in list(ckpt)[:4]) or "nothing"
            raise CheckpointError(
                f"{path} is not a mapper file ipltool reads (it holds {shown}); accepted: {'; '.join(MAPPER_FORMATS)}"
            )
        n_ctx, dim, latent_dim, options = _foreign_args(state, kind, n_ctx, dim, path)
        source = "its inferred sizes"

    def build() -> torch.nn.Module:
        try:
            return registry.build_mapper(kind, n_ctx, dim, latent_dim, **options)
        except UnknownNameError as err:
            raise CheckpointError(f"{path} holds a mapper of unknown kind: {err.message}", hint=err.hint) from None
        except (UsageError, TypeError, ValueError) as err:  # options the factory refuses
            message = err.message if isinstance(err, UsageError) else checkpoints.first_line(err)
            raise CheckpointError(f"{path}: {source} do not build a {kind!r} mapper ({message})") from None

    expected = checkpoints.meta_state(build)
    if expected is not None:  # None: a plugin that cannot be built on the meta device
        checkpoints.check_shapes(state, expected, path, f"a {kind!r} mapper")
    mapper = build()
    try:
        mapper.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit a {kind!r} mapper: {checkpoints.first_line(err)}") from None
    if ckpt.get("format") != "ipltool":
        ckpt = {
            "format": "ipl-official" if kind == MLPMapper.kind else "state-dict",
            "kind": kind,
            "init_args": dict(mapper.init_args),
            "state_dict": state,
            "optimizer": None,
            "ctx_init": None,
            "source": None,
            "target": None,
            "clip": None,
        }
    return mapper.to(device).eval(), ckpt
