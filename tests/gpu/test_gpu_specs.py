"""Every shipped softmax spec on the GPU at real sizes in bfloat16 against the float64 reference
(formerly the checks of bench/gpu_check.py): the forward and LSE at N = 4096, head dims 32-256 and
float16, and the gradients at N = 1024 (the reference is dense). Dropout specs draw one seed's keep
mask and hand the same to the reference.

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_gpu_specs.py
"""
from __future__ import annotations

import pytest
import torch

from gpu_env import DEV, GRAD_TOL, LOW, MARKS, TOL, rel, release, size, skip_unless_enabled

skip_unless_enabled()  # before anything is built or loaded

import attncc  # noqa: E402
from cases import SPEC_NAMES, inputs_for, module, pattern  # noqa: E402

pytestmark = MARKS

SOFTMAX = [n for n in SPEC_NAMES if pattern(n).kind == "softmax"]
# params that make each mask interesting at N = 4096 (tests/cases.py SMALL_PARAMS: at tiny sizes)
PARAMS = size({"sliding_window": {"window": 1024}, "local_bidirectional": {"w": 256}, "prefix_lm": {"prefix": 1024},
               "chunked_local": {"chunk": 1000}, "sink_window": {"sinks": 4, "window": 500},
               "neighborhood_2d": {"width": 64, "radius": 2}, "block_diagonal": {"chunk": 700}},
              {"sliding_window": {"window": 13}, "local_bidirectional": {"w": 9}, "prefix_lm": {"prefix": 11},
               "chunked_local": {"chunk": 13}, "sink_window": {"sinks": 3, "window": 9},
               "neighborhood_2d": {"width": 7, "radius": 1}, "block_diagonal": {"chunk": 11},
               "dilated": {"window": 30, "dilation": 3}, "longformer": {"g": 5, "w": 7}, "strided": {"stride": 6}})
D = size(128, 32)


def _call(name, N, B, grad, seed=0):
    """(pattern, module, q, k, v, kernel keywords, reference keywords) of one spec at length N."""
    p, mod = pattern(name), module(name)
    Hq = p.heads_q or 8
    Hkv = p.heads_kv or (Hq // 2 if Hq % 2 == 0 else Hq)
    Hq, Hkv = size((Hq, Hkv), (min(Hq, 4), min(Hkv, 2)) if not p.heads_q else (Hq, Hkv))
    Nq = N // 2 if name == "cross_causal" else N
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(DEV, LOW).requires_grad_(grad)
    k, v = (torch.randn(B, Hkv, N, D, generator=gen).to(DEV, LOW).requires_grad_(grad) for _ in range(2))
    kw = dict(PARAMS.get(name, {}), **{n: t.to(DEV) for n, t in inputs_for(p, B, Hq, N, gen).items()})
    ref_kw = dict(kw)
    if p.dropout:  # one seed's keep mask for both
        kw["seed"] = 1234
        ref_kw["keep_mask"] = mod.dropout_keep_mask(q, k, v, seed=1234)
    return p, mod, q, k, v, kw, ref_kw


@pytest.mark.parametrize("name", SOFTMAX)
def test_forward_and_lse(name):
    p, mod, q, k, v, kw, ref_kw = _call(name, size(4096, 64), 1, grad=False)
    o, lse = mod.attention(q, k, v, return_lse=True, **kw)
    ref, ref_lse = attncc.reference(p, q.double(), k.double(), v.double(), return_lse=True, **ref_kw)
    finite = torch.isfinite(ref_lse)
    assert not torch.isnan(o).any()
    assert torch.equal(torch.isfinite(lse), finite)
    assert rel(o, ref) < TOL
    if finite.any():
        assert float((lse.double()[finite] - ref_lse[finite]).abs().max()) < 5e-2
    release()


@pytest.mark.parametrize("name, head_dim, dtype", [
    ("causal", 32, torch.bfloat16), ("causal", 64, torch.bfloat16), ("causal", 80, torch.bfloat16),
    ("causal", 96, torch.bfloat16), ("causal", 256, torch.bfloat16), ("alibi", 64, torch.float16),
    ("dense", 128, torch.float16)])
def test_head_dims_and_float16(name, head_dim, dtype):
    """Head dims padded inside the kernel (not a power of two) and float16."""
    p, mod = pattern(name), module(name)
    dtype, N = size((dtype, 4096), (torch.float32, 48))
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, size(8, 2), N, head_dim, generator=gen).to(DEV, dtype) for _ in range(3))
    assert rel(mod.attention(q, k, v), attncc.reference(p, q.double(), k.double(), v.double())) < TOL
    release()


# N = 1024 runs the short-key configs; these families' hints pick others past 2048 keys (test_tile_hints.py)
LONG = [n for n in ("neighborhood_2d", "sink_window", "longformer") if n in SOFTMAX]


@pytest.mark.parametrize("name, N", [(n, size(1024, 48)) for n in SOFTMAX] + [(n, size(4096, 64)) for n in LONG])
def test_gradients(name, N):
    p, mod, q, k, v, kw, ref_kw = _call(name, N, 1, grad=True)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(DEV, LOW)
    grads = torch.autograd.grad(mod.attention(q, k, v, **kw), (q, k, v), do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(attncc.reference(p, *leaves, **ref_kw), leaves, do.double())
    for label, got, want in zip("qkv", grads, ref):
        assert not torch.isnan(got).any(), f"d{label} has NaN"
        assert rel(got, want) < GRAD_TOL, (label, rel(got, want))
    release()


@pytest.mark.parametrize("backend", ["triton", "gluon"])
@pytest.mark.parametrize("name", ["causal", "document"])
def test_kv_batch_broadcast(name, backend, monkeypatch):
    """k, v of batch 1 beside q of batch 3 (a stride-0 batch, as FlexAttention broadcasts them): the
    forward and the gradients (k's and v's summed over the batch) against the reference, through the
    tl kernels and the Gluon forward (whose TMA descriptors get a copy, attncc/runtime/gluon/launch.py)."""
    if backend == "gluon" and not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9):
        pytest.skip("the Gluon forward runs on sm90")
    monkeypatch.setenv("ATTNCC_BACKEND", backend)
    p, mod = pattern(name), module(name)
    B, H, N = 3, size(8, 2), size(2048, 48)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, N, D, generator=gen).to(DEV, LOW).requires_grad_()
    k, v = (torch.randn(1, H, N, D, generator=gen).to(DEV, LOW).requires_grad_() for _ in range(2))
    kw = {n: t.to(DEV) for n, t in inputs_for(p, B, H, N, gen).items()}
    do = torch.randn(B, H, N, D, generator=gen).to(DEV, LOW)
    o = mod.attention(q, k, v, **kw)
    grads = torch.autograd.grad(o, (q, k, v), do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attncc.reference(p, *leaves, **kw)
    want = torch.autograd.grad(ref, leaves, do.double())
    assert rel(o, ref) < TOL
    for label, got, w in zip("qkv", grads, want):
        assert got.shape == w.shape, label
        assert rel(got, w) < GRAD_TOL, (label, rel(got, w))
    release()
