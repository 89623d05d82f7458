"""The one place that picks an implementation for the custom ops.

The choice comes from the call's `impl` argument, else the `IPL_KERNELS`
environment variable, else `auto`. This version ships the native PyTorch
implementations only; `auto` therefore always resolves to `native`.
"""

from __future__ import annotations

import os

from ipltool.errors import UsageError

ENV_VAR = "IPL_KERNELS"
_IMPLS = ("native",)
_CHOICES = ("auto",) + _IMPLS


def available_impls() -> tuple[str, ...]:
    """Return the implementation names this installation can run."""
    return _IMPLS


def resolve_impl(impl: str | None = None) -> str:
    """Resolve `impl` (or `$IPL_KERNELS`, or `auto`) to a concrete implementation name.

    Args:
        impl: `"auto"`, `"native"` or None (read the environment).

    Returns:
        The name of the implementation to run, one of `available_impls()`.

    Raises:
        UsageError: the name is not one this installation offers.
    """
    choice = impl if impl is not None else os.environ.get(ENV_VAR, "auto")
    choice = choice.strip().lower() or "auto"
    if choice not in _CHOICES:
        raise UsageError(
            f"unknown kernel implementation {choice!r} (from {'the call' if impl else ENV_VAR})",
            hint=f"use one of: {', '.join(_CHOICES)}",
        )
    return "native" if choice == "auto" else choice
