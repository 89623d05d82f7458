"""Sample grids of a training run: the same latents through G_s and the adapted G_ema.

The fixed z's come from the run (drawn first, as in the reference); the truncation
centre is the mean of 4096 mapped samples drawn from a generator of its own, so
rendering samples never moves the training random stream and a resumed run draws
exactly what an uninterrupted one does.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ipltool.images import png_bytes
from ipltool.models.stylegan2 import Generator
from ipltool.train.run import atomic_write_bytes

MEAN_LATENT_SAMPLES = 4096


class SampleGrid:
    """Renders `fixed_z` with truncation and constant noise; writes source/adapted grids.

    Args:
        source: the frozen G_s (its images are rendered once and kept).
        fixed_z: (N, style_dim) latents.
        truncation: psi, 0.7 in the reference.
        seed: seeds the mean-latent draw.
        chunk: latents rendered at once (memory only; images do not change).
    """

    def __init__(self, source: Generator, fixed_z: torch.Tensor, truncation: float, seed: int, chunk: int = 8):
        device = source.input.input.device
        rng = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            self.mean_w = source.mean_latent(MEAN_LATENT_SAMPLES, generator=rng)
            self.w_plus = source.to_w_plus([self.mean_w + truncation * (source.mapping(fixed_z) - self.mean_w)])
        self.chunk = chunk
        self.source_images = self.render(source)

    @torch.no_grad()
    def render(self, generator: Generator) -> torch.Tensor:
        """The fixed latents through `generator`, on the CPU: (N, 3, H, W) in about [-1, 1]."""
        noise = generator.noise_list(randomize=False)
        parts = [generator.synthesis(w, noise).cpu() for w in self.w_plus.split(self.chunk)]
        return torch.cat(parts)

    def write(self, path: Path, adapted: Generator) -> Path:
        """Write a PNG whose rows alternate source and adapted images of the same latents."""
        adapted_images = self.render(adapted)
        n = len(adapted_images)
        per_row = min(n, max(1, math.ceil(math.sqrt(n * 2))))
        rows = []
        for start in range(0, n, per_row):
            source_row = self.source_images[start : start + per_row]
            adapted_row = adapted_images[start : start + per_row]
            pad = per_row - len(source_row)
            if pad:  # keep the columns aligned in a short last row
                blank = torch.full((pad, *source_row.shape[1:]), -1.0)
                source_row, adapted_row = torch.cat([source_row, blank]), torch.cat([adapted_row, blank])
            rows += [source_row, adapted_row]
        atomic_write_bytes(path, png_bytes(torch.cat(rows), nrow=per_row))
        return path
