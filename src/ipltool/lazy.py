"""Package attributes imported on first use (PEP 562), so that light commands never import torch."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that imports `package.<submodule>` when one of `names` is first read.

    Args:
        package: the package's `__name__`.
        names: exported name -> the submodule that defines it (`{"upfirdn2d": "upfirdn2d"}` would
            clash with the submodule's own name, which the import system binds on the package).

    Returns:
        The function to assign to the package's `__getattr__`; once loaded, a name is set on
        the package, so later reads cost nothing.
    """

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
