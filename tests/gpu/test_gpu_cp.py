"""Context-parallel attention (attncc.distributed) on GPUs: at world 1 the one-chunk layout is the
plain kernel bit for bit, and one rank holding the 16 chunks of an 8-rank head-tail layout (every
chunk pair its own call, merged through the LSEs) matches it, forward and backward; on two or more
GPUs ``python -m bench cp --multi --check`` (torchrun, NCCL) compares every layout and comm mode
with the single-GPU kernel and fails on a difference. tests/test_distributed.py checks the same on
CPU processes over gloo.

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_gpu_cp.py
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpu_env import DEV, LOW, MARKS, ON_GPU, TOL, rel, release, size, skip_unless_enabled

skip_unless_enabled()  # before anything is built or loaded

import attncc.distributed as cp  # noqa: E402
from cases import module  # noqa: E402

pytestmark = MARKS
ROOT = Path(__file__).resolve().parents[2]
SPECS = {"causal": {}, "sliding_window": {"window": size(8192, 7)}, "document": None}


@pytest.mark.parametrize("name", SPECS)
def test_world_one(name):
    m = module(name)
    N, H, D = size(16384, 40), size(16, 2), size(128, 16)
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, H, N, D, generator=gen).to(DEV, LOW) for _ in range(4))
    kw = SPECS[name]
    if kw is None:
        kw = {"doc": (torch.arange(N, device=DEV) // size(3000, 9)).to(torch.int32)[None].contiguous()}
    split = cp.make_layout("headtail", N, 8)
    split = cp.Layout(split.bounds, (0,) * split.num_chunks, 1, "split")  # 16 chunks, one rank
    ways = {"plain": lambda q, k, v: m.attention(q, k, v, **kw),
            "cp x1": lambda q, k, v: cp.attention(q, k, v, module=m, **kw),
            "cp split": lambda q, k, v: cp.attention(q, k, v, module=m, layout=split, **kw)}
    outs = {}
    for label, fn in ways.items():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = fn(*leaves)
        outs[label] = (o.detach(), torch.autograd.grad(o, leaves, do))
    assert torch.equal(outs["cp x1"][0], outs["plain"][0])
    assert rel(outs["cp split"][0], outs["plain"][0]) < TOL
    for label, got, want in zip(("dq", "dk", "dv"), outs["cp split"][1], outs["plain"][1]):
        assert rel(got, want) < TOL, label
    release()


@pytest.mark.skipif(not ON_GPU or torch.cuda.device_count() < 2, reason="needs two or more GPUs")
def test_several_gpus_match_one():
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="0")
    gpus = min(torch.cuda.device_count(), 4)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                           "-m", "bench", "cp", "--multi", "--check", "--lengths", "32768", "--reps", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
