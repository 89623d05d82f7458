"""The architecture of a StyleGAN2 generator, without torch: domain files and `ipl prompts` read it instantly.

`models/stylegan2.py` builds generators from it; `Domain.n_latent` asks it for the W+
size of a registry generator.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ipltool import hub
from ipltool.errors import UnknownNameError, UsageError


@dataclass(frozen=True)
class GeneratorConfig:
    """Architecture of a generator; everything needed to rebuild it.

    Args:
        size: output resolution, a power of two in 32..1024.
        style_dim: size of z and w (512 for every released model).
        n_mlp: layers of the mapping network (8).
        channel_multiplier: 2 for config-f, 1 for the smaller config-e style models.
        channel_max: cap on channels per layer (512 for released models; tiny test models use less).
        lr_mlp: learning-rate multiplier of the mapping network (0.01).
    """

    size: int
    style_dim: int = 512
    n_mlp: int = 8
    channel_multiplier: int = 2
    channel_max: int = 512
    lr_mlp: float = 0.01

    def __post_init__(self):
        if self.size < 32 or self.size > 1024 or self.size & (self.size - 1):
            raise UsageError(f"generator size must be a power of two from 32 to 1024, got {self.size}")
        if self.channel_multiplier not in (1, 2):
            raise UsageError(f"channel multiplier must be 1 or 2, got {self.channel_multiplier}")
        if self.n_mlp < 1 or self.style_dim < 1 or self.channel_max < 1:
            raise UsageError("n_mlp, style_dim and channel_max must be positive")

    @property
    def log_size(self) -> int:
        return int(math.log2(self.size))

    @property
    def n_latent(self) -> int:
        """Number of W+ style inputs: `2*log2(size) - 2` (18 at 1024)."""
        return 2 * self.log_size - 2

    @property
    def num_layers(self) -> int:
        """Number of noise inputs: one per StyledConv."""
        return 2 * (self.log_size - 2) + 1

    def channels(self) -> dict[int, int]:
        """Channels per resolution, as in rosinality's table, capped at `channel_max`."""
        cm = self.channel_multiplier
        table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * cm, 128: 128 * cm, 256: 64 * cm, 512: 32 * cm, 1024: 16 * cm}
        return {res: min(ch, self.channel_max) for res, ch in table.items()}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of_entry(cls, entry: hub.ModelEntry) -> GeneratorConfig:
        """The architecture of a `generator` entry of the model registry (its `arch` table).

        Raises:
            UnknownNameError: the entry is not a generator.
        """
        if entry.kind != "generator":
            raise UnknownNameError(f"{entry.name!r} is a {entry.kind}, not a generator")
        return cls(**entry.arch)
