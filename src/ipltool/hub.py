"""The model registry: names of pretrained files and the architectures behind them.

The registry is data (`data/models.toml`), read once per process. This module
answers "what is X": the download and verification side comes with `ipl fetch`.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import BaseModel, ConfigDict, Field

from ipltool.errors import UnknownNameError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ModelEntry(BaseModel):
    """One registry entry (see `data/models.toml` for the fields in use)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: str
    description: str
    synthetic: bool = False
    file: str | None = None
    arch: dict[str, Any] = Field(default_factory=dict)
    license: str = ""
    urls: list[str] = Field(default_factory=list)
    sha256: list[str] = Field(default_factory=list)
    bytes: int | None = None

    def generator_config(self):
        """The architecture (`GeneratorConfig`) of a `generator` entry."""
        from ipltool.models.stylegan2 import GeneratorConfig  # torch is imported only when needed

        if self.kind != "generator":
            raise UnknownNameError(f"{self.name!r} is a {self.kind}, not a generator")
        return GeneratorConfig(**self.arch)


@lru_cache(maxsize=1)
def _registry() -> dict[str, ModelEntry]:
    raw = tomllib.loads((resources.files("ipltool") / "data" / "models.toml").read_text(encoding="utf-8"))
    return {name: ModelEntry(name=name, **fields) for name, fields in raw.items()}


def list_models(kind: str | None = None) -> list[ModelEntry]:
    """Every registry entry, optionally only those of one `kind` (e.g. "generator")."""
    return [e for e in _registry().values() if kind is None or e.kind == kind]


def get_model(name: str) -> ModelEntry:
    """The registry entry called `name`.

    Raises:
        UnknownNameError: no such entry; the message lists the known names.
    """
    try:
        return _registry()[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown model {name!r} (known: {', '.join(_registry())})",
            hint="use a registry name or a path to a .pt file",
        ) from None


def cache_dir() -> Path:
    """Where pretrained files live: `$IPL_CACHE`, else the platform user cache dir."""
    env = os.environ.get("IPL_CACHE")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("ipltool"))


def local_path(name: str) -> Path:
    """The cache path of registry entry `name` (whether or not the file is there yet)."""
    entry = get_model(name)
    if entry.synthetic or not entry.file:
        raise UnknownNameError(f"{name!r} is synthetic and has no file")
    return cache_dir() / entry.file


def load_generator_by_name(spec: str, device="cpu", seed: int = 0):
    """The source generator of a domain: `tiny`, a registry name, or a path to a `.pt` file.

    Args:
        spec: the domain's `generator` value.
        device: where to put it.
        seed: seed of the synthetic `tiny` generator.

    Returns:
        A frozen `Generator` in eval mode.

    Raises:
        UsageError: a registry file that is not in the cache (the message says where it
            is expected), or a missing path.
    """
    from ipltool.errors import UsageError
    from ipltool.models.stylegan2 import build_generator, load_generator

    if spec in _registry() and _registry()[spec].synthetic:
        # Non-zero noise strengths, like a trained model (see build_generator).
        generator = build_generator(_registry()[spec].generator_config(), seed=seed, noise_strength=0.1)
    elif spec in _registry():
        path = local_path(spec)
        if not path.is_file():
            raise UsageError(
                f"the weights of {spec!r} are not in the cache ({path})",
                hint=f"put {_registry()[spec].file} there (sources: {', '.join(_registry()[spec].urls)}), "
                "or pass a checkpoint path as the generator",
            )
        generator = load_generator(path, config=_registry()[spec].generator_config())
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UsageError(f"generator checkpoint not found: {path}")
        generator = load_generator(path)
    return generator.to(device).eval().requires_grad_(False)
