"""What a `-g` value names: an `ipl adapt` run, a generator file, a registry generator or a domain.

`ipl generate`, `ipl blend`, `--blend` and `ipl stylize` resolve generators here, so the
same words mean the same generator everywhere. A domain name means its newest finished
adapt run under the runs folder (`train.run.finished_runs`); a run or a file inside a run
folder knows its source generator from the run's config.toml.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ipltool import hub
from ipltool.errors import UnknownNameError, UsageError, did_you_mean
from ipltool.train.run import GENERATOR_NAME, RunDir, finished_runs

_LABEL = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class GeneratorRef:
    """A resolved generator, not loaded yet.

    Attributes:
        label: its column and folder name (the domain of a run, a file's stem, a registry name).
        path: its weights file; None for a registry generator (loaded by name).
        source: its source generator (registry name, "tiny" or a path); None: unknown
            (a file outside any run folder).
        origin: where it came from, for messages ("runs/disney-20261205-101010").
        smoke: a `--smoke` run (tiny random models).
    """

    label: str
    path: Path | None
    source: str | None
    origin: str
    smoke: bool = False

    @property
    def is_source(self) -> bool:
        """True for a registry generator: a source generator itself."""
        return self.path is None


def unique_label(label: str, taken: set[str], reserved: tuple[str, ...] = ()) -> str:
    """`label` made safe as a folder name and different from `taken` and `reserved` (`-2`, `-3`...); added to `taken`."""
    label = _LABEL.sub("_", label) or "generator"
    candidate, counter = label, 2
    while candidate in taken or candidate in reserved:
        candidate = f"{label}-{counter}"
        counter += 1
    taken.add(candidate)
    return candidate


def run_name(path: Path) -> str:
    """The domain name a run folder's config gives, else the folder's name; a file's stem."""
    if path.is_dir():
        try:
            name = RunDir.open(path).read_config().get("name")
        except UsageError:
            name = None
        return name if isinstance(name, str) and name else path.name
    return path.stem


def generator_file(spec: Path) -> Path:
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


def _run_source(folder: Path) -> tuple[str | None, bool]:
    """(source generator, smoke) recorded in a run folder's config.toml; (None, False) without one."""
    if not (folder / "config.toml").is_file():
        return None, False
    run = RunDir.open(folder)
    try:
        config = run.read_config()
        smoke = run.read_info().smoke
    except UsageError:
        return None, False
    source = config.get("generator")
    return (source if isinstance(source, str) and source else None), smoke


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or spec.endswith((".pt", ".pth", ".pkl")) or spec.startswith(".")


def resolve_generator(spec: str, runs_root: Path, source: str | None = None) -> GeneratorRef:
    """The generator `spec` names (label not yet unique: see `resolve_generators`).

    Args:
        spec: a run folder, a generator `.pt` file, a registry generator name, or a domain
            name (its newest finished adapt run under `runs_root`), tried in that order.
        runs_root: where `ipl adapt` writes its runs.
        source: `--source-generator`: the source of a file outside any run folder
            (a run's own config wins).

    Raises:
        UsageError: nothing of that name, a run that has not finished, or no finished run of a domain.
    """
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            file = generator_file(path)
            run_source, smoke = _run_source(path)
            if run_source is None and not (path / "config.toml").is_file():
                raise UsageError(f"{spec} is a folder but not an `ipl adapt` run (no config.toml)", hint="pass a run folder or a generator .pt file")
            return GeneratorRef(run_name(path), file, run_source or source, spec, smoke)
        run_source, smoke = _run_source(path.parent)
        return GeneratorRef(run_name(path.parent) if run_source else path.stem, path, run_source or source, spec, smoke)
    if _looks_like_path(spec):
        raise UsageError(f"no such generator file or run folder: {spec}")
    try:
        entry = hub.get_model(spec)
    except UnknownNameError:
        entry = None
    if entry is not None:
        if entry.kind != "generator":
            raise UsageError(f"{spec!r} is a {entry.kind} in the model registry, not a generator")
        return GeneratorRef(spec, None, spec, f"registry generator {spec}", smoke=entry.synthetic)
    runs = finished_runs(spec, runs_root)
    if runs:
        folder, info = runs[0]
        run_source, _ = _run_source(folder)
        return GeneratorRef(spec, folder / GENERATOR_NAME, run_source, str(folder), info.smoke)
    from ipltool.domain import discover_domains

    names = [entry.name for entry in discover_domains() if not entry.error]
    if spec in names:
        raise UsageError(
            f"no finished `ipl adapt` run of {spec!r} under {runs_root}",
            hint=f"train one with `ipl adapt --domain {spec}`, or pass --runs DIR, a run folder or a generator file",
        )
    registry = [e.name for e in hub.list_models("generator")]
    raise UsageError(
        f"no run folder, generator file, registry generator or domain named {spec!r}{did_you_mean(spec, [*names, *registry])}",
        hint="`ipl fetch --list` shows registry generators, `ipl prompts list` the domains",
    )


def resolve_generators(specs: list[str], runs_root: Path, source: str | None = None, reserved: tuple[str, ...] = ()) -> list[GeneratorRef]:
    """`resolve_generator` for each spec, with unique labels (`disney`, `disney-2`...)."""
    taken: set[str] = set()
    refs = []
    for spec in specs:
        ref = resolve_generator(spec, runs_root, source)
        refs.append(GeneratorRef(unique_label(ref.label, taken, reserved), ref.path, ref.source, ref.origin, ref.smoke))
    return refs
