"""Modules imported on first use, for the compiler's modules that need torch or networkx only in
some functions: ``torch = lazy_module("torch")`` at the top, ``torch.zeros(...)`` in a function.
``attncc build`` then never imports them (torch alone takes seconds to import)."""
from __future__ import annotations

import importlib
import sys
import types


class _LazyModule(types.ModuleType):
    def __getattr__(self, name):
        return getattr(importlib.import_module(self.__name__), name)


def lazy_module(name: str) -> types.ModuleType:
    """The module ``name`` when it is imported already, else a stand-in that imports it on the
    first attribute read."""
    return sys.modules.get(name) or _LazyModule(name)


def is_tensor(x) -> bool:
    """``isinstance(x, torch.Tensor)``, without importing torch (no tensor exists before it is)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)
