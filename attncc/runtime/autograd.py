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
import warnings
from typing import Optional
from weakref import ref as _weakref

import torch

from attncc.runtime.call import Call, backward_cotangents


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
        # Everything the backward reads is checked against changes in place since the forward, not
        # only q, k, v: a kv_len[0] = 3, an optimizer step on a learned table or a changed cu_seqlens
        # would give gradients of values the forward never saw. The inputs declared grad = true are
        # arguments of this function and saved (saved-tensor hooks see them); the others and the
        # cu_seqlens have their version counters kept (a few attribute reads per call; issue 18).
        # Inference tensors (torch.inference_mode) have no version counter and cannot change
        # outside inference mode: nothing to keep.
        # ctx keeps the call without q, k, v: they reach the backward through save_for_backward only, so
        # that saved-tensor hooks manage them (non-reentrant checkpointing drops them until it recomputes
        # them, offloading moves them); a reference here kept them alive from the forward to the backward.
        # Weak references stay: where the backward gets the very tensors back (no saved-tensor hooks) the
        # call's signature memo serves them; hooks that give others back have it worked out anew (their
        # layouts read here on every call were ~50 attribute reads per forward + backward, issue 18).
        ctx.call = call.replace(q=None, k=None, v=None)
        ctx.operands = (_weakref(call.q), _weakref(call.k), _weakref(call.v))
        ctx.watched = (watch((call.cu_seqlens_q, call.cu_seqlens_k, *call.inputs.values()))
                       if call.inputs or call.varlen else None)
        # The LSE in log2 units less the score's row terms, where the forward kept it (keep_raw_lse):
        # saved with the LSE, so that a backward that gets other tensors than the forward's (saved-tensor
        # hooks that copy, torch.utils.checkpoint's recomputation) gets the raw LSE that goes with them.
        raw = raw_lse(call, lse)
        ctx.has_raw = raw is not None
        ctx.save_for_backward(q, k, v, o, lse, *grad_inputs, *((raw,) if raw is not None else ()))
        # The gradient of an unused LSE stays None: materialized, autograd would fill a zero
        # tensor of its shape per backward (an allocation and a memset kernel for nothing).
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        call = ctx.call
        do, dlse = backward_cotangents(f"{call.spec.name}.attention's backward", do, dlse)
        q, k, v, o, lse, *saved = ctx.saved_tensors
        if ctx.has_raw:  # the raw LSE of this very LSE (see forward)
            raw = saved.pop()
            call.for_backward["raw_lse"] = _sealed(lse, raw)
        names = call.grad_input_names
        if do is None and dlse is None:
            return (None,) * (4 + len(names))
        if do is None:  # only the LSE reaches the loss
            do = torch.zeros_like(o)
        # q, k, v and the grad inputs are checked by autograd (saved); the rest here
        if ctx.watched is not None:
            check_watched(ctx.watched, lambda: (f"{call.spec.name}.attention", (
                ("cu_seqlens_q", call.cu_seqlens_q), ("cu_seqlens_k", call.cu_seqlens_k), *call.inputs.items())))
        if saved:  # the inputs declared grad = true (as passed: Call.grad_sources): the call's own, unless
            # saved-tensor hooks gave others, which the kernels read converted to the declared type as bind does
            if any(s is not t for s, t in zip(saved, call.grad_sources())):
                given = {n: s for n, s in zip(names, saved) if n in call.given_inputs}
                read = {n: s.resolve_neg().to(call.inputs[n].dtype) if n in given else s for n, s in zip(names, saved)}
                call = _with_saved(call, inputs={**call.inputs, **read}, given_inputs={**call.given_inputs, **given})
        # q, k, v: the saved ones (see forward), with the signature memo where they are the forward's own
        rq, rk, rv = ctx.operands
        if q is rq() and k is rk() and v is rv():
            call = call.replace(q=q, k=k, v=v)
        else:
            call = call.replace(memo=None, q=q, k=k, v=v)
        call.check_device(f"{call.spec.name}.attention's backward")
        alert_input_grads(call)
        differentiable = torch.is_grad_enabled()  # create_graph=True
        if differentiable:
            with torch.no_grad():
                dq, dk, dv, input_grads = ctx.backward_fn(call, o, lse, do, dlse)
        else:  # the usual backward: autograd runs it with gradients off already
            dq, dk, dv, input_grads = ctx.backward_fn(call, o, lse, do, dlse)
        grads = [dq, dk, dv] + [input_grads.get(name) for name in names] if names else [dq, dk, dv]
        if differentiable:  # the gradients must not be differentiated
            grads = no_double_backward(call.spec.name, grads, (q, k, v, *saved, do, dlse))
        need = ctx.needs_input_grad
        if all(need[1:]):
            return (None, *grads)
        return (None,) + tuple(g if want else None for g, want in zip(grads, need[1:]))


def _with_saved(call: Call, **tensors) -> Call:
    """``call`` with the inputs that saved-tensor hooks gave back instead of its own (``inputs=``,
    ``given_inputs=``): the same values, maybe in another layout (a hook that offloads and restores
    transposed, say). What the call's signature fixed (``call.memo``: operand layouts, bound launches
    and their strides) holds only where each has the layout of the tensor it replaces; else it is
    worked out anew."""
    pairs = [(t, call.inputs[n]) for n, t in tensors["inputs"].items()]
    if all(_layout(new) == _layout(old) for new, old in pairs):
        return call.replace(**tensors)
    return call.replace(memo=None, **tensors)


def _layout(t: Optional[torch.Tensor]):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16)


# The raw LSE: the forward's LSE in log2 units less the score's row terms, handed to the backward of that LSE.

def keep_raw_lse(call: Call, lse: torch.Tensor) -> Optional[torch.Tensor]:
    """A buffer for the forward's LSE in log2 units (the key loop's ``m + log2(l)``) less its score's
    terms constant along j (the row terms), kept with ``lse`` in ``call.for_backward`` for the backward
    (:func:`raw_lse`); None when no backward follows. The LSE a call returns is in natural units and
    holds the row terms, in float32: taken back to log2 units it is an ulp off in 14 % of rows (a
    factor ``2**ulp`` on the recomputed weights: 2**8 at scores of 1e8), and a large row term
    (``0.1 * i`` at i = 2**29) rounds away what the backward's probabilities need; the raw LSE keeps
    both exact."""
    kept = call.for_backward
    if kept is None:
        return None
    raw = torch.full_like(lse, -math.inf) if call.varlen else torch.empty_like(lse)
    kept["raw_lse"] = (lse, raw)
    return raw


def seal_raw_lse(call: Call) -> None:
    """After the forward's launch: the version of the LSE it wrote, which :func:`raw_lse` checks."""
    kept = call.for_backward
    if kept is not None and "raw_lse" in kept:
        kept["raw_lse"] = _sealed(*kept["raw_lse"][:2])


def _sealed(lse: torch.Tensor, raw: torch.Tensor) -> tuple:
    """What ``call.for_backward["raw_lse"]`` holds once the LSE is written: (lse, raw, its version)."""
    return lse, raw, lse._version


def raw_lse(call: Call, lse: torch.Tensor) -> Optional[torch.Tensor]:
    """The raw LSE the forward of ``call`` kept (:func:`keep_raw_lse`) where ``lse`` is the LSE that
    forward returned, unchanged since; else None (a merged LSE, the Gluon forward's, a part call's,
    a traced backward): the backward then takes the row terms out of ``lse`` itself."""
    kept = (call.for_backward or {}).get("raw_lse")
    if kept is None or len(kept) != 3:
        return None
    mine, raw, version = kept
    if (lse.data_ptr() != mine.data_ptr() or lse.shape != mine.shape or lse.stride() != mine.stride()
            or lse.dtype != mine.dtype or mine._version != version):
        return None
    return raw


def alert_not_deterministic(what: str, why: str) -> None:
    """What torch's own ops do under ``torch.use_deterministic_algorithms(True)`` when they have no
    deterministic implementation: a RuntimeError, or with ``warn_only=True`` a warning. Call it only
    where deterministic algorithms are on."""
    message = (f"{what} does not have a deterministic implementation ({why}), but you set "
               f"'torch.use_deterministic_algorithms(True)'")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(message + ". Turn it off for this call, or pass warn_only=True to accept it")


def alert_input_grads(call: Call) -> None:
    """:func:`alert_not_deterministic` for a backward that computes the gradients of the call's [inputs]
    declared grad = true (``call.input_grads``), where deterministic algorithms are on: the dQ kernel
    sums them over its programs with atomic adds. Eager calls (:class:`AttentionFunction`) and the custom
    op torch.compile traces (attncc.runtime.compiled) both ask; the op did not, so a compiled training
    step with a learned table ran nondeterministically under ``torch.use_deterministic_algorithms(True)``
    without a word."""
    if call.input_grads and call.grad_input_names and torch.are_deterministic_algorithms_enabled():
        alert_not_deterministic(f"{call.spec.name}.attention's backward",
                                f"the gradients of its [inputs] ({', '.join(call.grad_input_names)}) are summed "
                                f"over the kernel's programs with float32 atomic adds, whose order varies from run "
                                f"to run")


def watch(tensors):
    """``(tensors, versions)``: the tensors among ``tensors`` (None and non-tensors skipped) with their
    version counters now (AttentionFunction.forward says why), inference tensors left out (they
    have none, and cannot change outside inference mode)."""
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    try:
        return tensors, [t._version for t in tensors]
    except RuntimeError:  # an inference tensor
        tensors = [t for t in tensors if not t.is_inference()]
        return tensors, [t._version for t in tensors]


def check_watched(watched, describe) -> None:
    """A RuntimeError in autograd's words when a tensor of ``watched`` (:func:`watch`) changed in
    place since; ``describe() -> (who, named)``, called only then (the check runs every backward):
    the function's name and ``(name, tensor)`` pairs that name the tensors in the message."""
    for t, version in zip(*watched):
        if t._version != version:
            who, named = describe()
            names = {id(v): n for n, v in named}
            raise RuntimeError(f"{who}: {names.get(id(t), 'a tensor')}, which the backward reads, has been modified by "
                               f"an inplace operation since the forward (its version is {t._version}, the forward "
                               f"saw {version}): pass a copy, or change it after the backward")


def no_double_backward(name: str, grads, anchors):
    """``grads`` (None entries kept) passed through :class:`_NoDoubleBackward`. ``anchors``: every tensor
    the gradients are a function of (None entries skipped), which is every differentiable input of the
    function (q, k, v, the learned [inputs], an initial state) and every gradient its backward got (dO,
    dLSE, a state's): a second-order path through any of them must meet the error. Anchored on q, k, v
    and dO only, a gradient penalty on a learned table's gradient (q, k, v frozen, ``o.sum()`` a loss
    whose dO needs no gradient) or a second derivative in the LSE's weights (``(lse * w).sum()``) came
    back as a constant: its second-order term was left out without a word."""
    present = [g for g in grads if g is not None]
    anchors = [a for a in anchors if a is not None]
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
    input_grads = {name: torch.zeros_like(t) for name, t in zip(call.grad_input_names, call.grad_sources())}
    return torch.zeros_like(call.q), torch.zeros_like(call.k), torch.zeros_like(call.v), input_grads
