"""Session 19's runtime changes on the GPU at real sizes (the CPU tests check them in the interpreter):
attention under ``torch.autocast("cuda")`` as SDPA runs it, a float32 learned table declared
bfloat16 getting its gradient in float32, o and gradients contiguous for a padded value head dim,
and the dispatch of a mask whose heavy-rows bound is a literal past 2**31 (int64 since this session).

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_gpu_session19.py
"""
from __future__ import annotations

import pytest
import torch

from gpu_env import DEV, LOW, MARKS, ON_GPU, TOL, rel, release, size, skip_unless_enabled

skip_unless_enabled()  # before anything is built or loaded

import attncc  # noqa: E402
from cases import module, pattern  # noqa: E402

pytestmark = MARKS
N = size(2048, 40)
D = size(128, 16)


def qkv(B=2, H=4, n=N, d=D, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, e, generator=g).to(DEV, dtype) for e in (d, d, dv or d)]


@pytest.mark.skipif(not ON_GPU, reason="autocast on CUDA")
def test_autocast_cuda_runs_in_the_autocast_dtype_as_sdpa():
    causal = module("causal")
    q, k, v = (t.requires_grad_() for t in qkv())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        o = causal.attention(q, k, v)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert o.dtype == want.dtype == torch.bfloat16
    assert rel(o, want) < TOL
    g = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), g)
    ref = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32  # the casts are differentiable: gradients in the dtypes given
        assert rel(a, b) < 3 * TOL
    release()


def test_float32_table_declared_bfloat16_gets_a_float32_gradient():
    text = '''
[inputs]
tab = { dims = ["h", 65], dtype = "bfloat16", grad = true }
[mask]
where = "j <= i"
[score]
bias = "tab[h, min(i - j, 64)]"
'''
    spec, p = attncc.compile(text), attncc.parse_spec(text)
    q, k, v = qkv(dtype=LOW)
    tab = torch.randn(q.shape[1], 65, generator=torch.Generator().manual_seed(3)).to(DEV).requires_grad_()
    o = spec.attention(q, k, v, tab=tab)
    g = torch.randn_like(o)
    (got,) = torch.autograd.grad(o, (tab,), g)
    t64 = tab.detach().to(torch.bfloat16).double().requires_grad_()  # the table the kernels read
    want = attncc.reference(p, q.double(), k.double(), v.double(), tab=t64)
    (ref,) = torch.autograd.grad(want, (t64,), g.double())
    assert got.dtype == torch.float32
    assert rel(o, want) < TOL
    assert rel(got, ref) < 5e-2  # bf16 q, k, v: the table's gradient sums many bf16-rounded terms
    release()


@pytest.mark.parametrize("dv", [size(72, 13), size(100, 5)])
def test_padded_value_dim_outputs_are_contiguous(dv):
    causal = module("causal")
    q, k, v = (t.requires_grad_() for t in qkv(dv=dv, dtype=LOW))
    o = causal.attention(q, k, v)
    assert o.is_contiguous() and o.shape[-1] == dv
    o.view(-1, N, dv)  # as SDPA's output takes it
    dq, dk, dv_ = torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
    assert dq.is_contiguous() and dk.is_contiguous() and dv_.is_contiguous()
    want = attncc.reference(pattern("causal"), q.double(), k.double(), v.double())
    assert rel(o, want) < TOL
    release()


def test_heavy_rows_bound_past_2_31():
    """`i < 3000000000 or j < 5`: every pair allowed at these lengths; the dispatch's count of heavy
    rows summed a literal past int32 (did not compile), now in int64."""
    spec = attncc.compile('[mask]\nwhere = "i < 3000000000 or j < 5"\n')  # noqa
    q, k, v = qkv(dtype=LOW)
    o = spec.attention(q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert rel(o, want) < TOL
    release()
