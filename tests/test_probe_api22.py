"""Probe 22 of the call API as an adversarial PyTorch user: attention(), decode(), linear attention,
packed calls, attncc.compile and the torch.compile / autograd wiring, against attncc.reference
(float64) and against what SDPA / FlexAttention do with the same call.

Probed clean (interpreter, seeded, tiny sizes): torch.compile(fullgraph=True, dynamic=True) with
changing lengths and int params (o, dq, dk against the reference, 5 calls), float params and scale=
as symbolic floats (specialize_float=False, 7 calls), int params and q_offset as 0-d tensors (4),
packed calls with changing cu_seqlens and S (12) and past-the-end cu_seqlens refused; dropout
without seed= under fullgraph (eager, aot_eager: o and gradients equal eager's after the same
torch.manual_seed); torch.utils.checkpoint (reentrant and not) of dropout without seed= (bitwise
equal), non-reentrant checkpoint inside torch.compile with a learned table; torch.export (strict,
non-strict, a dynamic length, an nn.Parameter table); tensors changed in place between forward
and backward under torch.compile (o, q, document ids: autograd's error); allow_mutation_on_saved_tensors
(q changed: the original's gradients); q is k and q is k is v, and one tensor passed as two learned
inputs (gradients summed, against the reference); jacobian (loop) against the reference, and
jacobian(vectorize=True), hessian, the double-backward jvp, torch.func.jacrev / vjp refused
clearly; float16 / bfloat16 losses scaled by 2**10..2**20 (as SDPA's math backward, float16 dO
itself overflowing at 2**16); 33 odd scalars for params, offsets, n_q, return_lse and scale (numpy,
tensors, bools, floats, 2**64, strings, lists); q, k, v with the negative bit (D 1, 2, 16: copied)
in attention, decode and linear attention, and a negated linear initial state; decode and linear
attention under torch.compile(fullgraph=False) after a refused call; nn.Parameter q; inference
tensors saved for backward (torch's error, as SDPA); the meta device (a clear error).

Left as they are: under allow_mutation_on_saved_tensors, an [inputs] tensor or cu_seqlens changed in
place is refused with attncc's clear error where torch's ops would clone it (the runtime keeps their
version counters instead of saving them: host cost); a torch.Tensor subclass q comes back as a plain
tensor (SDPA returns the subclass through __torch_function__); values equal.

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
- torch.compile(fullgraph=True), a packed call without max_seqlen_q / max_seqlen_k: dynamo's "Could not
  guard on data-dependent expression" (from the cu_seqlens check's ``if first != 0``), naming neither
  attncc nor the way out; now a graph break whose message says to pass them (without fullgraph the
  call breaks the graph, as it did). docs/spec-language.md "torch.compile" says so, and no longer says
  that a dropout call without ``seed=`` breaks the graph or fails under fullgraph (it draws its seed in
  the graph, as eager, a new one every call: probed, o and the gradients equal eager's after the same
  ``torch.manual_seed``).
- ``attncc.compile(spec)`` called inside a torch.compile(fullgraph=True) function: dynamo's "does not
  know how to trace the builtin _hashlib.openssl_sha256"; now a graph break whose message says to
  compile the module outside and call its attention inside (without fullgraph: a graph break, as
  before).
- A float [inputs] table with torch's negative bit (``z.conj().imag``, a lazily negated view, as
  complex RoPE or spectral code makes): the kernels read its memory, the values before the negation:
  attention() and decode() computed with the opposite table (o 2.9 off at scale 3) and its gradient
  (reaching z through the view) was wrong, silently; attncc.reference, torch's ops and a
  ``.resolve_neg()`` copy agree. input_as_read resolves it, and bind's signature cache does not take
  such a call (the check is one Tensor.is_neg per input per call); q, k, v were never affected (such
  views have even strides, which the kernels copy).
"""
from __future__ import annotations

import pytest
import torch

import attncc
from cases import module, pattern as _pattern

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



def test_compiled_packed_call_without_max_seqlen_says_what_to_pass():
    causal = module("causal")
    q, k, v = _qkv([(1, 2, 20, 16)] * 3, seed=6)
    cu = torch.tensor([0, 5, 12, 20], dtype=torch.int32)
    fn = _compiled(lambda q, k, v, cu: causal.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu))
    with pytest.raises(Exception, match="pass max_seqlen_q and max_seqlen_k"):
        fn(q, k, v, cu)
    eager = causal.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)
    loose = _compiled(lambda q, k, v, cu: causal.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu),
                      fullgraph=False)
    assert torch.allclose(loose(q, k, v, cu), eager, atol=1e-6)
    given = _compiled(lambda q, k, v, cu: causal.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                           max_seqlen_q=8, max_seqlen_k=8))
    assert torch.allclose(given(q, k, v, cu), eager, atol=1e-6)



def test_attncc_compile_inside_a_compiled_function_says_where_to_call_it():
    src = '[params]\nw = 3\n[mask]\nwhere = "j <= i and i - j < w"\n'
    q, k, v = _qkv([(1, 2, 12, 16)] * 3, seed=9)
    want = attncc.compile(src).attention(q, k, v)
    with pytest.raises(Exception, match="call it outside the function torch.compile traces"):
        _compiled(lambda q, k, v: attncc.compile(src).attention(q, k, v))(q, k, v)
    loose = _compiled(lambda q, k, v: attncc.compile(src).attention(q, k, v), fullgraph=False)
    assert torch.allclose(loose(q, k, v), want, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# tensors with torch's negative bit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_a_lazily_negated_table_is_read_with_its_sign(seed):
    t5 = module("t5_bias")
    q, k, v = _qkv([(1, 2, 12, 16)] * 3, seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    z = (3 * torch.randn(2, 32, dtype=torch.complex64, generator=gen)).requires_grad_()
    table = z.conj().imag
    assert table.is_neg()
    plain = table.detach().resolve_neg()
    for _ in range(2):  # the second call of the signature too (bind's cache)
        with torch.no_grad():  # (decode has no backward)
            for make in (lambda t: t5.attention(q, k, v, rel_bias=t),
                         lambda t: t5.decode(q[:, :, -3:], k, v, kv_len=[12], rel_bias=t)):
                assert torch.allclose(make(table), make(plain), atol=1e-6)
    # a plain call of the same layout first, then the negated one: not served from the cache
    t5.attention(q, k, v, rel_bias=plain.clone())
    o = t5.attention(q, k, v, rel_bias=table)
    assert torch.allclose(o, t5.attention(q, k, v, rel_bias=plain), atol=1e-6)
    w = torch.randn(o.shape, generator=gen)
    (o * w).sum().backward()
    zr = z.detach().clone().requires_grad_()
    ref = attncc.reference(_pattern("t5_bias"), q.double(), k.double(), v.double(), rel_bias=zr.conj().imag.double())
    (ref * w.double()).sum().backward()
    assert torch.allclose(z.grad, zr.grad.to(z.grad.dtype), atol=1e-4)


def test_a_lazily_negated_table_under_torch_compile_and_export():
    """Traced, the check is left to the custom op's body (Tensor.is_neg is no op dynamo traces: it broke
    fullgraph tracing and strict torch.export of every spec with [inputs] while it was asked there)."""
    t5 = module("t5_bias")
    q, k, v = _qkv([(1, 2, 12, 16)] * 3, seed=7)
    table = (3 * torch.randn(2, 32, dtype=torch.complex64, generator=torch.Generator().manual_seed(8))).conj().imag
    want = t5.attention(q, k, v, rel_bias=table.resolve_neg())
    fn = _compiled(lambda q, k, v, t: t5.attention(q, k, v, rel_bias=t))
    assert torch.allclose(fn(q, k, v, table), want, atol=1e-6)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rel_bias = torch.nn.Parameter(table.resolve_neg())

        def forward(self, q, k, v):
            return t5.attention(q, k, v, rel_bias=self.rel_bias)

    exported = torch.export.export(Block(), (q, k, v), strict=True)
    assert torch.allclose(exported.module()(q, k, v), want, atol=1e-6)
