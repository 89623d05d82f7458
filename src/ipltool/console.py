"""Terminal output shared by all commands: rich consoles, global flags, JSON."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from rich.console import Console


@dataclass
class GlobalOptions:
    """Flags given before the command (`ipl --json --device cpu prompts list`)."""

    device: str = "auto"
    quiet: bool = False
    json: bool = False
    debug: bool = False
    offline: bool = False


options = GlobalOptions()
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def reset() -> None:
    """Restore the defaults (each `main()` call starts from them)."""
    global options
    options = GlobalOptions()


def wants_json(local_flag: bool = False) -> bool:
    """True when data should be printed as JSON (the command's `--json` or the global one)."""
    return local_flag or options.json


def print_json(data: Any) -> None:
    """Write `data` as indented JSON to stdout, with no markup."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def info(message: str) -> None:
    """A status line on stderr, hidden by `--quiet` and `--json`."""
    if not (options.quiet or options.json):
        err.print(message)
