"""The latent codes of seeds, the truncation centre, and paths between codes.

One definition for every command that draws from a generator: sample `seed` uses the
`style_dim` normal numbers of `torch.Generator().manual_seed(seed)` (on the CPU, so a seed
gives the same face on every device), mapped by the source generator's mapping network
and truncated towards a mean w estimated from its own seeded stream (`centre_seed + 10**6`).
`ipl eval --seed S` renders its sample i from seed S + i with the centre of S, so
`ipl generate --seeds S+i` (centre seed 0, eval's default) and `ipl generate --n N --seed S`
(centre S) show the report's pictures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ipltool.errors import UsageError
from ipltool.models.stylegan2 import Generator

#: Samples used for the truncation centre.
MEAN_LATENT_SAMPLES = 4096
#: Offset of the centre's seed from the base seed, far from the sample seeds.
CENTRE_OFFSET = 10**6


def check_truncation(truncation: float) -> None:
    """Refuse a `--truncation` outside [0, 1].

    Raises:
        UsageError: one line naming the flag.
    """
    if not (math.isfinite(truncation) and 0 <= truncation <= 1):
        raise UsageError(f"--truncation must be a number in [0, 1] (got {truncation})", hint="0.7 is the papers' value; 1 turns truncation off")


def seed_z(seeds: Sequence[int], dim: int) -> torch.Tensor:
    """(len(seeds), dim) float32 z codes on the CPU, row i drawn from `manual_seed(seeds[i])`."""
    return torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def truncation_centre(source: Generator, centre_seed: int = 0) -> torch.Tensor:
    """The mean w (1, style_dim) truncation pulls towards: `MEAN_LATENT_SAMPLES` codes of seed `centre_seed + 10**6`."""
    generator = torch.Generator(device=source.device).manual_seed(centre_seed + CENTRE_OFFSET)
    return source.mean_latent(MEAN_LATENT_SAMPLES, generator=generator)


def truncate(w: torch.Tensor, centre: torch.Tensor, truncation: float) -> torch.Tensor:
    """`centre + ψ (w - centre)`; ψ = 1 leaves `w` as it is."""
    return centre + truncation * (w - centre)


@torch.no_grad()
def seed_w(source: Generator, z: torch.Tensor, centre: torch.Tensor, truncation: float) -> torch.Tensor:
    """W codes (B, style_dim) of the z codes `z`: the source's mapping, then truncation."""
    return truncate(source.mapping(z.to(source.device)), centre, truncation)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from `a` to `b` (vectors of the last dimension) at `t` in [0, 1].

    The walk in Z of StyleGAN's papers: Gaussian codes live near a sphere, and a straight
    line between two of them passes through less likely, duller codes near the centre.
    Nearly parallel vectors fall back to a straight line.
    """
    a_unit = a / a.norm(dim=-1, keepdim=True)
    b_unit = b / b.norm(dim=-1, keepdim=True)
    cos = (a_unit * b_unit).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    straight = sin.abs() < 1e-6
    safe = torch.where(straight, torch.ones_like(sin), sin)
    curved = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / safe
    return torch.where(straight, (1 - t) * a + t * b, curved)


def walk_times(keys: int, frames: int, loop: bool) -> list[tuple[int, float]]:
    """(segment, t) of each frame of a walk through `keys` key codes, `frames` frames per segment.

    Segments go key k -> k + 1; with `loop` one more goes from the last key back to the
    first, so the video repeats seamlessly and has no duplicate frame at the seam. The
    last key itself ends an open walk.
    """
    segments = keys if loop else keys - 1
    times = [(k, i / frames) for k in range(segments) for i in range(frames)]
    if not loop:
        times.append((segments - 1, 1.0))
    return times
