"""TOML in one place: the reader this Python has (tomllib, or tomli before 3.11) and the writer.

Domain files, `--set` values, run configs and the model registry all read through
here. TOML has no null, so what is written goes through `plain` first.
"""

from __future__ import annotations

import os
import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

TOMLDecodeError = tomllib.TOMLDecodeError
load = tomllib.load
loads = tomllib.loads


def plain(value: Any) -> Any:
    """`value` ready for TOML: None dropped from tables and arrays (recursively), paths as strings."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value if v is not None]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def dumps(data: dict) -> str:
    """TOML text of `data` after `plain`."""
    import tomli_w

    return tomli_w.dumps(plain(data))
