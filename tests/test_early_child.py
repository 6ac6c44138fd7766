"""tests/early_child.py: children started at the end of collection, waited for by a fixture."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import early_child
from early_child import EarlyChild, pool_map

HERE = Path(__file__).resolve().parent


def _pid_after(seconds):
    def task(index):
        time.sleep(seconds)
        return index, os.getpid()

    return task


def test_pool_map_keeps_the_order_and_waits_for_a_test_before_taking_a_second_process(tmp_path, monkeypatch):
    hurry = tmp_path / "hurry"
    monkeypatch.setenv(early_child.HURRY_ENV, str(hurry))
    one = pool_map(_pid_after(0.05), 8)
    assert [i for i, _ in one] == list(range(8))
    assert len({pid for _, pid in one}) == 1  # nobody waits: one process
    hurry.touch()
    two = pool_map(_pid_after(0.3), 8)
    assert [i for i, _ in two] == list(range(8))
    assert len({pid for _, pid in two}) == 2


def _dies_at_2(index):
    if index == 2:
        os._exit(3)
    return index


def test_a_pool_process_that_dies_is_an_error_naming_its_task(monkeypatch):
    monkeypatch.delenv(early_child.HURRY_ENV, raising=False)
    with pytest.raises(RuntimeError, match=r"died \(exit code 3\) running task 2"):
        pool_map(_dies_at_2, 5)


def _python(code):
    return lambda folder: [sys.executable, "-c", textwrap.dedent(code)]


def test_children_take_their_turns_one_at_a_time_at_a_lower_priority(tmp_path):
    """Turns: the first child starts at once, each of the others after the one before it ended
    (advance, as conftest calls it after every test), in order; a child a test waits for starts
    then. Each runs NICE above this process's niceness. The fourth child's early start is shown by a
    handshake, not by timing: the third child ends only once the fourth has touched a file (or after
    60 s, saying so), so it cannot pass by a slow start and cannot hang."""
    sign = tmp_path / "fourth started"
    code = """
        import os, sys, time
        from pathlib import Path
        start, sign = time.time(), Path(sys.argv[2])
        if sys.argv[1] == "3":
            sign.touch()
        deadline = time.monotonic() + (60 if sys.argv[1] == "2" else 0.3)
        while time.monotonic() < deadline and not (sys.argv[1] == "2" and sign.exists()):
            time.sleep(0.02)
        print(start, time.time(), os.nice(0), sign.exists())
    """
    children = [EarlyChild(f"turn{n}", lambda _, n=n: _python(code)(None) + [str(n), str(sign)],
                           lambda _: dict(os.environ)) for n in range(4)]
    turns = early_child.Turns()
    try:
        turns.add(children[:3])
        assert children[0].running and all(c.folder is None for c in children[1:])
        deadline = time.monotonic() + 60
        while turns.waiting and time.monotonic() < deadline:
            assert sum(c.running for c in children) <= 1
            time.sleep(0.05)
            turns.advance()
        turns.add(children[3:])  # a test waits for it while the one before still runs
        assert children[3].folder is None and children[2].running
        outcomes = [children[3].result()] + [c.result() for c in children[:3]]
        spans = [o.stdout.split() for o in outcomes[1:] + outcomes[:1]]
        assert [c.folder is not None for c in children] == [True] * 4
        assert [s[3] for s in spans] == ["False", "False", "True", "True"], spans  # (started before its turn)
        times = [[float(x) for x in s[:2]] for s in spans]
        assert all(a[1] <= b[0] for a, b in zip(times[:3], times[1:3])), spans
        nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + early_child.NICE)
        assert all(int(s[2]) == nice for s in spans), spans
    finally:
        for c in children:
            c.stop()


def test_a_failed_child_reports_its_code_and_output():
    child = EarlyChild("fails", _python("import sys; print('out'); sys.exit('the reason')"), lambda _: dict(os.environ))
    try:
        outcome = child.result()
        assert outcome.returncode == 1
        assert "exited with code 1" in outcome.failure() and "the reason" in outcome.failure()
    finally:
        child.stop()
    assert not child.folder.exists()


def test_a_child_past_its_timeout_is_killed_with_its_workers():
    """The child and a process it started (its own group) are gone after the timeout."""
    code = """
        import subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(worker.pid, flush=True)
        time.sleep(60)
    """
    child = EarlyChild("sleeps", _python(code), lambda _: dict(os.environ), timeout=2)
    try:
        outcome = child.result()
        assert outcome.returncode is None and "timed out" in outcome.failure(), outcome.failure()
        worker = int(outcome.stdout.split()[0])
        time.sleep(0.5)
        assert not _alive(worker)
    finally:
        child.stop()


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie is dead (its parent reaps it later)
    except FileNotFoundError:
        return False


def test_a_child_kills_itself_when_pytest_is_gone(tmp_path):
    """A parent that dies without stopping its child (os._exit: no atexit): the child, watching
    its parent, kills its process group."""
    parent = f"""
        import os, sys, time
        sys.path.insert(0, {str(HERE)!r})
        from early_child import EarlyChild
        code = "import sys, time; sys.path.insert(0, {str(HERE)!r}); import early_child; early_child.watch_parent(); time.sleep(60)"
        child = EarlyChild("orphan", lambda f: [sys.executable, "-c", code], lambda f: dict(os.environ))
        child.start()
        print(child._proc.pid, child.folder, flush=True)
        time.sleep(1)
        os._exit(0)
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(parent)], capture_output=True, text=True, timeout=60)
    pid, folder = out.stdout.split()
    pid = int(pid)
    shutil.rmtree(folder)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid)


def test_conftest_starts_the_child_at_collection_only_for_selected_tests_and_runs_its_module_last(tmp_path):
    """A copy of this folder's conftest.py, early_child.py, slow_rule.py and xdist_together.py with
    two modules: the child (which records when it started) starts before the first test runs, and
    not when its fixture's tests are deselected or skipped (slow); its module runs last."""
    for name in ("conftest.py", "early_child.py", "slow_rule.py", "xdist_together.py"):
        shutil.copy(HERE / name, tmp_path / name)
    started = tmp_path / "started"
    (tmp_path / "test_a_early.py").write_text(textwrap.dedent(f"""
        import sys, time, pytest
        from early_child import EarlyChild
        code = "import time; open({str(started)!r}, 'w').write(repr(time.time()))"
        EARLY_CHILDREN = {{"out": EarlyChild("t", lambda f: [sys.executable, "-c", code], lambda f: {{}})}}

        @pytest.fixture(scope="module")
        def out():
            outcome = EARLY_CHILDREN["out"].result()
            assert outcome.returncode == 0, outcome.failure()
            return float(open({str(started)!r}).read())

        def test_waits(out):
            assert out

        def test_no_child():
            pass
    """))
    (tmp_path / "test_b.py").write_text(textwrap.dedent(f"""
        import os, time
        def test_first():
            # the child was started at collection, before this test (which does not ask for it): its
            # file appears while this test waits (a loaded machine may take seconds to start it)
            deadline = time.monotonic() + 60
            while not os.path.exists({str(started)!r}) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert os.path.exists({str(started)!r})
    """))

    def pytest_(*args):
        # not as an xdist worker when this suite runs under -n (the conftest behaves otherwise there)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
        run = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "no:randomly",
                              *args], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        return [line.split(" ")[0] for line in run.stdout.splitlines() if " PASSED" in line]

    assert pytest_() == ["test_b.py::test_first", "test_a_early.py::test_waits", "test_a_early.py::test_no_child"]
    started.unlink()
    assert pytest_("-k", "not waits", "test_a_early.py") == ["test_a_early.py::test_no_child"]
    assert not started.exists()
    # a test that waits for the child, skipped (slow, without -m slow): no child, and its module keeps its place
    early = tmp_path / "test_a_early.py"
    early.write_text(early.read_text().replace("def test_waits", "@pytest.mark.slow\ndef test_waits"))
    (tmp_path / "test_b.py").write_text(textwrap.dedent(f"""
        import os, time
        def test_none():
            time.sleep(3)  # (a child started at collection would have written its file by now)
            assert not os.path.exists({str(started)!r})
    """))
    assert pytest_() == ["test_a_early.py::test_no_child", "test_b.py::test_none"]

