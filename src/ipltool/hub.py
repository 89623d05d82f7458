"""The model registry: names of pretrained files and the architectures behind them.

The registry is data (`data/models.toml`), read once per process. This module
answers "what is X": the download and verification side comes with `ipl fetch`.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from importlib import resources
from typing import Any

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
