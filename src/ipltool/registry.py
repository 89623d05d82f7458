"""Plugin discovery through Python entry points.

Groups (the built-ins register through the same groups as third parties):
- `ipltool.mappers`:  factory `(n_ctx, dim, latent_dim, **options) -> nn.Module`
  mapping (B, latent_dim) to (B, n_ctx, dim);
- `ipltool.encoders`: an object that loads a checkpoint and maps aligned images
  (B, 3, H, W) in [-1, 1] to W+ codes (B, n_latent, 512);
- `ipltool.domains`:  a directory of domain files (a package, a path, or a
  callable returning a path).

`$IPL_PLUGINS` limits which third-party distributions load: unset loads all, an
empty string loads none, otherwise a comma-separated list of distribution names.
ipltool's own entry points always load.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ipltool.errors import PluginError, unknown_name

GROUPS = {
    "mappers": "ipltool.mappers",
    "encoders": "ipltool.encoders",
    "domains": "ipltool.domains",
}
ENV_VAR = "IPL_PLUGINS"
OWN_DIST = "ipltool"


# ----------------------------------------------------------------------------
# Contracts, checked when a plugin loads (docs/plugins.md has the full text)


@runtime_checkable
class MapperFactory(Protocol):
    """`ipltool.mappers`: builds a module mapping w (B, latent_dim) to prompts (B, n_ctx, dim)."""

    def __call__(self, n_ctx: int, dim: int, latent_dim: int, **options: Any) -> Any: ...


@runtime_checkable
class EncoderLoader(Protocol):
    """`ipltool.encoders`: loads an inverter from a checkpoint.

    Optional members: `default_weights` (a registry name used when `--weights` is not
    given) and `tiny(decoder, seed=0, input_size=64, device="cpu", **options)` (a random
    inverter for `--smoke`); see `optional_method`.
    """

    def load(self, path: Any, device: Any = "cpu", **options: Any) -> Any: ...


#: Per group: the protocol its objects follow and the methods they must have.
CONTRACTS: dict[str, tuple[type, tuple[str, ...]]] = {
    "mappers": (MapperFactory, ("__call__",)),
    "encoders": (EncoderLoader, ("load",)),
}


@dataclass(frozen=True)
class Plugin:
    """One entry point: `kind` (mappers/encoders/domains), `name`, target `value`, and its distribution."""

    kind: str
    name: str
    value: str
    dist: str
    version: str

    @property
    def builtin(self) -> bool:
        return _canonical(self.dist) == OWN_DIST


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _allowed_dists() -> set[str] | None:
    raw = os.environ.get(ENV_VAR)
    if raw is None:
        return None
    return {_canonical(part) for part in raw.split(",") if part.strip()}


def plugins(kind: str | None = None) -> list[Plugin]:
    """Installed entry points of one kind (or all kinds), filtered by `$IPL_PLUGINS`.

    Built-ins come first, then third parties sorted by distribution and name.
    """
    kinds = [kind] if kind else list(GROUPS)
    allowed = _allowed_dists()
    found: list[Plugin] = []
    seen: set[tuple[str, str, str]] = set()
    for k in kinds:
        if k not in GROUPS:
            raise unknown_name("plugin kind", k, GROUPS, label="kinds")
        for ep in metadata.entry_points(group=GROUPS[k]):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            plugin = Plugin(k, ep.name, ep.value, dist, version)
            key = (k, ep.name, _canonical(dist))
            # An editable install can expose the same distribution twice.
            if key in seen:
                continue
            seen.add(key)
            if not plugin.builtin and allowed is not None and _canonical(dist) not in allowed:
                continue
            found.append(plugin)
    return sorted(found, key=lambda p: (GROUPS[p.kind], not p.builtin, p.dist, p.name))


def names(kind: str) -> list[str]:
    """Names available for `kind`, in discovery order, without duplicates."""
    return list(dict.fromkeys(p.name for p in plugins(kind)))


def _find(kind: str, name: str) -> Plugin:
    matches = [p for p in plugins(kind) if p.name == name]
    if not matches:
        raise unknown_name(
            kind[:-1], name, names(kind), label="installed",
            hint="`ipl plugins` lists installed plugins; install a plugin package to add more",
        )
    return matches[0]  # built-ins first: a third party cannot replace a built-in silently


def require(kind: str, name: str) -> Plugin:
    """Check that plugin `name` of `kind` is installed, before any work starts.

    Raises:
        UnknownNameError: it is not; the message suggests a close name, the hint lists the installed ones.
    """
    return _find(kind, name)


def load(kind: str, name: str) -> Any:
    """Import and return the object behind plugin `name` of `kind`.

    Raises:
        UnknownNameError: no such plugin; the hint lists the installed ones.
        PluginError: the plugin is installed but fails to import.
    """
    plugin = _find(kind, name)
    ep = metadata.EntryPoint(name=plugin.name, value=plugin.value, group=GROUPS[kind])
    try:
        obj = ep.load()
    except Exception as err:
        raise PluginError(
            f"{kind[:-1]} plugin {name!r} from {plugin.dist} failed to load: {type(err).__name__}: {err}",
            hint=f"reinstall {plugin.dist}, or set {ENV_VAR} to leave it out",
        ) from err
    _check_contract(plugin, obj)
    return obj


def _describe(plugin: Plugin) -> str:
    return f"{plugin.kind[:-1]} plugin {plugin.name!r} from {plugin.dist} ({plugin.value})"


def _check_contract(plugin: Plugin, obj: Any) -> None:
    """Refuse an object without the methods of its group's protocol, naming the plugin and the method."""
    protocol, methods = CONTRACTS.get(plugin.kind, (None, ()))
    for method in methods:
        if not callable(getattr(obj, method, None)):
            what = "is not callable" if method == "__call__" else f"has no {method}() method"
            raise PluginError(
                f"{_describe(plugin)} {what}: it does not follow the {protocol.__name__} contract",
                hint="see docs/plugins.md for what each plugin group provides",
            )


def optional_method(kind: str, name: str, obj: Any, method: str, needed_for: str):
    """The optional method `method` of plugin object `obj`, or a PluginError saying what needs it.

    Raises:
        PluginError: `obj` has no such method; the message names the plugin and `needed_for`.
    """
    found = getattr(obj, method, None)
    if not callable(found):
        raise PluginError(
            f"{_describe(_find(kind, name))} has no {method}() method, which {needed_for} needs",
            hint="see docs/plugins.md for the optional methods of each plugin group",
        )
    return found


def build_mapper(kind: str, n_ctx: int, dim: int, latent_dim: int, **options):
    """Build the mapper registered as `kind` with the factory contract of `ipltool.mappers`."""
    return load("mappers", kind)(n_ctx, dim, latent_dim, **options)


def _as_directory(obj: Any) -> Path:
    if callable(obj) and not isinstance(obj, types.ModuleType):
        obj = obj()
    if isinstance(obj, types.ModuleType):
        return Path(str(resources.files(obj.__name__)))
    if isinstance(obj, (str, os.PathLike)):
        return Path(obj)
    if hasattr(obj, "joinpath"):  # importlib.resources Traversable
        return Path(str(obj))
    raise TypeError(f"expected a package, a path or a callable returning one, got {type(obj).__name__}")


def domain_pack_dirs() -> list[tuple[str, Path]]:
    """Directories of domain files contributed by plugins, as `(provider, directory)` pairs.

    Raises:
        PluginError: a domain pack fails to import or does not name a directory.
    """
    result = []
    for plugin in plugins("domains"):
        target = load("domains", plugin.name)
        try:
            directory = _as_directory(target)
        except TypeError as err:
            raise PluginError(f"domain pack {plugin.name!r} from {plugin.dist}: {err}") from None
        if not directory.is_dir():
            raise PluginError(f"domain pack {plugin.name!r} from {plugin.dist} names {directory}, which is not a directory")
        result.append((f"{plugin.dist} ({plugin.name})", directory))
    return result
