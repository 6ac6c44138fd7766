"""Kernels run on the CPU under Triton's interpreter; set it before Triton is imported."""
import os
import sys
from pathlib import Path

import pytest

from slow_rule import runs_slow  # (its own module: tests/test_slow_rule.py imports it)

os.environ.setdefault("TRITON_INTERPRET", "1")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # pytest -n: the workers share the cores, not each all of them
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `import generated.<name>` as a user would from the repo root


def pytest_configure(config):
    """Under pytest-xdist, the tests of a module that waits for a child process on one worker
    (tests/xdist_together.py: each worker's fixture would start the child)."""
    if config.pluginmanager.hasplugin("xdist"):
        from xdist_together import Together

        config.pluginmanager.register(Together(), "attncc_xdist_together")


def _early_children(item):
    """The tests/early_child.py children the test's fixtures wait for (none for a skipped test: a
    slow one without -m slow)."""
    if item.get_closest_marker("skip"):
        return []
    children = getattr(getattr(item, "module", None), "EARLY_CHILDREN", {})
    return [child for fixture, child in children.items() if fixture in getattr(item, "fixturenames", ())]


def _starts_early(config) -> bool:
    # pytest-xdist's workers each collect every test and run some: there the fixture starts its child
    return not config.option.collectonly and "PYTEST_XDIST_WORKER" not in os.environ


def pytest_collection_modifyitems(session, config, items):
    """Tests marked slow are skipped unless ``-m`` names slow (``-m slow``, ``-m "slow or not
    slow"``) or gpu (the GPU session's ``-m gpu`` runs tests/gpu/test_gpu_big.py's sizes past 2**31,
    which session 23's first version of this rule skipped there): the marker alone selects nothing,
    and CI runs ``pytest -q -n 2``. The modules whose
    tests wait for an early child run last: the child has had every test before them to run beside."""
    if not runs_slow(config.option.markexpr):
        skip = pytest.mark.skip(reason="slow: runs with -m slow")
        for item in items:
            if item.get_closest_marker("slow"):
                item.add_marker(skip)
    if _starts_early(config):
        late = {item.module for item in items if _early_children(item)}
        items[:] = [x for x in items if getattr(x, "module", None) not in late] + \
                   [x for x in items if getattr(x, "module", None) in late]


def pytest_collection_finish(session):
    """Start the early children the selected tests wait for, one after another in the order of
    those tests (tests/early_child.py)."""
    if _starts_early(session.config):
        import early_child

        early_child.TURNS.add([child for item in session.items for child in _early_children(item)])


def pytest_runtest_logfinish(nodeid, location):
    """The next early child's turn, once the one before it ended."""
    import early_child

    early_child.TURNS.advance()


def pytest_sessionfinish(session):
    import early_child

    early_child.stop_all()


@pytest.fixture
def tune_cache(tmp_path, monkeypatch):
    """An empty tune cache directory (ATTNCC_CACHE_DIR) with nothing loaded from earlier tests, and no
    ATTNCC_TUNE / ATTNCC_CONFIG from the environment."""
    from attncc.runtime import tuning

    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "tune"))
    monkeypatch.delenv("ATTNCC_TUNE", raising=False)
    monkeypatch.delenv("ATTNCC_CONFIG", raising=False)
    tuning._LOADED.clear()
    yield tmp_path / "tune"
    tuning._LOADED.clear()
