"""Sample grids of a training run: the same latents through G_s and the adapted G_ema.

The fixed z's come from the run (drawn first, as in the reference); the truncation
centre is the mean of 4096 mapped samples drawn from a generator of its own, so
rendering samples never moves the training random stream and a resumed run draws
exactly what an uninterrupted one does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ipltool.figures import grid_figure
from ipltool.images import png_bytes, to_pil
from ipltool.models.stylegan2 import Generator
from ipltool.atomic import atomic_write_bytes

MEAN_LATENT_SAMPLES = 4096
#: Samples side by side at most; more wrap into further source/adapted row pairs.
MAX_COLUMNS = 8


def sample_columns(n: int) -> int:
    """Columns of a grid of `n` samples: as many as fit in the fewest blocks of at most `MAX_COLUMNS`.

    The blocks come out as even as possible (35 samples: 5 blocks of 7), so the last one is
    at most slightly narrower.
    """
    blocks = -(-n // MAX_COLUMNS)
    return -(-n // blocks)


class SampleGrid:
    """Renders `fixed_z` with truncation and constant noise; writes source/adapted grids.

    Args:
        source: the frozen G_s (its images are rendered once and kept).
        fixed_z: (N, style_dim) latents.
        truncation: psi, 0.7 in the reference.
        seed: seeds the mean-latent draw.
        chunk: latents rendered at once (memory only; images do not change); `CHUNK` by default.
        tile: edge of one sample in the PNG, px (`adapt.sample_size`).
        title: start of the caption strip, e.g. "disney · ipl"; the step follows it.
    """

    CHUNK = 8

    def __init__(
        self, source: Generator, fixed_z: torch.Tensor, truncation: float, seed: int, chunk: int = CHUNK, tile: int = 256, title: str = ""
    ):
        device = source.device
        rng = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            self.mean_w = source.mean_latent(MEAN_LATENT_SAMPLES, generator=rng)
            self.w_plus = source.to_w_plus([self.mean_w + truncation * (source.mapping(fixed_z) - self.mean_w)])
        self.chunk = chunk
        self.tile = tile
        self.title = title
        self.source_images = self.render(source)

    @torch.no_grad()
    def render(self, generator: Generator) -> torch.Tensor:
        """The fixed latents through `generator`, on the CPU: (N, 3, H, W) in about [-1, 1]."""
        noise = generator.noise_list(randomize=False)
        parts = [generator.synthesis(w, noise).cpu() for w in self.w_plus.split(self.chunk)]
        return torch.cat(parts)

    def write(self, path: Path, adapted: Generator, step: int | None = None) -> Path:
        """Write a PNG of the samples in columns: a "source" row over an "adapted" row of the same latents.

        More than `MAX_COLUMNS` samples wrap into further source/adapted pairs (see
        `sample_columns`); the caption strip holds `title` and the step.
        """
        adapted_images = self.render(adapted)
        columns = sample_columns(len(adapted_images))
        rows, labels = [], []
        for start in range(0, len(adapted_images), columns):
            rows.append([to_pil(image) for image in self.source_images[start : start + columns]])
            rows.append([to_pil(image) for image in adapted_images[start : start + columns]])
            labels += ["source", "adapted"]
        caption = " · ".join(part for part in (self.title, f"step {step}" if step is not None else "") if part)
        figure = grid_figure(rows, self.tile, row_labels=labels, caption=caption, group=2)
        atomic_write_bytes(path, png_bytes(figure))
        return path
