"""The model registry and the cache: what each pretrained file is, where it lives, how it is fetched.

The registry is data (`data/models.toml`), read once per process; `add_model` adds
entries. Files live in one cache dir (`paths.cache_dir()`: `$IPL_CACHE`, else the
platform user cache dir). `ensure(name)` is how every command gets a file: from the
cache, else announced and downloaded (`download.py` does the transfer), never when
offline (`--offline`, `IPL_OFFLINE=1`). Hashes known in advance are enforced; where none
is known the first download records one in the cache (`checksums.json`), and later
downloads and `ipl fetch --verify` must match it.
"""

from __future__ import annotations

import bz2
import json
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from rich.filesize import decimal

from ipltool import console, paths, progress, tomlio
from ipltool.atomic import atomic_write_text
from ipltool.download import ChecksumError, download, sha256_file
from ipltool.errors import IplError, UnknownNameError, UsageError, unknown_name



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
    format: str = ""
    needed_by: list[str] = Field(default_factory=list)
    decompress: str | None = None
    #: For an archive (`decompress`): the sha256 values of the file it unpacks to, the one
    #: the cache holds (`sha256` is then the archive's, as downloaded).
    unpacked_sha256: list[str] = Field(default_factory=list)


@lru_cache(maxsize=1)
def _registry() -> dict[str, ModelEntry]:
    raw = tomlio.loads((resources.files("ipltool") / "data" / "models.toml").read_text(encoding="utf-8"))
    return {name: ModelEntry(name=name, **fields) for name, fields in raw.items()}


def list_models(kind: str | None = None) -> list[ModelEntry]:
    """Every registry entry, optionally only those of one `kind` (e.g. "generator")."""
    return [e for e in _registry().values() if kind is None or e.kind == kind]


def get_model(name: str) -> ModelEntry:
    """The registry entry called `name`.

    Raises:
        UnknownNameError: no such entry; the message suggests a close name, the hint lists the known ones.
    """
    try:
        return _registry()[name]
    except KeyError:
        raise unknown_name("model", name, _registry(), hint="use a registry name or a path to a .pt file") from None


def add_model(entry: ModelEntry) -> None:
    """Register `entry` for the rest of the process, beside those of `data/models.toml`.

    Raises:
        UsageError: the registry already has an entry of that name.
    """
    if entry.name in _registry():
        raise UsageError(f"the model registry already has an entry named {entry.name!r}")
    _registry()[entry.name] = entry


def remove_model(name: str) -> ModelEntry:
    """Take entry `name` out of the registry (undoes `add_model`); returns it.

    Raises:
        UnknownNameError: no such entry.
    """
    entry = get_model(name)
    del _registry()[name]
    return entry


def local_path(name: str) -> Path:
    """The cache path of registry entry `name` (whether or not the file is there yet)."""
    entry = get_model(name)
    if entry.synthetic or not entry.file:
        raise UnknownNameError(f"{name!r} is synthetic and has no file")
    return paths.cache_dir() / entry.file


# ----------------------------------------------------------------------------
# The cache: state, verification, fetching, importing

CHECKSUMS_NAME = "checksums.json"


def offline() -> bool:
    """True when no command may touch the network (`--offline` or `IPL_OFFLINE=1`)."""
    return console.options.offline or os.environ.get("IPL_OFFLINE", "") not in ("", "0")


def _records_path() -> Path:
    return paths.cache_dir() / CHECKSUMS_NAME


def _read_records() -> dict[str, dict]:
    """`checksums.json`: per name, the recorded sha256 and the size and mtime it was computed for."""
    try:
        data = json.loads(_records_path().read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise IplError(f"cannot read {_records_path()}: {err}", hint="delete it; `ipl fetch --verify` rebuilds it") from None
    return data if isinstance(data, dict) else {}


def record(name: str, digest: str, path: Path, how: str) -> None:
    """Remember in `checksums.json` the sha256 of the cached file of `name` and how it got there.

    Args:
        name: the registry name.
        digest: the file's sha256.
        path: the cached file (its size and mtime are kept, so `status` knows when it changed).
        how: "download", "import", "verify", or what a converter calls itself ("nvlabs-pickle").
    """
    records = _read_records()
    stat = path.stat()
    records[name] = {"sha256": digest, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "source": how}
    paths.cache_dir().mkdir(parents=True, exist_ok=True)
    atomic_write_text(_records_path(), json.dumps(records, indent=2, sort_keys=True) + "\n")


def known_hashes(entry: ModelEntry) -> frozenset[str]:
    """The sha256 values the cached file of `entry` may have: the registry's, else the one recorded at its download.

    For an archive these are the hashes of the unpacked file (`unpacked_sha256`), the
    file the cache holds; `archive_hashes` are those of the download itself.
    """
    listed = entry.unpacked_sha256 if entry.decompress else entry.sha256
    if listed:
        return frozenset(listed)
    record = _read_records().get(entry.name)
    return frozenset([record["sha256"]]) if record and record.get("source") == "download" else frozenset()


def archive_hashes(entry: ModelEntry) -> frozenset[str]:
    """The sha256 values of the download of an archive entry (`decompress`), as the registry lists them."""
    return frozenset(entry.sha256)


@dataclass
class CacheStatus:
    """Where a registry file stands in the cache."""

    entry: ModelEntry
    path: Path | None
    cached: bool
    verified: bool | None  # None: not checked since the file last changed (or nothing to check against)


def status(name: str) -> CacheStatus:
    """Cached? Verified? Cheap: a file is re-hashed only by `verify`, its result kept per size and mtime."""
    entry = get_model(name)
    if entry.synthetic:
        return CacheStatus(entry, None, True, True)
    path = local_path(name)
    if not path.is_file():
        return CacheStatus(entry, path, False, None)
    record = _read_records().get(name)
    stat = path.stat()
    if record and record.get("bytes") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
        hashes = known_hashes(entry)
        return CacheStatus(entry, path, True, record["sha256"] in hashes if hashes else None)
    return CacheStatus(entry, path, True, None)


def verify(name: str) -> CacheStatus:
    """Re-hash a cached file and compare it with the known or recorded hash; the result is remembered."""
    entry = get_model(name)
    current = status(name)
    if entry.synthetic or not current.cached:
        return current
    digest = sha256_file(current.path)
    hashes = known_hashes(entry)
    previous = _read_records().get(name, {})
    record(name, digest, current.path, previous.get("source", "verify"))
    return CacheStatus(entry, current.path, True, digest in hashes if hashes else None)


def _size(n: int | None) -> str:
    """A registry size as '381.5 MB' (decimal units, as download sizes are usually given)."""
    return "size unknown" if n is None else decimal(n)


def missing_hint(name: str) -> str:
    """The exact commands that put `name` into the cache."""
    return f"run `ipl fetch {name}` where there is internet, or `ipl fetch --import {name} FILE` with a copy you have"


def ensure(name: str) -> Path:
    """The cache path of `name`, downloading it first (announced, with a progress bar) if missing.

    Raises:
        UsageError: missing while offline; the hint names the `ipl fetch` line to run.
        DownloadError: every mirror failed (the message says why for each).
    """
    entry = get_model(name)
    path = local_path(name)
    if path.is_file():
        return path
    if offline():
        raise UsageError(f"{name} ({entry.description}) is not in the cache ({path}) and downloads are off", hint=missing_hint(name))
    return fetch(name)


def ensure_all(names: list[str], force: bool = False) -> dict[str, Path]:
    """`ensure` for several files, announcing first what will be downloaded (names and sizes).

    Offline, every missing file is named in one error.
    """
    missing = [n for n in names if force or not local_path(n).is_file()]
    if missing and offline():
        listed = ", ".join(f"{n} ({_size(get_model(n).bytes)})" for n in missing)
        hint = missing_hint(missing[0]) if len(missing) == 1 else f"run `ipl fetch {' '.join(missing)}` where there is internet, or `ipl fetch --import NAME FILE` for each"
        raise UsageError(f"not in the cache, and downloads are off: {listed}", hint=hint)
    if missing:
        sizes = [get_model(n).bytes for n in missing]
        total = _size(sum(sizes)) if all(sizes) else "size partly unknown"
        console.info(f"will download {len(missing)} file(s), {total}: " + ", ".join(f"{n} ({_size(b)})" for n, b in zip(missing, sizes)))
    return {n: fetch(n, force=force) if n in missing else local_path(n) for n in names}


def fetch(name: str, force: bool = False) -> Path:
    """Download `name` into the cache (verified, atomically), unless it is already there.

    Raises:
        UsageError: offline; or the entry is synthetic.
        DownloadError, ChecksumError: see `ipltool.download.download`.
    """
    entry = get_model(name)
    path = local_path(name)
    if path.is_file() and not force:
        return path
    if offline():
        raise UsageError(f"cannot download {name}: downloads are off (--offline or IPL_OFFLINE)", hint=missing_hint(name))
    if not entry.urls:
        raise UsageError(f"{name} has no download address", hint=f"get it by hand, then `ipl fetch --import {name} FILE`")
    console.info(f"downloading {name} ({_size(entry.bytes)}): {entry.description}")
    target = path.with_name(path.name + ".download") if entry.decompress else path
    hashes = archive_hashes(entry) if entry.decompress else known_hashes(entry)
    with progress.track(entry.bytes, name, unit=progress.BYTES) as update:
        digest = download(entry.urls, target, sha256=hashes, size=entry.bytes, progress=update, name=name)
    if entry.decompress:
        digest = _unpack(entry, target, path)
    record(name, digest, path, "download")
    return path


def _unpack(entry: ModelEntry, archive: Path, path: Path) -> str:
    """Decompress a verified archive into `path`, drop the archive, and return the unpacked file's sha256.

    The unpacked file goes through a temporary name and replaces `path` only when its
    hash is one of `unpacked_sha256` (when the registry lists any).

    Raises:
        ChecksumError: the unpacked file is not the listed one (nothing is left in the cache).
    """
    if entry.decompress != "bz2":
        raise IplError(f"{entry.name}: unknown archive format {entry.decompress!r}")
    tmp = path.with_name(f".{path.name}.unpack")
    try:
        with bz2.open(archive, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        digest = sha256_file(tmp)
        if entry.unpacked_sha256 and digest not in entry.unpacked_sha256:
            raise ChecksumError(
                f"{entry.name}: the archive unpacks to sha256 {digest}, not {', '.join(entry.unpacked_sha256)}",
                hint="nothing was kept; report the archive's address as changed",
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        archive.unlink(missing_ok=True)
    return digest


#: Registry formats that are `torch.save` files, checked by `checkpoints.read` on import when no hash is known.
TORCH_FORMATS = ("rosinality", "psp-checkpoint", "state-dict")


def import_file(name: str, file: str | os.PathLike, link: bool = False) -> Path:
    """Put a copy you already have into the cache: checked against the known hashes, then copied or linked.

    Where no hash is known, a `torch.save` file (a generator, or `TORCH_FORMATS`) must be
    readable weights-only and finite before it is copied.

    Raises:
        UsageError: the file does not exist.
        ChecksumError: its hash is not one of the registry's for `name` (nothing is copied).
        CheckpointError: no hash is known and the file is not finite weights (nothing is copied).
    """
    entry = get_model(name)
    if entry.synthetic:
        raise UsageError(f"{name} is synthetic: it needs no file")
    source = Path(file).expanduser()
    if not source.is_file():
        raise UsageError(f"no such file: {source}")
    path = local_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if entry.decompress and source.suffix != path.suffix:  # the archive as downloaded
        digest = sha256_file(source)
        if entry.sha256 and digest not in entry.sha256:
            raise ChecksumError(f"{source} is not {name}: sha256 {digest} is not one of {', '.join(entry.sha256)}")
        archive = path.with_name(path.name + ".download")
        shutil.copyfile(source, archive)
        record(name, _unpack(entry, archive, path), path, "import")
        return path
    digest = sha256_file(source)
    hashes = known_hashes(entry)  # of the unpacked file, for an archive entry
    if hashes and digest not in hashes:
        raise ChecksumError(
            f"{source} is not {name}: sha256 {digest} is not one of {', '.join(sorted(hashes))}",
            hint="check that it is the right file; nothing was copied",
        )
    if not hashes and (entry.kind == "generator" or entry.format in TORCH_FORMATS):
        # Nothing to compare with: the contents must at least be finite weights, read
        # without running code (the same checks as every later load), before they are cached.
        from ipltool import checkpoints

        checkpoints.check_finite(checkpoints.read(source, f"{name} weights file"), source)
    tmp = path.with_name(f".{path.name}.import")
    tmp.unlink(missing_ok=True)
    if link:
        try:
            os.link(source, tmp)  # a hard link shares the bytes; a symlink would break if the copy moves
        except OSError:
            os.symlink(source.resolve(), tmp)
    else:
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)
    record(name, digest, path, "import")
    return path


def clip_entry(model: str, pretrained: str | None) -> ModelEntry | None:
    """The registry entry holding OpenAI's weights for a CLIP architecture, if any.

    Args:
        model: the architecture in open_clip's spelling ("ViT-B-32"; see
            `ipltool.models.clip.normalize_model_name` for other spellings).
        pretrained: the weights tag; only "openai" has registry entries.
    """
    if pretrained != "openai":
        return None
    for entry in list_models("clip"):
        if entry.arch.get("model") == model:
            return entry
    return None
