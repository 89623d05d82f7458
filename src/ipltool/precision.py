"""`--precision fp32|bf16|fp16|auto`: which arithmetic the networks run in, decided in one place.

fp32 is the default and the precision the paper's numbers are defined in: it runs no
autocast and no loss scaling, so its results are bit-identical to a build without
this option. bf16 and fp16 run the generators, CLIP and the mapper under
`torch.autocast`; parameters, optimizer states, losses and the EMA stay float32
(autocast never changes a parameter's dtype). fp16 adds a `GradScaler`, because small
gradients underflow in half precision; bf16 has fp32's exponent range and needs none.
auto picks bf16 where the hardware computes it natively and fp32 elsewhere
(`native_precision`); a run stores the precision it resolved to.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, ContextManager

from ipltool.errors import UsageError, did_you_mean, first_line

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: every command's --help reads this module for
# the option, and help must not pay for importing torch.

PRECISIONS = ("fp32", "bf16", "fp16")
AUTO = "auto"
#: What `--precision` accepts: a precision, or auto (resolved per device by `Precision.of`).
CHOICES = (*PRECISIONS, AUTO)
_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

#: Help of the option, identical in every command that has it.
PRECISION_HELP = (
    "fp32 (default; the paper's numbers), bf16 or fp16: autocast for the networks, "
    "losses and the EMA stay in fp32, fp16 adds loss scaling. auto: bf16 where the hardware "
    "has it natively (CPUs with AVX512-BF16 or AMX, NVIDIA GPUs from Ampere on), else fp32."
)


def check_precision(name: str | None) -> str:
    """Validate a precision name (one of `CHOICES`, auto included); None means the default, fp32.

    Raises:
        UsageError: not one of `CHOICES`.
    """
    if name is None:
        return "fp32"
    value = name.strip().lower()
    if value not in CHOICES:
        raise UsageError(f"invalid precision {name!r}{did_you_mean(value, CHOICES)}", hint=f"use {', '.join(CHOICES)}")
    return value


def native_precision(device: torch.device | str) -> str:
    """What `--precision auto` means on `device`: "bf16" where the hardware computes bf16 natively, else "fp32".

    Native means bf16 matrix units, where bf16 is several times faster than fp32:
    CPUs with AVX512-BF16 or AMX (oneDNN's bf16 kernels), CUDA GPUs of compute
    capability 8.0 (Ampere) and newer. Everywhere else bf16 would be emulated, slower
    than fp32, so auto keeps fp32 there.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return "bf16" if torch.cuda.get_device_capability(index) >= (8, 0) else "fp32"
    if device.type == "cpu":
        # torch's own probes of the CPU (the ones oneDNN dispatches on); an older torch without them counts as no.
        probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
        return "bf16" if any(probe is not None and probe() for probe in probes) else "fp32"
    return "fp32"


def autocast_layout(x: torch.Tensor) -> torch.Tensor:
    """`x` in channels-last memory order while autocast is on for a CPU tensor, else `x` itself.

    Convolutions keep the memory order of their input, so a network whose first
    activation is channels-last runs channels-last throughout, which is the order
    oneDNN's bf16 kernels want (20 % on a config-f synthesis forward and backward at
    64 px, benchmarks/RESULTS.md). fp32 keeps the default order, so its arithmetic stays
    that of the reference bit for bit. GPUs keep it too: the compiled CUDA kernels
    (`ipltool.kernels`) read NCHW and would copy every activation back.
    """
    import torch

    if x.dim() == 4 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def is_channels_last(x: torch.Tensor) -> bool:
    """True for a 4-d tensor stored channels-last (as `autocast_layout` lays it out) and not also plain NCHW.

    A tensor with one channel or a 1x1 side is both; it counts as plain.
    """
    import torch

    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _check_supported(name: str, device: torch.device) -> None:
    """Refuse a reduced precision the installed torch cannot autocast to on `device`."""
    import torch

    if device.type == "cuda" and name == "bf16" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"this CUDA device does not support bf16 (device {device})", hint="use --precision fp16 (or fp32)")
    if not torch.amp.autocast_mode.is_autocast_available(device.type):
        raise UsageError(f"torch {torch.__version__} has no autocast for {device.type}", hint="use --precision fp32")
    # torch disables autocast with a warning (or raises) for a dtype a backend lacks;
    # asking it is safer than keeping our own table of what each backend supports.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        try:
            torch.autocast(device.type, dtype=getattr(torch, _DTYPE_NAMES[name]))
        except (RuntimeError, UserWarning) as err:
            reason = first_line(err)
            raise UsageError(f"--precision {name} is not supported on {device.type}: {reason}", hint="use --precision fp32") from None


@dataclass(frozen=True)
class Precision:
    """A checked precision for one device. Build it with `Precision.of`.

    Attributes:
        name: "fp32", "bf16" or "fp16" (never auto: `of` resolves it).
        device_type: `torch.device.type` of the models ("cpu", "cuda", "mps").
    """

    name: str = "fp32"
    device_type: str = "cpu"

    @classmethod
    def of(cls, name: str | None, device: torch.device | str) -> Precision:
        """The precision `name` (None: fp32; auto: `native_precision(device)`) on `device`.

        Raises:
            UsageError: an unknown name, or a reduced precision `device` cannot autocast to
                (bf16 on a CUDA GPU without bf16, a backend torch has no autocast for).
        """
        import torch

        name = check_precision(name)
        device = torch.device(device)
        if name == AUTO:
            name = native_precision(device)
        if name != "fp32":
            _check_supported(name, device)
        return cls(name, device.type)

    @property
    def reduced(self) -> bool:
        """True for bf16 and fp16 (autocast on)."""
        return self.name != "fp32"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype autocast computes in (float32 for fp32)."""
        import torch

        return getattr(torch, _DTYPE_NAMES[self.name])

    def autocast(self) -> ContextManager:
        """Context for network forward passes: `torch.autocast` for bf16/fp16, a no-op for fp32.

        Loss terms belong outside it: autocast would run their matmuls in the reduced dtype.
        """
        if not self.reduced:
            return contextlib.nullcontext()  # not even a disabled autocast: fp32 stays the untouched path
        import torch

        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """A `GradScaler`, enabled for fp16 only; disabled it passes losses and steps through unchanged."""
        import torch

        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


#: The default: no autocast, no loss scaling.
FP32 = Precision()


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """`loss.backward(); optimizer.step()`, through `scaler` (which only acts when enabled, for fp16).

    The caller zeroes the gradients first, as before.
    """
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # skipped by an enabled scaler when a gradient is inf/NaN
    scaler.update()


def _option_value(value: str | None) -> str | None:
    return None if value is None else check_precision(value)


def precision_option():
    """The `--precision` typer option: the same help in every command, validated while parsing.

    Its value is the checked name, or None when the flag is absent (the default, fp32),
    so `ipl adapt --resume` can tell an explicit flag from the default.
    """
    import typer

    return typer.Option(None, "--precision", help=PRECISION_HELP, show_default=False, callback=_option_value)
