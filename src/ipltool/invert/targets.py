"""The adapted generators a `stylize` run renders through, and the names their outputs get.

`--generator` takes a run directory (the `generator.pt` of `ipl adapt`) or a checkpoint
file; `--domain NAME` takes the newest finished adapt run of that domain under the runs
folder (`train.run.finished_runs`). With `--smoke`, a domain without a smoke run gets a random tiny stand-in, so the
plumbing can be checked before anything was trained.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ipltool import console
from ipltool.errors import CheckpointError, UsageError
from ipltool.models.stylegan2 import Generator, build_generator, load_generator
from ipltool.train.run import GENERATOR_NAME, RunDir, finished_runs

_LABEL = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class Target:
    """One adapted generator: `label` names its output folder; `source` says where it came from."""

    label: str
    generator: Generator
    source: str


def _run_config(path: Path) -> dict:
    try:
        return RunDir.open(path).read_config()
    except UsageError:
        return {}


def _label_from(path: Path) -> str:
    if path.is_dir():
        name = _run_config(path).get("name")
        if isinstance(name, str) and name:
            return name
        return path.name
    return path.stem


def _unique(label: str, taken: set[str]) -> str:
    label = _LABEL.sub("_", label) or "generator"
    candidate, counter = label, 2
    while candidate in taken or candidate in ("aligned", "reconstruction"):
        candidate = f"{label}-{counter}"
        counter += 1
    taken.add(candidate)
    return candidate


def _generator_file(spec: Path) -> Path:
    """The generator file of a run directory, or the file itself.

    Raises:
        UsageError: the path does not exist or the run has no generator yet.
    """
    if spec.is_dir():
        path = spec / GENERATOR_NAME
        if not path.is_file():
            raise UsageError(
                f"{spec} has no {GENERATOR_NAME} (the adapt run has not finished)",
                hint=f"finish it with: ipl adapt --resume {spec}",
            )
        return path
    if not spec.is_file():
        raise UsageError(f"no such generator: {spec}", hint="pass an `ipl adapt` run folder or a generator .pt file")
    return spec


@dataclass(frozen=True)
class TargetSpec:
    """A target before loading: its label and file (None: a `--smoke` random stand-in)."""

    label: str
    path: Path | None
    source: str


def plan_targets(generators: list[Path], domains: list[str], runs_root: Path, smoke: bool) -> list[TargetSpec]:
    """Find every generator the run renders through, without loading any (cheap checks first).

    Args:
        generators: `--generator` values (run folders or files).
        domains: `--domain` names, resolved to their newest adapt run under `runs_root`.
        runs_root: where `ipl adapt` put its runs.
        smoke: domains without a smoke run get a random tiny stand-in.

    Returns:
        Specs in the order given (files first, then domains), with unique labels.

    Raises:
        UsageError: a missing file, an unfinished run, or a domain without a run.
    """
    taken: set[str] = set()
    specs: list[TargetSpec] = []
    for spec in generators:
        specs.append(TargetSpec(_unique(_label_from(spec), taken), _generator_file(spec), str(spec)))
    for domain in domains:
        runs = finished_runs(domain, runs_root)
        run = next((path for path, info in runs if info.smoke == smoke), None)
        # The runs of the other kind were passed over: say so, or the user wonders where they went.
        others = [path for path, info in runs if info.smoke != smoke]
        if run is not None:
            specs.append(TargetSpec(_unique(domain, taken), run / GENERATOR_NAME, str(run)))
        elif smoke:
            passed = f" (skipped {len(others)} real run(s): --smoke renders with tiny random models only)" if others else ""
            console.info(
                f"[yellow]--smoke: no smoke run of {console.escape(repr(domain))} under {console.escape(runs_root)}; "
                f"using a random tiny stand-in{passed}[/]"
            )
            specs.append(TargetSpec(_unique(domain, taken), None, "random stand-in (--smoke)"))
        elif others:
            raise UsageError(
                f"no finished `ipl adapt` run of {domain!r} under {runs_root}: found {len(others)} --smoke run(s) "
                f"(newest {others[0]}) and skipped them: their tiny random generators only go with --smoke",
                hint=f"check the plumbing with `ipl stylize ... --domain {domain} --smoke` (or --smoke -g {others[0]}); "
                f"for real pictures train one with `ipl adapt --domain {domain}`",
            )
        else:
            raise UsageError(
                f"no finished `ipl adapt` run of {domain!r} under {runs_root}",
                hint=f"train one with `ipl adapt --domain {domain}`, pass --runs DIR, or pass --generator FILE",
            )
    return specs


def load_targets(specs: list[TargetSpec], device: torch.device, like: Generator) -> list[Target]:
    """Load the planned generators, checked against the inverter's own generator.

    Args:
        specs: from `plan_targets`.
        device: where the generators go.
        like: the encoder's generator; W+ codes must fit every target, and random
            stand-ins copy its architecture.

    Raises:
        CheckpointError: a file that is not a generator, or a generator whose W+ space
            differs from the encoder's (another resolution or style size).
    """
    targets = []
    for spec in specs:
        if spec.path is None:
            generator = build_generator(like.config, seed=zlib.crc32(spec.label.encode()), noise_strength=0.1)
        else:
            generator = load_generator(spec.path)
        if (generator.n_latent, generator.style_dim) != (like.n_latent, like.style_dim):
            raise CheckpointError(
                f"generator {spec.label!r} ({spec.source}) takes W+ codes of {generator.n_latent}x{generator.style_dim}, "
                f"the encoder makes {like.n_latent}x{like.style_dim}",
                hint="use generators adapted from the generator the encoder was trained for",
            )
        targets.append(Target(spec.label, generator.to(device).eval().requires_grad_(False), spec.source))
    return targets
