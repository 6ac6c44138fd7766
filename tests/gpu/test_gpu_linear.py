"""Linear attention (specs/linear_elu.toml) on the GPU in bfloat16 (formerly the checks of
bench/linear_bench.py): forward and gradients against the float64 reference, two calls carrying
the state equal one call, and ``step`` token by token equals the call.

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_gpu_linear.py
"""
from __future__ import annotations

import torch

from gpu_env import DEV, LOW, MARKS, TOL, rel, release, size, skip_unless_enabled

skip_unless_enabled()  # before anything is built or loaded

import attncc  # noqa: E402
from cases import module, pattern  # noqa: E402

pytestmark = MARKS
H, D = 4, size(128, 32)


def qkv(T, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, T, D, generator=gen).to(DEV, LOW).requires_grad_(grad) for _ in range(3)]


def test_forward():
    mod, p = module("linear_elu"), pattern("linear_elu")
    q, k, v = qkv(size(4096, 64))
    assert rel(mod.attention(q, k, v), attncc.reference(p, q.double(), k.double(), v.double())) < TOL
    release()


def test_gradients():
    mod, p = module("linear_elu"), pattern("linear_elu")
    q, k, v = qkv(size(2048, 48), seed=1, grad=True)
    o = mod.attention(q, k, v)
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(attncc.reference(p, *leaves), leaves, do.double())
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert rel(a, b) < TOL, name
    release()


def test_state_carry_and_step():
    """Two calls carrying the state give one call; ``step`` over the first tokens gives its rows."""
    mod = module("linear_elu")
    T, cut = size(4096, 64), size(1500, 23)
    q, k, v = qkv(T, seed=2)
    whole = mod.attention(q, k, v)
    o1, state = mod.attention(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], return_state=True)
    o2 = mod.attention(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], initial_state=state, q_offset=cut, k_offset=cut)
    assert rel(torch.cat([o1, o2], 2), whole) < TOL
    state, rows = None, []
    for t in range(size(64, 6)):
        o_t, state = mod.step(q[:, :, t], k[:, :, t], v[:, :, t], state)
        rows.append(o_t)
    assert rel(torch.stack(rows, 2), whole[:, :, :len(rows)]) < TOL
    release()
