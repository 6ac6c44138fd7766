"""Where the GPU tests run, and at which sizes.

On a CUDA GPU with ``TRITON_INTERPRET=0`` (bench/gpu_session.sh): the real sizes, bfloat16. With
``ATTNCC_GPU_TESTS_ON_CPU=1``: the CPU under the interpreter, tiny sizes and float32, a check that
the tests themselves run (``=first``: the first parametrization of each test only, what
tests/test_bench.py runs in CI; tests/gpu/conftest.py). Otherwise every module here is
skipped as a whole at import (:func:`skip_unless_enabled`), before it builds or loads anything, so
that the plain ``python -m pytest`` of CI spends no time on them.
"""
from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
ON_CPU = not ON_GPU and os.environ.get("ATTNCC_GPU_TESTS_ON_CPU") in ("1", "first")
DEV = "cuda" if ON_GPU else "cpu"
LOW = torch.bfloat16 if ON_GPU else torch.float32  # the interpreter computes in numpy: float32 is quick there
TOL = 2e-2  # ||o - ref|| / ||ref|| for bfloat16 inputs (tests/cases.py REL_TOL)
GRAD_TOL = 3e-2
REASON = "needs a CUDA GPU and TRITON_INTERPRET=0 (or ATTNCC_GPU_TESTS_ON_CPU=1: tiny sizes on the CPU)"

MARKS = [pytest.mark.gpu, pytest.mark.skipif(not (ON_GPU or ON_CPU), reason=REASON)]


def skip_unless_enabled() -> None:
    """Called at the top of every test module here: skips the module where it cannot run."""
    if not (ON_GPU or ON_CPU):
        pytest.skip(REASON, allow_module_level=True)


def size(gpu, cpu):
    """``gpu`` on the GPU, ``cpu`` in the CPU check."""
    return gpu if ON_GPU else cpu


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def release() -> None:
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
