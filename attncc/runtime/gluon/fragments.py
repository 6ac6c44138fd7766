"""The rendered Gluon fragments of a generated module: the ``_gluon.py`` file beside it
(attncc.codegen.gluon), imported on first use.

A generated module whose forward takes rendered fragments names them in its ``SpecInfo``
(``gluon_fragments=_rt.gluon_fragments(__name__, __file__)``); nothing here imports Triton until
:meth:`FragmentFile.load`, which only the Gluon path calls (attncc.runtime.backend): the module
itself is imported under the interpreter and with Tritons that have no Gluon.
"""
from __future__ import annotations

import importlib.util
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

_LOCK = threading.Lock()


@dataclass(frozen=True)
class FragmentFile:
    """``module``: the generated module's name; ``file``: its path. The fragments are the file
    ``<stem>_gluon.py`` beside it, imported as the module ``<module>_gluon``."""

    module: str
    file: str

    @property
    def path(self) -> Path:
        file = Path(self.file)
        return file.with_name(file.stem + "_gluon.py")

    def load(self) -> ModuleType:
        """The fragments module (``walk``, ``mask``, ``score``, ``SEGMENTS``, ``pattern_args(call)``,
        ``exact(call)``), imported once per process; an ``ImportError`` naming the file when it is
        missing or cannot be imported."""
        name = self.module + "_gluon"
        with _LOCK:
            module = sys.modules.get(name)
            if module is not None:
                return module
            path = self.path
            if not path.is_file():
                raise ImportError(f"{self.module}'s Gluon fragments {path} are missing (run `attncc build` again)")
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
            return module
