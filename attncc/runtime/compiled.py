"""Generated softmax attention as torch custom ops, so that ``torch.compile`` traces through it.

``attncc::attention_forward`` and ``attncc::attention_backward`` (``torch.library.custom_op``,
torch >= 2.4) take the tensors of a call and its scalars; the generated module's launchers run
inside them, looked up by the spec's name and hash (:func:`register_kernels`, called when a
generated module is imported). ``register_fake`` gives the shapes to the compiler and
``register_autograd`` connects the two ops. Params, scale and dropout probability go as the
schema's numbers, so a value that the compiler made symbolic is carried as one. What the ops'
signature cannot carry (a module that registered nothing) goes the eager way instead: a graph
break (see :func:`attncc.runtime.launch.run_attention`).
"""
from __future__ import annotations

import ast
import functools
from typing import Callable, Dict, List, Optional, Tuple

import torch

from attncc.runtime.autograd import alert_input_grads, no_double_backward, no_pairs, no_pairs_backward
from attncc.runtime.call import MAX_SIGNATURES, Call, check_cu_seqlens, input_as_read, resolved, tensor_key
from attncc.runtime.spec_info import SpecInfo

# spec key -> (SpecInfo, forward launcher, backward launcher)
_KERNELS: Dict[str, Tuple[SpecInfo, Callable, Optional[Callable]]] = {}


def _key(spec: SpecInfo) -> str:
    return f"{spec.name}:{spec.spec_hash}"


def register_kernels(spec: SpecInfo, forward: Callable, backward: Optional[Callable]) -> None:
    """Make a generated module's launchers reachable from the custom ops."""
    _KERNELS[_key(spec)] = (spec, forward, backward)


def launchers(spec: SpecInfo) -> Tuple[Callable, Optional[Callable]]:
    """``(forward, backward)`` that the generated module of ``spec`` registered (see the module's
    ``_forward`` / ``_backward``): ``forward(call) -> (o, lse)``, ``backward(call, o, lse, do) ->
    (dq, dk, dv, input_grads)``, ``call`` from ``attncc.runtime.bind``. attncc.distributed runs
    them per (query chunk, key chunk) with the global LSE and output of the chunk's rows."""
    if _key(spec) not in _KERNELS:
        raise ValueError(f"attncc: no kernels registered for {spec.name} (spec hash {spec.spec_hash}); "
                         f"import its generated module first")
    return _KERNELS[_key(spec)][1:]


_MEMOS: Dict[tuple, dict] = {}


@functools.lru_cache(maxsize=256)
def _options(options: str):
    """The params' (name, is an int) of an op's ``options`` string (parsed once per string)."""
    return ast.literal_eval(options)


def eager_when_traced(fn: Callable) -> Callable:
    """``fn``, a generated entry point that no custom op carries (``decode``, linear attention's
    ``attention`` and ``step``), as torch.compile may call it: traced, it runs outside the graph,
    eagerly (a graph break; under ``fullgraph=True`` dynamo's error names the function). Traced
    into, its host code and Triton launches failed whatever the mode (a guard on kv_len's values,
    dynamo inside Triton's launcher). Eager calls call ``fn`` itself."""
    hidden = torch._disable_dynamo(fn)  # (imports torch._dynamo on its first call, not here)

    @functools.wraps(fn)
    def entry(*args, **kwargs):
        if torch.compiler.is_compiling():
            return hidden(*args, **kwargs)
        return fn(*args, **kwargs)
    return entry


def _plain(x) -> bool:
    return type(x) in (int, float)


def compilable(call: Call) -> bool:
    """Whether the custom ops can carry this call: its spec registered, params and scalars plain numbers."""
    return (_key(call.spec) in _KERNELS and _KERNELS[_key(call.spec)][2] is not None
            and all(_plain(x) for x in (call.scale, call.dropout_p, *call.params.values())))


def attention(call: Call):
    """(o, lse) of ``call`` through the custom op (autograd included)."""
    # The numbers go as the schema's ints and floats, never in a string: the compiler makes a number
    # that changes between calls symbolic (automatic dynamic), and a symbolic number has no repr.
    # ``options`` (a string) holds what every call of a graph shares: the params' names and kinds.
    # (Tracing sees a symbolic int as an int: ``type`` tells ints from floats, not what is symbolic.)
    ints = [value for value in call.params.values() if type(value) is int]
    floats = [call.scale, call.dropout_p] + [value for value in call.params.values() if type(value) is not int]
    options = repr(tuple((name, type(value) is int) for name, value in call.params.items()))
    # the float inputs as the caller passed them (Call.grad_sources): the op converts them as bind did
    inputs = [call.passed_input(d.name) for d in call.spec.inputs]
    return attention_forward(call.q, call.k, call.v, inputs, call.cu_seqlens_q, call.cu_seqlens_k, _key(call.spec),
                             options, ints, floats, call.B, call.Nq, call.Nk, call.q_offset, call.k_offset, call.n_q,
                             call.n_k, call.seed)


def _call(q, k, v, inputs, cu_q, cu_k, key, options, ints, floats, B, Nq, Nk, q_offset, k_offset, n_q, n_k, seed,
          input_grads=False) -> Tuple[Call, Callable, Callable]:
    spec, forward, backward = _KERNELS[key]
    scale, dropout_p, *float_params = floats
    int_values, float_values = iter(ints), iter(float_params)
    params = {name: next(int_values) if is_int else next(float_values) for name, is_int in _options(options)}
    # what the runtime derives per signature (configs, WIDE, operand layouts) is kept across the
    # op's calls as bind() keeps it for eager calls (Call.memo)
    signature = (key, options, tuple(ints), tuple(floats), B, Nq, Nk, q_offset, k_offset, n_q, n_k, cu_q is not None,
                 *(tensor_key(t) for t in (q, k, v, *inputs)))
    memo = _MEMOS.get(signature)
    if memo is None:
        if len(_MEMOS) >= MAX_SIGNATURES:
            _MEMOS.clear()
        memo = _MEMOS[signature] = {}
    # a float input of another type than declared comes as passed (attention() above): read at the
    # declared type, as bind reads it, its gradient in the passed type (Call.given_inputs)
    read = {d.name: input_as_read(spec.name, d.name, d.dtype, t) for d, t in zip(spec.inputs, inputs)}
    given = {d.name: t for d, t in zip(spec.inputs, inputs) if read[d.name] is not t and t.is_floating_point()}
    call = Call(spec, q, k, v, B, q.shape[1], k.shape[1], Nq, Nk, q.shape[3], v.shape[3], q_offset, k_offset, n_q,
                n_k, scale, True, params, read, given_inputs=given,
                cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, input_grads=input_grads, dropout_p=dropout_p, seed=seed,
                memo=memo)
    if Nq == 0 or Nk == 0:
        forward, backward = no_pairs, no_pairs_backward
    return call, forward, backward


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with contiguous strides: what the ops' fakes promise for every output. (A compiler lays
    out the graph around the fake's strides; ``.contiguous()`` alone keeps any strides of an empty
    tensor, which counts as contiguous.)"""
    return t.contiguous() if t.numel() else t.new_empty(t.shape)


@torch.library.custom_op("attncc::attention_forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: List[torch.Tensor],
                      cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor], key: str,
                      options: str, ints: List[int], floats: List[float], B: int, Nq: int, Nk: int, q_offset: int,
                      k_offset: int, n_q: int, n_k: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    q, k, v = resolved(q, k, v)  # (bind's, which the trace skipped)
    call, forward, _ = _call(q, k, v, inputs, cu_seqlens_q, cu_seqlens_k, key, options, ints, floats, B, Nq, Nk,
                             q_offset, k_offset, n_q, n_k, seed)
    if cu_seqlens_q is not None and cu_seqlens_q.device.type == "cpu":
        # the check bind makes of CPU cu_seqlens in eager calls, which a trace cannot (their values
        # are data): the kernels would read and write past the packed rows, or leave the rows of a
        # sequence longer than max_seqlen at 0
        check_cu_seqlens(f"{call.spec.name}.attention", cu_seqlens_q, cu_seqlens_k, q.shape[2], k.shape[2], Nq, Nk)
    o, lse = forward(call)
    return _dense(o), _dense(lse)


@attention_forward.register_fake
def _(q, k, v, inputs, cu_seqlens_q, cu_seqlens_k, key, options, ints, floats, B, Nq, Nk, q_offset, k_offset, n_q, n_k,
      seed):
    rows = q.shape[:-1]
    return q.new_empty(*rows, v.shape[-1]), q.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("attncc::attention_backward", mutates_args=())
def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: List[torch.Tensor],
                       cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor], o: torch.Tensor,
                       lse: torch.Tensor, do: torch.Tensor, dlse: Optional[torch.Tensor], key: str, options: str,
                       ints: List[int], floats: List[float], B: int, Nq: int, Nk: int, q_offset: int, k_offset: int, n_q: int, n_k: int, seed: int,
                       input_grads: bool) -> List[torch.Tensor]:
    """[dq, dk, dv, then the gradient of each input declared grad = true (zeros unless input_grads)];
    ``dlse``: the LSE's gradient, None when the loss does not use the LSE."""
    q, k, v, do, dlse = resolved(q, k, v, do, dlse)
    call, _, backward = _call(q, k, v, inputs, cu_seqlens_q, cu_seqlens_k, key, options, ints, floats, B, Nq, Nk,
                              q_offset, k_offset, n_q, n_k, seed, input_grads)
    call.check_device(f"{call.spec.name}.attention's backward")  # (at run time, as alert_input_grads)
    alert_input_grads(call)  # (at run time: the op's body runs when the compiled backward does)
    dq, dk, dv, grads = backward(call, o, lse, do, dlse)
    return [_dense(dq), _dense(dk), _dense(dv)] + [
        _dense(grads[name]) if name in grads else t.new_zeros(t.shape)
        for name, t in zip(call.grad_input_names, call.grad_sources())]


@attention_backward.register_fake
def _(q, k, v, inputs, cu_seqlens_q, cu_seqlens_k, o, lse, do, dlse, key, options, ints, floats, B, Nq, Nk, q_offset,
      k_offset, n_q, n_k, seed, input_grads):
    spec = _KERNELS[key][0]
    # contiguous, as the op returns them (_dense): empty_like would keep the strides of a transposed
    # q (BNHD views, a packed qkv) or table, and a compiler that trusts the fake (inductor) failed
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)] + [
        t.new_empty(t.shape) for d, t in zip(spec.inputs, inputs) if d.grad]


def _no_grads(ints) -> tuple:
    """The gradients of attention_forward's arguments after q, k, v, inputs, none differentiable:
    cu_seqlens_q, cu_seqlens_k, key, options, ints, floats, B, Nq, Nk, q_offset, k_offset, n_q, n_k,
    seed. (torch.library's autograd takes a list of numbers as one argument, gradient None, but an
    empty list as a list of tensors, gradient []; ``floats`` always holds the scale.)"""
    return (None,) * 4 + (None if ints else [], None) + (None,) * 8


def _setup_context(ctx, inputs, output):
    q, k, v, ins, cu_q, cu_k, key, options, *scalars = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k, *output, *ins)
    ctx.meta = (key, options, len(ins), scalars)
    ctx.set_materialize_grads(False)  # dlse=None when the loss does not use the LSE: no cost


def _backward(ctx, do, dlse):
    key, options, n_inputs, scalars = ctx.meta
    q, k, v, cu_q, cu_k, o, lse, *ins = ctx.saved_tensors
    spec = _KERNELS[key][0]
    need = ctx.needs_input_grad
    if do is None and dlse is None:
        return (None, None, None, [None] * n_inputs) + _no_grads(scalars[0])
    if do is None:
        do = torch.zeros_like(o)
    grads = attention_backward(q, k, v, ins, cu_q, cu_k, o, lse, do, dlse, key, options, *scalars, bool(need[3]))
    if torch.is_grad_enabled():  # create_graph=True: the gradients must not be differentiated
        grads = no_double_backward(spec.name, grads, (q, k, v, *ins, do, dlse))
    dq, dk, dv, *learned = grads
    learned = iter(learned)
    d_inputs = [next(learned) if d.grad else None for d in spec.inputs]
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            d_inputs if need[3] else [None] * n_inputs) + _no_grads(scalars[0])


attention_forward.register_autograd(_backward, setup_context=_setup_context)
