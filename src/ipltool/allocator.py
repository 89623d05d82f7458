"""How the C heap serves torch's CPU tensors: glibc's defaults, or freed blocks kept for reuse.

glibc's malloc serves every block above its mmap threshold (which it raises to at most
32 MiB) with a fresh `mmap`, and unmaps it again on free. A training step at 256 px
allocates and frees many activations of 32-300 MB, so every page of each one faults on
first touch. On the project's VMs the kernel's page-fault time exceeded the arithmetic:
stage 2 at 256 px in fp32 took 30.7 s a step, 16.7 s with the blocks kept
(`benchmarks/RESULTS.md`, "The C heap").

`reuse` lifts the mmap and trim thresholds to 2 GiB with `mallopt`, so freed blocks go
back to the heap and the next step reuses pages that are already mapped. The price is a
higher resident peak (up to +53 % measured at 256 px: the heap keeps its holes), which is
why it is not the default. Only the largest blocks matter: a 64 or 128 MiB threshold kept
the memory and lost the speed, so no middle setting is offered.

The choice comes from `ipl --malloc`, else `$IPL_MALLOC`, else `system`. Nothing changes
off glibc, or where the user has tuned malloc already (glibc's own variables, or
jemalloc/tcmalloc/mimalloc preloaded); `apply_malloc_choice` says which happened.
"""

from __future__ import annotations

import ctypes
import os
import platform

from ipltool.errors import UsageError, did_you_mean

ENV_VAR = "IPL_MALLOC"
CHOICES = ("system", "reuse")

# mallopt parameters (malloc.h) and the largest value its `int` argument takes.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP = 2**31 - 1

# Settings of the user's that win over ours: glibc's own environment variables, and
# allocators that replace malloc altogether.
_USER_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")

_applied = False


def malloc_choice(value: str | None = None) -> str:
    """The requested choice, one of `CHOICES`: `value`, else `$IPL_MALLOC`, else `system`.

    Raises:
        UsageError: an unknown name.
    """
    choice = (value if value is not None else os.environ.get(ENV_VAR, "")).strip().lower() or "system"
    if choice not in CHOICES:
        source = "--malloc" if value is not None else ENV_VAR
        raise UsageError(
            f"unknown {source} value {choice!r}{did_you_mean(choice, CHOICES)}",
            hint="use system (glibc's defaults) or reuse (faster CPU training, more resident memory)",
        )
    return choice


def user_malloc_settings() -> str | None:
    """The user's own malloc tuning found in the environment (a variable's name), or None."""
    for name in _USER_ENV:
        if name in os.environ:
            return name
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    preload = os.environ.get("LD_PRELOAD", "")
    return next((f"LD_PRELOAD ({name})" for name in _PRELOADED if name in preload), None)


def apply_malloc_choice(choice: str | None = None) -> str:
    """Set this process's C heap as `malloc_choice(choice)` asks, before the big tensors exist.

    Returns:
        What holds now: `"system"` (glibc's defaults, nothing done), `"reuse"` (thresholds
        lifted; also when an earlier call lifted them), `"user"` (reuse was asked for, but
        the user's own malloc settings are left alone) or `"unavailable"` (reuse was asked
        for, but this is not glibc or `mallopt` refused).

    Raises:
        UsageError: an unknown choice.
    """
    global _applied
    if malloc_choice(choice) == "system":
        return "reuse" if _applied else "system"  # lifted thresholds cannot be taken back safely
    if _applied:
        return "reuse"
    if user_malloc_settings():
        return "user"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "unavailable"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # The mmap threshold first: with it set, glibc also stops adjusting the trim threshold.
    _applied = mallopt(_M_MMAP_THRESHOLD, _KEEP) == 1 and mallopt(_M_TRIM_THRESHOLD, _KEEP) == 1
    return "reuse" if _applied else "unavailable"
