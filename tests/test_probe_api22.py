"""Probe 22 of the call API as an adversarial PyTorch user: attention(), decode(), linear attention,
packed calls, attncc.compile and the torch.compile / autograd wiring, against attncc.reference
(float64) and against what SDPA / FlexAttention do with the same call.

Found and fixed (each test below failed before its fix):
- torch.compile, ``torch.use_deterministic_algorithms(True)``: the eager backward of a spec with a
  learned table (``grad = true``) raises torch's "does not have a deterministic implementation"
  (its gradient is summed with atomic adds), but the custom op torch.compile traces asked nothing:
  a compiled training step ran it without a word. The op's body asks now (autograd.alert_input_grads).
- torch.compile, an [inputs] tensor that requires grad but is declared without ``grad = true``: eager
  calls refuse it (its gradient would be dropped), the compiled call returned ``w.grad = None``
  silently. The traced call checks it too (launch.run_attention).
- torch.compile(fullgraph=False), once a call inside the compiled function raised (a wrong shape,
  caught; or the refusal above): dynamo runs the frames that raised eagerly from then on and traces
  the functions they call as frames of their own, so run_attention was traced with a call bound
  eagerly (its signature memo taken for "not traced"), or ran eagerly and dynamo traced _run: the
  kernels' launch traced on fake tensors, every later call failed (InterpreterError here, Triton's
  errors on the GPU). run_attention now asks dynamo whether a compiled function runs (one C call) and
  runs _run hidden from dynamo there.
"""
from __future__ import annotations

import pytest
import torch

import attncc
from cases import module

SCALED = '[inputs]\nw = { dims = ["h"], dtype = "float32" }\n[score]\nmod = "s * w[h]"\n'


def _qkv(shapes, dtype=torch.float32, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_(grad) for s in shapes]


def _compiled(fn, fullgraph=True):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=fullgraph, backend="eager")


# ---------------------------------------------------------------------------------------------
# torch.compile keeps the eager call's refusals
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def test_compiled_learned_table_backward_alerts_under_deterministic_algorithms(deterministic):
    q, k, v = _qkv([(1, 2, 11, 16)] * 3, grad=True)
    (t,) = _qkv([(2, 32)], seed=1, grad=True)
    t5 = module("t5_bias")
    fn = _compiled(lambda q, k, v, t: t5.attention(q, k, v, rel_bias=t))
    o = fn(q, k, v, t)
    with pytest.raises(RuntimeError, match="deterministic implementation"):
        o.sum().backward()
    torch.use_deterministic_algorithms(True, warn_only=True)
    o = fn(q, k, v, t)
    with pytest.warns(UserWarning, match="deterministic implementation"):
        o.sum().backward()
    assert t.grad is not None and t.grad.abs().max() > 0


def test_compiled_call_refuses_an_input_that_would_drop_its_gradient():
    m = attncc.compile(SCALED)
    q, k, v = _qkv([(1, 2, 11, 16)] * 3, grad=True)
    w = torch.rand(2, generator=torch.Generator().manual_seed(3)).requires_grad_()
    with pytest.raises(ValueError, match="declared without grad = true"):
        m.attention(q, k, v, w=w)
    fn = _compiled(lambda q, k, v, w: m.attention(q, k, v, w=w), fullgraph=False)
    with pytest.raises(ValueError, match="declared without grad = true"):
        fn(q, k, v, w).sum().backward()
    # detached it runs, compiled and eager alike
    o = fn(q, k, v, w.detach())
    assert torch.allclose(o, m.attention(q, k, v, w=w.detach()), atol=1e-6)


def test_compiled_function_keeps_working_after_a_refused_call():
    """torch.compile(fullgraph=False): once a call raised inside it (a wrong shape, caught), dynamo runs
    the frames it failed in (bind's among them) eagerly from then on and traces the rest; run_attention,
    traced with a call bound eagerly (a signature memo), took it for an eager call and traced the
    kernels' launch: every later call failed with an InterpreterError (Triton's errors on the GPU)."""
    causal = module("causal")
    q, k, v = _qkv([(1, 2, 13, 16)] * 3, seed=5, grad=True)
    fn = _compiled(lambda q, k, v: causal.attention(q, k, v), fullgraph=False)
    with pytest.raises(ValueError, match="k has 5 positions but v has 13"):
        fn(q, k[:, :, :5], v)
    o = fn(q, k, v)
    grads = torch.autograd.grad(o.pow(2).sum(), (q, k, v))
    o_eager = causal.attention(q, k, v)
    eager = torch.autograd.grad(o_eager.pow(2).sum(), (q, k, v))
    assert torch.allclose(o, o_eager, atol=1e-6)
    for a, b in zip(grads, eager):
        assert torch.allclose(a, b, atol=1e-5)
