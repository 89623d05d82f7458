"""`ipl blend`: write a mix of adapted generators as a normal generator checkpoint.

The file is `{"g_ema": ..., "config": ..., "blend": {...}}`, so every command (and the
reference StyleGAN-NADA / IPL code, which reads `g_ema`) loads it like any adapted
generator; the `blend` entry records what it was made from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ipltool.atomic import atomic_torch_save
from ipltool.errors import UsageError
from ipltool.models.stylegan2 import generator_checkpoint
from ipltool.render.blend import mixed_generator
from ipltool.render.generate import Loader
from ipltool.render.generators import resolve_generator


def blend_generators(
    generators: Sequence[str],
    weights: Sequence[float],
    out: Path,
    runs_root: Path = Path("runs"),
    source_generator: str | None = None,
    force: bool = False,
) -> Path:
    """Write `θ_s + Σ w_i (θ_i − θ_s)` of `generators` to `out` (see `render.blend`).

    Args:
        generators: domains, run folders, .pt files (as `ipl generate -g`).
        weights: one per generator; when they do not sum to 1 the source generator's
            weights make up the rest (so it must be known).
        out: the .pt file to write (atomically).
        runs_root: where domain names find their runs.
        source_generator: the source of files outside run folders.
        force: replace an existing `out` (never one of the inputs).

    Raises:
        UsageError: counts that differ, fewer than two generators with weights summing to 1
            (that is a copy), an existing `out` without `force`, `out` naming an input.
        CheckpointError: generators of other sources or architectures.
    """
    if len(generators) != len(weights):
        raise UsageError(f"{len(generators)} generators but {len(weights)} weights", hint="give one weight per generator, e.g. --weights 0.5,0.5")
    if not generators:
        raise UsageError("name the generators to blend, e.g. ipl blend disney pixar --weights 0.5,0.5 --out mix.pt")
    if out.suffix != ".pt":
        raise UsageError(f"--out {out}: a generator checkpoint is a .pt file")
    refs = [resolve_generator(spec, runs_root, source_generator) for spec in generators]
    inputs = {ref.path.resolve() for ref in refs if ref.path is not None}
    if out.resolve() in inputs:
        raise UsageError(f"--out {out} is one of the generators being blended: choose another file")
    if out.exists() and not force:
        raise UsageError(f"{out} exists", hint="choose another --out, or add --force to replace it")
    loader = Loader("cpu")
    total = sum(weights)
    known = [ref for ref in refs if ref.source is not None]
    source = None
    if abs(total - 1) > 1e-9:  # the source weighs in (else the generators are compared among themselves)
        source, _ = loader.source_of(known[0] if known else refs[0], f"weights summing to {total:g}")
    mixed = mixed_generator(source, [(loader.generator(ref), w) for ref, w in zip(refs, weights)], [ref.origin for ref in refs])
    record = {
        "from": [ref.origin for ref in refs],
        "weights": [float(w) for w in weights],
        "source": known[0].source if known else None,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(generator_checkpoint(mixed, blend=record), out)
    return out


def blend_record(path: Path) -> dict | None:
    """The `blend` entry of a checkpoint `ipl blend` wrote (None for any other file)."""
    from ipltool import checkpoints

    data = checkpoints.read(path, "checkpoint")
    record = data.get("blend") if isinstance(data, dict) else None
    return record if isinstance(record, dict) else None

