"""The adapted generators a `stylize` run renders through, and the names their outputs get.

`--generator` takes a run directory (the `generator.pt` of `ipl adapt`) or a checkpoint
file; `--domain NAME` takes the newest finished adapt run of that domain under the runs
folder (`train.run.finished_runs`). With `--smoke`, a domain without a smoke run gets a random tiny stand-in, so the
plumbing can be checked before anything was trained.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ipltool import console
from ipltool.errors import CheckpointError, UsageError
from ipltool.models.stylegan2 import Generator, build_generator, load_generator
from ipltool.render.blend import blend_label, mixed_generator, strength_label
from ipltool.render.generators import generator_file, run_name, unique_label
from ipltool.train.run import GENERATOR_NAME, finished_runs

#: Folder names of a stylize output that no target label may take.
RESERVED = ("aligned", "reconstruction")


def _unique(label: str, taken: set[str]) -> str:
    return unique_label(label, taken, RESERVED)


@dataclass
class Target:
    """One adapted generator: `label` names its output folder; `source` says where it came from."""

    label: str
    generator: Generator
    source: str


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
        specs.append(TargetSpec(_unique(run_name(spec), taken), generator_file(spec), str(spec)))
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


def mix_options(strength: str, blend: list[str], runs_root: Path) -> tuple[list[float], list[tuple[TargetSpec, float]]]:
    """`--strength` and `--blend` as `load_targets` takes them: the strengths, and the blend's targets with weights.

    Raises:
        UsageError: malformed values, or a blend name that names no generator.
    """
    from ipltool.render.blend import parse_blend, parse_number_list
    from ipltool.render.generators import resolve_generator

    strengths = list(dict.fromkeys(parse_number_list(strength, "--strength")))
    pairs = []
    for name, weight in parse_blend(blend):
        ref = resolve_generator(name, runs_root)
        if ref.path is None:
            raise UsageError(f"--blend {name}: a source generator, not an adapted one", hint="blend adapted generators (domains, run folders, .pt files)")
        pairs.append((TargetSpec(ref.label, ref.path, ref.origin), weight))
    return strengths, pairs


def load_targets(
    specs: list[TargetSpec],
    device: torch.device,
    like: Generator,
    strengths: Sequence[float] = (1.0,),
    blend: Sequence[tuple[TargetSpec, float]] = (),
) -> list[Target]:
    """Load the planned generators, checked against the inverter's own generator.

    Args:
        specs: from `plan_targets`.
        device: where the generators go.
        like: the encoder's generator: the source generator of the targets. W+ codes must
            fit every target, random stand-ins copy its architecture and mapping network,
            and `strengths` and `blend` mix with its weights (`render.blend`).
        strengths: `--strength` values: each target at each (1: as trained; `disney-s0.5`).
        blend: `--blend` (target, weight) pairs: one more target mixing them.

    Raises:
        CheckpointError: a file that is not a generator, or a generator whose W+ space
            differs from the encoder's (another resolution or style size), or that was
            adapted from another source (with `strengths` or `blend`).
    """
    taken = {spec.label for spec in specs}
    targets = []
    for spec in specs:
        generator = _load(spec, like)
        for alpha in strengths:
            if alpha == 1:
                targets.append(Target(spec.label, generator.to(device).eval().requires_grad_(False), spec.source))
            else:
                mixed = mixed_generator(like, [(generator, alpha)], [spec.source])
                targets.append(Target(_unique(strength_label(spec.label, alpha), taken), mixed.to(device), f"{spec.source} at strength {alpha:g}"))
    if blend:
        generators = [(_load(spec, like), weight) for spec, weight in blend]
        mixed = mixed_generator(like, generators, [spec.source for spec, _ in blend])
        label = _unique(blend_label([(spec.label, weight) for spec, weight in blend]), taken)
        targets.append(Target(label, mixed.to(device), " + ".join(f"{w:g}×{spec.source}" for spec, w in blend)))
    return targets


def _load(spec: TargetSpec, like: Generator) -> Generator:
    """The generator of `spec` on the CPU (a random stand-in sharing `like`'s mapping network for None)."""
    if spec.path is None:
        generator = build_generator(like.config, seed=zlib.crc32(spec.label.encode()), noise_strength=0.1)
        # Adaptation never changes the mapping network: a stand-in keeps its source's, as real targets do.
        generator.style.load_state_dict(like.style.state_dict())
    else:
        generator = load_generator(spec.path)
    if (generator.n_latent, generator.style_dim) != (like.n_latent, like.style_dim):
        raise CheckpointError(
            f"generator {spec.label!r} ({spec.source}) takes W+ codes of {generator.n_latent}x{generator.style_dim}, "
            f"the encoder makes {like.n_latent}x{like.style_dim}",
            hint="use generators adapted from the generator the encoder was trained for",
        )
    return generator.to(like.device)
