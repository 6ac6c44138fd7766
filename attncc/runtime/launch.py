"""Picking and launching tile configs (runtime/configs.py, runtime/tuning.py), tensor preparation
for TMA descriptors, and the entry to autograd (runtime/autograd.py)."""
from __future__ import annotations

import dataclasses
import functools
import operator
import threading
from typing import Callable, Optional, Tuple

import torch

from attncc.runtime import backend, compiled, tuning
from attncc.runtime.autograd import AttentionFunction, no_pairs, no_pairs_backward
from attncc.runtime.call import Call, converted, env, env_flag, interpreting, on_call_device
from attncc.runtime.configs import (TOO_BIG, KernelConfig, config_settings, default_config, fit_key,
                                     preset_and_forced, preset_config, trial_active, trial_config)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def pick_config(call: Call, kernel: str = "") -> KernelConfig:
    """The tile config of one kernel of a call (``kernel``: "" the forward, "dkdv" or "dq"):
    forced by a tuning trial or the environment (see configs.env_config), small under the
    interpreter, else the one tuned for this GPU (runtime/tuning.py), else :func:`default_config`."""
    preset = preset_config(kernel)
    if preset is not None:
        return preset
    # once per call signature and state of the tune cache (a config stored since is picked up)
    return call.cached(("config", kernel, tuning.generation()),
                       lambda: tuning.cached_config(call, kernel) or default_config(call, kernel))


def shared_tile_config(call: Call, kernel: str, forward: KernelConfig) -> KernelConfig:
    """A backward kernel's config with the forward's tile shape (and warps), so that the block
    lists the forward classified per call (data-dependent masks) serve the backward too; a
    config forced by the environment is kept as it is. A tuning trial's gets the forward's tiles
    as the cache entry it may become does (the tuner timed dK/dV and dQ candidates at tile shapes
    that no call of such a spec ran, and recorded their times and gains for configs of which only
    the pipeline depth was used)."""
    preset, forced = preset_and_forced(kernel)
    if forced and trial_config(kernel) is None:  # the environment's
        return preset
    if preset is not None:  # a tuning trial's, or the interpreter's
        return _with_tiles(preset, forward.BLOCK_M, forward.BLOCK_N, forward.num_warps)
    return call.cached(("shared config", kernel, forward, tuning.generation()),
                       lambda: _with_tiles(pick_config(call, kernel), forward.BLOCK_M, forward.BLOCK_N,
                                           forward.num_warps))


def backward_configs(call: Call, shared: bool) -> Tuple[KernelConfig, KernelConfig, KernelConfig]:
    """(the forward's, the dK/dV kernel's, the dQ kernel's) configs of a backward: :func:`pick_config`
    of each, the backward kernels' with the forward's tile shape when ``shared`` (see
    :func:`shared_tile_config`). Once per call signature and state of the settings they read (the
    environment's configs, the interpreter, the tune cache); every time during a tuning trial."""
    if trial_active():
        return _backward_configs(call, shared)
    return call.cached(("backward configs", shared, config_settings(), tuning.generation()),
                       lambda: _backward_configs(call, shared))


def _backward_configs(call: Call, shared: bool):
    cfg = pick_config(call)
    if shared:
        return cfg, shared_tile_config(call, "dkdv", cfg), shared_tile_config(call, "dq", cfg)
    return cfg, pick_config(call, "dkdv"), pick_config(call, "dq")


@functools.lru_cache(maxsize=1024)
def _with_tiles(cfg: KernelConfig, block_m: int, block_n: int, num_warps: int) -> KernelConfig:
    return dataclasses.replace(cfg, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)


def launch(call: Call, cfg: KernelConfig, run_kernel: Callable[[KernelConfig], None], kernel: str = ""):
    """Launch with ``cfg``; when the kernel needs more shared memory than the GPU has (a
    pattern that gathers from memory in the loop, say), retry with shallower pipelining.
    What failed is remembered per (spec, kernel, head dim, dtype, config); ``kernel`` names
    the backward kernels ("dkdv", "dq"), "" is the forward. Its launches take Triton's scratch
    from :func:`scratch`."""
    _LAUNCHING.own = True
    try:
        return _launch(call, cfg, run_kernel, kernel)
    finally:
        _LAUNCHING.own = False


def bound_launch(call: Call, make: Callable, cfg: KernelConfig, q, k, v, *buffers, layout=()):
    """``make(call, cfg, q, k, v, *buffers, *layout)``: a kernel's launch with everything but the tensors and
    flags that change from call to call bound (a generated module's ``_*_launch``, which returns a
    function of those), made once and kept with the call's signature (:meth:`Call.cached`) for each
    of what else its numbers come from: the config, the interpreter setting, the layouts of the
    operands ``q``, ``k``, ``v`` (the call's own tensors have the signature's; copies made for the
    kernels (:func:`kernel_operands`, RoPE) key their own), and the strides of ``layout``, tensors
    whose layout the signature does not fix (the gradient dO). ``buffers``: tensors allocated for
    this launch from the operands' shapes (their layouts follow from those).

    On a GPU, for a call with a signature memo (unless ``ATTNCC_FAST_LAUNCH=0``) the launch is a
    :class:`BoundLaunch`, whose :class:`FastKernel` launches skip Triton's per-launch specialization:
    every scalar the launch passes positionally is bound here, so the key of a bound launch is
    what Triton specializes on."""
    fast = call.memo is not None and fast_launch()
    if q is call.q and k is call.k and v is call.v:
        key = (make, cfg, interpreting(), fast)
    else:
        key = (make, cfg, interpreting(), fast, q.shape, q.stride(), q.dtype, k.shape, k.stride(), v.shape, v.stride())
    if layout:
        key += (layout[0].stride(),) if len(layout) == 1 else tuple(t.stride() for t in layout)
    if fast:
        return call.cached(key, lambda: BoundLaunch(make(call, cfg, q, k, v, *buffers, *layout)))
    return call.cached(key, lambda: make(call, cfg, q, k, v, *buffers, *layout))


def fast_launch() -> bool:
    """On unless ``ATTNCC_FAST_LAUNCH=0``; off under the interpreter (nothing to skip there). On by
    default since its outputs and gradients were bitwise the plain launch's on an H100 (2026-12-05,
    session 11: causal and document, N = 1024 and 4096, tl and Gluon forwards) and it cut the host time
    of a causal forward+backward at N = 1024 from 453 to 331 us (`python -m bench host`)."""
    return env_flag("ATTNCC_FAST_LAUNCH", True) and not interpreting()  # (the value checked everywhere)


# .slot: the compiled kernels of the BoundLaunch running on this thread; .own: inside launch()
_LAUNCHING = threading.local()


def _launch(call: Call, cfg: KernelConfig, run_kernel: Callable[[KernelConfig], None], kernel: str):
    if not TOO_BIG:  # the common case: nothing ever failed to fit
        try:
            return run_kernel(cfg)
        except _out_of_resources():
            if cfg.num_stages <= 1:
                raise
            TOO_BIG.add((fit_key(call, kernel), cfg))
    key = fit_key(call, kernel)
    while True:
        if (key, cfg) not in TOO_BIG:
            try:
                return run_kernel(cfg)
            except _out_of_resources():
                if cfg.num_stages <= 1:
                    raise
                TOO_BIG.add((key, cfg))
        cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)


@functools.lru_cache(maxsize=1)
def _out_of_resources():
    from triton.runtime.errors import OutOfResources

    return OutOfResources


def fast_math(call: Call) -> bool:
    """Approximate special functions (tanh.approx) where their error is below the inputs':
    16-bit inputs on a GPU; never under the interpreter, which cannot run inline PTX."""
    return call.q.dtype != torch.float32 and not interpreting()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of ints (``triton.cdiv`` is a constexpr function: about 6 us per host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (``triton.next_power_of_2`` without its per-call cost)."""
    return 1 << max(0, n - 1).bit_length()


def _tma_strides(t: torch.Tensor) -> bool:
    """Last stride 1, the others and the last dim's bytes multiples of 16 (the layout's part of
    :func:`tma_ready`)."""
    return _strides_suit(t.stride(), t.element_size(), t.shape[-1])


@functools.lru_cache(maxsize=1024)
def _strides_suit(strides: Tuple[int, ...], es: int, dim: int) -> bool:
    return strides[-1:] == (1,) and all((s * es) % 16 == 0 for s in strides[:-1]) and (dim * es) % 16 == 0


def tma_ready(t: torch.Tensor) -> torch.Tensor:
    """A view the kernel's tensor descriptors can read: last stride 1, other strides and
    the base 16-byte aligned, rows of a multiple of 16 bytes. Tensors that are not are copied
    (contiguously, with the head dim zero-padded when its row is not a multiple of 16 bytes); the
    result is the same. The rows' width counts too: the kernels size what they write (o, dq, dk,
    dv) by their operands' head dims, and take q's and k's to be one (HEAD_DIM): a view of
    rows of 18 floats in rows of 20 has suitable strides, but an output of rows of 18 floats would
    not, and a q padded to 20 beside it would read 2 columns past that k's view."""
    if t.data_ptr() % 16 == 0 and _strides_suit(t.stride(), t.element_size(), t.shape[-1]):
        return t
    es = t.element_size()
    d = t.shape[-1]
    unit = 16 // es
    d_round = -(-d // unit) * unit
    if d_round == d:
        out = t.contiguous()  # (torch keeps any stride of a length-1 dim: [1, 1, 1, 16] with row stride 21)
        if _tma_strides(out) and out.data_ptr() % 16 == 0:
            return out
    out = torch.zeros(*t.shape[:-1], d_round, dtype=t.dtype, device=t.device)
    out[..., :d] = t
    return out


def kernel_operands(call: Call):
    """q, k, v as the kernel reads them (see tma_ready). Triton 3.6's CPU interpreter computes
    bfloat16 dot products wrongly, so there (tests only) bfloat16 operands go in as float32.
    Whether the strides suit is decided once per call signature; the base's alignment, a value
    of this call's tensors, is checked every time."""
    q, k, v = call.q, call.k, call.v
    suits = call.cached("tma_strides", lambda: tuple(_tma_strides(t) for t in (q, k, v)))
    if suits == _ALL_SUIT and not (q.data_ptr() % 16 or k.data_ptr() % 16 or v.data_ptr() % 16):
        pass  # the common case: the call's own tensors
    else:
        if not (suits[0] and q.data_ptr() % 16 == 0):
            q = tma_ready(q)
        if not (suits[1] and k.data_ptr() % 16 == 0):
            k = tma_ready(k)
        if not (suits[2] and v.data_ptr() % 16 == 0):
            v = tma_ready(v)
    if interpreting() and q.dtype is torch.bfloat16:
        q, k, v = q.float(), k.float(), v.float()
    return q, k, v


_ALL_SUIT = (True, True, True)


def dot_operand(t: torch.Tensor) -> torch.Tensor:
    """A bfloat16 input that a lowered dot's tile product reads (attncc.codegen.tile_dots) as the
    kernels take it: as it is, but float32 under Triton's CPU interpreter, which computes bfloat16
    dot products wrongly (tests only, as :func:`kernel_operands`); its expanded dims stay expanded,
    so that its strides are the ones a launch bound for the signature."""
    return converted(t, torch.float32) if interpreting() else t


_ALLOCATOR_SET = threading.local()


def _alloc(size: int, alignment: int, stream):
    """Triton's per-launch scratch (the kernels' on-device tensor descriptors, written and read
    by the launched kernel only): for attncc's own launches (:func:`launch`), :func:`scratch` of the
    current CUDA device; for any other Triton kernel of this thread (this allocator is the
    thread's), a fresh one: such a kernel may start before the one before it ends (programmatic
    dependent launch)."""
    if getattr(_LAUNCHING, "own", False):
        return scratch(size, stream, _CUDA, torch._C._cuda_isCurrentStreamCapturing())
    return torch.empty(size, device=_CUDA, dtype=torch.int8)


_CUDA = torch.device("cuda")
_SCRATCH: dict = {}  # (device, stream) -> int8 buffer


def scratch(size: int, stream, device, capturing: bool) -> torch.Tensor:
    """A buffer of at least ``size`` bytes for a launch on ``stream``: one per stream, grown as
    needed, instead of an allocation per launch (an aten op on every launch of a kernel with tensor
    descriptors, 3 per forward+backward). Safe because the scratch lives only while the kernel
    runs and kernels of one stream run one after the other (a buffer outgrown is freed in the
    stream's order by the caching allocator). Under CUDA graph capture a fresh one, as Triton's
    own use expects: a graph's kernels replay later, beside other streams' launches."""
    if capturing:
        return torch.empty(size, device=device, dtype=torch.int8)
    key = (device, stream)
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.numel() < size:
        if len(_SCRATCH) >= 64:  # streams come and go (a pool of them, usually)
            _SCRATCH.clear()
        buffer = _SCRATCH[key] = torch.empty(max(size, 2 * (0 if buffer is None else buffer.numel())),
                                             device=device, dtype=torch.int8)
    return buffer


def ensure_allocator():
    """On-device tensor descriptors need scratch memory from a Triton allocator. Triton keeps it
    in a context variable, so each thread sets it (autograd runs backward passes of CUDA
    tensors on a thread of its own)."""
    if getattr(_ALLOCATOR_SET, "done", False) or interpreting():
        return
    import triton

    triton.set_allocator(_alloc)
    _ALLOCATOR_SET.done = True


def grad_operand(do: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """dL/do as the backward kernels read it: v's dtype (the kernels' operand dtype) and
    padded head dim, TMA-ready (see tma_ready)."""
    if do.dtype != v.dtype:
        do = do.to(v.dtype)
    if do.shape[-1] != v.shape[-1]:
        padded = torch.zeros(*do.shape[:-1], v.shape[-1], dtype=v.dtype, device=do.device)
        padded[..., :do.shape[-1]] = do
        do = padded
    return tma_ready(do)


def grads_as_inputs(call: Call, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                    input_grads: Optional[dict] = None):
    """(dq, dk, dv, {input name: gradient}): the kernels' gradients (padded head dims, operand
    dtype, fp32 buffers of the inputs) with the shapes and dtypes of q, k, v and the inputs.
    Inputs without a gradient (not wanted, or not differentiable) are left out."""
    # in the dtypes of the tensors autograd differentiates (Call.grad_sources): the caller's
    grads = {name: g.to(call.passed_input(name).dtype)
             for name, g in (input_grads or {}).items()} if call.input_grads else {}
    dtype = call.q.dtype  # q, k, v have one (bind checks)
    return _as(dq, call.D, dtype), _as(dk, call.D, dtype), _as(dv, call.Dv, dtype), grads


def _as(g: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``g[..., :dim]`` in ``dtype``, contiguous (as o, and as SDPA's gradients: a view of the padded
    rows refused ``.view``): ``g`` itself when it is that already (no view made per call)."""
    if g.shape[-1] != dim:
        g = g[..., :dim].contiguous() if g.dtype == dtype else g[..., :dim]
    return g if g.dtype == dtype else g.to(dtype)


def run_attention(call: Call, forward: Callable[[Call], Tuple[torch.Tensor, torch.Tensor]],
                  backward: Optional[Callable] = None):
    """Run the forward, attached to autograd when a gradient is wanted; returns (o, lse).

    ``backward(call, o, lse, do, dlse=None) -> (dq, dk, dv, {name: grad})``: the generated module's backward launcher
    (None: the kind has no backward yet; asking for a gradient then raises).
    Under ``torch.compile`` the call is a custom op (attncc/runtime/compiled.py) the compiler
    traces, or, when the ops cannot carry it (:func:`attncc.runtime.compiled.compilable`), runs eagerly
    (a graph break), gradients included."""
    backend.refuse_forced(call)  # ATTNCC_BACKEND=gluon on a spec without the Gluon forward (attncc.runtime.backend)
    forward, backward = tuning.on_the_fly(forward, backward)  # ATTNCC_TUNE=1: tune what the cache lacks
    run = _run
    # bind keeps no signature memo while torch.compile traces, so a call with one is not traced, unless
    # it runs inside a torch.compile'd function: once a call raised there (a refused argument, caught),
    # dynamo runs the frames it raised in eagerly and traces the others as their own frames, so that
    # this frame may be traced with a call bound eagerly, or run eagerly and _run's frames traced: both
    # traced the kernels' launch (an InterpreterError, Triton's errors on the GPU) on every later call.
    if call.memo is None or _in_compiled_function():
        if torch.compiler.is_compiling():
            if compiled.compilable(call):
                if call.spec.inputs and torch.is_grad_enabled():  # as _run: the op's backward would drop it
                    call.check_no_dropped_grads("attention")
                return compiled.attention(call)
            return _run_eagerly()(call, forward, backward)
        if _in_compiled_function():  # run eagerly in a compiled function: none of _run traced
            run = _run_eagerly()
    with on_call_device(call):
        return run(call, forward, backward)


# dynamo's frame callback: set while a torch.compile'd function runs, in the frames it runs eagerly too
_frame_callback = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
_frame_callback = getattr(_frame_callback, "get_eval_frame_callback", None)


def _in_compiled_function() -> bool:
    """Whether a torch.compile'd function is running (traced or not): dynamo may trace the frames this
    one calls. (torch without the callback's getter: is_compiling(), which misses the eager frames.)"""
    if _frame_callback is None:  # pragma: no cover - other torch versions
        return torch.compiler.is_compiling()
    return _frame_callback() is not None


def _run(call: Call, forward, backward):
    if call.Nq == 0 or call.Nk == 0:  # no pair at all: o = 0, lse = -inf, zero gradients
        forward, backward = no_pairs, no_pairs_backward
    if not torch.is_grad_enabled():
        return forward(call)
    names = call.grad_input_names
    if names:
        call.check_no_dropped_grads("attention")
        grad_inputs = call.grad_sources()
        input_grads = any(t.requires_grad for t in grad_inputs)
        if not (input_grads or call.q.requires_grad or call.k.requires_grad or call.v.requires_grad):
            return forward(call)
    else:
        if call.spec.inputs:
            call.check_no_dropped_grads("attention")
        grad_inputs, input_grads = (), False
        if not (call.q.requires_grad or call.k.requires_grad or call.v.requires_grad):
            return forward(call)
    if backward is None:
        raise NotImplementedError(f"attncc: {call.spec.name} ({call.spec.kind}) has no backward pass yet; "
                                  f"call it under torch.no_grad() or detach q, k, v")
    # The forward writes the LSE and keeps for the backward what both can share. (The call is
    # this call's own: bind makes one per call, so it is changed in place, not copied.)
    call.return_lse, call.for_backward, call.input_grads = True, {}, input_grads
    return AttentionFunction.apply((forward, backward, call), call.q, call.k, call.v, *grad_inputs)


@functools.lru_cache(maxsize=None)
def _run_eagerly():
    """_run hidden from torch.compile (made on first use: torch._dynamo imports sympy)."""
    return torch.compiler.disable(_run, recursive=True)


class BoundLaunch:
    """A generated launch closure (``launch(*tensors_and_flags)``, made by :func:`bound_launch` once per
    call signature, config and operand layouts) whose :class:`FastKernel` launches are keyed by it.
    Everything the closure passes to its kernel but the tensors and its own arguments is bound in
    it (strides, sizes, offsets, scales, constexprs, the grid), so Triton's specialization of a
    launch through it varies only with what :meth:`FastKernel._launch` keys: the tensors' dtypes and
    16-byte alignment, None arguments, and the keyword arguments."""

    __slots__ = ("launch", "compiled")

    def __init__(self, launch):
        self.launch = launch
        self.compiled = {}  # FastKernel -> _Launches

    def __call__(self, *args):
        _LAUNCHING.slot = self.compiled
        try:
            return self.launch(*args)
        finally:
            _LAUNCHING.slot = None


class _Launches:
    """A FastKernel's launches from one BoundLaunch: where its tensor and None arguments are
    (the generated code passes them in fixed places), and {key: (compiled kernel, the
    parameters after the positional ones)}."""

    __slots__ = ("tensors", "nones", "scalars", "compiled")

    def __init__(self, args):
        self.tensors = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        self.nones = tuple(i for i, a in enumerate(args) if a is None)
        others = [i for i, a in enumerate(args) if a is not None and not isinstance(a, torch.Tensor)]
        # the positional scalars' values, as one tuple (itemgetter of one index gives the value)
        self.scalars = operator.itemgetter(*others, *others[:1]) if others else (lambda args: ())
        self.compiled = {}


class FastKernel:
    """A ``@triton.jit`` kernel launched through Triton's compiled kernel directly, skipping the
    per-launch argument specialization of ``JITFunction.run`` (about 10 us of Python per launch
    of these 40-argument kernels, measured on the CPU: ``python -m bench host --stub``, docs/performance.md).

    On unless ``ATTNCC_FAST_LAUNCH=0`` (:func:`fast_launch`), for
    launches made inside a :class:`BoundLaunch`. The first launch of each key goes through
    ``kernel[grid](...)`` as always (compiling, specializing) and keeps the compiled kernel that
    ``JITFunction.run`` returns; later launches with the same key call it with every parameter in
    order (constexprs included: the launcher skips them), as ``JITFunction.run`` does. The key,
    per bound launch (which fixes the grid and, in the generated launches, every positional
    scalar), holds what Triton specializes on: the positional scalars' values (a safeguard costing
    ~1 us: a bound launch passes the same ones every time), each tensor argument's dtype and 16-byte
    alignment, the keyword arguments (constexprs and options by value; a runtime scalar such as the
    dropout seed by its specialization, :func:`_specialization`) and the current device. A launch
    that passes a tensor where an earlier one passed None takes the plain path. Elsewhere (the
    interpreter, no bound launch) the plain launch.

    Not re-checked per launch (as ``JITFunction.run`` would): Triton's debug and instrumentation
    knobs and the kernels' global constants changing after the first launch of a key.
    """

    def __init__(self, fn):
        self.fn = fn
        # parameters that are not constexprs: Triton specializes a scalar passed for one by keyword
        # (the dropout seed) on its value (== 1, divisible by 16, 32 or 64 bits)
        self._runtime_keywords = frozenset(p.name for p in fn.params if not p.is_constexpr)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid, args, kwargs):
        slot = getattr(_LAUNCHING, "slot", None)
        if slot is None:
            return self.fn[grid](*args, **kwargs)
        launches = slot.get(self)
        if launches is None:
            launches = slot[self] = _Launches(args)
        for i in launches.nones:
            if args[i] is not None:  # (the generated launches never do this)
                return self.fn[grid](*args, **kwargs)
        keywords = tuple(kwargs.items())
        if self._runtime_keywords.intersection(kwargs):
            keywords = tuple((k, _specialization(v)) if k in self._runtime_keywords else (k, v) for k, v in keywords)
        ptrs = [args[i].data_ptr() for i in launches.tensors]
        key = (len(args), torch.cuda.current_device(), keywords, launches.scalars(args),
               tuple((p % 16 == 0, args[i].dtype) for p, i in zip(ptrs, launches.tensors)))
        entry = launches.compiled.get(key)
        if entry is None:
            compiled = self.fn[grid](*args, **kwargs)
            launches.compiled[key] = (compiled, tuple((p.name, p.default) for p in self.fn.params[len(args):]),
                                      direct_launch(compiled) if DIRECT_LAUNCH else None, key[1])
            return compiled
        compiled, tail, direct, device = entry
        gx, gy, gz = grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1
        if direct is None or _hooks_set():
            compiled[(gx, gy, gz)](*args, *(kwargs.get(name, default) for name, default in tail))
            return compiled
        # the tensors as their addresses: the C launcher takes an int as it is, where for a tensor it
        # calls data_ptr() and asks the driver about the address (cuPointerGetAttribute) on every
        # launch; the call's tensors were checked to be on its GPU when it was bound
        full = list(args)
        for p, i in zip(ptrs, launches.tensors):
            full[i] = p
        full.extend(kwargs.get(name, default) for name, default in tail)
        direct(gx, gy, gz, device, full)
        return compiled


# Launches of a FastKernel's compiled kernels through Triton's C launcher itself (:func:`direct_launch`)
DIRECT_LAUNCH = env_flag("ATTNCC_DIRECT_LAUNCH", False)


@functools.lru_cache(maxsize=1)
def _knobs():
    from triton import knobs

    return knobs.runtime


def _hooks_set() -> bool:
    """Whether Triton has a launch hook to call (knobs.runtime: HookChains, which a user may also
    have replaced by a function or None)."""
    knobs = _knobs()
    return any(getattr(hook, "calls", hook) for hook in (knobs.launch_enter_hook, knobs.launch_exit_hook))


def direct_launch(compiled):
    """``run(gx, gy, gz, device, args)``: ``compiled[(gx, gy, gz)](*args)`` without what Triton 3.6
    does in Python around its C launcher on every launch (a closure per grid, the driver's device
    and stream through its proxy, launch metadata for hooks nobody set, two scratch closures),
    for CUDA launchers of single-CTA kernels without profile scratch; None for any other (they
    keep the plain path). Its global scratch comes from :func:`_alloc`, the allocator attncc's
    launches set (:func:`ensure_allocator`). Used only while no launch hook is set."""
    launcher = compiled.run
    needed = ("launch", "launch_cooperative_grid", "launch_pdl", "global_scratch_size", "global_scratch_align",
              "profile_scratch_size")
    if not all(hasattr(launcher, name) for name in needed) or getattr(launcher, "num_ctas", 1) != 1 \
            or launcher.profile_scratch_size:
        return None
    launch, function, packed = launcher.launch, compiled.function, compiled.packed_metadata
    coop, pdl = launcher.launch_cooperative_grid, launcher.launch_pdl
    size, align = launcher.global_scratch_size, launcher.global_scratch_align
    raw_stream = torch._C._cuda_getCurrentRawStream

    def run(gx, gy, gz, device, args):
        stream = raw_stream(device)
        buffer = _alloc(gx * gy * gz * size, align, stream) if size else None
        launch(gx, gy, gz, stream, function, coop, pdl, buffer, None, packed, None, None, None, *args)
    return run


_INT_RANGES = ((-2**31, 2**31, "i32"), (-2**63, 2**63, "i64"))


def _specialization(value):
    """What Triton specializes a non-constexpr scalar on: an int's == 1, divisibility by 16 and
    width (i32, i64, u64: a seed past 2**31 is an i64 argument); other types by type."""
    if isinstance(value, int) and not isinstance(value, bool):
        width = next((name for lo, hi, name in _INT_RANGES if lo <= value < hi), "u64")
        return int, value == 1, value % 16 == 0, width
    return type(value)


def fast_kernel(fn):
    """``fn`` as a :class:`FastKernel`; ``fn`` itself under the interpreter (nothing to skip)."""
    from triton.runtime.jit import JITFunction

    return FastKernel(fn) if isinstance(fn, JITFunction) else fn
