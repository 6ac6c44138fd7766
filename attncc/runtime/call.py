"""Validate a call of a generated ``attention`` before anything is launched.

Every message says what was expected and what came, so that a wrong shape, dtype,
device, head count or keyword never turns into a wrong answer or a launch error.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad

from attncc.core.semantics import (FLOAT32_MAX, FLOAT32_TINY, INT_LIMIT, MAX_HEAD_DIM, dropout_probability,
                                   foreign_keyword_hints, input_dtype_accepted, input_dtype_hint, int_argument,
                                   param_value, plain_number, positions_to_cover)
from attncc.runtime.intervals import INT32_MAX, POSITION_PAD, CallNumbers, cached_reach
from attncc.runtime.spec_info import SpecInfo

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "float64": torch.float64, "int32": torch.int32, "int64": torch.int64, "int16": torch.int16,
           "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass
class Call:
    """A validated call: sizes, positions and the resolved params and inputs."""

    spec: SpecInfo
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    Dv: int
    q_offset: int
    k_offset: int
    n_q: int
    n_k: int
    scale: float
    return_lse: bool
    params: Dict[str, object] = field(default_factory=dict)
    inputs: Dict[str, torch.Tensor] = field(default_factory=dict)
    # The float inputs that bind converted to their declared type, as the caller passed them: the
    # kernels read ``inputs``, autograd differentiates these (see :meth:`grad_sources`), so that a
    # float32 table declared bfloat16 gets the kernels' float32 gradient, not one rounded to bfloat16.
    given_inputs: Dict[str, torch.Tensor] = field(default_factory=dict)
    # A dict when a backward pass will follow (the autograd path sets it): the forward keeps
    # there what the backward of the same call reuses (the transposed block lists). None otherwise.
    for_backward: Optional[dict] = field(default=None, repr=False, compare=False)
    # Packed variable-length batches (FlashAttention's varlen layout): q [1, Hq, total_q, D], k/v
    # [1, Hkv, total_k, D]; then B is the number of sequences S, Nq / Nk the longest lengths
    # (max_seqlen_q / max_seqlen_k), q_offset = k_offset = 0 and n_q / n_k placeholders (the kernels
    # read every sequence's own lengths from the cu_seqlens [S + 1], int32 or int64, contiguous).
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    # The backward computes the gradients of the inputs declared grad = true (autograd sets it).
    input_grads: bool = False
    # Attention dropout (specs with [score].dropout; see with_dropout): the probability (0: off)
    # and the seed of the counter-based RNG that the forward and backward kernels share.
    dropout_p: float = 0.0
    seed: int = 0
    # What the runtime derived from this call's signature (configs, the WIDE switch, operand
    # layouts): one dict shared by every call that bind() found in its signature cache, so that
    # it is computed once per signature (see :meth:`cached`). None: nothing shared (computed anew).
    memo: Optional[dict] = field(default=None, repr=False, compare=False)

    def cached(self, key, make):
        """``make()``, computed once per call signature (shapes, strides, dtypes, device, offsets,
        params, scale): everything in ``memo`` must depend on nothing else (not on tensor values,
        return_lse, dropout or the backward's bookkeeping, which calls of one signature may differ in)."""
        memo = self.memo
        if memo is None:
            return make()
        value = memo.get(key, _MISSING)
        if value is _MISSING:
            value = memo[key] = make()
        return value

    def replace(self, **changes) -> "Call":
        """A copy with ``changes`` (as ``dataclasses.replace``, without re-running ``__init__``:
        the hot path makes a few of these per call)."""
        new = object.__new__(Call)
        new.__dict__ = {**self.__dict__, **changes}
        return new

    @property
    def group(self) -> int:
        return self.Hq // self.Hkv

    @property
    def grad_input_names(self) -> Tuple[str, ...]:
        """The [inputs] declared ``grad = true``, in spec order."""
        return self.cached("grad_input_names", lambda: tuple(d.name for d in self.spec.inputs if d.grad))

    def grad_sources(self) -> list:
        """The tensors that get the gradients of the inputs declared ``grad = true``, in spec order:
        each as the caller passed it (not its conversion to the declared type, whose backward would
        round the kernels' float32 gradient to that type)."""
        return [self.passed_input(name) for name in self.grad_input_names]

    def passed_input(self, name: str) -> torch.Tensor:
        """Input ``name`` as the caller passed it (``inputs`` holds what the kernels read)."""
        return self.given_inputs.get(name, self.inputs[name])

    def check_no_dropped_grads(self, what: str) -> None:
        """A ``ValueError`` for an input that requires grad but is declared without ``grad = true``:
        its gradient would be dropped without a word (FlexAttention users expect tensors a mod
        reads to get one). Called with grad mode on."""
        names = self.cached("plain_input_names", lambda: tuple(d.name for d in self.spec.inputs if not d.grad))
        for name in names:
            t = self.inputs.get(name)
            if t is not None and t.requires_grad:
                raise ValueError(f"{self.spec.name}.{what}: input {name} requires grad, but [inputs].{name} is "
                                 f"declared without grad = true, so it would get no gradient: declare it with "
                                 f"grad = true, or pass {name}.detach()")

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def total_q(self) -> int:
        return self.q.shape[2]

    @property
    def total_k(self) -> int:
        return self.k.shape[2]

    @property
    def positions(self) -> int:
        """The largest position of the call (and n_q, n_k): what its positions' arithmetic reaches."""
        return max(self.q_offset + self.Nq, self.k_offset + self.Nk, self.n_q, self.n_k)

    @property
    def cuda_index(self) -> int:
        """q's GPU index, -1 off CUDA, once per call signature (no tensor attribute read on a repeated
        signature: tests/test_host_ops.py pins those)."""
        return self.cached("cuda_index", self._cuda_index)

    def _cuda_index(self) -> int:
        return self.q.get_device() if self.q.is_cuda else -1

    def check_device(self, who: str) -> None:
        """:func:`refuse_device` of the call's device once more, for a backward: bind checked it for the
        forward, and TRITON_INTERPRET may have been turned off since. A CPU forward's backward then ran
        anyway, without the interpreter's bfloat16 conversions (its gradients 1e10 off, without a word)."""
        if not interpreting() and self.cuda_index < 0:
            refuse_device(who, self.q.device)

    @property
    def wide(self) -> bool:
        """The kernels' WIDE switch: int64 position arithmetic (see :func:`wide_positions`), once
        per call signature."""
        return self.cached("wide", self._wide)

    def _wide(self) -> bool:
        # the module's _int_reach at this call's numbers (its divisors were checked by bind)
        reach = int_reach(self.spec, positions=self.positions, batch=self.B, heads=self.Hq, params=self.params)
        return wide_positions(self.positions, self.params, self.inputs.values(), arithmetic=reach)


_MISSING = object()


# Index arithmetic of a kernel stays int32 up to this value: positions and tile bounds run up to
# a few blocks (<= 256 rows each) past the last position.
INT32_REACH = 2**31 - 1 - POSITION_PAD


def wide_positions(reach: int, params: Optional[dict] = None, inputs=(), arithmetic: Optional[int] = None) -> bool:
    """Whether a call needs the kernels' WIDE switch: positions, int params, the head count and
    the expressions of them computed in int64. True when positions up to ``reach`` can pass
    int32, when the kernels' integer arithmetic can (``arithmetic``: its largest magnitude, from
    the module's ``_int_reach``; without it, positions plus the largest int param stand in),
    or when an input holds more than 2**31 elements along its strides (its gathers then multiply
    positions by strides past 2**31). Ordinary calls keep int32 arithmetic, the faster one."""
    if arithmetic is None:
        arithmetic = reach + max((abs(v) for v in (params or {}).values()
                                  if isinstance(v, int) and not isinstance(v, bool)), default=0)
    if reach > INT32_REACH or arithmetic > INT32_MAX:
        return True
    return any(sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) >= 2**31 for t in inputs if t.numel())


def check_divisors(spec: SpecInfo, who: str, *, positions: int, batch: int, heads: int, n_q, n_k,
                   params: dict) -> None:
    """Check the spec's divisors of params and sizes at a call's numbers: a ValueError for one
    that is 0 (a kernel cannot raise). bind() does it once per call signature (params are keyed
    by value), before any launch."""
    if spec.int_divisors is not None:
        spec.int_divisors(CallNumbers(who, positions=positions, batch=batch, heads=heads, n_q=n_q, n_k=n_k,
                                      params=params))


def int_reach(spec: SpecInfo, *, positions: int, batch: int, heads: int, params: dict) -> Optional[int]:
    """The largest magnitude of the spec's integer arithmetic at a call's numbers (see
    :mod:`attncc.runtime.intervals`); None for a module that does not describe it."""
    if spec.int_reach is None:
        return None
    return cached_reach(spec.int_reach, positions=positions, batch=batch, heads=heads, params=params)


def dtype_name(t: torch.dtype) -> str:
    """A dtype's name as specs write it (``torch.bfloat16`` -> "bfloat16")."""
    return _NAMES.get(t, str(t).replace("torch.", ""))



def _int_arg(name: str, value, minimum: int = 0, maximum: int = INT_LIMIT - 1, who: str = "") -> int:
    """``value`` as an int in ``[minimum, maximum]``; errors name ``who`` (the function called) and ``name``
    (the check is :func:`attncc.core.semantics.int_argument`, which int params share)."""
    return int_argument(f"{who}: {name}" if who else name, value, minimum, maximum)


# bind()'s signature cache: per spec (by identity), (spec, {signature: the Call it bound, without
# its tensors}, the names of its [inputs]). BIND_STATS counts hits and misses (tests read it).
_BOUND: Dict[int, Tuple[SpecInfo, dict, frozenset]] = {}
BIND_STATS: Counter = Counter()
MAX_SIGNATURES = 1024  # per spec; past it the cache starts over (shapes that never repeat)


def bind(spec: SpecInfo, q, k, v, *, return_lse=False, q_offset=0, k_offset=0, n_q=None, n_k=None,
         scale=None, kwargs: Optional[dict] = None, cu_seqlens_q=None, cu_seqlens_k=None,
         max_seqlen_q=None, max_seqlen_k=None, fn: str = "attention") -> Call:
    """Check the arguments of ``attention(q, k, v, ...)`` against the spec; return the Call.

    With ``cu_seqlens_q`` / ``cu_seqlens_k`` q, k, v are packed sequences (see :class:`Call`).
    ``fn``: the function called, which the errors name (a linear module's ``step`` binds here too).

    The checks depend on the call's signature only (types, shapes, dtypes, devices and the
    scalars), so a signature seen before skips them: the cached Call gets this call's tensors
    (:func:`_signature` says what a signature holds; calls it cannot key, such as a tensor
    passed as ``q_offset``, are checked every time). Nothing here reads a tensor's values,
    except the cu_seqlens of a packed batch on the CPU or without ``max_seqlen_*`` (one host sync)."""
    refuse_transforms(f"{spec.name}.{fn}", q, k, v, kwargs=kwargs)
    q, k, v = autocast_operands(q, k, v)
    checked = dict(fn=fn, return_lse=return_lse, q_offset=q_offset, k_offset=k_offset, n_q=n_q, n_k=n_k, scale=scale,
                   kwargs=kwargs, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                   max_seqlen_k=max_seqlen_k)
    if torch.compiler.is_compiling():
        # Traced by torch.compile (symbolic shapes): checked, never cached, and no module state read
        # or written. dynamo guards on what a traced function reads: a counter bumped or a cache
        # looked up here became a guard that failed on the next call, so every call recompiled until
        # the recompile limit, where fullgraph=True raised (9th call of a training loop).
        return _bind_checked(spec, q, k, v, **checked)
    q, k, v = resolved_eager(q, k, v)
    slot = _BOUND.get(id(spec))
    if slot is None or slot[0] is not spec:
        slot = _BOUND[id(spec)] = (spec, {}, frozenset(d.name for d in spec.inputs))
    try:
        key = _signature(q, k, v, (return_lse, q_offset, k_offset, n_q, n_k, scale, max_seqlen_q, max_seqlen_k),
                         kwargs, cu_seqlens_q, cu_seqlens_k, slot[2])
    except RuntimeError:  # a tensor without strides (nested): the checks say what is wrong with it
        key = None
    if key is not None:
        bound = slot[1].get(key)
        if bound is not None:
            BIND_STATS["hit"] += 1
            return _rebind(bound, q, k, v, kwargs, cu_seqlens_q, cu_seqlens_k)
    BIND_STATS["miss"] += 1
    call = _bind_checked(spec, q, k, v, **checked)
    # (an input named "scale" that came as scale= is not in kwargs: such calls stay uncached)
    if key is not None and all(d.name in (kwargs or ()) for d in spec.inputs):
        if len(slot[1]) >= MAX_SIGNATURES:
            slot[1].clear()
        # the input conversions bind made (an int input widened, a float one to its declared type)
        converts = tuple((d.name, call.inputs[d.name].dtype if call.inputs[d.name] is not kwargs[d.name] else None)
                         for d in spec.inputs)
        # k, v of batch 1 that bind broadcast over q's batch: the next calls of the signature too
        call.memo = {"converts": converts, "signature": key, "kv_broadcast": call.k is not k}
        # kept without tensors: the cache must not hold a call's memory
        slot[1][key] = call.replace(q=None, k=None, v=None, inputs={}, given_inputs={}, cu_seqlens_q=None,
                                    cu_seqlens_k=None)
    return call


def resolved(*tensors):
    """``tensors`` with torch's lazy negation applied where one carries it (the negative bit of
    ``x.conj().imag`` or ``torch._neg_view``: the memory holds the values before the negation, which
    the kernels would read: o 5.4 off); ``resolve_neg`` is differentiable. None and non-tensors as they
    came (the checks name what is wrong with them). q, k, v and the caches go through it on every
    call (bind, bind_decode), the cotangents in the backwards. Traced by torch.compile (which cannot
    trace ``is_neg``) nothing here: the custom ops' bodies resolve their tensors when they run."""
    return tensors if torch.compiler.is_compiling() else resolved_eager(*tensors)


def resolved_eager(*tensors):
    """:func:`resolved` where nothing traces (bind after its check for a trace)."""
    if any(isinstance(t, _Tensor) and t.is_neg() for t in tensors):
        return tuple(t.resolve_neg() if isinstance(t, _Tensor) else t for t in tensors)
    return tensors


def autocast_operands(q, k, v):
    """``tensors`` (q, k, v) as ``torch.autocast`` runs attention: SDPA's policy (lower_precision_fp),
    where autocast is on for q's device type, float16 / bfloat16 / float32 tensors of that device
    in the autocast dtype (as differentiable casts: their gradients come back in the dtypes given),
    float64 and everything else as it came (bind's checks name what is wrong with it). Without it
    a float32 q beside a bfloat16 v (a Hugging Face model under autocast: RoPE's float32 cos and sin
    promote q and k, v comes from an autocast linear) was refused where SDPA runs, and float32
    inputs ran in float32 where SDPA runs in the autocast dtype. (Autocast off: one C call.)"""
    if not _any_autocast() or not isinstance(q, torch.Tensor):
        return q, k, v
    device_type = q.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_CAST and t.dtype != dtype
                 and t.device.type == device_type else t for t in (q, k, v))


_AUTOCAST_CAST = (torch.float16, torch.bfloat16, torch.float32)
_any_autocast = torch._C._is_any_autocast_enabled


def broadcast_kv_batch(q, k, v):
    """``k`` and ``v`` of batch 1 beside ``q`` of batch B > 1, expanded to batch B (stride 0, no
    copy), as FlexAttention broadcasts them; autograd sums their gradients over the batch. Any
    other combination is returned as it came (bind's checks name what is wrong with it). For
    dense 4-D tensors (bind checks that first)."""
    if k.shape[0] == v.shape[0] == 1 and q.shape[0] > 1:
        B = q.shape[0]
        return k.expand(B, *k.shape[1:]), v.expand(B, *v.shape[1:])
    return k, v


_SAME_DEVICE = contextlib.nullcontext()


def on_device(t):
    """A context that makes ``t``'s GPU the current CUDA device while a call launches its kernels,
    where ``t`` is on another GPU than the current one (a no-op otherwise, and for CPU tensors).
    Triton launches on the current device and its current stream: q on cuda:1 with cuda:0 current
    ran the kernels on GPU 0, reading GPU 1's memory through peer access, unordered with the work
    of cuda:1's stream that made q. (torch's own ops run on their tensors' device; autograd runs a
    backward on a thread of the gradients' device.)"""
    return _on_gpu(t.get_device() if getattr(t, "is_cuda", False) is True else -1)


def on_call_device(call: "Call"):
    """:func:`on_device` of the call's q, its GPU index kept with the call's signature (Call.cuda_index)."""
    return _on_gpu(call.cuda_index)


def refuse_device(who: str, device) -> None:
    """A ValueError unless the kernels run on ``device``: a CUDA GPU, or the CPU under TRITON_INTERPRET=1."""
    if not (device.type == "cuda" or (device.type == "cpu" and interpreting())):
        raise ValueError(f"{who}: tensors are on {device}; the kernels run on a CUDA GPU, or on the CPU under "
                         f"TRITON_INTERPRET=1")


def _on_gpu(index: int):
    """The switch to GPU ``index`` where it is not the current one (-1: not a GPU, no switch)."""
    if index >= 0 and index != torch.cuda.current_device():
        return torch.cuda.device(index)
    return _SAME_DEVICE


def on_q_device(fn):
    """``fn`` (a generated entry point whose first argument is q) run on q's GPU (:func:`on_device`)."""
    @functools.wraps(fn)
    def entry(q, *args, **kwargs):
        with on_device(q):
            return fn(q, *args, **kwargs)
    return entry


_functorch_level = torch._C._functorch.maybe_current_level


def refuse_transforms(name: str, *tensors, kwargs: Optional[dict] = None) -> None:
    """A call inside a torch.func transform (vmap, grad, jvp, jacrev, ...) gets a clear error: its
    tensors are wrappers without storage, which the kernels cannot read (torch's own message,
    "Cannot access data pointer", named neither the call nor the cause). So does a call with a
    forward-mode AD tangent on one of ``tensors`` or of ``kwargs``' values (:func:`refuse_tangents`). ~0.1 us."""
    if _functorch_level() is not None:
        raise NotImplementedError(f"{name}: torch.func transforms (vmap, grad, jvp, jacrev, ...) are not supported: the "
                                  f"kernels read plain tensors. Call it on the whole batch (q, k, v carry batch and "
                                  f"head dims) and take gradients with torch.autograd (loss.backward(), torch.autograd.grad)")
    if _forward_ad._current_level >= 0:  # inside torch.autograd.forward_ad.dual_level()
        refuse_tangents(name, (*tensors, *(kwargs or {}).values()))


_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def refuse_transformed_backward(name: str, *cotangents) -> None:
    """A backward run under vmap: ``torch.autograd.grad(..., is_grads_batched=True)`` runs it over the batch
    of cotangents with torch's legacy vmap, whose batched ``cotangents`` (None skipped) have no storage:
    the kernels failed with torch's "Cannot access data pointer of Tensor that doesn't have storage",
    which named neither the call nor the cause. So does one under a torch.func transform."""
    if _functorch_level() is not None or any(t is not None and _legacy_batched(t) for t in cotangents):
        raise NotImplementedError(f"{name}: a backward under a torch.func transform (torch.autograd.grad(..., "
                                  f"is_grads_batched=True) runs it under vmap) is not supported: the kernels read plain "
                                  f"tensors. Call torch.autograd.grad once per cotangent (retain_graph=True)")


def backward_cotangents(name: str, *cotangents):
    """The cotangents a backward's kernels read: :func:`refuse_transformed_backward`, then
    :func:`resolved` (a cotangent with torch's negative bit read as its values, not its memory)."""
    refuse_transformed_backward(name, *cotangents)
    return resolved(*cotangents)


def refuse_tangents(name: str, tensors) -> None:
    """Forward-mode AD (``torch.autograd.forward_ad.make_dual``): the kernels have no JVP. A dual tensor
    needs no gradient, so without this check the call ran on its primal values and returned outputs
    without a tangent (``unpack_dual(o).tangent`` None, read as zero) without a word; torch's own ops
    without a forward derivative raise. ``tensors``: the call's tensor arguments (others skipped)."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and _forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(f"{name}: forward-mode AD (a tangent from torch.autograd.forward_ad.make_dual) "
                                      f"is not supported: the kernels have no JVP. Take gradients with reverse mode "
                                      f"(loss.backward(), torch.autograd.grad), or compute the JVP with "
                                      f"attncc.reference")


def refuse_gradients(name: str, tensors, detach: str) -> None:
    """A function without a backward pass (``decode``, linear attention's ``step``) raises when one of
    ``tensors`` wants a gradient, rather than hand back outputs that silently carry none; ``detach``
    names what to detach (and where a backward is)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise NotImplementedError(f"{name} is for inference and has no backward pass; call it under "
                                  f"torch.no_grad() or detach {detach}")


def dense_tensor(who: str, arg: str, t) -> None:
    """``t`` (a torch.Tensor) must be a strided tensor with storage: not sparse, not nested."""
    if t.layout != torch.strided or t.is_nested:
        kind = "a nested tensor" if t.is_nested else f"layout {t.layout}"
        raise TypeError(f"{who}: {arg} must be a dense (strided) tensor, got {kind}")


def _rebind(bound: Call, q, k, v, kwargs, cu_q, cu_k) -> Call:
    """``bound`` (a Call of this signature) with this call's tensors."""
    call = object.__new__(Call)
    fields = bound.__dict__.copy()
    fields["q"], fields["k"], fields["v"] = q, k, v
    memo = bound.memo
    if memo["kv_broadcast"]:
        fields["k"], fields["v"] = broadcast_kv_batch(q, k, v)
    converts = memo["converts"]
    if converts:
        # as bind converted them (converted: an expanded table stays expanded, where .to copied the whole view)
        fields["inputs"] = {name: (kwargs[name] if dtype is None else converted(kwargs[name], dtype))
                            for name, dtype in converts}
        fields["given_inputs"] = {name: kwargs[name] for name, dtype in converts
                                  if dtype is not None and dtype.is_floating_point}
    if cu_q is not None:  # the kernels read cu_seqlens at unit stride (see _varlen)
        fields["cu_seqlens_q"], fields["cu_seqlens_k"] = cu_q.contiguous(), cu_k.contiguous()
    call.__dict__ = fields
    return call


_SCALARS = (int, float, bool, type(None))
_SCALAR_TYPES = frozenset(_SCALARS)
_Tensor = torch.Tensor


def tensor_key(t):
    """What a call's checks and configs depend on of a tensor (not its values)."""
    return t.shape, t.stride(), t.dtype, t.device


def _signature(q, k, v, scalars, kwargs, cu_q, cu_k, input_names=frozenset()):
    """What the checks of a call depend on, as a hashable key; None when a call must be checked
    every time: anything but tensors and plain numbers, tensors as scalars or params (their
    values count, and reading them would need a host sync), and packed batches whose cu_seqlens
    bind reads (on the CPU, or without max_seqlen). ``scalars``: (return_lse, q_offset, k_offset,
    n_q, n_k, scale, max_seqlen_q, max_seqlen_k), keyed with their types: 1, 1.0 and True are equal
    keys. Tensors are keyed by layout only for ``input_names``, the spec's [inputs], which the
    kernels read on the device. Runs on every call: one flat tuple, no per-tensor tuples."""
    if not (isinstance(q, _Tensor) and isinstance(k, _Tensor) and isinstance(v, _Tensor)):
        return None
    types = tuple(map(type, scalars))
    if not _SCALAR_TYPES.issuperset(types):
        return None
    device = q.device
    key = (q.shape, q.stride(), q.dtype, device, k.shape, k.stride(), k.dtype, k.device,
           v.shape, v.stride(), v.dtype, v.device, scalars, types,
           # bind refuses other devices than CUDA unless interpreting
           device.type == "cuda" or interpreting())
    if cu_q is not None or cu_k is not None:
        if not (isinstance(cu_q, _Tensor) and isinstance(cu_k, _Tensor)) or scalars[6] is None \
                or scalars[7] is None or cu_q.device.type == "cpu":
            return None
        key += (tensor_key(cu_q), tensor_key(cu_k))
    if kwargs:
        extra = []
        for name, value in kwargs.items():
            if isinstance(value, _Tensor):
                if name not in input_names or value.is_neg():  # (input_as_read resolves a negative bit)
                    return None
                extra.append((name, value.shape, value.stride(), value.dtype, value.device))
            elif type(value) in _SCALAR_TYPES:
                extra.append((name, type(value), value))
            else:
                return None
        key += tuple(extra)
    return key


def _bind_checked(spec: SpecInfo, q, k, v, *, return_lse=False, q_offset=0, k_offset=0, n_q=None, n_k=None,
                  scale=None, kwargs: Optional[dict] = None, cu_seqlens_q=None, cu_seqlens_k=None,
                  max_seqlen_q=None, max_seqlen_k=None, fn: str = "attention") -> Call:
    """:func:`bind` without its signature cache: every check, every time."""
    name, who = spec.name, f"{spec.name}.{fn}"
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        dense_tensor(who, arg, t)
        if t.dim() != 4:
            raise ValueError(f"{who}: {arg} must have 4 dims [B, H, N, D] (SDPA layout), got shape {tuple(t.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{who}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{who}: q, k, v must have one dtype, got {dtype_name(q.dtype)}, {dtype_name(k.dtype)}, {dtype_name(v.dtype)}")
    # `dtypes` in the spec says what to tune ahead of time; the kernels take all three.
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"{who}: q, k, v must be bfloat16, float16 or float32, got {dtype_name(q.dtype)}")
    refuse_device(who, q.device)
    given_k = k  # a packed call's error names the batch the caller passed, not the broadcast one
    k, v = broadcast_kv_batch(q, k, v)
    check_kv_shapes(spec, who, q, k, v)
    B, Hq, Nq, D = q.shape
    _, Hkv, Nk, _ = k.shape
    Dv = v.shape[3]
    if not isinstance(return_lse, bool):
        raise TypeError(f"{who}: return_lse must be a bool, got {return_lse!r}")

    q_offset = _int_arg("q_offset", q_offset, who=who)
    k_offset = _int_arg("k_offset", k_offset, who=who)
    cu_q = cu_k = None
    if cu_seqlens_q is not None or cu_seqlens_k is not None or max_seqlen_q is not None or max_seqlen_k is not None:
        if q_offset or k_offset or n_q is not None or n_k is not None:
            raise ValueError(f"{who}: q_offset, k_offset, n_q, n_k cannot be combined with cu_seqlens: "
                             f"every packed sequence starts at position 0 and has its own n_q, n_k")
        cu_q, cu_k, B, Nq, Nk, lengths_read = _varlen(name, q, given_k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                      max_seqlen_k)
    check_grid_extent(who, B, Hq, "sequences" if cu_q is not None else "batch rows")
    n_q = q_offset + Nq if n_q is None else _int_arg("n_q", n_q, who=who)
    n_k = k_offset + Nk if n_k is None else _int_arg("n_k", n_k, who=who)
    # n_q, n_k are the lengths of the sequences that the call's rows are part of
    for arg, n, offset, rows, which in (("n_q", n_q, q_offset, Nq, "query"), ("n_k", n_k, k_offset, Nk, "key")):
        if n < offset + rows:
            raise ValueError(f"{who}: {arg} = {n} is shorter than the call's {which} rows, which are "
                             f"positions {offset}..{offset + rows - 1} ({arg} must be >= {offset + rows})")
    check_position_limit(who, q_offset, Nq, k_offset, Nk)
    scale, kwargs = scale_keyword(spec, scale, kwargs)
    scale = softmax_scale(who, spec, scale, D)

    n_max = max(q_offset + Nq, k_offset + Nk)
    passed = dict(kwargs)
    params, inputs = bind_params_and_inputs(spec, who, kwargs, B=B, Hq=Hq,
                                            positions=n_max, device=q.device, ends=(q_offset + Nq, k_offset + Nk))
    if cu_q is None:
        check_divisors(spec, who, positions=max(n_max, n_q, n_k), batch=B, heads=Hq, n_q=n_q,
                       n_k=n_k, params=params)
    else:
        check_packed_divisors(spec, who, cu_q, cu_k, positions=n_max, batch=B, heads=Hq, max_q=Nq,
                              max_k=Nk, params=params, lengths_read=lengths_read)
    given = {name: passed[name] for name, t in inputs.items() if t is not passed[name] and t.is_floating_point()}
    return Call(spec, q, k, v, B, Hq, Hkv, Nq, Nk, D, Dv, q_offset, k_offset, n_q, n_k, float(scale),
                return_lse, params, inputs, given_inputs=given, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


# The kernels take the scale, and the scale times log2(e), as float32 numbers.
def softmax_scale(who: str, spec: SpecInfo, scale, D: int) -> float:
    """The softmax scale of a call: ``scale=`` when given, else the spec's, else 1/sqrt(D).
    A scale the kernels cannot use is refused (contract v1, "Non-finite values"): not a real
    number, NaN, infinite, zero or negative, or outside float32's normal range (it would become
    0 or inf in the kernels, and every output NaN)."""
    if scale is None:
        scale = spec.scale if spec.scale is not None else 1.0 / math.sqrt(D)
    else:
        given, scale = scale, plain_number(scale, f"{who}: scale")  # numpy's numbers, one-element tensors
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"{who}: scale must be a positive number, got {type(given).__name__} {given!r}")
    try:
        value = float(scale)
    except OverflowError:  # an int past float64's range
        value = math.inf
    if not 0 < value < math.inf:  # NaN too (comparisons only: torch.compile traces them on a symbolic float)
        raise ValueError(f"{who}: scale must be a finite positive number, got {scale!r}")
    if not (FLOAT32_TINY <= value and value * 1.4426950408889634 <= FLOAT32_MAX):
        raise ValueError(f"{who}: scale = {scale!r} is outside the float32 range the kernels compute in "
                         f"({FLOAT32_TINY:.4g} to {FLOAT32_MAX / 1.4426950408889634:.4g})")
    return value


def scale_keyword(spec: SpecInfo, scale, kwargs: Optional[dict]):
    """``(scale, kwargs)`` with ``kwargs`` copied: a param or input named ``scale`` takes the
    ``scale=`` keyword (as in ``attncc.reference``), and the softmax scale stays the spec's."""
    kwargs = dict(kwargs or {})
    if scale is not None and any(x.name == "scale" for x in (*spec.params, *spec.inputs)):
        kwargs["scale"], scale = scale, None
    return scale, kwargs


SEED_LIMIT = 2**63


def dropout_settings(spec: SpecInfo, who: str, *, dropout_p=None, seed=None, training=True):
    """(dropout probability, seed) of a call of a spec with dropout: ``dropout_p`` overrides the
    spec's ``[score].dropout``, ``training=False`` turns it off (as ``F.dropout``), and a missing
    seed is drawn from torch's default CPU generator (so ``torch.manual_seed`` fixes it)."""
    if not isinstance(training, bool):
        raise TypeError(f"{who}: training must be a bool, got {training!r}")
    if dropout_p is None:
        dropout_p = spec.dropout
    else:
        dropout_p = dropout_probability(f"{who}: dropout_p", dropout_p)
    dropout_p = float(dropout_p) if training else 0.0
    if seed is None and dropout_p > 0 and _capturing():
        raise ValueError(f"{who}: pass seed= under CUDA graph capture: a seed drawn now would be frozen into the "
                         f"graph, and every replay would drop the same pairs")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else 0
    else:
        seed = _int_arg("seed", seed, maximum=2**64, who=who)  # the limit below says why
        if seed >= SEED_LIMIT:
            raise ValueError(f"{who}: seed must be below 2**63, got {seed}")
    return dropout_p, seed


def dropout_mask_shape(spec: SpecInfo, q, k, v, *, q_offset, k_offset, seed):
    """(B, Hq, Nq, Nk, q_offset, k_offset) of ``dropout_keep_mask(q, k, v, ...)``, after the checks
    ``attention`` makes: the mask's shape and the offsets as ints (numpy's integers and one-element
    tensors, which attention takes, went to the kernel as they came: a tensor as a pointer)."""
    who = f"{spec.name}.dropout_keep_mask"
    if seed is None:
        raise ValueError(f"{who}: pass the seed that the attention call used")
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise TypeError(f"{who}: {arg} must be a 4-D torch.Tensor [B, H, N, D]")
    q_offset = _int_arg("q_offset", q_offset, who=who)
    k_offset = _int_arg("k_offset", k_offset, who=who)
    # the shapes attention takes (bind's checks): a mask of a call that attention refuses (k and v
    # of different lengths or batches) came back without a word
    check_kv_shapes(spec, who, q, *broadcast_kv_batch(q, k, v))
    check_position_limit(who, q_offset, q.shape[2], k_offset, k.shape[2])
    return q.shape[0], q.shape[1], q.shape[2], k.shape[2], q_offset, k_offset


def check_kv_shapes(spec: SpecInfo, who: str, q, k, v):
    """q [B, Hq, Nq, D], k and v [B, Hkv, Nk, ...] (after :func:`broadcast_kv_batch`), then the heads
    and head dims (:func:`check_heads_and_dims`)."""
    B, Hq, _, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    Bv, Hv, Nv, Dv = v.shape
    if not (B == Bk == Bv):
        raise ValueError(f"{who}: batch sizes differ: q {B}, k {Bk}, v {Bv} (k and v take q's batch "
                         f"size, or 1: broadcast over q's batch)")
    if Hkv != Hv:
        raise ValueError(f"{who}: k has {Hkv} heads but v has {Hv}")
    if Nk != Nv:
        raise ValueError(f"{who}: k has {Nk} positions but v has {Nv}")
    check_heads_and_dims(spec, who, Hq=Hq, Hkv=Hkv, D=D, Dk=Dk, Dv=Dv)


# CUDA caps grid axes 1 and 2 at 65535 blocks: the kernels' grids put the heads on axis 1 and the batch
# rows (a packed batch's sequences) on axis 2 (templates/walks.j2, dispatch), so B x H may pass it.
MAX_GRID_AXIS = 65535


def check_grid_extent(who: str, B: int, H: int, rows: str = "batch rows"):
    """B and H each within CUDA's grid axis limit (:data:`MAX_GRID_AXIS`): past it the launch failed with
    "Triton Error [CUDA]: invalid argument"."""
    for count, what in ((B, rows), (H, "heads")):
        if count > MAX_GRID_AXIS:
            raise ValueError(f"{who}: {count} {what}; the kernels take at most {MAX_GRID_AXIS} (CUDA's grid limit): "
                             f"split the call")


def check_position_limit(who: str, q_offset: int, Nq: int, k_offset: int, Nk: int):
    """Positions (offset + rows) below 2**62, the kernels' and the reference's int64 reach."""
    if max(q_offset + Nq, k_offset + Nk) >= INT_LIMIT:
        raise ValueError(f"{who}: positions must stay below 2**62, got q_offset + Nq = {q_offset + Nq}, "
                         f"k_offset + Nk = {k_offset + Nk}")


def check_heads_and_dims(spec: SpecInfo, who: str, *, Hq: int, Hkv: int, D: int, Dk: int, Dv: int,
                         k: str = "k", v: str = "v", kv: str = "k/v have"):
    """Head counts (GQA divisibility, the spec's fixed counts) and head dims of a call."""
    if Dk != D:
        raise ValueError(f"{who}: q and {k} head dims differ: {D} vs {Dk}")
    if Hq == 0 or Hkv == 0:
        # (0 is a multiple of any count, but a group of 0 query heads per kv head is nothing the
        # kernels can index: they divide by it, and linear attention's states would go unwritten)
        raise ValueError(f"{who}: q has {Hq} heads, {kv} {Hkv}: each needs at least one head")
    if Hq % Hkv:
        raise ValueError(f"{who}: q has {Hq} heads, {kv} {Hkv}: the query head count must be a multiple of the key/value head count")
    if spec.heads_q is not None and Hq != spec.heads_q:
        raise ValueError(f"{who}: the spec fixes [heads].q = {spec.heads_q}, q has {Hq} heads")
    if spec.heads_kv is not None and Hkv != spec.heads_kv:
        raise ValueError(f"{who}: the spec fixes [heads].kv = {spec.heads_kv}, {kv} {Hkv} heads")
    if not 1 <= D <= MAX_HEAD_DIM or not 1 <= Dv <= MAX_HEAD_DIM:
        raise ValueError(f"{who}: head dims D and Dv from 1 to {MAX_HEAD_DIM} are supported (as in a spec's head_dim "
                         f"and value_dim), got D = {D}, Dv = {Dv}")
    if spec.rope and ((spec.rotary_dim or D) > D or (spec.rotary_dim or D) % 2):
        # as attncc.reference: the rotated dims come in pairs, within the head
        what = f"the spec's [rope].rotary_dim = {spec.rotary_dim}" if spec.rotary_dim else "[rope] (rotating the whole head)"
        raise ValueError(f"{who}: {what} needs an even rotary dim of at most the head dim, got head dim D = {D}")
    if spec.value_dim is not None and Dv != spec.value_dim:
        raise ValueError(f"{who}: the spec fixes value_dim = {spec.value_dim}, {v} has {Dv}")


def bind_params_and_inputs(spec: SpecInfo, who: str, kwargs: dict, *, B: int, Hq: int, positions: int,
                           device, what_positions: str = "positions", ends: Optional[Tuple[int, int]] = None):
    """Resolve the spec's [params] (defaults, per-call overrides, types) and check its [inputs]
    (tensor, device, dims: "b" = B, "h" = Hq, "n" covering ``positions``, dtype). Consumes
    ``kwargs``; anything left over is an error. ``ends``: (the query positions' end, the keys'):
    an "n" dim read at the query (key) positions only need cover those (InputInfo.positions).

    Dtypes: an integer input narrower than declared is widened to the declared type; a wider
    one is kept as it is (the kernels read it at its own width, so no value is ever narrowed:
    doc ids 0 and 2**32 stay two documents). A float input is converted to the declared type
    (the kernels compute in float32 whatever it is). Strides are kept: the kernels take them."""
    # (the one check of a param's value, which `attncc explain --param` makes too)
    params = {p.name: p.default if p.hidden else param_value(p.name, p.kind, kwargs.pop(p.name, p.default),
                                                             count=p.maximum, who=who)
              for p in spec.params}
    inputs = {}
    for d in spec.inputs:
        if d.name not in kwargs:
            raise ValueError(f"{who}: missing input {d.name!r}: a tensor with dims ({', '.join(map(str, d.dims))}) of {d.dtype}")
        t = kwargs.pop(d.name)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{who}: input {d.name} must be a torch.Tensor, got {type(t).__name__}")
        dense_tensor(who, f"input {d.name}", t)
        if t.device != device:
            raise ValueError(f"{who}: input {d.name} is on {t.device}, q is on {device}")
        if t.dim() != len(d.dims):
            raise ValueError(f"{who}: input {d.name} must have {len(d.dims)} dims ({', '.join(map(str, d.dims))}), got shape {tuple(t.shape)}")
        for axis, (dim, size) in enumerate(zip(d.dims, t.shape)):
            want = {"b": B, "h": Hq}.get(dim, dim)
            if dim == "n":
                read_at = d.positions[axis] if ends is not None and d.positions else ""
                need = positions_to_cover(read_at, ends, positions)
                if size < need:
                    what = {"i": "the query positions", "j": "the key positions"}.get(read_at, what_positions)
                    raise ValueError(f"{who}: input {d.name} dim {axis} ('n') must cover {what} 0..{need - 1}, got size {size}")
            elif size != want:
                raise ValueError(f"{who}: input {d.name} dim {axis} ({dim!r}) must be {want}, got {size}")
        inputs[d.name] = input_as_read(who, d.name, d.dtype, t)
    if kwargs:
        known = [p.name for p in spec.params if not p.hidden] + [d.name for d in spec.inputs]
        raise TypeError(f"{who}: unexpected keyword(s) {', '.join(sorted(kwargs))}; "
                        f"known inputs and params: {', '.join(known) or 'none'}" + foreign_keyword_hints(kwargs))
    return params, inputs


def input_as_read(who: str, name: str, declared: str, t: torch.Tensor) -> torch.Tensor:
    """The values of input ``name`` (declared ``declared``, a dtype name) as the kernels read them:
    a float tensor converted to the declared float type, an integer one for a bool input as
    ``!= 0``, an integer one narrower than declared widened (a wider one kept: no value narrowed);
    a TypeError for a dtype the input does not accept. Whatever else classifies tiles or chunks
    from an input's values (attncc.distributed's chunk classes) reads them through this, so that
    it sees what the kernels compute with (float64 ids 1 and 1 + 1e-12 are one float32 value).

    A tensor with torch's negative bit (a lazily negated view: ``.imag`` of a conjugated complex tensor)
    is resolved first: the kernels read its memory, which holds the values before the negation (a
    table passed so gave another score, and its gradients the opposite sign, without a word)."""
    if not torch.compiler.is_compiling() and t.is_neg():  # (traced: the custom op's body reads it, eagerly)
        t = t.resolve_neg()
    want_dtype = _DTYPES[declared]
    if t.dtype == want_dtype:
        return t
    if not input_dtype_accepted(t.dtype, want_dtype):
        raise TypeError(f"{who}: input {name} must be {declared}, got {dtype_name(t.dtype)}{input_dtype_hint(t.dtype)}")
    if t.dtype.is_floating_point or want_dtype == torch.bool:
        return converted(t, want_dtype)  # floats to the declared type; ints to bool: != 0
    if not _holds(t.dtype, want_dtype) or t.dtype in _FEW_OPS:
        return converted(t, _holding(who, name, t.dtype, want_dtype))
    return t


def converted(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` with its expanded (stride-0) dims kept expanded: the kernels read those in place,
    and ``.to`` writes every entry of the view (a bfloat16 mask expanded over heads and positions, in a
    float32 input, became a dense float32 copy of the whole view)."""
    if all(st or n <= 1 for n, st in zip(t.shape, t.stride())):
        return t.to(dtype)
    distinct = t[tuple(slice(0, 1) if st == 0 else slice(None) for st in t.stride())]
    return distinct.to(dtype).expand(t.shape)


# torch's unsigned types past uint8 have few operations (no aminmax, which classifies tiles from an
# input's values: a uint16 table in a uint8 input raised NotImplementedError): read at a signed type
# that holds them (uint64 is refused by input_dtype_accepted)
_FEW_OPS = tuple(getattr(torch, n) for n in ("uint16", "uint32") if hasattr(torch, n))


def _holds(have: torch.dtype, want: torch.dtype) -> bool:
    """Does the integer type ``have`` hold every value of the integer type ``want``?"""
    a, b = torch.iinfo(have), torch.iinfo(want)
    return a.min <= b.min and a.max >= b.max


def _holding(who: str, name: str, given: torch.dtype, declared: torch.dtype) -> torch.dtype:
    """The integer type an input of type ``given`` is read at, for an input declared ``declared``
    that does not hold all its values: the declared type when it holds the given one's (a narrower
    tensor widened), else the narrowest signed type holding both (int8 ids in a uint8 input, uint32
    in an int32 one), so that no value changes: a plain ``.to(declared)`` would wrap -1 to 255."""
    for dtype in (declared, torch.int16, torch.int32, torch.int64):
        if _holds(dtype, given) and _holds(dtype, declared):
            return dtype
    raise TypeError(f"{who}: input {name} is {dtype_name(given)}, whose values no signed integer type holds "
                    f"(declared {dtype_name(declared)}): pass it as int64")


def _varlen(name, q, k, cu_q, cu_k, max_q, max_k):
    """Check packed-sequence arguments; return (cu_q, cu_k, S, max_seqlen_q, max_seqlen_k, read), ``read``:
    whether the host read the cu_seqlens' values (and may read them again at no extra sync).

    The contents of the cu_seqlens (from 0, non-decreasing, within the packed length, lengths at
    most max_seqlen) are checked when they are on the CPU, or when max_seqlen_* is omitted
    (that costs one host sync, which computes the max lengths as well)."""
    if cu_q is None or cu_k is None:
        given = "cu_seqlens_q" if cu_q is not None else "cu_seqlens_k" if cu_k is not None else "max_seqlen only"
        raise ValueError(f"{name}.attention: packed sequences need both cu_seqlens_q and cu_seqlens_k, got {given}")
    for arg, t in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}.attention: {arg} must be a torch.Tensor, got {type(t).__name__}")
        dense_tensor(f"{name}.attention", arg, t)
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name}.attention: {arg} must be int32 or int64, got {dtype_name(t.dtype)}")
        if t.device != q.device:
            raise ValueError(f"{name}.attention: {arg} is on {t.device}, q is on {q.device}")
        if t.dim() != 1 or t.numel() < 2:
            raise ValueError(f"{name}.attention: {arg} must have shape [S + 1] with S >= 1 sequences, got shape {tuple(t.shape)}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"{name}.attention: cu_seqlens_q has {cu_q.numel() - 1} sequences, cu_seqlens_k {cu_k.numel() - 1}")
    if q.shape[0] != 1 or k.shape[0] != 1:
        raise ValueError(f"{name}.attention: with cu_seqlens q, k, v are packed as [1, H, total, D]; got batch "
                         f"{q.shape[0]} (q) and {k.shape[0]} (k)")
    S = cu_q.numel() - 1
    # the kernels read cu_seqlens[b] at unit stride: a strided view is copied (S + 1 numbers, no sync)
    cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()
    max_q = None if max_q is None else _int_arg("max_seqlen_q", max_q, who=f"{name}.attention")
    max_k = None if max_k is None else _int_arg("max_seqlen_k", max_k, who=f"{name}.attention")
    if (max_q is None or max_k is None) and _capturing(q.device):
        raise ValueError(f"{name}.attention: pass max_seqlen_q and max_seqlen_k under CUDA graph capture: reading "
                         f"them from cu_seqlens takes a host sync, which a capture cannot hold")
    # (CPU tensors are checked always: here, or while torch.compile traces, where a read of their values
    # is a data-dependent guard it refuses under fullgraph, by the custom op as it runs; CUDA ones
    # with max_seqlen_* never)
    read = max_q is None or max_k is None or (q.device.type == "cpu" and not torch.compiler.is_compiling())
    if (max_q is None or max_k is None) and torch.compiler.is_compiling():
        # reading the max lengths from the values is a data-dependent guard: fullgraph=True failed with
        # dynamo's "Could not guard on data-dependent expression", which named neither the call nor
        # the way out; without fullgraph the call breaks the graph here, as it did at the read
        torch._dynamo.graph_break(msg=f"{name}.attention: pass max_seqlen_q and max_seqlen_k (ints) under "
                                      f"torch.compile: computing them from the cu_seqlens reads their values, "
                                      f"which a traced call does not have")
    if read:
        q_max, k_max = check_cu_seqlens(f"{name}.attention", cu_q, cu_k, q.shape[2], k.shape[2], max_q, max_k)
        max_q = q_max if max_q is None else max_q
        max_k = k_max if max_k is None else max_k
    # No sequence is longer than the packed rows: a larger bound (max_seqlen_q=2**31 as "no limit")
    # would only launch programs without rows, billions of them, and switch to int64 positions.
    return cu_q, cu_k, S, min(max_q, q.shape[2]), min(max_k, k.shape[2]), read


def check_packed_divisors(spec: SpecInfo, who: str, cu_q, cu_k, *, positions: int, batch: int, heads: int,
                          max_q: int, max_k: int, params: dict, lengths_read: bool) -> None:
    """The divisor check of a packed call: every sequence has its own n_q, n_k (its lengths), so a
    divisor made of them (``j % (n_k - 3)``) is checked at every length from 1 to max_seqlen, and
    where it may be 0 there, at each sequence's own lengths when ``lengths_read`` (the host read the
    cu_seqlens: CPU tensors, or max_seqlen omitted; else the range's error stands, as decode's for
    kv_len on the GPU). A sequence without query rows or without keys computes no pair and is not
    checked. (Checked at max_seqlen alone, a sequence of length 3 ran with a zero divisor.)"""
    try:
        check_divisors(spec, who, positions=positions, batch=batch, heads=heads, n_q=(1, max(max_q, 1)),
                       n_k=(1, max(max_k, 1)), params=params)
        return
    except ValueError as e:
        if not lengths_read:
            # 0 at the longest lengths too (a param of 0, say): that error; else the range's, with the way out
            check_divisors(spec, who, positions=positions, batch=batch, heads=heads, n_q=max(max_q, 1),
                           n_k=max(max_k, 1), params=params)
            raise ValueError(f"{e}; a packed call's sequences have their own n_q, n_k, whose values are not read on "
                             f"the host (cu_seqlens on {cu_q.device} with max_seqlen_q and max_seqlen_k given): omit "
                             f"max_seqlen_* to have each sequence's lengths checked (one host sync)") from None
    lens = torch.stack([cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]], 1).tolist()
    seen = set()
    for s, (nq, nk) in enumerate(lens):
        if nq and nk and (nq, nk) not in seen:
            seen.add((nq, nk))
            check_divisors(spec, f"{who} (packed sequence {s}: n_q = {nq}, n_k = {nk})", positions=positions,
                           batch=batch, heads=heads, n_q=nq, n_k=nk, params=params)


def check_cu_seqlens(who: str, cu_q, cu_k, total_q: int, total_k: int, max_q: Optional[int] = None,
                     max_k: Optional[int] = None) -> Tuple[int, int]:
    """The contents of a packed call's cu_seqlens (one host sync): from 0, non-decreasing, within
    the ``total_q`` / ``total_k`` packed rows, no sequence longer than ``max_q`` / ``max_k`` where
    given; returns the longest lengths. The kernels trust them: a sequence past the packed rows
    reads and writes past q, k, v and o, one longer than max_seqlen_q keeps its rows past it at
    o = 0, lse = -inf, one longer than max_seqlen_k its keys' gradients past it at 0 (the grids
    cover max_seqlen rows)."""
    cu = torch.stack([cu_q, cu_k])
    lens = cu[:, 1:] - cu[:, :-1]
    # [first, last, shortest, longest] of q and of k
    (q0, q_end, q_min, q_max), (k0, k_end, k_min, k_max) = torch.stack(
        [cu[:, 0], cu[:, -1], lens.min(1).values, lens.max(1).values], 1).tolist()
    for arg, first, end, shortest, total in (("cu_seqlens_q", q0, q_end, q_min, total_q),
                                             ("cu_seqlens_k", k0, k_end, k_min, total_k)):
        if first != 0:
            raise ValueError(f"{who}: {arg} must start at 0, got {first}")
        if shortest < 0:
            raise ValueError(f"{who}: {arg} must be non-decreasing (cumulative lengths)")
        if end > total:
            raise ValueError(f"{who}: {arg} ends at {end}, past the {total} packed rows")
    for arg, given, longest in (("max_seqlen_q", max_q, q_max), ("max_seqlen_k", max_k, k_max)):
        if given is not None and given < longest:
            raise ValueError(f"{who}: {arg} = {given} is less than the longest sequence ({longest})")
    return q_max, k_max


def _capturing(device=None) -> bool:
    """Whether the current CUDA stream is capturing a graph (False off CUDA)."""
    if device is not None and device.type != "cuda":
        return False
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def interpreting() -> bool:
    """Whether kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``), as Triton itself reads
    the variable (:data:`TRITON_ON`): ``TRITON_INTERPRET=false`` (or off, no, 2) took the interpreter's
    ways here (CPU tensors accepted, its small configs, no tuning) while Triton compiled for the GPU,
    which failed with "0 active drivers" on the CPU, and ran the interpreter's configs on a GPU."""
    if _ENV_DATA is None:  # pragma: no cover - not CPython's os.environ
        return (env("TRITON_INTERPRET") or "").lower() in TRITON_ON
    # read on every call, several times per call: the raw value, looked up as bytes
    raw = _ENV_DATA.get(_INTERPRET_KEY)
    if raw is None:
        return False
    on = _INTERPRET_VALUES.get(raw)
    if on is None:
        on = os.environ.decodevalue(raw).lower() in TRITON_ON
        if not torch.compiler.is_compiling():  # (as env(): no cache filled while traced)
            if len(_INTERPRET_VALUES) >= 16:
                _INTERPRET_VALUES.clear()
            _INTERPRET_VALUES[raw] = on
    return on


# The values of a boolean variable that Triton takes for on (triton.knobs' getenv_bool: lower-cased,
# not stripped; anything else, "false" or "2" included, is off)
TRITON_ON = frozenset(("1", "true", "yes", "on", "y"))
_INTERPRET_VALUES: Dict[object, bool] = {}  # raw TRITON_INTERPRET value -> interpreting


# os.environ.get costs about 1.4 us (it encodes the key and decodes the value); the runtime reads
# a few variables per call (TRITON_INTERPRET, ATTNCC_CONFIG*, ATTNCC_TUNE), so it looks them up in
# os.environ's own mapping, which os.environ[...] = ..., putenv through os.environ and
# monkeypatch.setenv all keep current, and decodes each raw value once.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEYS: Dict[str, object] = {}
_ENV_VALUES: Dict[object, str] = {}  # raw value -> decoded


def env(name: str, default: Optional[str] = None) -> Optional[str]:
    """``os.environ.get(name, default)``, faster."""
    if _ENV_DATA is None:  # pragma: no cover - not CPython's os.environ
        return os.environ.get(name, default)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = os.environ.encodekey(name)
        # (traced by torch.compile the caches are not filled: dynamo guards on what a traced function
        # reads, and a cache that grows after the trace fails its guard: a recompile each time)
        if not torch.compiler.is_compiling():
            _ENV_KEYS[name] = key
    value = _ENV_DATA.get(key)
    if value is None:
        return default
    text = _ENV_VALUES.get(value)
    if text is None:
        text = os.environ.decodevalue(value)
        if not torch.compiler.is_compiling():
            if len(_ENV_VALUES) >= 256:
                _ENV_VALUES.clear()
            _ENV_VALUES[value] = text
    return text


# The spellings an on/off variable (ATTNCC_TUNE, ATTNCC_FAST_LAUNCH, ...) takes; "" is unset.
FLAG_SPELLINGS = {"0": False, "1": True, "false": False, "true": True, "False": False, "True": True,
                   "no": False, "yes": True, "off": False, "on": True}


def env_flag(name: str, default: bool) -> bool:
    """The on/off environment variable ``name``: 1 / true / yes / on, 0 / false / no / off, unset or
    empty ``default``; a ValueError naming it for anything else (``ATTNCC_TUNE=false`` turned tuning
    on, ``ATTNCC_FAST_LAUNCH=false`` left the fast launch on)."""
    text = env(name)
    if not text:
        return default
    value = FLAG_SPELLINGS.get(text)
    if value is None:
        raise ValueError(f"{name} must be 1 (or true, yes, on) or 0 (or false, no, off); unset: "
                         f"{int(default)}; got {text!r}")
    return value


if _ENV_DATA is not None:  # the variables the runtime reads, keyed before any call is traced
    _ENV_KEYS.update((name, os.environ.encodekey(name)) for name in (
        "TRITON_INTERPRET", "ATTNCC_BACKEND", "ATTNCC_GLUON_BWD", "ATTNCC_GLUON_BWD_TILES", "ATTNCC_FAST_LAUNCH",
        "ATTNCC_TUNE", "ATTNCC_CACHE_DIR", "ATTNCC_RESIDUE_MIN_ROWS", "ATTNCC_COLUMN_MIN_ROWS", "ATTNCC_CHECK_DECODE"))


def raw_env_key(name: str):
    """The key of ``name`` in os.environ's own mapping (see :func:`raw_env_get`)."""
    return name if _ENV_DATA is None else os.environ.encodekey(name)


def raw_env_get(key):
    """The raw (undecoded) value of an environment variable, None when unset: for keys of
    settings that the runtime keeps things per value of (``raw_env_key``)."""
    return os.environ.get(key) if _ENV_DATA is None else _ENV_DATA.get(key)


if _ENV_DATA is not None:
    _INTERPRET_KEY = os.environ.encodekey("TRITON_INTERPRET")
