"""CLIP for IPL: a frozen open_clip model, differentiable preprocessing, and the learned-prompt encoder.

`load_clip` builds a `Clip` from an open_clip architecture name plus a weights source
(an open_clip tag, a local file, or nothing for a seeded random init). `Clip` turns
generator images in [-1, 1] into CLIP features without PIL, and `PromptEncoder` runs
CLIP's text tower with learned context vectors in place of the context tokens
(docs/method.md §0).
"""

from __future__ import annotations

import difflib
import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from ipltool import checkpoints, hub
from ipltool.errors import CheckpointError, IplError, UnknownNameError, UsageError, did_you_mean, first_line

if TYPE_CHECKING:
    from ipltool.domain import Domain

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TINY_MODEL = "ipl-tiny-clip"
_TINY_CONFIG = Path(__file__).resolve().parents[1] / "data" / f"{TINY_MODEL}.json"
_TINY_ALIASES = ("tiny", "ipl-tiny", TINY_MODEL)
_OPENAI_INT_KEYS = ("input_resolution", "context_length", "vocab_size")
_SCHEMAS = ("hf-hub:", "local-dir:")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")
# `ipl fetch` names of the weights IPL uses; other models get the generic hint.


# ----------------------------------------------------------------------------
# Names and loading


def normalize_model_name(name: str) -> str:
    """Turn a CLIP architecture name into open_clip's spelling.

    Args:
        name: an open_clip name ("ViT-B-32"), an OpenAI one ("ViT-B/32"), or "tiny" /
            "ipl-tiny" for the small random test model.

    Returns:
        The open_clip config name ("ViT-B-32", or `TINY_MODEL`).
    """
    name = name.strip()
    if name.lower() in _TINY_ALIASES:
        return TINY_MODEL
    if name.startswith(_SCHEMAS):
        return name  # "hf-hub:org/repo" keeps its slash
    return name.replace("/", "-")


def _register_tiny_config() -> None:
    import open_clip

    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(_TINY_CONFIG)


def _fetch_hint(name: str) -> str:
    entry = hub.clip_entry(name, "openai")
    if entry is None:
        return "pass a local weights file (`ipl fetch --list` shows the weights it can download)"
    return f"run `ipl fetch {entry.name}` or pass a local weights file"


def domain_models(domain: Domain) -> list[str]:
    """Registry names of every file a domain needs: its generator (unless synthetic or a path) and CLIP models."""
    names = []
    if any(entry.name == domain.generator and not entry.synthetic for entry in hub.list_models()):
        names.append(domain.generator)
    for spec in domain.clip:
        entry = hub.clip_entry(normalize_model_name(spec.model), spec.pretrained)
        if entry is not None and entry.name not in names:
            names.append(entry.name)
    return names


def _looks_like_path(pretrained: str) -> bool:
    if os.sep in pretrained or "/" in pretrained or pretrained.endswith(_WEIGHT_SUFFIXES):
        return True
    return os.path.exists(pretrained)


def _is_openai_file(path: Path) -> bool:
    """True for OpenAI's own formats: a TorchScript archive, or a state dict with its int entries."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return True
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return False  # safetensors, numpy, ...: open_clip's own loader decides
    if not isinstance(state, dict):
        return False

    def is_int(value) -> bool:
        return isinstance(value, int) or (torch.is_tensor(value) and value.ndim == 0 and not value.is_floating_point())

    return all(is_int(state.get(key)) for key in _OPENAI_INT_KEYS)


def _check_known_model(name: str, given: str | None = None) -> None:
    import open_clip

    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5)
        choices = ", ".join(close or ["ViT-B-32", "ViT-B-16", "ViT-L-14"])
        given = name if given is None else given
        raise UnknownNameError(
            f"unknown CLIP architecture {given!r}{did_you_mean(name, known)}",
            hint=f"try one of: {choices}, or `tiny` (open_clip.list_models() lists all; OpenAI spellings such as ViT-B/32 work too)",
        )


def check_model_name(model: str, pretrained: str | None = None) -> str:
    """Check a CLIP architecture name (and weights tag) without building anything; return open_clip's spelling.

    Accepted: the names of `open_clip.list_models()`, their OpenAI spellings (`ViT-B/32`),
    `tiny`, and `hf-hub:...`/`local-dir:...` (whose configs open_clip reads when loading);
    `pretrained` may be None, a file (checked when loaded) or a tag open_clip knows for it.
    Training and `ipl eval` call it for every requested model with and without `--smoke`
    (which swaps the models for the tiny one), so a typo fails the same way in both.

    Raises:
        UsageError: an empty name.
        UnknownNameError: an unknown name or tag; the message names the closest known one.
    """
    name = normalize_model_name(model)
    if not name or name in _SCHEMAS:
        raise UsageError(f"empty CLIP model name (got {model!r})", hint="e.g. ViT-B/32 (open_clip.list_models() lists all)")
    if name == TINY_MODEL or name.startswith(_SCHEMAS):
        return name
    _check_known_model(name, given=model)
    if pretrained and not _looks_like_path(pretrained):
        _check_tag(name, pretrained)
    return name


def _check_tag(name: str, pretrained: str) -> dict:
    """open_clip's config of weights tag `pretrained` of architecture `name`, or UnknownNameError."""
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise UnknownNameError(
            f"unknown CLIP weights {pretrained!r} for {name} (neither a known tag nor a file){did_you_mean(pretrained, tags)}",
            hint=f"tags for {name}: {', '.join(tags)}" if tags else _fetch_hint(name),
        )
    return tag_cfg


def _load_model(name: str, pretrained: str | None, seed: int) -> torch.nn.Module:
    import open_clip

    if name.startswith(_SCHEMAS):
        # open_clip reads config and weights from the hub or the folder; `pretrained` does not apply.
        if pretrained is not None:
            raise UsageError(f"{name} brings its own weights; do not pass pretrained={pretrained!r}")
        try:
            return open_clip.create_model(name, device="cpu")
        except Exception as exc:
            raise IplError(f"cannot load CLIP {name}: {first_line(exc)}", hint=_fetch_hint(name)) from exc

    if pretrained is None:
        _check_known_model(name)
        # Seeded init that leaves the caller's RNG untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # open_clip warns on the root logger that the init is random, which is the point here.
            logging.disable(logging.WARNING)
            try:
                return open_clip.create_model(name, pretrained=None, device="cpu")
            finally:
                logging.disable(logging.NOTSET)

    if _looks_like_path(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise UsageError(f"CLIP weights file not found: {path}", hint=_fetch_hint(name))
        # Empty files and zip bombs are refused before torch or open_clip opens the file
        # (both read it with weights_only=True or as TorchScript, never as a plain pickle).
        checkpoints.check_file(path, "CLIP weights file")
        try:
            if _is_openai_file(path):
                # open_clip's create_model(pretrained=FILE) rejects OpenAI files; the
                # architecture is read from the file itself.
                with warnings.catch_warnings():
                    # open_clip tries torch.jit.load first, which newer torch flags as deprecated.
                    warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=FutureWarning)
                    return open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
            _check_known_model(name)
            return open_clip.create_model(name, pretrained=str(path), device="cpu")
        except IplError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"cannot load CLIP weights {path} into {name}: {first_line(exc)}",
                hint=f"check that the file holds weights of the {name} architecture",
            ) from exc

    _check_known_model(name)
    tag_cfg = _check_tag(name, pretrained)
    if hub.offline():
        raise UsageError(
            f"CLIP weights {name}/{pretrained} would be downloaded by open_clip, and downloads are off",
            hint="pass a local weights file as `pretrained`, or drop --offline / IPL_OFFLINE",
        )
    # OpenAI-trained weights use QuickGELU; the plain config (e.g. ViT-B-32) does not say so.
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    try:
        return open_clip.create_model(name, pretrained=pretrained, device="cpu", force_quick_gelu=quick_gelu)
    except Exception as exc:
        message = f"cannot get CLIP weights {name}/{pretrained}: {first_line(exc)}"
        raise IplError(message, hint=_fetch_hint(name)) from exc


def load_clip(model: str, pretrained: str | None = None, device: str | torch.device = "cpu", seed: int = 0) -> Clip:
    """Build a frozen fp32 CLIP model.

    Args:
        model: architecture name (see `normalize_model_name`); "tiny" is a small random
            model (embed_dim 32, 32x32 images) for tests; "hf-hub:..." and "local-dir:..."
            names are passed to open_clip, which loads their own weights.
        pretrained: None for a random init seeded with `seed`; an open_clip tag such as
            "openai" (downloads through open_clip); or a local file, either OpenAI's
            format (TorchScript archive, or a state dict with the int entries
            `input_resolution`/`context_length`/`vocab_size`, whose architecture is read
            from the file; open_clip rounds its matrices through fp16 on the way, which
            loses nothing for OpenAI's own fp16 weights) or an open_clip checkpoint for `model`
            (name the "-quickgelu" variant for weights trained with QuickGELU).
        device: where the model lives.
        seed: seed of the random init (ignored when weights are loaded). The global RNG
            is left as it was.

    Returns:
        A `Clip` in eval mode whose parameters do not require grad (gradients still
        flow to images and prompts).

    Raises:
        UnknownNameError: unknown architecture or tag.
        UsageError: the weights file does not exist.
        CheckpointError: the file cannot be loaded into the architecture.
        IplError: open_clip could not get the weights of a tag (no network, ...).
    """
    name = normalize_model_name(model)
    if name == TINY_MODEL:
        _register_tiny_config()
    entry = hub.clip_entry(name, pretrained)
    if entry is not None:  # OpenAI's weights come from our cache (fetched on first use), never a surprise download
        pretrained = str(hub.ensure(entry.name))
    net = _load_model(name, pretrained, seed)
    net = net.to(device).float().eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return Clip(net, name)


# ----------------------------------------------------------------------------
# The wrapper


class Clip:
    """A frozen open_clip model with differentiable preprocessing for generator output.

    Attributes:
        model: the open_clip model (`open_clip.CLIP` or `CustomTextCLIP`).
        tokenizer: its open_clip tokenizer.
        name: architecture name in open_clip's spelling.
        image_size: CLIP input resolution S (224 for ViT-B/32).
        logit_scale: `exp(model.logit_scale)` as a float (100 for OpenAI weights).
        text_width: width d of the token embeddings (512 for ViT-B/32), None when the
            text tower has no token-embedding table (Hugging Face towers).
        embed_dim: size of the joint image-text feature space.

    Args:
        model: an open_clip model, already frozen and on its device.
        name: its architecture name.
    """

    def __init__(self, model: torch.nn.Module, name: str):
        import open_clip

        self.model = model
        self.name = name
        self.device = next(model.parameters()).device
        self.tokenizer = open_clip.get_tokenizer(name, context_length=getattr(model, "context_length", None))

        size = model.visual.image_size
        if isinstance(size, (tuple, list)):
            if size[0] != size[1]:
                raise UsageError(f"CLIP {name} has a non-square input {tuple(size)}, which is not supported")
            size = size[0]
        self.image_size = int(size)
        self.logit_scale = float(model.logit_scale.detach().exp().reshape(-1)[0])

        embedding = getattr(model, "token_embedding", None)
        if embedding is None:
            embedding = getattr(getattr(model, "text", None), "token_embedding", None)
        self.text_width = int(embedding.weight.shape[1]) if embedding is not None else None
        self.embed_dim = _embed_dim(model, self.image_size)
        lay_out_attention(model)
        self._adapter: _Apply | None = None
        self._lowered_params: list[tuple[str, torch.nn.Parameter]] = []
        self._lowered: tuple[tuple, dict[str, torch.Tensor]] | None = None

    def __repr__(self) -> str:
        return (
            f"Clip({self.name}, image_size={self.image_size}, embed_dim={self.embed_dim}, "
            f"text_width={self.text_width}, device={self.device})"
        )

    def preprocess(self, x: torch.Tensor, antialias: bool = False) -> torch.Tensor:
        """Generator images to CLIP input, differentiably (no PIL).

        Steps: 1. map [-1, 1] to [0, 1]; 2. resize the shorter side to `image_size`
        with bicubic interpolation (`align_corners=False`, no antialiasing by default:
        the reference's behaviour), the longer side to `int(S * long / short)`, as
        torchvision's `Resize(int)`; skipped when the shorter side is already S;
        3. centre crop S x S as torchvision's `center_crop`; 4. normalise with
        `CLIP_MEAN` / `CLIP_STD`.

        Args:
            x: (B, 3, H, W) images in [-1, 1], any float dtype.
            antialias: antialias the resize (today's torchvision default; off for parity).

        Returns:
            (B, 3, S, S) tensor of x's dtype, S = `image_size`.
        """
        size = self.image_size
        x = (x + 1) / 2
        h, w = x.shape[-2:]
        short, long = (w, h) if w <= h else (h, w)
        if short != size:
            new_long = int(size * long / short)
            new_h, new_w = (new_long, size) if w <= h else (size, new_long)
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=antialias)
            h, w = new_h, new_w
        top = int(round((h - size) / 2.0))
        left = int(round((w - size) / 2.0))
        x = x[..., top : top + size, left : left + size]
        mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def encode_image(self, x: torch.Tensor, antialias: bool = False) -> torch.Tensor:
        """CLIP image features of generator images.

        Args:
            x: (B, 3, H, W) images in [-1, 1].
            antialias: passed to `preprocess`.

        Returns:
            (B, embed_dim) features, not normalised.
        """
        return self.call(lambda model, pixels: model.encode_image(pixels), self.preprocess(x, antialias=antialias))

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """BPE token ids, SOT/EOT added and zero-padded.

        Args:
            texts: one string or a list of N strings.

        Returns:
            (N, context_length) int64 tensor on the model's device.
        """
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts)).to(self.device)

    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """CLIP text features, in one batched call.

        Args:
            texts: one string or a list of N strings.

        Returns:
            (N, embed_dim) features, not normalised.
        """
        text = self.tokenize(texts)
        if not _has_causal_text_tower(self.model):
            return self.call(lambda model, ids: model.encode_text(ids), text)
        return self.call(lambda model, ids: text_tower(model, model.token_embedding(ids), ids), text)

    def call(self, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        """`fn(model, *args)`, with the model's matrix weights already in autocast's dtype when autocast is on.

        Autocast casts a weight at every call unless it needs a gradient, and CLIP's never
        do: a ViT-B/32 encoding casts 126 M weights each time. On a CPU they are cast once
        and kept (about 250 MB for ViT-B/32 in bf16) until a weight changes: a bf16 image
        encoding of 8 without gradients 93 -> 75 ms, with them 371 -> 340 ms
        (benchmarks/RESULTS.md). Only the weights that autocast itself lowers are kept
        (`_lowered_names`), so the results are those of the plain call bit for bit.
        Without autocast (fp32), or on a GPU, `fn` runs on the model as it is.
        """
        weights = self._lowered_weights()
        if weights is None:
            return fn(self.model, *args)
        return torch.func.functional_call(self._adapter, weights, (fn, *args))

    def _lowered_weights(self) -> dict[str, torch.Tensor] | None:
        """The kept low-precision weights for the autocast in effect (named for `_adapter`), or None without autocast."""
        device_type = self.device.type
        # CPUs only: there the kept copy takes 5 % off a bf16 stage-1 step
        # (benchmarks/RESULTS.md); a GPU casts at its memory bandwidth, and the copy's
        # 250 MB would count against the 12 GB target instead (unmeasured there).
        if device_type != "cpu" or not torch.is_autocast_enabled(device_type):
            return None
        dtype = torch.get_autocast_dtype(device_type)
        if self._adapter is None:
            self._adapter = _Apply(self.model)
            self._lowered_params = [(f"model.{name}", param) for name, param in _lowered_names(self.model)]
        # The parameters are kept with their key: a replaced one cannot pass for it by reusing its address.
        key = (dtype, tuple((id(param), param.data_ptr(), param._version) for _, param in self._lowered_params))
        if self._lowered is None or self._lowered[0] != key:
            self._lowered = None  # free the old copy before making the new one
            with torch.no_grad():
                weights = {name: param.detach().to(dtype) for name, param in self._lowered_params}
            self._lowered = (key, weights)
        return self._lowered[1]


class _Apply(torch.nn.Module):
    """`forward(fn, *args)` is `fn(model, *args)`: lets `torch.func.functional_call` swap the weights of any method."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        return fn(self.model, *args)


def _lowered_names(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters of `model` that autocast casts to its low dtype at every use: matrix products only.

    Linear, convolution and attention projection weights and biases, and the bare
    projection matrices CLIP multiplies with `@` (`visual.proj`, `text_projection`).
    Embeddings, positional terms and normalisations are left out: autocast keeps them
    (or runs them) in float32, and a cast copy would round them. So is the one weight
    whose dtype open_clip reads as a tower's working dtype (`Transformer.get_cast_dtype`,
    the first block's `mlp.c_fc.weight`): in bf16 it would turn the whole residual
    stream bf16.
    """
    dtype_probes = {
        f"{prefix}.resblocks.0.mlp.c_fc.weight".lstrip(".")
        for prefix, module in model.named_modules()
        if callable(getattr(module, "get_cast_dtype", None))
    }
    found: list[tuple[str, torch.nn.Parameter]] = []
    for prefix, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
            names = ("weight", "bias")
        elif isinstance(module, torch.nn.MultiheadAttention):
            names = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        elif prefix in ("", "visual"):
            names = ("proj", "text_projection")
        else:
            continue
        for name in names:
            param = module._parameters.get(name)
            full = f"{prefix}.{name}" if prefix else name
            if param is not None and param.is_floating_point() and full not in dtype_probes:
                found.append((full, param))
    return found


def _sequence_first(module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: give a batch-first attention its inputs in sequence-first memory order (under autocast)."""
    query, key, value, *rest = args
    if not torch.is_autocast_enabled(query.device.type):
        return None  # float32 keeps its reference arithmetic bit for bit (the goldens); the gain there is small
    laid_out = query.transpose(0, 1).contiguous().transpose(0, 1)
    key = laid_out if key is query else key.transpose(0, 1).contiguous().transpose(0, 1)
    value = laid_out if value is query else value.transpose(0, 1).contiguous().transpose(0, 1)
    if laid_out.device.type == "cpu" and key is laid_out:
        # The same values under another name: self-attention with the query, key and value
        # one tensor takes torch's fused inference path when the weights are in the
        # input's dtype (`Clip.call`), and on CPUs that path copies each projection
        # through batched products: a bf16 image encoding without gradients took 2x longer.
        key = value = laid_out.view_as(laid_out)
    return (laid_out, key, value, *rest)


def lay_out_attention(model: torch.nn.Module) -> None:
    """Make every batch-first `nn.MultiheadAttention` of `model` project its inputs with one matrix product.

    A batch-first attention transposes its (N, L, E) input to (L, N, E) before the
    in-projection. On that strided view, a linear layer whose input needs a gradient
    becomes a batched product over a copy of the weight per position: 2x slower in
    float32 and 35x in bf16 on CPUs (benchmarks/RESULTS.md). Under autocast, the hook
    hands it the same values already stored sequence-first, so the transpose is
    contiguous. In float32 it changes nothing: the rounding, and so the goldens, stay
    those of the reference. Idempotent.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.MultiheadAttention) and module.batch_first and not getattr(module, "_ipl_laid_out", False):
            module.register_forward_pre_hook(_sequence_first)
            module._ipl_laid_out = True


def _has_causal_text_tower(model: torch.nn.Module) -> bool:
    import open_clip

    return isinstance(model, open_clip.CLIP) and getattr(model, "attn_mask", None) is not None and model.text_pool_type == "argmax"


def text_tower(model: torch.nn.Module, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The rest of `open_clip.CLIP.encode_text` (open_clip 3.3) after the token embedding.

    Only the first `L` positions run, up to the batch's last EOT token: attention is
    causal and the features are read at the EOT, so the zero padding after it cannot
    change them. With prompts of about 10 tokens this skips 7/8 of the text tower's
    work and activation memory. Results agree with the full 77 positions to float
    rounding.

    Args:
        model: an `open_clip.CLIP` with a causal text tower (`attn_mask` set, argmax pooling).
        x: (B, context_length, width) token embeddings, possibly with learned vectors spliced in.
        text: (B, context_length) the token ids (the EOT, the largest id, marks where to pool).
    """
    from open_clip.transformer import text_global_pool

    cast_dtype = model.transformer.get_cast_dtype()
    length = int(text.argmax(dim=-1).max()) + 1
    x, text = x[:, :length].to(cast_dtype), text[:, :length]
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        if isinstance(model.text_projection, torch.nn.Linear):
            x = model.text_projection(x)
        else:
            x = x @ model.text_projection
    return x


def _embed_dim(model: torch.nn.Module, image_size: int) -> int:
    out = getattr(model.visual, "output_dim", None)
    if isinstance(out, int):
        return out
    param = next(model.parameters())
    with torch.no_grad():
        probe = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
        return int(model.encode_image(probe).shape[-1])


# ----------------------------------------------------------------------------
# Learned prompts


class PromptEncoder:
    """CLIP's text tower with learned context vectors (the E_P of docs/method.md §0).

    The prompt `ctx_init + " " + label` is tokenized to `[SOT, ctx..., label..., EOT, 0...]`;
    the `n_ctx` context token embeddings are replaced by the learned vectors `P_b`, and the
    rest of `open_clip.CLIP.encode_text` runs unchanged (positional embedding, causal
    transformer, final layer norm, pooling at the EOT token, text projection).

    `n_ctx` counts BPE tokens of `ctx_init`. **Quirk**: the reference counts
    space-separated words (`word_count`); the two agree for "a photo of a" but not for
    every phrase (a rare word can split into several tokens). Counting tokens is what
    keeps the invariant "P = ctx_embedding() reproduces encode_text" true, so mappers
    must be built with `n_ctx`, and a reference checkpoint whose ctx_init has
    `word_count != n_ctx` cannot be reused as is.

    Args:
        clip: a `Clip` around an `open_clip.CLIP` model (custom text towers are not supported).
        ctx_init: the context phrase the learned vectors stand for.

    Attributes:
        n_ctx: number of BPE tokens of `ctx_init`.
        word_count: number of space-separated words of `ctx_init` (the reference's n_ctx).
        dim: token-embedding width d.
    """

    def __init__(self, clip: Clip, ctx_init: str = "a photo of a"):
        if not _has_causal_text_tower(clip.model):
            raise UsageError(
                f"learned prompts need an open_clip CLIP model with a built-in causal text tower; "
                f"{clip.name} is a {type(clip.model).__name__}",
                hint="use an OpenAI-style CLIP such as ViT-B-32",
            )
        self.clip = clip
        self.ctx_init = ctx_init
        self.word_count = len(ctx_init.split())
        ids = clip.tokenize(ctx_init)[0]
        self.n_ctx = int(ids.argmax()) - 1  # EOT has the largest id
        if self.n_ctx < 1:
            raise UsageError(f"ctx_init {ctx_init!r} has no tokens", hint='use a phrase such as "a photo of a"')
        self._ctx_ids = ids[1 : 1 + self.n_ctx]
        self.dim = int(clip.model.token_embedding.weight.shape[1])
        self._tokens: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"PromptEncoder({self.clip.name}, ctx_init={self.ctx_init!r}, n_ctx={self.n_ctx}, dim={self.dim})"

    def ctx_embedding(self) -> torch.Tensor:
        """Token embeddings of `ctx_init`, the natural starting point for P.

        Returns:
            (n_ctx, d) tensor, detached.
        """
        return self.clip.model.token_embedding(self._ctx_ids).detach()

    def _label_tokens(self, label: str) -> torch.Tensor:
        tokens = self._tokens.get(label)
        if tokens is None:
            tokens = self.clip.tokenize(f"{self.ctx_init} {label}")[0]
            # BPE splits on whitespace first, so the context tokens cannot merge with the label.
            assert torch.equal(tokens[1 : 1 + self.n_ctx], self._ctx_ids), "context tokens changed"
            self._tokens[label] = tokens
        return tokens

    def encode(self, P: torch.Tensor, labels: str | Sequence[str]) -> torch.Tensor:
        """Text features of `[SOT, P_b, label_b, EOT]` for every sample, in one call.

        Args:
            P: (B, n_ctx, d) learned context vectors; gradients flow back to it.
            labels: one label for the whole batch, or a list of B labels.

        Returns:
            (B, embed_dim) features, not normalised.
        """
        if P.ndim != 3 or P.shape[1] != self.n_ctx or P.shape[2] != self.dim:
            raise UsageError(f"prompt vectors must have shape (B, {self.n_ctx}, {self.dim}), got {tuple(P.shape)}")
        batch = P.shape[0]
        if isinstance(labels, str):
            labels = [labels] * batch
        elif len(labels) != batch:
            raise UsageError(f"got {len(labels)} labels for a batch of {batch} prompts")
        text = torch.stack([self._label_tokens(label) for label in labels])

        n_ctx = self.n_ctx

        def tower(model: torch.nn.Module, P: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            x = model.token_embedding(text)
            x = torch.cat([x[:, :1], P.to(x.dtype), x[:, 1 + n_ctx :]], dim=1)
            return text_tower(model, x, text)

        return self.clip.call(tower, P, text)
