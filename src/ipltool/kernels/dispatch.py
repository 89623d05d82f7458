"""The one place that picks an implementation for the custom ops.

The choice comes from the call's `impl` argument, else the `IPL_KERNELS` environment
variable, else `auto`:

- `native`: plain PyTorch, on every device; the specification the others must match.
- `cuda`: the compiled kernels (`kernels/csrc`); strict: a tensor off the GPU or a
  failed build is an error. Meant for benchmarks and CI.
- `auto`: the compiled kernels for CUDA tensors, the native ops otherwise. When the
  kernels cannot be built, it says why in one warning line (once per process) and
  continues with the native ops.
"""

from __future__ import annotations

import os

from ipltool.errors import UsageError, did_you_mean
from ipltool.kernels import build

ENV_VAR = "IPL_KERNELS"
CHOICES = ("auto", "native", "cuda")

_warned = False


def kernel_choice(impl: str | None = None) -> str:
    """The requested choice, one of `CHOICES`: `impl`, else `$IPL_KERNELS`, else `auto`.

    Raises:
        UsageError: an unknown name.
    """
    choice = (impl if impl is not None else os.environ.get(ENV_VAR, "auto")).strip().lower() or "auto"
    if choice not in CHOICES:
        source = "the call" if impl is not None else ENV_VAR
        raise UsageError(f"unknown kernel implementation {choice!r} (from {source}){did_you_mean(choice, CHOICES)}", hint=f"use one of: {', '.join(CHOICES)}")
    return choice


def available_impls() -> tuple[str, ...]:
    """The implementations this machine could run: `native`, and `cuda` when a GPU is visible."""
    import torch

    return ("native", "cuda") if torch.cuda.is_available() and torch.version.cuda else ("native",)


def _warn_fallback(error: build.KernelBuildError) -> None:
    global _warned
    if not _warned:
        _warned = True
        from ipltool import console

        # Always shown (also with --quiet): a run at native speed should never be a surprise.
        console.err.print(
            f"[yellow]warning:[/] compiled CUDA kernels unavailable ({error.message}); using the native PyTorch ops. "
            f"{error.hint or ''}".rstrip(),
            markup=True,
            highlight=False,
        )


def resolve_impl(impl: str | None = None, x=None) -> str:
    """Decide which implementation runs a call on tensor `x`: `"native"` or `"cuda"`.

    Args:
        impl: `"auto"`, `"native"`, `"cuda"` or None (read `$IPL_KERNELS`).
        x: the call's main input (only its device matters); None counts as off the GPU.

    Raises:
        UsageError: an unknown name, or `cuda` for a tensor that is not on a CUDA device.
        KernelBuildError: `cuda` was asked for and the kernels cannot be built.
    """
    choice = kernel_choice(impl)
    if choice == "native":
        return "native"
    on_gpu = bool(getattr(x, "is_cuda", False))
    if choice == "cuda":
        if not on_gpu:
            where = getattr(x, "device", "no tensor")
            raise UsageError(
                f"{ENV_VAR}=cuda: the compiled kernels run on CUDA tensors, this one is on {where}",
                hint="run on a GPU (--device cuda), or use IPL_KERNELS=auto",
            )
        build.extension()
        return "cuda"
    if not on_gpu:
        return "native"
    try:
        build.extension()
    except build.KernelBuildError as error:
        _warn_fallback(error)
        return "native"
    return "cuda"


def check_device(device) -> None:
    """Fail before any work when `IPL_KERNELS=cuda` cannot hold for a run on `device`.

    With `cuda`, a run off the GPU is refused and the kernels are built (or loaded) now,
    so a build failure stops the command before it creates a run directory. `auto` and
    `native` need nothing up front.

    Raises:
        UsageError: `cuda` with a device that is not a CUDA device.
        KernelBuildError: `cuda` and the kernels cannot be built.
    """
    if kernel_choice() != "cuda":
        return
    if getattr(device, "type", str(device)) != "cuda":
        raise UsageError(
            f"{ENV_VAR}=cuda: the compiled kernels run on CUDA tensors, this run is on {device}",
            hint="run on a GPU (--device cuda), or use IPL_KERNELS=auto",
        )
    build.extension()


def reset_warning() -> None:
    """Allow the fallback warning to be printed again (for tests)."""
    global _warned
    _warned = False
