"""A package's submodules as attributes on first use, so `tinylab.interop.lm_eval_harness` works
after `import tinylab` without importing every module (and its optional library) up front."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from types import ModuleType

__all__ = ["submodules_on_demand"]


def submodules_on_demand(package: str) -> Callable[[str], ModuleType]:
    """A module `__getattr__` (PEP 562) for `package`: an attribute the package lacks is imported as
    its submodule of that name when one exists; otherwise the usual AttributeError."""

    def __getattr__(name: str) -> ModuleType:
        if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")  # binds it on the package too
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
