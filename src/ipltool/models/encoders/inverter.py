"""Image -> W+ inverters and the four built-in encoder plugins (docs/inversion.md §7).

An `Inverter` bundles an encoder with the generator it was trained with (the
checkpoint's `decoder`) and the average code. `ipl stylize` gets one from a plugin:

    plugin = ipltool.registry.load("encoders", "e4e")
    inverter = plugin.load(hub.ensure(plugin.default_weights), device="cuda")
    w = inverter.invert(inverter.preprocess(images))      # (B, 18, 512)

pSp and e4e need one encoder pass; ReStyle refines its code over `steps` passes, each
seeing the input next to the current reconstruction. Every decoder call uses
`input_is_latent=True, randomize_noise=False` and truncation 1, as the references do.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ipltool.errors import UsageError
from ipltool.models.encoders.checkpoint import EncoderCheckpoint, read_checkpoint
from ipltool.models.encoders.irse import BackboneConfig
from ipltool.models.encoders.psp import ENCODER_CLASSES
from ipltool.models.stylegan2 import Generator

DEFAULT_STEPS = 5  # ReStyle's n_iters_per_batch at training and in its inference scripts
TINY_SPREAD = 0.1  # how far one pass of a tiny encoder moves a code, in units of W's spread

# ----------------------------------------------------------------------------
# Inverters


class Inverter(nn.Module):
    """Base class: maps aligned faces (B, 3, input_size, input_size) in [-1, 1] to W+ codes.

    Args:
        name: the plugin name ("e4e", "psp", "restyle-e4e", "restyle-psp").
        encoder: one of the encoder modules of `ipltool.models.encoders.psp`.
        decoder: the generator the encoder was trained with.
        latent_avg: (n_latent, style_dim) average code added to the encoder's output, or None.
        opts: the checkpoint's training options (informative).

    Attributes:
        name, input_size, n_latent, style_dim, encoder_type, decoder, latent_avg, opts.
        warm_start: whether `invert` takes `init` (a code to refine) and `steps`, as
            ReStyle's does; the video path then starts each frame from the previous one.
    """

    warm_start = False

    def __init__(
        self,
        name: str,
        encoder: nn.Module,
        decoder: Generator,
        latent_avg: torch.Tensor | None,
        opts: dict[str, Any] | None = None,
    ):
        super().__init__()
        if encoder.n_styles != decoder.n_latent or encoder.style_dim != decoder.style_dim:
            raise UsageError(
                f"encoder makes {encoder.n_styles}x{encoder.style_dim} codes, "
                f"the decoder takes {decoder.n_latent}x{decoder.style_dim}"
            )
        self.name = name
        self.encoder_type = type(encoder).__name__
        self.input_size: int = encoder.input_size
        self.n_latent: int = encoder.n_styles
        self.style_dim: int = encoder.style_dim
        self.opts = dict(opts or {})
        self.encoder = encoder
        self.decoder = decoder
        if latent_avg is not None:
            latent_avg = latent_avg.detach().reshape(-1, self.style_dim).expand(self.n_latent, -1).clone()
        self.register_buffer("latent_avg", latent_avg, persistent=False)
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize images to the encoder's input size.

        Args:
            images: (B, 3, H, W) in [-1, 1], any size.

        Returns:
            (B, 3, input_size, input_size) float32 on the inverter's device; bilinear
            (antialiased when shrinking), unchanged when already that size.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise UsageError(f"expected RGB images (B, 3, H, W), got {tuple(images.shape)}")
        images = images.to(self.device, torch.float32)
        size = self.input_size
        if tuple(images.shape[-2:]) == (size, size):
            return images
        shrink = images.shape[-2] > size or images.shape[-1] > size
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Render W+ codes (B, n_latent, style_dim) with the decoder: (B, 3, size, size).

        The reference call: `input_is_latent=True, randomize_noise=False`, truncation 1.
        """
        images, _ = self.decoder([codes], input_is_latent=True, randomize_noise=False)
        return images

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        expected = (3, self.input_size, self.input_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise UsageError(
                f"{self.name} inverts (B, 3, {self.input_size}, {self.input_size}) images, got {tuple(images.shape)}",
                hint="resize with Inverter.preprocess first",
            )
        if self.training:  # BatchNorm batch statistics would make codes depend on the batch
            self.eval()
        return images.to(self.device, torch.float32)

    @torch.no_grad()
    def invert(self, images: torch.Tensor, return_steps: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """W+ codes of aligned faces.

        Args:
            images: (B, 3, input_size, input_size) in [-1, 1] (see `preprocess`).
            return_steps: also return the code after each encoder pass.

        Returns:
            codes (B, n_latent, style_dim); with `return_steps`, `(codes, [codes per pass])`.
        """
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Same as `invert(images)`."""
        return self.invert(images)

    def extra_repr(self) -> str:
        avg = "with latent_avg" if self.latent_avg is not None else "no latent_avg"
        return f"name={self.name!r}, input={self.input_size}, n_latent={self.n_latent}, style_dim={self.style_dim}, {avg}"


class SinglePassInverter(Inverter):
    """pSp / e4e: `w = E(x)`, plus `latent_avg` when the encoder was trained to start from it."""

    @torch.no_grad()
    def invert(self, images: torch.Tensor, return_steps: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """W+ codes (B, n_latent, style_dim) of (B, 3, input_size, input_size) images in [-1, 1].

        With `return_steps`, returns `(codes, [codes])` (one pass), like the ReStyle inverters.
        """
        x = self._check_images(images)
        w = self.encoder(x)
        if self.latent_avg is not None:
            w = w + self.latent_avg
        return (w, [w]) if return_steps else w


class ReStyleInverter(Inverter):
    """ReStyle: iterative refinement starting from the average code (or a given one: `invert(init=...)`).

    Steps:
    1. Once per inverter, `avg_img = pool(decode(latent_avg))` (cached; `clear_cache()` drops it).
    2. `prev = avg_img`; for k in 0..steps-1: `delta = E(cat([x, prev], 1))`;
       `w = latent_avg + delta` at k = 0, else `w = w + delta`; `prev = pool(decode(w))`.
    3. Return the last `w`. The last decode only makes a picture, so it is skipped.

    `pool` is an adaptive average pool when the decoder renders larger than the encoder's
    input (an exact 4x4 mean at 1024 -> 256, the reference `face_pool`), a bilinear resize
    otherwise (tiny decoders can be smaller than the encoder input).

    Args:
        steps: encoder passes (5, the reference value).
        extra_pass: **quirk** of the thesis code: one more encoder pass after the last step,
            whose code is returned without being decoded (6 passes for steps=5).
        (others as `Inverter`; `latent_avg` is required.)
    """

    warm_start = True  # `invert` takes `init` and `steps`

    def __init__(
        self,
        name: str,
        encoder: nn.Module,
        decoder: Generator,
        latent_avg: torch.Tensor,
        opts: dict[str, Any] | None = None,
        steps: int = DEFAULT_STEPS,
        extra_pass: bool = False,
    ):
        if latent_avg is None:
            raise UsageError("ReStyle needs latent_avg: every refinement starts from the average code")
        super().__init__(name, encoder, decoder, latent_avg, opts)
        self.steps = steps
        self.extra_pass = extra_pass
        self.register_buffer("avg_image", None, persistent=False)

    def clear_cache(self) -> None:
        """Forget the cached average image (after changing the decoder or latent_avg)."""
        self.avg_image = None

    def pool(self, images: torch.Tensor) -> torch.Tensor:
        """Bring decoder output (B, 3, size, size) to (B, 3, input_size, input_size)."""
        size = self.input_size
        if images.shape[-1] > size:
            return F.adaptive_avg_pool2d(images, (size, size))
        if images.shape[-1] == size:
            return images
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)

    @torch.no_grad()
    def average_image(self) -> torch.Tensor:
        """The decoded average code, pooled to the input size: (1, 3, input_size, input_size); cached."""
        if self.avg_image is None:
            self.avg_image = self.pool(self.decode(self.latent_avg[None]))
        return self.avg_image

    @torch.no_grad()
    def invert(
        self,
        images: torch.Tensor,
        return_steps: bool = False,
        init: torch.Tensor | None = None,
        steps: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Refined W+ codes (B, n_latent, style_dim) of (B, 3, input_size, input_size) images in [-1, 1].

        Args:
            images: the aligned faces.
            return_steps: also return the code after each pass: `steps` codes, or
                `steps + 1` with `extra_pass`.
            init: (B or 1, n_latent, style_dim) codes to refine instead of the average code
                (a warm start, e.g. the previous frame's code of a video): step 2 then starts
                from `w = init`, `prev = pool(decode(init))`, adding every delta to it.
            steps: passes of this call (default `self.steps`); a warm start needs fewer.
        """
        x = self._check_images(images)
        passes = (self.steps if steps is None else steps) + (1 if self.extra_pass else 0)
        if passes < 1:
            raise UsageError(f"ReStyle needs at least one pass, got steps={steps}")
        if init is None:
            prev = self.average_image().expand(x.shape[0], -1, -1, -1)
            w = self.latent_avg.expand(x.shape[0], -1, -1)
        else:
            w = init.to(x.device, torch.float32).expand(x.shape[0], -1, -1)
            prev = self.pool(self.decode(w))
        codes = []
        for k in range(passes):
            w = w + self.encoder(torch.cat([x, prev], dim=1))
            codes.append(w)
            if k + 1 < passes:
                prev = self.pool(self.decode(w))
        return (w, codes) if return_steps else w


# ----------------------------------------------------------------------------
# Plugins


class EncoderPlugin:
    """An `ipltool.encoders` entry point: builds an `Inverter` of one encoder family.

    Attributes:
        name: plugin name ("e4e", "psp", "restyle-e4e", "restyle-psp").
        description: one line for `ipl plugins`.
        default_weights: hub registry name of the released FFHQ checkpoint.
        encoder_type: the `opts["encoder_type"]` this plugin loads.
    """

    options = ("restyle_steps", "extra_pass")

    def __init__(self, name: str, description: str, default_weights: str, encoder_type: str):
        self.name = name
        self.description = description
        self.default_weights = default_weights
        self.encoder_type = encoder_type

    @property
    def iterative(self) -> bool:
        """True for the ReStyle family (6-channel input, refinement loop)."""
        return self.encoder_type in ("BackboneEncoder", "ProgressiveBackboneEncoder")

    def __repr__(self) -> str:
        return f"EncoderPlugin({self.name!r}, {self.encoder_type}, weights={self.default_weights!r})"

    def _parse(self, options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise UsageError(
                f"encoder {self.name!r} got unknown option(s): {', '.join(unknown)}",
                hint=f"options: {', '.join(self.options)}",
            )
        steps = options.get("restyle_steps")
        extra = options.get("extra_pass")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise UsageError(f"restyle_steps must be a positive integer, got {steps!r}")
        if extra is not None and not isinstance(extra, bool):
            raise UsageError(f"extra_pass must be true or false, got {extra!r}")
        # A single-pass encoder accepts the defaults (a CLI may always pass them) but not
        # a setting it would silently ignore.
        if not self.iterative and ((steps is not None and steps != DEFAULT_STEPS) or extra):
            raise UsageError(f"restyle_steps and extra_pass apply to the restyle-* encoders, not {self.name!r}")
        return {"steps": DEFAULT_STEPS if steps is None else steps, "extra_pass": bool(extra)}

    def _build(
        self, encoder: nn.Module, decoder: Generator, latent_avg: torch.Tensor | None, opts: dict, settings: dict
    ) -> Inverter:
        if self.iterative:
            return ReStyleInverter(self.name, encoder, decoder, latent_avg, opts, **settings)
        return SinglePassInverter(self.name, encoder, decoder, latent_avg, opts)

    def load(self, path: str | os.PathLike, device: str | torch.device = "cpu", **options: Any) -> Inverter:
        """Load a checkpoint of this family (strictly; see `read_checkpoint`).

        Args:
            path: the `.pt` file (official layout).
            device: where the inverter runs.
            **options: `restyle_steps` (int, 5) and `extra_pass` (bool, False; a **quirk**
                of the thesis), ReStyle only.

        Returns:
            An `Inverter` in eval mode on `device`.

        Raises:
            UsageError: unknown or inapplicable options.
            CheckpointError: the file is not a checkpoint of this family or does not fit.
        """
        settings = self._parse(options)
        ckpt: EncoderCheckpoint = read_checkpoint(path, expected_type=self.encoder_type)
        return self._build(ckpt.encoder, ckpt.decoder, ckpt.latent_avg, ckpt.opts, settings).to(device)

    def load_default(self, device: str | torch.device = "cpu", **options: Any) -> Inverter:
        """`load` the released FFHQ checkpoint from the model cache (fetched on first use)."""
        from ipltool import hub

        return self.load(hub.ensure(self.default_weights), device=device, **options)

    def tiny(
        self,
        decoder: Generator,
        seed: int = 0,
        input_size: int = 64,
        device: str | torch.device = "cpu",
        **options: Any,
    ) -> Inverter:
        """A few-channel, randomly initialised encoder of this family for tests and `--smoke` runs.

        Widths (16, 32, 48, style_dim), one unit per stage. `latent_avg` is the mean of
        4096 mapped z's, repeated. The style blocks' linear layers get zero bias and are
        rescaled so that, on a fixed random probe batch, one encoder pass moves the code by
        `TINY_SPREAD` (0.1) times the spread of W on average: codes stay near `latent_avg`,
        yet different photos give visibly different codes. Everything is seeded on a
        forked RNG: the same `seed` gives the same inverter, and the caller's random
        stream is untouched.

        Args:
            decoder: the generator to pair with (its n_latent and style_dim set the code shape).
                It becomes a submodule, so moving the inverter moves it too.
            seed: random seed.
            input_size: encoder input side (power of two >= 32).
            device: where the inverter runs.
            **options: as for `load`.

        Returns:
            An `Inverter` in eval mode on `device`.
        """
        settings = self._parse(options)
        dim = decoder.style_dim
        third = 48 if dim != 48 else 40  # adjacent stages must differ for the loader to split them
        backbone = BackboneConfig(
            in_nc=6 if self.iterative else 3,
            widths=(16, 32, third, dim),
            units=(1, 1, 1, 1),
            se_reduction=min(16, dim),
        )
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            encoder = ENCODER_CLASSES[self.encoder_type](decoder.n_latent, dim, input_size, backbone).eval()
            probe = torch.rand(4, backbone.in_nc, input_size, input_size) * 2 - 1
            for block in encoder.styles:
                block.linear.bias.zero_()
            # With zero biases the codes are linear in the linear weights: one rescale sets their size.
            size = encoder(probe).abs().mean().clamp_min(1e-12)
            rng = torch.Generator(device=decoder.device).manual_seed(seed)
            ws = decoder.mapping(torch.randn(4096, dim, device=rng.device, generator=rng))
            scale = TINY_SPREAD * ws.std(0).mean().cpu() / size
            for block in encoder.styles:
                block.linear.weight.mul_(scale)
        latent_avg = ws.mean(0, keepdim=True).expand(decoder.n_latent, -1)
        opts = {"encoder_type": self.encoder_type, "input_nc": backbone.in_nc, "start_from_latent_avg": True}
        return self._build(encoder, decoder, latent_avg, opts, settings).to(device)


E4E = EncoderPlugin(
    "e4e",
    "e4e (encoder4editing): one pass, codes near W for editability; FFHQ faces",
    "e4e-ffhq",
    "Encoder4Editing",
)
PSP = EncoderPlugin(
    "psp",
    "pSp (pixel2style2pixel): one pass, closest single-pass reconstruction; FFHQ faces",
    "psp-ffhq",
    "GradualStyleEncoder",
)
RESTYLE_E4E = EncoderPlugin(
    "restyle-e4e",
    "ReStyle over e4e: iterative refinement (5 passes), editable codes; FFHQ faces",
    "restyle-e4e-ffhq",
    "ProgressiveBackboneEncoder",
)
RESTYLE_PSP = EncoderPlugin(
    "restyle-psp",
    "ReStyle over pSp: iterative refinement (5 passes), closest reconstruction; FFHQ faces",
    "restyle-psp-ffhq",
    "BackboneEncoder",
)
PLUGINS = {p.name: p for p in (E4E, PSP, RESTYLE_E4E, RESTYLE_PSP)}
