"""`ipl prompts`: list, show and validate domain files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List

import tomli_w
import typer
from rich.table import Table

from ipltool import console
from ipltool.errors import DomainError, UsageError

if TYPE_CHECKING:
    from ipltool.domain import DomainEntry

app = typer.Typer(
    help="Domain files: the source/target texts and settings of an adaptation.",
    no_args_is_help=True,
    epilog=(
        "A domain is found by path, then in the user domain dir ($IPL_DOMAINS_DIR), "
        "then among the built-ins, then in plugin domain packs."
    ),
)

JSON_OPTION = console.json_option("Print JSON instead of a table.")
_ORIGIN_LABEL = {"path": "file", "user": "user dir", "builtin": "built-in", "plugin": "plugin"}


def _from_label(entry: DomainEntry) -> str:
    """Where a domain comes from, for the table: `user dir`, `built-in`, `plugin: DIST (PACK)` or `file: PATH`."""
    label = _ORIGIN_LABEL[entry.origin]
    # Only a plugin (which package) and a path (which file) say more than the origin: the
    # user dir's provider is "user dir" again (its path is printed under the table).
    return f"{label}: {entry.provider}" if entry.origin in ("plugin", "path") and entry.provider else label


def _entry_json(entry: DomainEntry) -> dict:
    data = {
        "name": entry.name,
        "origin": entry.origin,
        "provider": entry.provider,
        "path": str(entry.path),
        "active": entry.shadowed_by is None and entry.error is None,
        "shadowed_by": entry.shadowed_by,
        "error": entry.error,
    }
    if entry.domain:
        data.update(source=entry.domain.source, target=entry.domain.target, generator=entry.domain.generator)
    return data


@app.command("list")
def list_domains(json_output: bool = JSON_OPTION) -> None:
    """List every available domain and where it comes from.

    When two domains share a name, the first in lookup order wins and the others are
    marked as shadowed.
    """
    from ipltool.domain import discover_domains, user_domain_dir

    entries = discover_domains()
    if console.wants_json(json_output):
        console.print_json([_entry_json(e) for e in entries])
        return
    table = Table(title=f"{sum(e.shadowed_by is None and e.error is None for e in entries)} domains", title_justify="left")
    for column in ("name", "source -> target", "generator", "from", "status"):
        table.add_column(column)
    for e in entries:
        from_ = _from_label(e)
        if e.error:
            status, style = "broken (see `ipl prompts validate`)", "red"
        elif e.shadowed_by:
            status, style = f"shadowed by {_ORIGIN_LABEL[e.shadowed_by]}", "dim"
        else:
            status, style = "ok", ""
        d = e.domain
        cells = [e.name, f"{d.source} -> {d.target}" if d else "?", d.generator if d else "?", from_]
        table.add_row(*(console.escape(c) for c in cells), status, style=style)  # cells are text from files, not markup
    console.out.print(table)
    console.info(f"user domain dir: {console.escape(user_domain_dir())}")


@app.command("show")
def show(
    domain: str = typer.Argument(..., help="A domain name (see `ipl prompts list`) or a path to a .toml file."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Print a domain with every default filled in, as TOML you can copy and edit."""
    from rich.syntax import Syntax

    from ipltool.domain import find_domain

    entry = find_domain(domain)
    data = entry.domain.resolved().to_toml_dict()
    if console.wants_json(json_output):
        console.print_json({"path": str(entry.path), "origin": entry.origin, "domain": data})
        return
    header = f"# {entry.name}: {_ORIGIN_LABEL[entry.origin]} {entry.path}\n"
    text = header + tomli_w.dumps(data)
    if console.out.is_terminal:
        console.out.print(Syntax(text, "toml", theme="ansi_dark", background_color="default"))
    else:
        console.out.file.write(text)


@app.command("validate")
def validate(
    files: List[Path] = typer.Argument(..., help="Domain files to check.", metavar="FILE..."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Check domain files: TOML syntax, known keys, types and required values.

    Prints one line per file; exits with code 2 when any file is invalid.
    """
    from ipltool.domain import load_domain_file

    results = []
    for path in files:
        try:
            domain = load_domain_file(path)
            results.append({"file": str(path), "ok": True, "name": domain.name, "error": None, "problems": []})
        except DomainError as err:
            results.append({"file": str(path), "ok": False, "name": None, "error": err.message, "problems": err.message.splitlines()})
    if console.wants_json(json_output):
        console.print_json(results)
    else:
        for r in results:
            if r["ok"]:
                console.out.print(f"[green]ok[/]    {console.escape(r['file'])} ({console.escape(r['name'])})")
            else:  # one line per problem, each with its file:line
                console.out.print("\n".join(f"{'[red]error[/]' if i == 0 else '     '} {console.escape(p)}" for i, p in enumerate(r["problems"])))
    bad = sum(not r["ok"] for r in results)
    if bad:
        raise UsageError(f"{bad} of {len(results)} domain file(s) invalid")
