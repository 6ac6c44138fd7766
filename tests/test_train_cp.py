"""examples/train_cp.py under torchrun on two CPU processes (gloo, Triton interpreter): the first
step's loss and weight gradients with context parallelism equal those of one process on the whole
sequence (the example's --check), and training runs on. The run is a child process that starts
when pytest's collection ends (tests/early_child.py): it runs beside the tests before this module."""
from __future__ import annotations

import os
import sys

import pytest

from cases import ROOT
from early_child import EarlyChild

CMD = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
       str(ROOT / "examples" / "train_cp.py"), "--tiny", "--check", "--steps", "2",
       "--attention", "document", "--layout", "balanced", "--comm", "ring", "--kv-heads", "1"]
ENV = {"TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
EARLY_CHILDREN = {"run": EarlyChild("train_cp", lambda folder: CMD, lambda folder: dict(os.environ, **ENV), timeout=600,
                                    cwd=ROOT)}


@pytest.fixture(scope="module")
def run():
    return EARLY_CHILDREN["run"].result()


def test_train_cp_check_under_torchrun(run):
    assert run.returncode == 0, run.failure()
    assert "check: loss" in run.stdout and ": ok" in run.stdout, run.stdout
    assert "step    1" in run.stdout, run.stdout
