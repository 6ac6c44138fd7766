"""Child processes that tests wait for, started when collection ends so that they run beside the
tests before them.

CI runs pytest serially on a 2-core machine: while one test runs, the other core idles. A test
module whose fixture waits for a long child process (tests/test_sm90_compile.py: every launch
compiled for sm90) names it in ``EARLY_CHILDREN = {fixture name: EarlyChild(...)}``; conftest.py
starts it once the selected tests are known (only when one of them uses that fixture; not under
``--collect-only`` nor in pytest-xdist's workers, where it starts when the fixture asks, as
before, and the module's tests all go to one worker: tests/xdist_together.py) and moves that
module's tests to the end, and the fixture takes the child's output with :meth:`EarlyChild.result`.

Until a test waits for it, the child's work runs in one process (:func:`pool_map`), on the core
the serial tests leave idle; once one waits (``hurry``, a file the parent makes), in two. The
wait's timeout counts from when the test starts waiting. The child kills itself and its
workers when pytest goes away (:func:`watch_parent`), and conftest kills what is left at the
session's end.

Several children take that core in turn (:class:`Turns`): one at a time, in the order their
tests come, the next started after the test during which the one before it ended (or at once by
a test that waits for it). They run at a lower priority (:data:`NICE`), so that the serial tests,
and the processes those start, keep a core while children run beside them.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

# what the parent tells the child in its environment
PARENT_ENV = "ATTNCC_EARLY_PARENT"  # the pid of the pytest process
HURRY_ENV = "ATTNCC_EARLY_HURRY"  # the path that exists once a test waits for the result
NICE = 10  # a child's niceness above pytest's: the serial tests come first where both want a core


@dataclass
class EarlyChild:
    """``argv(folder)`` and ``env(folder)``: the child's command line and environment (``folder``:
    a fresh temporary folder of its own, removed at the session's end); ``timeout``: seconds a
    test waits for it (from when it starts waiting); ``cwd``: its working folder."""
    name: str
    argv: Callable[[Path], List[str]]
    env: Callable[[Path], dict]
    timeout: float = 900
    cwd: Optional[Path] = None
    _proc: Optional[subprocess.Popen] = field(default=None, repr=False)
    _folder: Optional[Path] = field(default=None, repr=False)
    _started: float = field(default=0.0, repr=False)
    _owner: int = field(default=0, repr=False)  # the pid that started it
    _outcome: Optional[tuple] = field(default=None, repr=False)

    @property
    def folder(self) -> Path:
        return self._folder

    def start(self) -> None:
        """Start the child unless it runs or ran (idempotent)."""
        if self._proc is not None:
            return
        self._folder = Path(tempfile.mkdtemp(prefix=f"attncc-{self.name}-"))
        env = dict(self.env(self._folder), **{PARENT_ENV: str(os.getpid()), HURRY_ENV: str(self._folder / "hurry")})
        self._started, self._owner = time.monotonic(), os.getpid()
        # its own process group (not its own session: the kernel's autogroup would then weigh it as
        # much as the whole pytest run), so that stop() reaches the pool's workers too
        self._proc = subprocess.Popen(self.argv(self._folder), env=env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                      stdout=open(self._folder / "stdout", "wb"),
                                      stderr=open(self._folder / "stderr", "wb"), process_group=0)
        with _gone():  # before it forks its pool (seconds of imports later): the workers inherit it
            os.setpriority(os.PRIO_PROCESS, self._proc.pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + NICE))
        _RUNNING.append(self)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def result(self) -> "Outcome":
        """Wait for the child (starting it if nobody did) and return its outcome; a child that
        runs past ``timeout`` from now is killed and reported as such (returncode None)."""
        self.start()
        if self._outcome is None:
            if not self._folder.exists():
                raise RuntimeError(f"child process {self.name} was stopped before a test waited for it")
            (self._folder / "hurry").touch()
            waited = time.monotonic()
            try:
                code = self._proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self.stop(keep_folder=True)
                code = None
            stdout, stderr = ((self._folder / s).read_text(errors="replace") for s in ("stdout", "stderr"))
            self._outcome = (code, stdout, stderr, time.monotonic() - self._started, time.monotonic() - waited)
        return Outcome(self, *self._outcome)

    def stop(self, keep_folder: bool = False) -> None:
        """Kill the child's process group if it still runs; remove its folder unless ``keep_folder``.
        Only in the process that started it (not in a fork of pytest that a test made and exits)."""
        if self._proc is None or self._owner != os.getpid():
            return
        if self._proc.poll() is None:
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
                with _gone():
                    os.killpg(self._proc.pid, sig)
                try:
                    self._proc.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    pass
        with _gone():  # workers that outlived the child (the group outlives its leader)
            os.killpg(self._proc.pid, signal.SIGKILL)
        if not keep_folder:
            shutil.rmtree(self._folder, ignore_errors=True)


@dataclass(frozen=True)
class Outcome:
    """A finished (or timed-out: ``returncode`` None) child: its output, seconds since it started
    and seconds the test waited for it."""
    child: EarlyChild
    returncode: Optional[int]
    stdout: str
    stderr: str
    seconds: float
    waited: float

    def failure(self) -> str:
        """Why the child did not succeed (empty when it did), with the end of its output."""
        if self.returncode == 0:
            return ""
        what = (f"timed out: still running {self.waited:.0f} s after the test started waiting "
                f"({self.seconds:.0f} s after it started)" if self.returncode is None
                else f"exited with code {self.returncode} after {self.seconds:.0f} s")
        return (f"child process {self.child.name} {what}\n--- stdout (end) ---\n{self.stdout[-3000:]}"
                f"\n--- stderr (end) ---\n{self.stderr[-6000:]}")


_RUNNING: List[EarlyChild] = []


class Turns:
    """Children that take one core in turn: :meth:`add` starts the first now and each of the
    others once the ones before it have ended (:meth:`advance`); one that a test waits for starts
    then, whatever its turn."""

    def __init__(self):
        self.waiting: List[EarlyChild] = []
        self.started: List[EarlyChild] = []

    def add(self, children: List[EarlyChild]) -> None:
        self.waiting.extend(c for c in children if c not in self.waiting and c not in self.started)
        self.advance()

    def advance(self) -> None:
        """Start the next child unless one started before it still runs."""
        while self.waiting and not any(c.running for c in self.started):
            child = self.waiting.pop(0)
            child.start()  # (nothing if a test started it already)
            self.started.append(child)


TURNS = Turns()  # the session's: conftest.py adds the children at collection, advances after every test


def stop_all() -> None:
    """Kill every child still running and remove the folders (conftest's pytest_sessionfinish)."""
    TURNS.waiting.clear()
    while _RUNNING:
        _RUNNING.pop().stop()


atexit.register(stop_all)


class _gone:
    """Ignores ProcessLookupError / PermissionError: the process group is already gone."""

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        return kind is not None and issubclass(kind, (ProcessLookupError, PermissionError))


# ---------------------------------------------------------------------------------------
# in the child
# ---------------------------------------------------------------------------------------


def watch_parent() -> None:
    """In the child: kill its process group (itself and the pool's workers) once the pytest process
    that started it is gone (killed, or ended without stop_all)."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return

    def watch():
        while os.getppid() == int(parent):
            time.sleep(1)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def hurried() -> bool:
    """Whether a test waits for the child (always, for a child pytest did not start early)."""
    path = os.environ.get(HURRY_ENV)
    return not path or os.path.exists(path)


def pool_map(fn: Callable[[int], object], count: int, processes: int = 2) -> list:
    """``[fn(i) for i in range(count)]``, in forked processes taking the indices in order: one
    process until :func:`hurried`, then ``processes`` (the others start when a test waits). A
    process that dies mid-task (a crash in Triton) is an error naming the task, not a hang."""
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("fork")
    tasks, results = ctx.Queue(), ctx.Queue()
    for i in [*range(count), *[None] * processes]:  # a None ends a worker
        tasks.put(i)
    busy = ctx.RawArray("l", processes)  # each worker's task, in shared memory: a crash may lose the queue's last item
    workers, out = [], {}

    def add():
        w = ctx.Process(target=_work, args=(fn, tasks, results, busy, len(workers)), daemon=True)
        w.start()
        workers.append(w)

    add()
    while len(out) < count:
        if len(workers) < processes and hurried():
            add()
        try:
            index, value = results.get(timeout=0.5)
        except queue.Empty:
            dead = [(i, w.exitcode) for i, w in enumerate(workers) if w.exitcode not in (None, 0)]
            if dead:
                i, code = dead[0]
                raise RuntimeError(f"a pool process died (exit code {code}) running task {busy[i]}")
            continue
        out[index] = value
    for w in workers:
        w.join(10)
    return [out[i] for i in range(count)]


def _work(fn, tasks, results, busy, worker):
    for index in iter(tasks.get, None):
        busy[worker] = index
        results.put((index, fn(index)))
