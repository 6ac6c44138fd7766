"""tests/xdist_together.py: under ``-n 2`` a module that waits for a child process runs on one worker.

xdist's own load scheduling, driven here as its controller drives it (fake workers that finish
their tests in turn, seeded durations), split a 60-test module that defines ``EARLY_CHILDREN``
across both workers at a run's end: both would have started the module's child (the sm90
compile: minutes of CPU each). With :func:`xdist_together.scheduler` no seed splits it, every
test runs once, and a module without a child is still split where xdist splits it.
"""
from __future__ import annotations

import random
import types

import pytest

pytest.importorskip("xdist")

import xdist_together  # noqa: E402
from xdist.scheduler import LoadScheduling  # noqa: E402

CHILD = "EARLY_CHILDREN = {}\n"


class _Worker:
    def __init__(self, name):
        self.gateway = types.SimpleNamespace(id=name)
        self.shutting_down = False
        self.queue = []

    def send_runtest_some(self, indices):
        self.queue.extend(indices)

    def shutdown(self):
        self.shutting_down = True


def _config(root):
    values = {"tx": ["2*popen"], "dist": "load", "maxschedchunk": None, "numprocesses": 2}
    return types.SimpleNamespace(getvalue=values.get, getoption=values.get, rootpath=root)


def _modules(tmp_path, sizes, children):
    """Test files under tmp_path/tests (those in ``children`` define EARLY_CHILDREN) and the node ids."""
    (tmp_path / "tests").mkdir()
    ids = []
    for n, size in enumerate(sizes):
        name = f"tests/test_m{n:02d}.py"
        (tmp_path / name).write_text(CHILD if n in children else "# no child\n")
        ids += [f"{name}::test_{k}" for k in range(size)]
    return ids


def _run(sched, ids, seed):
    """Drive ``sched`` as xdist's controller does; which worker ran each node id."""
    rnd = random.Random(seed)
    workers = [_Worker("gw0"), _Worker("gw1")]
    for w in workers:
        sched.add_node(w)
    for w in workers:
        sched.add_node_collection(w, ids)
    sched.schedule()
    clock, ran = {w: 0.0 for w in workers}, {}
    while any(w.queue for w in workers):
        w = min((w for w in workers if w.queue), key=lambda w: clock[w])
        index = w.queue.pop(0)
        assert index not in ran, "a test sent twice"
        ran[index] = w.gateway.id
        duration = rnd.choice((0.01, 0.05, 0.3, 2.0))
        clock[w] += duration
        sched.mark_test_complete(w, index, duration)
    assert sorted(ran) == list(range(len(ids)))
    return {ids[i]: who for i, who in ran.items()}


def _workers_of(ran, module):
    return {who for node, who in ran.items() if node.startswith(module + "::")}


SIZES = [37, 5, 60, 90, 12, 60, 41, 8, 120, 60, 3, 30]
CHILDREN = {2, 5, 9}


def test_xdist_alone_splits_a_module_with_a_child(tmp_path):
    """The fail-before case: xdist's LoadScheduling splits one of the child modules for some seed."""
    ids = _modules(tmp_path, SIZES, CHILDREN)
    split = [seed for seed in range(20)
             if any(len(_workers_of(_run(LoadScheduling(_config(tmp_path)), ids, seed), f"tests/test_m{n:02d}.py")) > 1
                    for n in CHILDREN)]
    assert split, "xdist kept every child module whole: the case below proves nothing"


def test_a_module_with_a_child_runs_on_one_worker(tmp_path):
    ids = _modules(tmp_path, SIZES, CHILDREN)
    other_split = False
    for seed in range(20):
        ran = _run(xdist_together.scheduler(_config(tmp_path), None), ids, seed)
        for n in range(len(SIZES)):
            workers = _workers_of(ran, f"tests/test_m{n:02d}.py")
            assert n not in CHILDREN or len(workers) == 1, (seed, n, workers)
            other_split |= len(workers) > 1
    assert other_split, "no module without a child was split: the schedule is no longer xdist's"


def test_the_shipped_child_modules_are_found():
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    found = {p.name for p in tests.glob("test_*.py") if xdist_together.waits_for_a_child(p)}
    assert {"test_sm90_compile.py", "test_gluon_rendered.py", "test_gluon_lists.py", "test_codegen.py",
            "test_int64_offsets.py", "test_gluon_compile.py", "test_gluon_wiring.py"} <= found, found
    assert "test_early_child.py" not in found  # (its EARLY_CHILDREN are in strings of code it writes)


def test_the_plugin_takes_only_load_scheduling(tmp_path):
    config = _config(tmp_path)
    assert isinstance(xdist_together.Together.pytest_xdist_make_scheduler(config, None), LoadScheduling)
    config.getvalue = {"dist": "loadfile"}.get
    assert xdist_together.Together.pytest_xdist_make_scheduler(config, None) is None
