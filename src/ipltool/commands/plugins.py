"""`ipl plugins`: what the installed plugin packages contribute."""

from __future__ import annotations

import typer
from rich.table import Table

from ipltool import console, registry


def plugins(
    kind: str = typer.Option(None, "--kind", help="Only one kind: mappers, encoders or domains."),
    json_output: bool = console.json_option("Print JSON instead of a table."),
) -> None:
    """List installed plugins (mappers, encoders, domain packs), built-ins included.

    Set IPL_PLUGINS to a comma-separated list of distributions to load only those
    third-party plugins (an empty value loads none).
    """
    found = registry.plugins(kind)
    if console.wants_json(json_output):
        console.print_json(
            [{"kind": p.kind, "name": p.name, "target": p.value, "distribution": p.dist, "version": p.version, "builtin": p.builtin} for p in found]
        )
        return
    table = Table(title="installed plugins", title_justify="left")
    for column in ("kind", "name", "distribution", "version", "target"):
        table.add_column(column)
    for p in found:
        cells = (p.kind, p.name, p.dist + (" (built-in)" if p.builtin else ""), p.version, p.value)
        table.add_row(*(console.escape(c) for c in cells))  # third-party names and targets, not markup
    console.out.print(table)
