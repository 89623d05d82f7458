"""Reading and writing pSp / e4e / ReStyle checkpoints in the official layout (docs/inversion.md §6).

A file is `{"state_dict": {"encoder.<key>": ..., "decoder.<key>": ...}, "opts": {...},
"latent_avg": tensor}`; anything else at the top level (optimizer, global_step,
discriminator...) is ignored. The encoder class comes from `opts["encoder_type"]`, its
shape from the weights themselves (stage widths and unit counts from `body.*`, the
number of styles from `styles.N`, the input size from the number of convs in
`styles.0`), so few-channel test files load through the same path as the released
ones. Both halves load with `strict=True`; a mismatch is a `CheckpointError`, never a
silent partial load.

Input size: the released files are 256 px and the file does not say so; we read it off
the weights (`styles.0` has log2(input/16) convs) and, when `opts["ipl_input_size"]`
is present (written by `save_checkpoint`), check that it agrees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ipltool import checkpoints
from ipltool.atomic import atomic_torch_save
from ipltool.errors import CheckpointError, UsageError
from ipltool.models.encoders.irse import BackboneConfig
from ipltool.models.encoders.psp import ENCODER_CLASSES, n_styles_for
from ipltool.models.stylegan2 import Generator, build_from_state, config_from_state_dict

#: encoder_type -> the plugin that loads it (for error messages).
PLUGIN_FOR_TYPE = {
    "GradualStyleEncoder": "psp",
    "Encoder4Editing": "e4e",
    "BackboneEncoder": "restyle-psp",
    "ProgressiveBackboneEncoder": "restyle-e4e",
}
#: encoder_type -> input channels of its family.
INPUT_NC = {"GradualStyleEncoder": 3, "Encoder4Editing": 3, "BackboneEncoder": 6, "ProgressiveBackboneEncoder": 6}
#: e4e names the generator size `stylegan_size`, the others `output_size`.
SIZE_KEY = {"Encoder4Editing": "stylegan_size"}
DEFAULT_SIZE = 1024  # what pSp's inference assumes when an old file has no output_size
INPUT_SIZE_KEY = "ipl_input_size"


@dataclass
class EncoderCheckpoint:
    """The parts of a loaded checkpoint (all on CPU, encoder and decoder in eval mode).

    Attributes:
        path: the file.
        encoder_type: `opts["encoder_type"]`.
        encoder: the encoder module, weights loaded strictly.
        decoder: the generator the encoder was trained with, loaded strictly.
        latent_avg: (n_styles, style_dim), or None when the encoder's codes are absolute
            (pSp/e4e trained without `start_from_latent_avg`).
        input_size: side of the images the encoder takes (256 for released files).
        opts: the training options as stored.
    """

    path: Path
    encoder_type: str
    encoder: nn.Module
    decoder: Generator
    latent_avg: torch.Tensor | None
    input_size: int
    opts: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------
# Reading


def _supported() -> str:
    return ", ".join(f"{t} ({PLUGIN_FOR_TYPE[t]})" for t in ENCODER_CLASSES)


def _read(path: Path) -> dict:
    # Weights only, sizes bounded by the file, memory-mapped: the released files are 1.2 GB.
    ckpt = checkpoints.read(path, "encoder checkpoint")
    if not isinstance(ckpt.get("state_dict"), dict) or not isinstance(ckpt.get("opts"), dict):
        found = ", ".join(sorted(map(str, ckpt)))
        raise CheckpointError(
            f"{path} is not a pSp/e4e/ReStyle checkpoint: it needs 'state_dict' and 'opts' dicts (found: {found})"
        )
    return ckpt


def _split(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries whose key starts with `prefix + "."`, prefix stripped, floats as float32."""
    cut = len(prefix) + 1
    part = {k[cut:]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix + ".")}
    odd = [k for k, v in part.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(f"{prefix} entry {prefix}.{odd[0]} is a {type(part[odd[0]]).__name__}, not a tensor")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in part.items()}


def _indices(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    """Sorted distinct N of the keys `prefix.N.*`."""
    return sorted({int(k.split(".")[1]) for k in state if k.startswith(prefix + ".") and k.split(".")[1].isdigit()})


def _check_type(opts: dict, path: Path, expected: str | None) -> str:
    encoder_type = opts.get("encoder_type")
    if not isinstance(encoder_type, str):
        raise CheckpointError(f"{path}: opts has no encoder_type, so pSp cannot be told from e4e (supported: {_supported()})")
    if encoder_type.startswith("ResNet"):
        raise CheckpointError(
            f"{path}: {encoder_type} encoders (ResNet34 backbone, non-face domains) are not supported; supported: {_supported()}"
        )
    if encoder_type not in ENCODER_CLASSES:
        raise CheckpointError(f"{path}: unknown encoder_type {encoder_type!r}; supported: {_supported()}")
    if expected is not None and encoder_type != expected:
        raise CheckpointError(
            f"{path} holds a {encoder_type} ({PLUGIN_FOR_TYPE[encoder_type]}) encoder, not {expected} "
            f"({PLUGIN_FOR_TYPE.get(expected, '?')}): load it with encoder {PLUGIN_FOR_TYPE[encoder_type]!r}"
        )
    return encoder_type


def encoder_arch(state: dict[str, torch.Tensor], what: str = "encoder") -> dict[str, Any]:
    """Read an encoder's shape off its (prefix-stripped) state dict.

    Stages are runs of units with the same depth (`body.K.res_layer.1.weight` [depth, in, 3, 3]);
    the SE reduction comes from `body.0`, the style count from `styles.N`, the style width
    from `styles.0.linear`, the input size from the number of convs in `styles.0`
    (log2(input / 16)). The strict load afterwards checks everything else.

    Returns:
        dict with `backbone` (BackboneConfig), `n_styles`, `style_dim`, `input_size`.

    Raises:
        CheckpointError: a key the shape is read from is missing, or the layout is not IR-SE.
    """
    try:
        stem = state["input_layer.0.weight"]
        units = _indices(state, "body")
        if units != list(range(len(units))) or not units:
            raise CheckpointError(f"{what}: body units are not numbered 0..N-1 (found {units[:5]}...)")
        depths = [state[f"body.{i}.res_layer.1.weight"].shape[0] for i in units]
        widths, counts = [depths[0]], [1]
        for d in depths[1:]:
            if d == widths[-1]:
                counts[-1] += 1
            else:
                widths.append(d)
                counts.append(1)
        if len(widths) != 4:
            raise CheckpointError(f"{what}: expected an IR-SE backbone with 4 stages, found stage widths {widths}")
        reduction = depths[0] // max(state["body.0.res_layer.5.fc1.weight"].shape[0], 1)
        styles = _indices(state, "styles")
        if styles != list(range(len(styles))) or not styles:
            raise CheckpointError(f"{what}: style blocks are not numbered 0..N-1 (found {styles[:5]}...)")
        style_dim = state["styles.0.linear.weight"].shape[0]
        n_convs = len({k.split(".")[3] for k in state if k.startswith("styles.0.convs.")})
        backbone = BackboneConfig(in_nc=stem.shape[1], widths=tuple(widths), units=tuple(counts), se_reduction=max(reduction, 1))
    except KeyError as err:
        raise CheckpointError(f"{what}: not an IR-SE encoder state dict (no key {err})") from None
    except IndexError:  # a tensor of the wrong rank
        raise CheckpointError(f"{what}: not an IR-SE encoder state dict (a tensor of the wrong shape)") from None
    except UsageError as err:  # shapes no BackboneConfig accepts
        raise CheckpointError(f"{what}: {err.message}") from None
    return {
        "backbone": backbone,
        "n_styles": len(styles),
        "style_dim": style_dim,
        "input_size": backbone.downsampling * 2**n_convs,
    }


def _latent_avg(ckpt: dict, path: Path, n_styles: int, style_dim: int) -> torch.Tensor:
    avg = ckpt["latent_avg"]
    if not isinstance(avg, torch.Tensor):
        raise CheckpointError(f"{path}: latent_avg is a {type(avg).__name__}, not a tensor")
    avg = avg.detach().float()
    checkpoints.check_finite(avg, path, prefix="latent_avg")
    ok = (avg.ndim == 1 and avg.shape[0] == style_dim) or (avg.ndim == 2 and avg.shape[0] in (1, n_styles) and avg.shape[1] == style_dim)
    if not ok:
        raise CheckpointError(
            f"{path}: latent_avg has shape {list(avg.shape)}; expected [{style_dim}], [1, {style_dim}] or [{n_styles}, {style_dim}]"
        )
    return avg.reshape(-1, style_dim).expand(n_styles, style_dim).clone()


def read_checkpoint(path: str | Path, expected_type: str | None = None) -> EncoderCheckpoint:
    """Load an official (or `save_checkpoint`-written) pSp / e4e / ReStyle checkpoint on CPU.

    Steps:
    1. `torch.load(map_location="cpu", weights_only=True)`; extra top-level entries are ignored.
    2. Pick the class from `opts["encoder_type"]`; ResNet variants and unknown types are rejected,
       and so is a type other than `expected_type` (when given).
    3. Read the encoder's shape off its weights; check the style count against
       `opts["output_size"]` (`stylegan_size` for e4e; 1024 when absent, as pSp's inference
       assumes), the input channels against `opts["input_nc"]` and the family (3 or 6), and
       the input size against `opts["ipl_input_size"]` when present.
    4. Load the encoder (`encoder.*`) and the decoder (`decoder.*`, a rosinality Generator
       whose shape is read off its weights: 1024/512/8/cm2 for released files) strictly.
    5. `latent_avg` [D], [1, D] or [n_styles, D] -> (n_styles, D). It is kept when
       `opts["start_from_latent_avg"]` is true (when absent: when the file has one) and always
       for ReStyle, which starts from it; otherwise it is dropped, as the reference never adds it.

    Args:
        path: the `.pt` file.
        expected_type: the `encoder_type` the caller can handle, or None for any supported one.

    Returns:
        An `EncoderCheckpoint`; encoder and decoder in eval mode on CPU.

    Raises:
        CheckpointError: one line naming the file and what does not fit.
    """
    path = Path(path)
    ckpt = _read(path)
    opts = dict(ckpt["opts"])
    encoder_type = _check_type(opts, path, expected_type)
    if opts.get("learn_in_w"):
        raise CheckpointError(f"{path}: pSp trained with learn_in_w=True (one W code) is not supported; only W+ encoders are")
    state = ckpt["state_dict"]
    try:
        enc_state, dec_state = _split(state, "encoder"), _split(state, "decoder")
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err.message}") from None
    if not enc_state or not dec_state:
        raise CheckpointError(f"{path}: state_dict needs both 'encoder.*' and 'decoder.*' entries")
    checkpoints.check_finite(state, path, prefix="state_dict")

    arch = encoder_arch(enc_state, f"{path} (encoder)")
    n_styles, style_dim, input_size = arch["n_styles"], arch["style_dim"], arch["input_size"]
    size_key = SIZE_KEY.get(encoder_type, "output_size")
    size = opts.get(size_key, DEFAULT_SIZE)
    if not isinstance(size, int) or size < 4 or size & (size - 1):
        raise CheckpointError(f"{path}: opts[{size_key!r}] = {size!r} is not a power-of-two image size")
    if n_styles_for(size) != n_styles:
        raise CheckpointError(
            f"{path}: {size_key} {size} means {n_styles_for(size)} styles, but the encoder has {n_styles} style blocks"
        )
    family_nc = INPUT_NC[encoder_type]
    file_nc = arch["backbone"].in_nc
    opts_nc = opts.get("input_nc", file_nc)
    if opts_nc != family_nc or file_nc != family_nc:
        raise CheckpointError(
            f"{path}: {encoder_type} takes {family_nc} input channels, but opts input_nc is {opts_nc!r} "
            f"and input_layer.0.weight has {file_nc}"
        )
    if INPUT_SIZE_KEY in opts and opts[INPUT_SIZE_KEY] != input_size:
        raise CheckpointError(f"{path}: opts {INPUT_SIZE_KEY} is {opts[INPUT_SIZE_KEY]!r}, but the style blocks fit {input_size} px input")

    try:
        with torch.device("meta"):
            encoder = ENCODER_CLASSES[encoder_type](n_styles, style_dim, input_size, arch["backbone"])
    except UsageError as err:  # e.g. style blocks too short for any input size
        raise CheckpointError(f"{path} (encoder): {err.message}") from None
    # assign=True: the module was built on the meta device, so the file's tensors become
    # the parameters without a second 1 GB copy or a random init.
    checkpoints.load_strict(encoder, enc_state, f"{path} (encoder)", type(encoder).__name__, assign=True)

    try:
        config = config_from_state_dict(dec_state)
    except (CheckpointError, UsageError) as err:
        raise CheckpointError(f"{path} (decoder): {err.message}") from None
    if config.size != size or config.style_dim != style_dim:
        raise CheckpointError(
            f"{path}: the decoder is {config.size} px with {config.style_dim}-wide styles, "
            f"but opts and the encoder say {size} px and {style_dim}"
        )
    decoder = build_from_state(config, dec_state, f"{path} (decoder)")

    use_avg = bool(opts.get("start_from_latent_avg", "latent_avg" in ckpt)) or INPUT_NC[encoder_type] == 6
    latent_avg = None
    if use_avg:
        if ckpt.get("latent_avg") is None:
            why = "ReStyle starts from it" if family_nc == 6 else "opts start_from_latent_avg is true"
            raise CheckpointError(f"{path} has no latent_avg, but {why}")
        latent_avg = _latent_avg(ckpt, path, n_styles, style_dim)
    return EncoderCheckpoint(path, encoder_type, encoder.eval(), decoder.eval(), latent_avg, input_size, opts)


# ----------------------------------------------------------------------------
# Writing


def save_checkpoint(
    path: str | Path,
    encoder: nn.Module,
    decoder: Generator,
    opts: dict[str, Any] | None = None,
    latent_avg: torch.Tensor | None = None,
) -> None:
    """Write `encoder` and `decoder` in the official layout (atomically).

    The file is `{"state_dict": {"encoder.*", "decoder.*"}, "opts": ..., "latent_avg": ...}`.
    `opts` starts from what the modules say (`encoder_type` = the class name, `input_nc`,
    `output_size` or, for e4e, `stylegan_size`, `start_from_latent_avg` = whether
    `latent_avg` is given, and `ipl_input_size`, which the reference files lack) and the
    caller's `opts` override any of it (tests use that to write broken files).

    Args:
        path: output `.pt` file; its directory must exist.
        encoder: one of the four encoder modules.
        decoder: its generator.
        opts: extra or overriding training options.
        latent_avg: (style_dim,), (1, style_dim) or (n_styles, style_dim); omitted from the file when None.
    """
    encoder_type = type(encoder).__name__
    base: dict[str, Any] = {
        "encoder_type": encoder_type,
        "input_nc": getattr(encoder, "in_nc", 3),
        SIZE_KEY.get(encoder_type, "output_size"): decoder.size,
        "start_from_latent_avg": latent_avg is not None,
        INPUT_SIZE_KEY: getattr(encoder, "input_size", 256),
    }
    state = {f"encoder.{k}": v.detach().cpu() for k, v in encoder.state_dict().items()}
    state.update({f"decoder.{k}": v.detach().cpu() for k, v in decoder.state_dict().items()})
    ckpt: dict[str, Any] = {"state_dict": state, "opts": {**base, **(opts or {})}}
    if latent_avg is not None:
        ckpt["latent_avg"] = latent_avg.detach().cpu().clone()
    atomic_torch_save(ckpt, path)

