"""The catalogue of outside patterns (tests/catalogue.py: FlexAttention's test mods, the
attention-gym masks and mods) on the GPU: compiled kernels at the GPU's own tile configs, head
dims 64 and 128, bfloat16, against the independent float64 oracle; forward, LSE and gradients on
every call of every pattern, longer calls for the patterns without fixed-size inputs, and
``decode`` (contiguous and paged caches, 1 and 16 new rows). Not run yet (written without a GPU).

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_gpu_catalogue.py
"""
from __future__ import annotations

import pytest
import torch

from gpu_env import DEV, LOW, MARKS, release, size, skip_unless_enabled

skip_unless_enabled()  # before anything is built or loaded

import catalogue as C  # noqa: E402

pytestmark = MARKS
HEAD_DIMS = size([64, 128], [16])
# longer calls for patterns whose inputs (if any) have no fixed-size table: ragged, Nq != Nk, offsets
LONG_CALLS = size([C.Call(700, 1100, q_offset=400), C.Call(1024, 1024), C.Call(333, 257, q_offset=90, k_offset=11)],
                  [])
CALLS = size(None, 1)  # on the CPU (a check that the test runs): the first call only
DECODES = size(((1, False), (16, True), (3, True)), ((3, True),))


def _dtype(c):
    return LOW if c.bf16 else torch.float32  # conditions on the score: compared in float32


def _scalable(c) -> bool:
    return not any(isinstance(d, int) for decl in c.spec.get("inputs", {}).values() for d in decl["dims"])


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("c", C.CASES, ids=lambda c: c.name)
def test_pattern(c, head_dim):
    for n, call in enumerate(c.calls[:CALLS]):
        C.check_call(c, call, seed=n, head_dim=head_dim, dtype=_dtype(c), layout=n % 3, device=DEV)
    if _scalable(c) and c.name != "bigbird":
        for n, call in enumerate(LONG_CALLS):
            C.check_call(c, call, seed=10 + n, head_dim=head_dim, dtype=_dtype(c), device=DEV)
    release()


@pytest.mark.parametrize("c", [c for c in C.CASES if c.decode], ids=lambda c: c.name)
def test_decode(c):
    for nq, paged in DECODES:
        C.check_decode(c, seed=nq, nq=nq, paged=paged, head_dim=HEAD_DIMS[-1], dtype=_dtype(c), device=DEV)
    release()
