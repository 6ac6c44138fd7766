"""examples/train_cp.py under torchrun on two CPU processes (gloo, Triton interpreter): the first
step's loss and weight gradients with context parallelism equal those of one process on the whole
sequence (the example's --check), training runs on, and the process group is released at the end
(tests/train_cp_exit.py: no gloo thread left to race the interpreter's exit)."""
from __future__ import annotations

import os
import subprocess
import sys

from cases import ROOT


def test_train_cp_check_under_torchrun():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "train_cp_exit.py"), "--tiny", "--check", "--steps", "2",
           "--attention", "document", "--layout", "balanced", "--comm", "ring", "--kv-heads", "1"]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "check: loss" in run.stdout and ": ok" in run.stdout, run.stdout
    assert "step    1" in run.stdout, run.stdout
    assert "not released" not in run.stdout, run.stdout
