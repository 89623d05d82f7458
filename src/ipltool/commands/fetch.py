"""`ipl fetch`: get, list, verify and import the pretrained files of the model registry."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.filesize import decimal
from rich.table import Table

from ipltool import console, paths
from ipltool.errors import UsageError

if TYPE_CHECKING:
    from ipltool import hub


def _verified_text(state: hub.CacheStatus) -> str:
    from ipltool import hub

    if state.entry.synthetic:
        return "always available"
    if not state.cached:
        return "-"
    if state.verified is None:
        return "not checked" if hub.known_hashes(state.entry) else "no known hash"
    if not state.verified:
        return "[red]NO: sha256 mismatch[/]"
    return "yes" if state.entry.sha256 else "yes (hash recorded at first download)"


def _row(state: hub.CacheStatus) -> dict:
    entry = state.entry
    return {
        "name": entry.name,
        "kind": entry.kind,
        "bytes": entry.bytes,
        "cached": state.cached,
        "verified": state.verified,
        "synthetic": entry.synthetic,
        "path": str(state.path) if state.path else None,
        "needed_by": entry.needed_by,
        "description": entry.description,
    }


def _list(json_output: bool) -> None:
    from ipltool import hub

    states = [hub.status(entry.name) for entry in hub.list_models()]
    if console.wants_json(json_output):
        console.print_json({"cache_dir": str(paths.cache_dir()), "models": [_row(s) for s in states]})
        return
    table = Table(title=f"model registry (cache: {paths.cache_dir()})")
    for column in ("name", "kind", "size", "cached", "verified", "needed by"):
        table.add_column(column)
    for s in states:
        cached = "always" if s.entry.synthetic else ("yes" if s.cached else "no")
        size = "-" if s.entry.synthetic else "size unknown" if s.entry.bytes is None else decimal(s.entry.bytes)
        table.add_row(s.entry.name, s.entry.kind, size, cached, _verified_text(s), ", ".join(s.entry.needed_by))
    console.out.print(table)


def _verify(names: list[str], json_output: bool) -> bool:
    """Re-hash the named (default: every cached) file; True when none mismatches."""
    from ipltool import hub

    targets = names or [e.name for e in hub.list_models() if not e.synthetic and hub.status(e.name).cached]
    results = [hub.verify(name) for name in targets]
    if console.wants_json(json_output):
        console.print_json({"models": [_row(s) for s in results]})
    else:
        for s in results:
            console.out.print(f"{s.entry.name}: {'not in the cache' if not s.cached else _verified_text(s)}")
        if not results:
            console.out.print("nothing in the cache to verify")
    return all(s.verified is not False for s in results)


def fetch(
    names: Optional[list[str]] = typer.Argument(None, help="Registry names to download, e.g. stylegan2-ffhq-1024 clip-vit-b32."),
    domain: Optional[list[str]] = typer.Option(None, "--domain", "-d", help="Everything a domain needs (repeatable)."),
    list_models: bool = typer.Option(False, "--list", help="Table of every registry file: size, cached, verified."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash cached files (the NAMES given, else all) against the known sha256."),
    import_: Optional[tuple[str, Path]] = typer.Option(
        None, "--import", metavar="NAME FILE", help="Put a copy you have into the cache (checked first); an NVlabs .pkl is converted."
    ),
    link: bool = typer.Option(False, "--link", help="With --import: link the file instead of copying it."),
    from_nvlabs: bool = typer.Option(False, "--from-nvlabs", help="With --import: FILE is an NVlabs network pickle, whatever its name."),
    force: bool = typer.Option(False, "--force", help="Download again even when the file is in the cache."),
    json_output: bool = console.json_option(),
) -> None:
    """Download pretrained weights into the cache, verified; list, verify or import them.

    Downloads resume after an interruption, try mirrors in order and check sha256.
    Other commands fetch what they need on first use; `--offline` (or IPL_OFFLINE=1)
    turns every download off.

    Examples: ipl fetch --list   |   ipl fetch --domain disney   |   ipl fetch --import stylegan2-ffhq-1024 ffhq.pkl
    """
    # The registry (pydantic) and the downloader load here, so `ipl --help` stays instant.
    from ipltool import cache_import, hub
    from ipltool.domain import load_domain

    names = list(names or [])
    if list_models:
        _list(json_output)
        return
    if verify:
        for name in names:
            hub.get_model(name)
        if not _verify(names, json_output):
            raise UsageError("some cached files do not match their sha256", hint="fetch them again with --force")
        return
    if import_ is not None:
        name, file = import_
        path = cache_import.import_file(name, file, link=link, nvlabs=from_nvlabs or None)
        state = hub.status(name)
        if console.wants_json(json_output):
            console.print_json({"models": [_row(state)]})
        else:
            console.out.print(f"{name}: imported to {console.escape(path)} ({_verified_text(state)})")
        return
    if domain:
        from ipltool.models.clip import domain_models  # imports torch, so only for --domain

        for spec in domain:
            names += [n for n in domain_models(load_domain(spec)) if n not in names]
    if not names:
        raise UsageError("nothing to fetch", hint="name models (ipl fetch --list shows them) or a domain: ipl fetch --domain disney")
    entries = [hub.get_model(n) for n in names]  # unknown names fail before any download
    files = hub.ensure_all([e.name for e in entries if not e.synthetic], force=force)
    states = [hub.status(e.name) for e in entries]
    if console.wants_json(json_output):
        console.print_json({"models": [_row(s) for s in states]})
    else:
        for entry in entries:
            where = "built in, nothing to download" if entry.synthetic else files[entry.name]
            console.out.print(f"{entry.name}: {where}")
