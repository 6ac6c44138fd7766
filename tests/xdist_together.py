"""Under pytest-xdist (``-n 2``, CI's command): the tests of a module that waits for a child process
(``EARLY_CHILDREN``, tests/early_child.py) go to one worker.

xdist's load scheduling hands out runs of consecutive tests; a run that ended inside such a module
gave its first tests to one worker and the rest to the other, and each worker's module-scoped
fixture started the module's child: the whole compile (tests/test_sm90_compile.py's, minutes of
CPU) twice. Here a run that would end inside such a module takes the rest of the module too.
Every other module is split as xdist splits it. conftest.py registers :class:`Together` where
xdist is loaded; tests/test_xdist_together.py tests it (its own module: ``import conftest`` finds
tests/gpu/conftest.py in a whole run).
"""
from __future__ import annotations

import re
from pathlib import Path

_DEFINES = re.compile(r"^EARLY_CHILDREN\s*=", re.MULTILINE)


def waits_for_a_child(path: Path) -> bool:
    """Whether the test module at ``path`` defines ``EARLY_CHILDREN`` (at its top level)."""
    try:
        return bool(_DEFINES.search(path.read_text(errors="replace")))
    except OSError:
        return False


def run_end(collection, pending, num, together) -> int:
    """How many of ``pending`` (indices into ``collection``, the node ids) to send where xdist
    would send ``num``: past ``num`` while the next one is of the same module as the last one sent
    and that module is ``together(module's path)``."""
    num = min(num, len(pending))
    if num <= 0:
        return num
    module = collection[pending[num - 1]].split("::")[0]
    if together(module):
        while num < len(pending) and collection[pending[num]].split("::")[0] == module:
            num += 1
    return num


class Together:
    """The plugin: xdist's ``--dist load`` (what ``-n`` alone picks) with :func:`run_end`'s runs."""

    @staticmethod
    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") != "load":
            return None
        return scheduler(config, log)


def scheduler(config, log, root: Path | None = None):
    """A LoadScheduling whose runs keep the modules that wait for a child whole."""
    from xdist.scheduler import LoadScheduling

    root = Path(config.rootpath if root is None else root)
    known = {}

    def together(module: str) -> bool:
        if module not in known:
            known[module] = waits_for_a_child(root / module)
        return known[module]

    class Scheduling(LoadScheduling):
        def _send_tests(self, node, num):
            super()._send_tests(node, run_end(self.collection, self.pending, num, together))

    return Scheduling(config, log)
