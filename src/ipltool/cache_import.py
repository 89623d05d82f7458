"""Putting a copy you have into the cache (`ipl fetch --import NAME FILE`), pickles included.

`import_file` is the one place that decides whether a file is an NVlabs network pickle,
converted by `ipltool.nvlabs.import_pickle`, or a file checked and copied as it is by
`ipltool.hub.import_file`. It sits above both and imports `nvlabs` (and so torch) only
for a pickle, so importing any other file stays as light as the registry.
"""

from __future__ import annotations

import os
from pathlib import Path

from ipltool import hub


def import_file(name: str, file: str | os.PathLike, link: bool = False, nvlabs: bool | None = None) -> Path:
    """Put `file` into the cache as registry entry `name`; returns its cache path.

    Args:
        name: the registry name.
        file: the copy you have.
        link: link instead of copying (ignored for a pickle, whose conversion is written).
        nvlabs: the file is an NVlabs network pickle; None: when its name ends in `.pkl`.

    Raises:
        UsageError, ChecksumError, CheckpointError: see `hub.import_file` and
            `nvlabs.import_pickle`.
    """
    if nvlabs is None:
        nvlabs = Path(file).suffix == ".pkl"
    if nvlabs:
        from ipltool.nvlabs import import_pickle  # torch, only for a pickle

        return import_pickle(name, file)
    return hub.import_file(name, file, link=link)
