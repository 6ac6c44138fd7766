"""The autograd wiring of generated softmax attention.

:class:`AttentionFunction` runs a generated module's forward with the LSE written (a
backward follows) and keeps q, k, v, o and the LSE; its backward calls the module's
backward launcher, which recomputes P from the LSE. Gradients of gradients are not
implemented: asking for them raises (see :class:`_NoDoubleBackward`).
"""
from __future__ import annotations

import dataclasses

import torch

from attncc.runtime.call import Call


def check_grad_inputs(call: Call) -> None:
    """``[inputs]`` declared ``grad = true`` get no gradient yet: refuse a tensor that wants one
    rather than silently leaving its ``.grad`` empty."""
    for d in call.spec.inputs:
        t = call.inputs.get(d.name)
        if d.grad and isinstance(t, torch.Tensor) and t.requires_grad:
            raise NotImplementedError(
                f"attncc: {call.spec.name}: the gradient of input {d.name!r} (declared grad = true) is not "
                f"implemented yet; pass {d.name} without requires_grad (e.g. {d.name}.detach()) to train q, k, v only")


class AttentionFunction(torch.autograd.Function):
    """o, lse = attention(q, k, v) with dq, dk, dv from the generated backward kernels.

    ``forward(call) -> (o, lse)`` and ``backward(call, o, lse, do) -> (dq, dk, dv)`` are the
    generated module's launchers; ``call`` the validated call (its q, k, v are the inputs).
    The LSE is an output without gradient (``mark_non_differentiable``).
    """

    @staticmethod
    def forward(ctx, forward, backward, call: Call, q, k, v):
        # The forward writes the LSE and keeps for the backward what both can share.
        call = dataclasses.replace(call, return_lse=True, for_backward={})
        o, lse = forward(call)
        ctx.call = call
        ctx.backward_fn = backward
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        if do is None:
            return None, None, None, None, None, None
        call = dataclasses.replace(ctx.call, q=q, k=k, v=v)
        with torch.no_grad():
            dq, dk, dv = ctx.backward_fn(call, o, lse, do)
        if torch.is_grad_enabled():  # create_graph=True: the gradients must not be differentiated
            dq, dk, dv = _NoDoubleBackward.apply(call.spec.name, dq, dk, dv, q, k, v, do)
        need = ctx.needs_input_grad
        return (None, None, None, dq if need[3] else None, dk if need[4] else None, dv if need[5] else None)


class _NoDoubleBackward(torch.autograd.Function):
    """Passes dq, dk, dv through; differentiating them raises a clear error."""

    @staticmethod
    def forward(ctx, name, dq, dk, dv, *anchors):
        ctx.name = name
        return dq.view_as(dq), dk.view_as(dk), dv.view_as(dv)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"attncc: double backward (gradients of the gradients) of {ctx.name} attention is "
                           f"not implemented")
