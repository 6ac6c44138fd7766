"""Probe 20 (training-loop semantics of the autograd wiring): the generated modules' ``attention``
(softmax and linear) and ``attncc.compile``'s, called as a PyTorch training loop calls SDPA or
FlexAttention, against attncc.reference (float64) and against what torch's own ops do.

Probed clean (seeded random calls at tiny odd sizes, interpreter):
- tensors changed in place after the forward and before the backward (q, k, v, a learned table,
  o itself, a view of o, the LSE, the storage under a q that needs no gradient) raise autograd's
  "modified by an inplace operation" on causal, rope_causal, t5_bias, alibi_learned, softcap, mqa
  (41 cases);
- dO and dLSE contiguous, BNHD-transposed, stride-0 (expanded from [1, 1, 1, D] and from a scalar,
  what ``o.sum()`` gives), at a storage offset, stride 2 in the last dim, flipped; on o only, the LSE
  only, or both; float32 and bfloat16 operands, over causal, t5_bias, alibi_learned, softcap,
  rope_causal, mqa: 252 cases within 1e-4 (bfloat16: 3e-2); dO in float64 / bfloat16 for float32 o and
  in float32 for bfloat16 / float16 o (autograd casts it; gradients in the operands' dtype);
- backward twice with retain_graph=True (exactly twice the gradients), accumulation into an
  existing .grad, torch.autograd.grad of each leaf alone, every subset of q, k, v requiring grad,
  none (no graph), torch.no_grad, torch.inference_mode, torch.utils.checkpoint reentrant and not:
  gradients bitwise equal to the plain call's (5 modules);
- torch.func transforms and float64 (so gradcheck) stay refused with their clear errors (pinned in
  tests/test_probe_grads.py and tests/test_probe_api19.py).

Found and fixed:
- create_graph=True: the gradients were passed through _NoDoubleBackward anchored on q, k, v and dO
  only, so a second-order path through anything else never met its error: a gradient penalty on a
  learned table's gradient with q, k, v frozen (``dt = grad(o.sum(), t, create_graph=True)``, then
  ``(o.sum() + dt.pow(2).sum()).backward()``) left the penalty out without a word (t.grad's norm 5.91,
  the true one 10.10), and a second derivative through the LSE's or a linear attention state's
  cotangent (``(lse * w).sum()``, ``(S * w).sum()``) came back None with allow_unused=True. The
  anchors are now every differentiable input and every cotangent (runtime.autograd.no_double_backward,
  its callers in autograd, compiled, linear and distributed).
- Forward-mode AD: a tangent (torch.autograd.forward_ad.make_dual) on q, k, v, a learned table, a decode
  q or a linear attention's q / initial state needs no gradient, so the call ran its kernels on the
  primal values and returned o without a tangent (``unpack_dual(o).tangent`` None, read as zero;
  the reference's tangent has norm 7.2), silently: torch's ops without a forward derivative raise.
  bind / bind_decode / linear.check_state refuse a tangent now (runtime.call.refuse_tangents), at the
  cost of one global read per call outside a dual level.
- ``torch.autograd.grad(o, q, cotangents, is_grads_batched=True)`` (the backward vmapped over a batch of
  cotangents, legacy BatchedTensors without storage) failed inside the kernels' launch with torch's
  "Cannot access data pointer of Tensor that doesn't have storage" (linear attention: "Cannot access
  storage of BatchedTensorImpl"), naming neither attncc nor the cause: now a NotImplementedError naming
  the function's backward and what to do (runtime.call.refuse_transformed_backward; also context
  parallelism's backward).
- Memory under activation checkpointing and offloading: AttentionFunction (ctx.call) and
  LinearAttentionFunction (ctx.lc) kept the validated call with its q, k, v (and the linear initial
  state) beside save_for_backward, where saved-tensor hooks never see them: under non-reentrant
  torch.utils.checkpoint and under offloading hooks a block's q, k, v stayed alive from the forward to
  the backward (freed around SDPA), so checkpointing an attention block saved none of their memory.
  ctx keeps the call without them now (and their layouts, so that the signature memo still serves the
  saved ones); gradients unchanged (tests/test_saved_hooks.py, the checkpoint tests).
"""
from __future__ import annotations

import pytest
import torch

import attncc
from cases import module, pattern, rel_err


def _qkv(shapes, dtype=torch.float32, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_(grad) for s in shapes]


# ---------------------------------------------------------------------------------------------
# create_graph=True: every second-order path meets the error
# ---------------------------------------------------------------------------------------------


def test_gradient_penalty_on_a_learned_table_raises():
    """q, k, v frozen, a learned table trained with a penalty on its own gradient: ``o.sum()``'s dO needs no
    gradient, so the table's gradient was anchored on nothing and came back as a constant; the
    penalty's gradient (the second-order term) was dropped silently."""
    q, k, v = _qkv([(1, 2, 13, 16)] * 3)
    (t,) = _qkv([(2, 32)], seed=1)
    t = (0.3 * t).requires_grad_()
    o = module("t5_bias").attention(q, k, v, rel_bias=t)
    (dt,) = torch.autograd.grad(o.sum(), t, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        (o.sum() + dt.pow(2).sum()).backward()


def test_second_derivative_through_the_lse_cotangent_raises():
    """dq is linear in the LSE's cotangent w: d(dq)/dw is not zero, and was given as None (allow_unused)."""
    q, k, v = _qkv([(1, 2, 13, 16)] * 3)
    q.requires_grad_()
    w = torch.randn(1, 2, 13, requires_grad=True)
    o, lse = module("causal").attention(q, k, v, return_lse=True)
    (dq,) = torch.autograd.grad((lse * w).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(dq.pow(2).sum(), w, allow_unused=True)


def test_second_derivative_through_a_linear_state_cotangent_raises():
    q, k, v = _qkv([(1, 2, 13, 16)] * 3)
    q.requires_grad_()
    w = torch.randn(1, 2, 16, 16, requires_grad=True)
    o, (s, z) = module("linear_elu").attention(q, k, v, return_state=True)
    (dq,) = torch.autograd.grad((s * w).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(dq.pow(2).sum(), w, allow_unused=True)


# ---------------------------------------------------------------------------------------------
# forward-mode AD (torch.autograd.forward_ad): refused, never a dropped tangent
# ---------------------------------------------------------------------------------------------


def _dual_calls():
    q, k, v = _qkv([(1, 2, 9, 16)] * 3)
    (t,) = _qkv([(2, 32)], seed=1)
    tangent = torch.ones(1, 2, 9, 16)
    dual = lambda x, d=None: fwAD.make_dual(x, torch.ones_like(x) if d is None else d)  # noqa: E731
    state = (torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 16))
    return {
        "q": lambda: module("causal").attention(dual(q, tangent), k, v),
        "k": lambda: module("causal").attention(q, dual(k), v),
        "v (return_lse)": lambda: module("causal").attention(q, k, dual(v), return_lse=True),
        "learned table": lambda: module("t5_bias").attention(q, k, v, rel_bias=dual(t)),
        "decode q": lambda: module("causal").decode(dual(q[:, :, :1]), k, v, kv_len=[9]),
        "linear q": lambda: module("linear_elu").attention(dual(q), k, v),
        "linear initial_state": lambda: module("linear_elu").attention(q, k, v, initial_state=(dual(state[0]), state[1])),
        "linear step": lambda: module("linear_elu").step(dual(q[:, :, 0]), k[:, :, 0], v[:, :, 0]),
    }


import torch.autograd.forward_ad as fwAD  # noqa: E402


@pytest.mark.parametrize("case", list(_dual_calls()))
def test_forward_mode_ad_tangents_are_refused(case):
    """A dual tensor (torch.autograd.forward_ad.make_dual) needs no gradient, so the call ran its kernels
    on the primal values outside autograd and returned o without a tangent: unpack_dual(o).tangent was
    None (read as zero; the reference's JVP of o for q's tangent of ones has norm 7.2), silently. The
    kernels have no JVP: the call is refused, naming the function."""
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            _dual_calls()[case]()


def test_plain_calls_inside_a_dual_level_still_run():
    """Only tensors that carry a tangent are refused: a call of plain tensors inside a dual level (a forward-AD
    computation elsewhere in the program) runs as outside it."""
    q, k, v = _qkv([(1, 2, 9, 16)] * 3)
    want = module("causal").attention(q, k, v)
    with fwAD.dual_level():
        fwAD.make_dual(torch.zeros(3), torch.ones(3))
        assert torch.equal(module("causal").attention(q, k, v), want)


# ---------------------------------------------------------------------------------------------
# torch.autograd.grad(..., is_grads_batched=True): the backward under vmap
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["causal", "linear_elu"])
def test_batched_cotangents_are_refused_clearly(name):
    """is_grads_batched=True runs the backward under vmap: the kernels got BatchedTensors and torch raised
    "Cannot access data pointer of Tensor that doesn't have storage", naming neither attncc nor the cause."""
    q, k, v = _qkv([(1, 2, 11, 16)] * 3, grad=True)
    o = module(name).attention(q, k, v)
    with pytest.raises(NotImplementedError, match=rf"{name}\.attention's backward: .*is_grads_batched"):
        torch.autograd.grad(o, q, torch.randn(3, *o.shape), is_grads_batched=True)


# ---------------------------------------------------------------------------------------------
# activation checkpointing and offloading free q, k, v as they do around SDPA
# ---------------------------------------------------------------------------------------------


def _alive_after_forward(attn, how):
    """Which of q, k, v (intermediates of a block: projections of x) are still alive once the forward has
    returned, under non-reentrant torch.utils.checkpoint or saved-tensor hooks that offload (copy)."""
    import gc
    import weakref

    x = torch.randn(1, 2, 16, 16, requires_grad=True)
    refs = {}

    def block(x):
        q, k, v = x * 1.5, x + 1, x - 1
        refs.update(q=weakref.ref(q), k=weakref.ref(k), v=weakref.ref(v))
        return attn(q, k, v)

    if how == "checkpoint":
        o = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    else:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            o = block(x)
    gc.collect()
    alive = sorted(n for n, r in refs.items() if r() is not None)
    o.sum().backward()  # and the backward still runs
    assert x.grad is not None and x.grad.isfinite().all()
    return alive


@pytest.mark.parametrize("how", ["checkpoint", "offload"])
@pytest.mark.parametrize("name", ["t5_bias", "linear_elu", "sdpa"])
def test_checkpointing_and_offloading_free_q_k_v(name, how):
    """The autograd Functions kept the validated call (ctx.call, ctx.lc) with its q, k, v: saved-tensor
    hooks never saw those references, so under non-reentrant checkpointing (which exists to drop a block's
    activations until the backward recomputes them) and CPU offloading the block's q, k and v stayed
    alive from the forward to the backward, as they do not around SDPA."""
    if name == "sdpa":
        attn = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    elif name == "t5_bias":
        attn = lambda q, k, v: module(name).attention(q, k, v, rel_bias=torch.full((2, 32), 0.1))  # noqa: E731
    else:
        attn = module(name).attention
    assert _alive_after_forward(attn, how) == []
