"""tests/conftest.py's rule for slow-marked tests: they run when ``-m`` names slow or selects by a
marker (the GPU session's ``-m gpu`` runs the sizes past 2**31), never by default nor under a
``-m`` that only excludes (``-m "not gpu"`` ran every slow test on the CPU before)."""
from types import SimpleNamespace

import pytest

from conftest import _runs_slow


@pytest.mark.parametrize("expr, runs", [
    (None, False), ("", False), ("not gpu", False), ("not gpu and not slow", True), ("slow", True),
    ("slow or not slow", True), ("gpu", True), ("gpu and slow", True), ("gpu or not gpu", False),
    ("not (not gpu)", True), ("slowish", True), ("gpu_extra", True),
])
def test_slow_tests_run_only_when_asked(expr, runs):
    config = SimpleNamespace(option=SimpleNamespace(markexpr=expr))
    assert _runs_slow(config) is runs
