"""Scores with terms constant along j (row terms) far into a sequence, on the GPU at real sizes: the
forward's raw LSE (the LSE less the row terms, written by the kernel beside it) reaches the backward,
so the gradients stay at bfloat16 accuracy at positions near 2**29 (tests/test_score_precision.py
checks the same on the CPU at tiny sizes). Through both backends: the Gluon forward hands the
backward its LSE (the fallback that subtracts the row terms in float32), which must stay within
tolerance at offsets where float32 still resolves them.

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_gpu_row_terms.py
"""
from __future__ import annotations

import pytest
import torch

from gpu_env import DEV, GRAD_TOL, ON_GPU, TOL, rel, release, size, skip_unless_enabled

skip_unless_enabled()

import attncc  # noqa: E402

from gpu_env import MARKS  # noqa: E402

pytestmark = MARKS

SCORES = {
    "bias_j": ('bias = "0.1 * j"', {}),
    "bias_i": ('bias = "0.1 * i + c"', {}),
    "constant": ('bias = "c"', {"c": 1e6}),
    "mod_i": ('mod = "s * 0.5 + 0.25 * i"', {}),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [0, 2**29])
@pytest.mark.parametrize("name", sorted(SCORES))
def test_row_terms_forward_and_gradients(name, offset, dtype):
    score, kw = SCORES[name]
    text = f'[params]\nc = 0.0\n[mask]\nwhere = "j <= i and i - j < 700"\n[score]\n{score}\n'
    mod, p = attncc.compile(text), attncc.parse_spec(text)
    dtype = dtype if ON_GPU else torch.float32
    B, H, N, D = 1, size(4, 2), size(2048, 48), size(128, 32)
    gen = torch.Generator().manual_seed(offset % 1000 + len(name))
    q, k, v = (torch.randn(B, H, N, D, generator=gen).to(DEV, dtype).requires_grad_() for _ in range(3))
    do = torch.randn(B, H, N, D, generator=gen).to(DEV, dtype)
    o, lse = mod.attention(q, k, v, q_offset=offset, k_offset=offset, return_lse=True, **kw)
    grads = torch.autograd.grad((o, lse), (q, k, v), (do, torch.full_like(lse, 0.3)))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro, rl = attncc.reference(p, *leaves, q_offset=offset, k_offset=offset, return_lse=True, **kw)
    want = torch.autograd.grad((ro, rl), leaves, (do.double(), torch.full_like(rl, 0.3)))
    assert rel(o, ro) < TOL
    for label, got, w in zip("qkv", grads, want):
        assert not torch.isnan(got).any(), label
        assert rel(got, w) < GRAD_TOL, (label, rel(got, w))
    release()
