"""Probe cache26 (session 26, probe26a): what a call binds once per signature (issue 18), attacked with
sequences of calls that differ in one thing, each call's output, LSE and gradients against the float64
reference (``tests/probe_cache26.py``, seeded; its docstring says what it draws).

Probed clean (CPU interpreter): ~1000 sequences of 2-4 calls over 22 shipped specs and two built in
process (strides and layouts of q, k, v and dO, alignment at one signature, k and v of batch 1,
dtypes, Nq / Nk / D / Dv / head counts, params as ints, floats, 0-d tensors and numpy numbers,
offsets, n_k, scale, return_lse, grad / no_grad / inference_mode, [inputs] of every integer and
float dtype, expanded, strided, transposed, at storage offsets, as the learned tables); inputs
changed in place between calls and between a forward and its backward; dropout's p, seed and
training switched at one signature; ATTNCC_CONFIG*, ATTNCC_RESIDUE_MIN_ROWS,
ATTNCC_COLUMN_MIN_ROWS and ATTNCC_FAST_LAUNCH changed between a forward and its backward and between
calls (150 cases); two backward passes of one graph (retain_graph) with other dO layouts; non-reentrant
checkpointing; four threads calling one module at other signatures; torch.compile'd calls whose
tables change dtype and layout; torch.autocast on and off at one set of tensors; decode beside
attention on one module; two compiled specs of one name.

Defect found (fixed): TRITON_INTERPRET turned off between a CPU forward and its backward. bind refuses
such a forward ("the kernels run on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1"), but the
backward ran anyway, without the interpreter's bfloat16 conversions: bfloat16 gradients 1e10 off,
without a word (float32 ran the GPU's configs in the interpreter). Each backward now checks again
(``Call.check_device``: the softmax and linear autograd functions and the compiled op).

Defect found (fixed in session 26 after the probe): q, k, v (and dO, dLSE, a decode's caches) with
torch's negative bit were read as their memory holds them (``causal.attention(q, k,
torch._neg_view(v))``: o 5.4 off), where [inputs] were resolved first: only a private view or
``as_strided`` of ``x.conj().imag`` makes one the kernels read in place (every other such view is
strided or 4 bytes off 16, so the kernels read a resolved copy); ``runtime.call.resolved`` now
applies the negation in bind, bind_decode and the backwards (three tensor method calls per call).
"""
from __future__ import annotations

import pytest
import torch

from cases import module


@pytest.mark.parametrize("name,dtype", [("causal", torch.bfloat16), ("document", torch.bfloat16),
                                        ("causal", torch.float32), ("linear_elu", torch.bfloat16)])
def test_backward_refused_once_the_interpreter_is_off(name, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 24, 16, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    kw = {"doc": torch.cumsum(torch.rand(2, 24, generator=gen) < 0.2, 1).to(torch.int32)} if name == "document" else {}
    o = module(name).attention(q, k, v, **kw)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"attention's backward: tensors are on cpu; .* TRITON_INTERPRET=1"):
        o.float().sum().backward()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # back on: the same graph's backward runs
    o.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def _negated(t):
    """``t``'s values behind torch's negative bit: memory holding -t, read lazily negated."""
    return torch._neg_view(-t)


@pytest.mark.parametrize("name", ["causal", "sliding_window", "linear_elu"])
def test_negative_bit_operands_and_cotangents(name):
    """q, k, v and dO carrying torch's negative bit give what their values give (were read as memory,
    o 5.4 off); gradients flow through the lazy negation. A decode's q and caches likewise."""
    m = module(name)
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=gen) for _ in range(3))
    go = torch.randn(1, 2, 24, 16, generator=gen)
    base = [t.clone().requires_grad_() for t in (q, k, v)]
    want = m.attention(*base)
    want.backward(go)
    for which in range(4):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        args = [_negated(t) if i == which else t for i, t in enumerate(leaves)]
        o = m.attention(*args)
        assert torch.allclose(o, want, atol=1e-6, rtol=0), (name, which)
        o.backward(_negated(go) if which == 3 else go)
        for got, ref in zip(leaves, base):
            assert torch.allclose(got.grad, ref.grad, atol=1e-5, rtol=0), (name, which)
    if hasattr(m, "decode"):
        kv_len = torch.tensor([24])
        ref = m.decode(q[:, :, -1:], k, v, kv_len=kv_len)
        for args in ((_negated(q[:, :, -1:]), k, v), (q[:, :, -1:], _negated(k), _negated(v))):
            assert torch.allclose(m.decode(*args, kv_len=kv_len), ref, atol=1e-6, rtol=0)
