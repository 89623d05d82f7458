"""Which photos a `stylize` run reads, and the output name each one gets.

Inputs are files, folders (searched recursively), glob patterns, or a list file with one
path per line. A path named explicitly is kept whatever its suffix (a bad one is reported
as unreadable later); inside folders and globs only image suffixes count. Each photo keeps
its path relative to the folder or glob root it came from, so `a/x.jpg` and `b/x.jpg`
never write to the same output name.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ipltool.errors import UsageError
from ipltool.images import IMAGE_SUFFIXES

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Photo:
    """One input: where it is and the output stem (POSIX, relative, no suffix) it writes to."""

    path: Path
    name: str


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in _GLOB_CHARS)


def _glob_root(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard (output names are relative to it)."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if _is_glob(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _in_folder(folder: Path) -> list[tuple[Path, Path]]:
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p, folder) for p in found]


def _expand(spec: str, base: Path | None = None) -> list[tuple[Path, Path]]:
    """(file, root) pairs for one command-line or list-file entry."""
    raw = os.path.expanduser(spec)
    if base is not None and not os.path.isabs(raw):
        raw = os.path.normpath(str(base / raw))
    if _is_glob(raw) and not Path(raw).exists():
        matches = sorted(Path(m) for m in glob.glob(raw, recursive=True))
        files = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise UsageError(f"no image matches {spec!r}", hint=f"image suffixes: {', '.join(IMAGE_SUFFIXES)}")
        root = _glob_root(raw)
        return [(f, root) for f in files]
    path = Path(raw)
    if path.is_dir():
        found = _in_folder(path)
        if not found:
            raise UsageError(f"no images in {path}", hint=f"image suffixes: {', '.join(IMAGE_SUFFIXES)}")
        return found
    # A file, or an entry that does not exist: kept, and reported per file when read.
    return [(path, path.parent)]


def read_list_file(path: Path) -> list[str]:
    """Entries of a list file: one path per line; blank lines and `#` comments skipped.

    Raises:
        UsageError: the list file cannot be read.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read list file {path}: {err}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def collect_photos(specs: list[str], list_file: Path | None = None) -> list[Photo]:
    """Every input photo in order, without duplicates, each with a unique output name.

    Args:
        specs: command-line arguments: files, folders, or glob patterns (quoted, so the
            shell leaves them alone; `**` recurses).
        list_file: a text file of further entries; relative ones are relative to it.

    Returns:
        `Photo`s; a missing file named on the command line is an error, one named in a
        list file is kept (it shows up as unreadable in the manifest, like a damaged one).

    Raises:
        UsageError: nothing to read, a missing command-line path, or a glob or folder
            without images.
    """
    pairs: list[tuple[Path, Path]] = []
    for spec in specs:
        if not _is_glob(spec) and not Path(os.path.expanduser(spec)).exists():
            raise UsageError(f"no such file or folder: {spec}")
        pairs += _expand(spec)
    if list_file is not None:
        for entry in read_list_file(list_file):
            pairs += _expand(entry, base=list_file.parent)
    if not pairs:
        raise UsageError("no input photos given", hint="pass files, folders or quoted globs, or --from-list FILE")

    photos: list[Photo] = []
    seen_paths: set[Path] = set()
    taken: set[str] = set()
    for path, root in pairs:
        key = path.resolve()
        if key in seen_paths:
            continue
        seen_paths.add(key)
        photos.append(Photo(path, _unique_name(path, root, taken)))
    return photos


def _unique_name(path: Path, root: Path, taken: set[str]) -> str:
    try:
        relative = path.resolve().relative_to(root.resolve())
    except ValueError:
        relative = Path(path.name)
    stem = PurePosixPath(*relative.with_suffix("").parts).as_posix()
    name = stem
    if name.lower() in taken:  # x.jpg next to x.png: keep the suffix in the name
        name = f"{stem}_{path.suffix.lstrip('.').lower()}"
    counter = 2
    while name.lower() in taken:  # same relative name from two roots
        name = f"{stem}-{counter}"
        counter += 1
    taken.add(name.lower())
    return name


def check_output_dir(out: Path, photos: list[Photo], specs: list[str]) -> None:
    """Refuse an output folder that would sit among the inputs.

    Outputs inside an input folder would be read back as inputs by the next run, and an
    output folder that holds inputs could overwrite them.

    Raises:
        UsageError: `out` is an input folder, lies inside one, or contains an input file.
    """
    out_resolved = out.resolve()
    folders = [Path(os.path.expanduser(s)).resolve() for s in specs if not _is_glob(s) and Path(os.path.expanduser(s)).is_dir()]
    folders += [_glob_root(os.path.expanduser(s)).resolve() for s in specs if _is_glob(s)]
    for folder in folders:
        if out_resolved == folder or folder in out_resolved.parents:
            raise UsageError(
                f"--out {out} is inside the input folder {folder}",
                hint="choose an output folder outside the inputs, e.g. --out stylized",
            )
    for photo in photos:
        if out_resolved in photo.path.resolve().parents:
            raise UsageError(
                f"--out {out} contains the input {photo.path}",
                hint="choose an output folder that holds no input photos",
            )
