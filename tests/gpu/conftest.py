"""tests/gpu: with ATTNCC_GPU_TESTS_ON_CPU=first only the first parametrization of each test runs
(tests/test_bench.py: the tests themselves run, in a few seconds); gpu_env.py says where they run."""
from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if os.environ.get("ATTNCC_GPU_TESTS_ON_CPU") != "first":
        return
    seen, keep, drop = set(), [], []
    for item in items:
        if Path(str(item.fspath)).resolve().parent == HERE:
            function = item.nodeid.split("[")[0]
            if function in seen:
                drop.append(item)
                continue
            seen.add(function)
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
