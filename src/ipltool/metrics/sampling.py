"""What `ipl eval` measures: adapt runs, generator checkpoints or image folders, as image streams.

A generator input renders **pairs** (docs/metrics.md §0): sample i uses z_i drawn from its own
seed `seed + i`, mapped by the source generator, truncated towards the source's mean w
(ψ = 0.7 by default), and rendered by the source and the adapted generator with their
constant noise. Per-sample seeds make the first n samples the same whatever N is, so
features cached for N samples serve any n <= N. A folder input streams its pictures in
sorted order (unpaired metrics only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ipltool.atomic import atomic_write_text
from ipltool.domain import Domain, load_domain
from ipltool.errors import RunConfigError, UsageError
from ipltool.images import UnreadableImage, find_images, load_rgb
from ipltool.models.stylegan2 import Generator, load_generator, load_source_generator
from ipltool.render.latents import seed_w, seed_z, truncation_centre
from ipltool.train.run import GENERATOR_NAME, RunDir

class NotEvaluable(UsageError):
    """An `ipl eval` input that holds nothing to measure: a train-mapper run, an unfinished
    adapt run, a folder that is neither a run nor holds readable images.

    `ipl eval` skips such an input with one line (`skipped PATH: REASON`) and goes on.

    Args:
        path: the input.
        reason: why it is skipped, e.g. "a train-mapper run (no generator.pt)".
        hint: what to do about it (optional).
    """

    def __init__(self, path: Path, reason: str, hint: str | None = None):
        super().__init__(f"{path}: {reason}", hint=hint)
        self.path = path
        self.reason = reason


class NonFiniteSamples(NotEvaluable):
    """A generator input whose pictures hold NaN or inf values: there is nothing meaningful to measure.

    Raised while sampling; `ipl eval` then skips the input with one line, as a `NotEvaluable` one,
    and exits with code 1.
    """

    def __init__(self, path: Path, reason: str):
        super().__init__(path, reason, hint="its weights are broken (a diverged run?): retrain it, or resume it from a finite state")


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
        kind: "run", "checkpoint", "blend" (`--blend`) or "folder".
        path: what was given.
        cache_dir: where its features are cached.
        fingerprint: changes whenever what it renders or holds changes.
        unreadable: files of a folder that Pillow cannot read (left out of `files`), with why.
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
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    strength: float = 1.0  # style strength α of the adapted generator (render.blend)
    blend: list[tuple[Path, float]] = field(default_factory=list)  # kind "blend": generator files and weights
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
        from ipltool.render.blend import mixed_generator

        self._source = load_source_generator(self.domain.generator, device=device)
        if self.kind == "blend":
            terms = [(self._adapted(path, device), weight * self.strength) for path, weight in self.blend]
            self._target = mixed_generator(self._source, terms, [str(path) for path, _ in self.blend])
            return
        target = self._adapted(self.path / GENERATOR_NAME if self.kind == "run" else self.path, device)
        self._target = target if self.strength == 1 else mixed_generator(self._source, [(target, self.strength)], [str(self.path)])

    def _adapted(self, path: Path, device: torch.device) -> Generator:
        """An adapted generator file, checked to fit the source's W+ space."""
        target = load_generator(path).to(device).eval().requires_grad_(False)
        if (self._source.n_latent, self._source.style_dim) != (target.n_latent, target.style_dim):
            raise UsageError(f"{path}: the adapted generator does not match its source generator {self.domain.generator!r}")
        return target

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
            self._means[seed] = truncation_centre(source, seed)
        mean = self._means[seed]
        with torch.no_grad():
            for first in range(start, stop, batch):
                indices = range(first, min(stop, first + batch))
                w = seed_w(source, seed_z([seed + i for i in indices], source.style_dim), mean, truncation)
                x_s, _ = source([w], input_is_latent=True, randomize_noise=False)
                x_t, _ = target([w], input_is_latent=True, randomize_noise=False)
                # to_uint8 would turn NaN into black pixels and measure them like any picture.
                for images, which in ((x_t, "its adapted generator"), (x_s, f"its source generator {self.domain.generator!r}")):
                    if not torch.isfinite(images).all():
                        raise NonFiniteSamples(self.path, f"{which} renders {'NaN' if images.isnan().any() else 'infinite'} pixels")
                yield {"source": to_uint8(x_s), "target": to_uint8(x_t)}


def _stack(pictures) -> torch.Tensor:
    from torchvision.transforms.functional import pil_to_tensor

    sizes = {p.size for p in pictures}
    if len(sizes) > 1:  # one batch, one size: resize to the first picture's size
        first = pictures[0].size
        pictures = [p if p.size == first else p.resize(first) for p in pictures]
    return torch.stack([pil_to_tensor(p) for p in pictures])


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
        NotEvaluable: nothing to measure there: a run that is not a finished adapt run, a
            folder that is neither a run nor holds readable images.
        UsageError: a missing path, or a checkpoint without --domain.
    """
    if not spec.exists():
        raise UsageError(f"no such run, checkpoint or folder: {spec}")
    if spec.is_dir() and (spec / "config.toml").is_file():
        run = RunDir.open(spec)
        try:
            info = run.read_info()
        except UsageError as err:
            raise NotEvaluable(spec, f"a run whose config cannot be read ({err.message})") from None
        stage = info.stage
        if stage != "adapt":
            what = "a train-mapper run" if stage == "mapper" else f"a {stage or 'unknown'!r} run, not an adapt run"
            raise NotEvaluable(spec, f"{what} (no {GENERATOR_NAME})", hint="pass `ipl adapt` run folders")
        if not run.generator_path.is_file():
            raise NotEvaluable(spec, f"an unfinished adapt run (no {GENERATOR_NAME})", hint=f"finish it with `ipl adapt --resume {spec}`")
        try:
            domain, _ = run.read()
        except RunConfigError as err:
            raise NotEvaluable(spec, f"a run whose config.toml is not a valid domain ({err.reason})") from None
        return EvalInput(
            _method_label(domain), spec.name, domain, "run", spec, spec / "eval-cache",
            _file_fingerprint(run.generator_path), smoke=info.smoke,
        )
    domain = load_domain(domain_name).resolved() if domain_name else None
    cache = report_dir / "cache"
    if spec.is_file():
        if domain is None:
            raise UsageError(f"{spec}: a generator checkpoint needs --domain (its source generator and texts)")
        return EvalInput(spec.stem, spec.stem, domain, "checkpoint", spec, cache, _file_fingerprint(spec))
    try:
        files = find_images(spec)
    except UsageError:
        raise NotEvaluable(spec, "neither an `ipl adapt` run (no config.toml) nor a folder of images") from None
    files, unreadable = readable_images(files, cache)
    if not files:
        raise NotEvaluable(spec, f"no image Pillow can read ({len(unreadable)} unreadable file(s), e.g. {unreadable[0][1]})")
    item = folder_input(spec, files, cache, domain)
    item.unreadable = unreadable
    return item


def readable_images(files: list[Path], cache_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Split `files` into pictures Pillow decodes and the others (with why), as `stylize` does.

    Each file is decoded in full once (damaged data may fail only past a good header);
    the verdict is kept in `cache_dir` under the listing's fingerprint, so that a later
    eval of an unchanged folder does not decode it again.

    Returns:
        (readable files in the given order, [(unreadable file, reason)]).
    """
    listing = hashlib.sha256("\n".join(_file_fingerprint(p) for p in files).encode()).hexdigest()
    record = cache_dir / f"unreadable-{listing[:16]}.json"
    try:
        bad = json.loads(record.read_text(encoding="utf-8"))
        if not isinstance(bad, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError):
        bad = {}
        for path in files:
            try:
                load_rgb(path)
            except UnreadableImage as err:
                bad[str(path)] = err.message
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps(bad, indent=1))
    return [p for p in files if str(p) not in bad], [(p, str(bad[str(p)])) for p in files if str(p) in bad]


def folder_input(path: Path, files: list[Path], cache_dir: Path, domain: Domain | None = None) -> EvalInput:
    """An input streaming `files` (named after `path`); its fingerprint changes when any file changes."""
    listing = hashlib.sha256("\n".join(_file_fingerprint(p) for p in files).encode()).hexdigest()
    return EvalInput(path.name, path.name, domain, "folder", path, cache_dir, listing, files=files)


def with_strengths(items: list[EvalInput], strengths: list[float]) -> list[EvalInput]:
    """Each generator input at each style strength (`--strength`): `disney-s0.5` beside `disney`; folders once."""
    from ipltool.render.blend import strength_label

    out = []
    for item in items:
        if not item.paired:
            out.append(item)
            continue
        for alpha in strengths:
            if alpha == 1:
                out.append(item)
            else:
                out.append(
                    dataclasses.replace(
                        item, name=strength_label(item.name, alpha), label=strength_label(item.label, alpha), strength=alpha,
                        fingerprint=f"{item.fingerprint}|strength={alpha!r}", _target=None, _source=None, _means={},
                    )
                )
    return out


def blend_input(pairs: list[tuple[str, float]], runs_root: Path, domain_name: str | None, report_dir: Path) -> EvalInput:
    """The `--blend NAME=WEIGHT ...` generator as one input, measured like a run.

    Its domain (source generator and texts) is `--domain`, else that of the first blended run.

    Raises:
        UsageError: a name that names no adapted generator, or no domain to measure against.
    """
    from ipltool.render.blend import blend_label
    from ipltool.render.generators import resolve_generator

    refs = [resolve_generator(name, runs_root) for name, _ in pairs]
    for ref in refs:
        if ref.path is None:
            raise UsageError(f"--blend {ref.label}: a source generator, not an adapted one")
    if domain_name:
        domain = load_domain(domain_name).resolved()
    else:
        run = next((ref.path.parent for ref in refs if (ref.path.parent / "config.toml").is_file()), None)
        if run is None:
            raise UsageError("--blend of files outside run folders needs --domain (its source generator and texts)")
        domain, _ = RunDir.open(run).read()
    label = blend_label([(ref.label, weight) for ref, (_, weight) in zip(refs, pairs)])
    fingerprint = "|".join(f"{_file_fingerprint(ref.path)}*{weight!r}" for ref, (_, weight) in zip(refs, pairs))
    return EvalInput(
        label, label, domain, "blend", Path(label), report_dir / "cache", fingerprint,
        smoke=any(ref.smoke for ref in refs), blend=[(ref.path, weight) for ref, (_, weight) in zip(refs, pairs)],
    )
