"""ipltool: zero-shot generative model adaptation with Image-specific Prompt Learning (IPL)."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("ipltool")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
