"""tests/conftest.py's rule (tests/slow_rule.py) for slow-marked tests: they run when ``-m`` names slow or selects by a
marker (the GPU session's ``-m gpu`` runs the sizes past 2**31), never by default nor under a
``-m`` that only excludes (``-m "not gpu"`` ran every slow test on the CPU before)."""
import pytest

from slow_rule import runs_slow


@pytest.mark.parametrize("expr, runs", [
    (None, False), ("", False), ("not gpu", False), ("not gpu and not slow", True), ("slow", True),
    ("slow or not slow", True), ("gpu", True), ("gpu and slow", True), ("gpu or not gpu", False),
    ("not (not gpu)", True), ("slowish", True), ("gpu_extra", True),
])
def test_slow_tests_run_only_when_asked(expr, runs):
    assert runs_slow(expr) is runs
