"""`--device auto|cpu|cuda[:N]|mps`: parsing and resolution, in one place."""

from __future__ import annotations

import re

from ipltool.errors import UsageError, did_you_mean

_SPEC = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device_spec(spec: str) -> str:
    """Validate a device string without importing torch; returns it lower-cased.

    Raises:
        UsageError: not one of auto, cpu, mps, cuda, cuda:N.
    """
    value = spec.strip().lower()
    if not _SPEC.match(value):
        raise UsageError(f"invalid device {spec!r}{did_you_mean(value, ('auto', 'cpu', 'mps', 'cuda'))}", hint="use auto, cpu, mps, cuda or cuda:N")
    return value


def resolve_device(spec: str = "auto"):
    """Turn a device string into a `torch.device`; `auto` = cuda, then mps, then cpu.

    Raises:
        UsageError: the requested accelerator is not available on this machine.
    """
    import torch

    from ipltool import distributed

    value = check_device_spec(spec)
    w = distributed.world()
    if w.distributed and value in ("auto", "cuda") and torch.cuda.is_available():
        # Under torchrun each process takes the GPU of its local rank.
        value = f"cuda:{w.local_rank}"
    device = _resolve(value)
    distributed.init(device)
    return device


def _resolve(value: str):
    import torch

    if value == "auto":
        if torch.cuda.is_available():
            return _checked(torch.device("cuda"))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return _checked(torch.device("mps"))
        return _checked(torch.device("cpu"))
    if value.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"device {value} requested but CUDA is not available", hint="use --device cpu (or auto)")
        index = int(value.split(":")[1]) if ":" in value else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"device {value} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if value == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise UsageError("device mps requested but MPS is not available", hint="use --device cpu (or auto)")
    return _checked(torch.device(value))


def _checked(device):
    """`device`, once the kernel choice is known to hold for it (`IPL_KERNELS=cuda` off the GPU fails here)."""
    from ipltool.kernels.dispatch import check_device

    check_device(device)
    return device
