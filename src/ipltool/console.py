"""Terminal output shared by all commands: rich consoles, global flags, JSON."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape as _rich_escape


@dataclass
class GlobalOptions:
    """Flags given before the command (`ipl --json --device cpu prompts list`)."""

    device: str = "auto"
    quiet: bool = False
    json: bool = False
    debug: bool = False
    offline: bool = False


def _consoles() -> tuple[Console, Console]:
    return Console(highlight=False, soft_wrap=True), Console(stderr=True, highlight=False, soft_wrap=True)


options = GlobalOptions()
out, err = _consoles()


def reset() -> None:
    """Restore the defaults (each `main()` call starts from them).

    The consoles are made anew too: rich reads the terminal size, `COLUMNS` and `NO_COLOR`
    when a console is created, and an in-process caller (tests, the web UI) may have
    changed them since the last command.
    """
    global options, out, err
    options = GlobalOptions()
    out, err = _consoles()


def wants_json(local_flag: bool = False) -> bool:
    """True when data should be printed as JSON (the command's `--json` or the global one)."""
    return local_flag or options.json


def _set_json(value: bool) -> bool:
    if value:
        options.json = True
    return value


def json_option(help_text: str = "Print the result as JSON."):
    """The `--json` option of a command: `ipl X --json` then acts exactly as `ipl --json X`.

    Its callback sets `options.json` while the command line is parsed, before the command
    runs, so progress and `info` lines go quiet as with the global flag and only the JSON
    reaches stdout.
    """
    import typer  # the bottom layer stays free of the CLI framework until a command is built

    return typer.Option(False, "--json", help=help_text, callback=_set_json)


def print_json(data: Any) -> None:
    """Write `data` as indented JSON to stdout, with no markup."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def escape(text: object) -> str:
    """`text` with rich markup escaped, so that `[a-z0-9]` or `[bold]` print as they are.

    Use it on every user-controlled piece (names, paths, messages) put into a line printed
    with markup. Unlike `rich.markup.escape`, a trailing backslash stays single (rich would
    double it, and print both unless a tag follows): put escaped text before plain text or
    at the end of a line, never right before a tag.
    """
    return _rich_escape(f"{text} ")[:-1]


def info(message: str) -> None:
    """A status line on stderr, hidden by `--quiet` and `--json`."""
    if not (options.quiet or options.json):
        err.print(message)
