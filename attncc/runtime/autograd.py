"""The autograd wiring of generated softmax attention.

:class:`AttentionFunction` runs a generated module's forward with the LSE written (a
backward follows) and keeps q, k, v, o and the LSE; its backward calls the module's
backward launcher, which recomputes P from the LSE. The ``[inputs]`` declared
``grad = true`` are extra autograd inputs and get their gradients from the same backward.
Both outputs are differentiable (contract v1): the LSE's gradient ``dlse`` enters the backward as
``dLoss/ds_ij += dlse_i * p_ij`` (``dlse/ds = p``), so partial attentions merged through their LSEs
train correctly. Gradients of gradients are not implemented: asking for them raises (see
:class:`_NoDoubleBackward`).
"""
from __future__ import annotations

import math

import torch

from attncc.runtime.call import Call


class AttentionFunction(torch.autograd.Function):
    """o, lse = attention(q, k, v, **inputs) with dq, dk, dv (and the grad inputs' gradients)
    from the generated backward kernels.

    ``run`` is ``(forward, backward, call)``: ``forward(call) -> (o, lse)`` and ``backward(call, o, lse,
    do, dlse) -> (dq, dk, dv, {name: grad})`` are the generated module's launchers, ``call`` the
    validated call as the forward runs it (its q, k, v are the inputs, ``grad_inputs`` its inputs
    declared ``grad = true``, in spec order; see :func:`attncc.runtime.launch.run_attention`).
    Gradients are not materialized: an output the loss does not use passes None (``dlse=None``
    costs the backward nothing; ``do=None`` becomes zeros).
    """

    @staticmethod
    def forward(ctx, run, q, k, v, *grad_inputs):
        forward, ctx.backward_fn, call = run
        o, lse = forward(call)
        # Everything the backward reads is saved, the [inputs] and cu_seqlens too, not only q, k, v:
        # autograd then refuses a backward after any of them changed in place (kv_len[0] = 3, an
        # optimizer step on a learned table) instead of computing gradients of values the forward
        # never saw, and saved-tensor hooks see all of them. Inference tensors (made under
        # torch.inference_mode) cannot be saved, nor changed outside it: the call keeps those.
        ctx.call, ctx.input_names = call, tuple(call.inputs)
        ctx.save_for_backward(q, k, v, o, lse, *(None if t is None or t.is_inference() else t
                                                 for t in (call.cu_seqlens_q, call.cu_seqlens_k, *call.inputs.values())))
        # The gradient of an unused LSE stays None: materialized, autograd would fill a zero
        # tensor of its shape per backward (an allocation and a memset kernel for nothing).
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, *saved = ctx.saved_tensors
        call = ctx.call
        kept = (call.cu_seqlens_q, call.cu_seqlens_k, *call.inputs.values())
        cu_q, cu_k, *inputs = (t if s is None else s for s, t in zip(saved, kept))
        names = call.grad_input_names
        if do is None and dlse is None:
            return (None,) * (4 + len(names))
        if do is None:  # only the LSE reaches the loss
            do = torch.zeros_like(o)
        # the saved tensors, checked by autograd against changes in place since the forward (the
        # call's own, unless autograd unpacked others)
        if not (q is call.q and k is call.k and v is call.v and cu_q is call.cu_seqlens_q
                and cu_k is call.cu_seqlens_k and all(a is b for a, b in zip(inputs, call.inputs.values()))):
            call = call.replace(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                inputs=dict(zip(ctx.input_names, inputs)))
        differentiable = torch.is_grad_enabled()  # create_graph=True
        if differentiable:
            with torch.no_grad():
                dq, dk, dv, input_grads = ctx.backward_fn(call, o, lse, do, dlse)
        else:  # the usual backward: autograd runs it with gradients off already
            dq, dk, dv, input_grads = ctx.backward_fn(call, o, lse, do, dlse)
        grads = [dq, dk, dv] + [input_grads.get(name) for name in names] if names else [dq, dk, dv]
        if differentiable:  # the gradients must not be differentiated
            grads = no_double_backward(call.spec.name, grads, (q, k, v, do))
        need = ctx.needs_input_grad
        if all(need[1:]):
            return (None, *grads)
        return (None,) + tuple(g if want else None for g, want in zip(grads, need[1:]))


def no_double_backward(name: str, grads, anchors):
    """``grads`` (None entries kept) passed through :class:`_NoDoubleBackward`."""
    present = [g for g in grads if g is not None]
    out = iter(_NoDoubleBackward.apply(name, len(present), *present, *anchors))
    return [None if g is None else next(out) for g in grads]


class _NoDoubleBackward(torch.autograd.Function):
    """Passes the gradients through; differentiating them raises a clear error."""

    @staticmethod
    def forward(ctx, name, count, *grads_and_anchors):
        ctx.name = name
        return tuple(g.view_as(g) for g in grads_and_anchors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"attncc: double backward (gradients of the gradients) of {ctx.name} attention is "
                           f"not implemented")


# The launchers of a call without a single pair (Nq or Nk = 0), which stand in for a generated
# module's (eager calls and the custom ops alike): o = 0, lse = -inf, zero gradients.

def no_pairs(call: Call):
    rows = tuple(call.q.shape[:-1])  # [B, Hq, Nq], or [1, Hq, total_q] for a packed (varlen) call
    o = torch.zeros(*rows, call.Dv, dtype=call.q.dtype, device=call.q.device)
    lse = torch.full(rows, -math.inf, dtype=torch.float32, device=call.q.device)
    return o, lse


def no_pairs_backward(call: Call, o, lse, do, dlse=None):
    input_grads = {name: torch.zeros_like(call.inputs[name]) for name in call.grad_input_names}
    return torch.zeros_like(call.q), torch.zeros_like(call.k), torch.zeros_like(call.v), input_grads
