"""`--compile`: stage 1's renders and CLIP image encodings through `torch.compile`, its code cached across runs.

Stage 1 renders a fixed batch without gradients every step, so its graphs are compiled
once and then reused: inductor fuses the modulation, bias, leaky ReLU and noise additions
around the convolutions. Measured on 2 cores of an Intel Xeon with AMX in bf16
(benchmarks/RESULTS.md, "torch.compile trial, stage 1"): a step at 256 px 8.98 s eager,
6.80 s compiled, after 93 s of compilation on a first run and 18 s on a later one, whose
code comes from the cache; 300 steps 2693 s eager, 2127 s (first run), 1905 s (later).
At 64 px a first run loses 30 s of 612, a later one gains 116 s.
Stage 2 is left eager: its layer choice trains other layers every step, so it
recompiles, and it lost there (the same file, "torch.compile trial, stage 2").
Compiled code rounds differently from the eager ops, so `--compile` is off by default
and fp32 without it stays bit for bit the reference's arithmetic.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ipltool.errors import IplError, first_line
from ipltool.paths import cache_dir

if TYPE_CHECKING:
    from ipltool.models.clip import Clip
    from ipltool.models.stylegan2 import Generator

CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"

#: Help of the flag, identical in every command that has it.
COMPILE_HELP = (
    "Compile stage 1's renders and CLIP image encodings with torch.compile: faster steps after "
    "a compilation of a minute or two on the first run (cached for later runs); results change "
    "within rounding."
)


def inductor_cache() -> Path:
    """Where inductor keeps its compiled code: `$TORCHINDUCTOR_CACHE_DIR` if the user set it, else `inductor/` in ipltool's cache.

    torch's default is a folder in /tmp, which does not outlive a reboot and is not where
    `ipl` keeps what it builds; pointing inductor at ipltool's cache lets a later run of the
    same shapes load the code instead of compiling it again. Importing `torch._dynamo`
    writes torch's default into the variable when it is unset, so a value equal to that
    default counts as unset (inductor reads the variable at every use).
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get(CACHE_VARIABLE)
    if current is None or current == default_cache_dir():
        os.environ[CACHE_VARIABLE] = str(cache_dir() / "inductor")
    return Path(os.environ[CACHE_VARIABLE])


@contextlib.contextmanager
def compiled_renders(generator: Generator, clips: Sequence[Clip]) -> Iterator[None]:
    """Within the block, `generator.synthesis` and each CLIP's image tower run compiled; as before after it.

    Shapes are static (`dynamic=False`): stage 1 renders the same chunk every step.
    """
    import torch

    inductor_cache()
    targets = [(generator, "synthesis"), *((clip.model, "encode_image") for clip in clips)]
    for owner, name in targets:
        setattr(owner, name, _reported(torch.compile(getattr(owner, name), dynamic=False)))
    try:
        yield
    finally:
        for owner, name in targets:
            delattr(owner, name)  # the instance attribute goes; the class's method shows again


def _reported(compiled: Callable) -> Callable:
    """`compiled`, with a failure of torch's compiler (no C++ compiler, an unsupported op) turned into one line."""
    import torch

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as err:
            cause = getattr(err, "inner_exception", None) or err  # a backend's failure: its first line says only "raised:"
            raise IplError(
                f"--compile: torch.compile failed ({first_line(cause)})",
                hint="run without --compile (on a CPU, torch.compile needs a C++ compiler such as gcc)",
            ) from None

    return call
