"""Where ipltool keeps files between runs; the bottom layer, it imports nothing of ipltool.

The cache dir holds the model registry's files (`hub`) and the kernel builds
(`kernels/build.py`, under `kernels/`).
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """Where pretrained files and kernel builds live: `$IPL_CACHE`, else the platform user cache dir."""
    env = os.environ.get("IPL_CACHE")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("ipltool"))
