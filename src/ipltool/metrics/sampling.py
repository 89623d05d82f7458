"""What `ipl eval` measures: adapt runs, generator checkpoints or image folders, as image streams.

A generator input renders **pairs** (METRICS.md §0): sample i uses z_i drawn from its own
seed `seed + i`, mapped by the source generator, truncated towards the source's mean w
(ψ = 0.7 by default), and rendered by the source and the adapted generator with their
constant noise. Per-sample seeds make the first n samples the same whatever N is, so
features cached for N samples serve any n <= N. A folder input streams its pictures in
sorted order (unpaired metrics only).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ipltool import hub
from ipltool.domain import Domain, load_domain
from ipltool.errors import UsageError
from ipltool.images import find_images, load_rgb
from ipltool.models.stylegan2 import Generator, load_generator
from ipltool.train.run import GENERATOR_NAME, RunDir

#: Samples used for the truncation centre (its own seeded stream, like the run samples).
MEAN_LATENT_SAMPLES = 4096


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] to uint8 (B, 3, H, W): `round((x + 1) * 127.5)`, clamped (METRICS §0)."""
    return images.add(1).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)


@dataclass
class EvalInput:
    """One column of the comparison: a generator pair or an image folder.

    Attributes:
        label: the column name (method for runs: `ipl`, `nada`, `ipl+custom`; else the name).
        name: unique name of the input (run folder name, file stem or folder name).
        domain: the domain (row), or None for a folder given without --domain.
        kind: "run", "checkpoint" or "folder".
        path: what was given.
        cache_dir: where its features are cached.
        fingerprint: changes whenever what it renders or holds changes.
    """

    label: str
    name: str
    domain: Domain | None
    kind: str
    path: Path
    cache_dir: Path
    fingerprint: str
    smoke: bool = False
    files: list[Path] = field(default_factory=list)
    _target: Generator | None = None
    _source: Generator | None = None
    _means: dict[int, torch.Tensor] = field(default_factory=dict)  # truncation centre per seed

    @property
    def paired(self) -> bool:
        """True when source/adapted pairs exist (runs and checkpoints)."""
        return self.kind != "folder"

    @property
    def available(self) -> int | None:
        """How many images a folder holds (None: a generator, unlimited)."""
        return len(self.files) if self.kind == "folder" else None

    def load(self, device: torch.device) -> None:
        """Load the generators (no-op for folders)."""
        if self.kind == "folder" or self._target is not None:
            return
        generator_path = self.path / GENERATOR_NAME if self.kind == "run" else self.path
        self._target = load_generator(generator_path).to(device).eval().requires_grad_(False)
        self._source = hub.load_generator_by_name(self.domain.generator, device=device)
        if (self._source.n_latent, self._source.style_dim) != (self._target.n_latent, self._target.style_dim):
            raise UsageError(f"{self.path}: the adapted generator does not match its source generator {self.domain.generator!r}")

    def batches(self, start: int, stop: int, batch: int, truncation: float, seed: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        """Images `start`..`stop - 1` in batches: {"target": uint8, "source": uint8 (pairs only)}."""
        if self.kind == "folder":
            for first in range(start, stop, batch):
                pictures = [load_rgb(p) for p in self.files[first : min(stop, first + batch)]]
                yield {"target": _stack(pictures)}
            return
        self.load(device)
        source, target = self._source, self._target
        if seed not in self._means:
            self._means[seed] = _mean_latent(source, seed)
        mean = self._means[seed]
        with torch.no_grad():
            for first in range(start, stop, batch):
                indices = range(first, min(stop, first + batch))
                z = torch.stack([torch.randn(source.style_dim, generator=torch.Generator().manual_seed(seed + i)) for i in indices]).to(device)
                w = source.mapping(z)
                w = mean + truncation * (w - mean)
                x_s, _ = source([w], input_is_latent=True, randomize_noise=False)
                x_t, _ = target([w], input_is_latent=True, randomize_noise=False)
                yield {"source": to_uint8(x_s), "target": to_uint8(x_t)}


def _stack(pictures) -> torch.Tensor:
    from torchvision.transforms.functional import pil_to_tensor

    sizes = {p.size for p in pictures}
    if len(sizes) > 1:  # one batch, one size: resize to the first picture's size
        first = pictures[0].size
        pictures = [p if p.size == first else p.resize(first) for p in pictures]
    return torch.stack([pil_to_tensor(p) for p in pictures])


def _mean_latent(source: Generator, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=source.input.input.device).manual_seed(seed + 10**6)
    return source.mean_latent(MEAN_LATENT_SAMPLES, generator=generator)


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _method_label(domain: Domain) -> str:
    """`ipl`, `nada`, or `ipl+custom` when custom prompts weigh in (the paper's columns)."""
    method = domain.adapt.method
    if method == "ipl" and domain.prompts.custom and domain.loss.lambda_custom > 0:
        return "ipl+custom"
    return method


def resolve_input(spec: Path, domain_name: str | None, report_dir: Path) -> EvalInput:
    """An `ipl eval` argument as an `EvalInput`.

    Args:
        spec: an `ipl adapt` run folder, a generator `.pt` file, or a folder of images.
        domain_name: `--domain`: required for checkpoints (source generator and texts),
            optional for folders (their row and CLIP texts), ignored for runs.
        report_dir: the report folder; checkpoints' and folders' features are cached there.

    Raises:
        UsageError: a missing path, a run that is not a finished adapt run, or a
            checkpoint without --domain.
    """
    if not spec.exists():
        raise UsageError(f"no such run, checkpoint or folder: {spec}")
    if spec.is_dir() and (spec / "config.toml").is_file():
        run = RunDir.open(spec)
        config = run.read_config()
        run_table = config.pop("run", {})
        if run_table.get("stage") != "adapt" or not run.generator_path.is_file():
            raise UsageError(
                f"{spec} is not a finished `ipl adapt` run (no {GENERATOR_NAME})",
                hint=f"finish it with `ipl adapt --resume {spec}`" if run_table.get("stage") == "adapt" else "pass an adapt run folder",
            )
        domain = Domain.model_validate(config)
        return EvalInput(
            _method_label(domain), spec.name, domain, "run", spec, spec / "eval-cache",
            _file_fingerprint(run.generator_path), smoke=bool(run_table.get("smoke")),
        )
    domain = load_domain(domain_name).resolved() if domain_name else None
    cache = report_dir / "cache"
    if spec.is_file():
        if domain is None:
            raise UsageError(f"{spec}: a generator checkpoint needs --domain (its source generator and texts)")
        return EvalInput(spec.stem, spec.stem, domain, "checkpoint", spec, cache, _file_fingerprint(spec))
    return folder_input(spec, find_images(spec), cache, domain)


def folder_input(path: Path, files: list[Path], cache_dir: Path, domain: Domain | None = None) -> EvalInput:
    """An input streaming `files` (named after `path`); its fingerprint changes when any file changes."""
    listing = hashlib.sha256("\n".join(_file_fingerprint(p) for p in files).encode()).hexdigest()
    return EvalInput(path.name, path.name, domain, "folder", path, cache_dir, listing, files=files)
