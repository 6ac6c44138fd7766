"""Gluon fragments and the kernels' per-tile math, run on the CPU in torch.

Gluon has no interpreter, so the rendered fragments (``generated/<name>_gluon.py``) and the
functions of ``attncc.runtime.gluon.common`` that the kernels inline are run here as the Python
functions they are written as, with ``gl`` bound to torch (:data:`GL`) and the helpers to their
definitions on the host (:data:`HELPERS`): the text that is compiled for the GPU is the text that
runs. What differs from the GPU: int64 instead of int32 arithmetic (the Gluon path refuses calls
past int32) and float64 here where the kernels use float32 and 16-bit P (:func:`emulate_forward`
checks the fragments' logic, not rounding). Integer ``//`` and ``%`` of the fragments' text are
Triton's (truncating, :func:`as_python`), not Python's: a ``//`` or ``%`` printed on an operand that
can be negative gives here what it gives on the GPU.

:func:`emulate_forward` runs a whole forward tile by tile as the warp-specialized kernel's
consumer does (fwd_ws.consumer_partition): the walk's first block as the prologue, then per segment
the masked head, the unmasked middle and the masked tail, each block (a block-list walk's: the
position's, ``key_block``) through ``block_scores`` and ``softmax_update``, ``finish_rows`` at the end.
"""
from __future__ import annotations

import ast
import importlib.util
import inspect
import math
import sys
import textwrap
import types
from pathlib import Path

import torch

from attncc.core import semantics
from attncc.runtime.gluon import common


class Pointer:
    """A kernel pointer on the host: a tensor's whole storage, flat, and element offsets into it (a
    scalar or a tensor). A tensor passed in ``pattern_args`` becomes one (:func:`ctx_of`), so that the
    fragments' own index math (``ptr_doc + b * stride0_doc + j * stride1_doc``) runs on the strides the
    host passes: a read that ignored them would read another element here too."""

    def __init__(self, flat, offset):
        self.flat, self.offset = flat, offset

    @classmethod
    def of(cls, t: torch.Tensor) -> "Pointer":
        flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())
        return cls(flat, torch.tensor(t.storage_offset()))

    def __add__(self, x):
        return Pointer(self.flat, self.offset + _t(x))

    __radd__ = __add__

    def __sub__(self, x):
        return Pointer(self.flat, self.offset - _t(x))

    def load(self, mask=None, other=0):
        offset = torch.as_tensor(self.offset).to(torch.int64)
        inside = (offset >= 0) & (offset < self.flat.numel())
        if mask is not None:
            mask = _t(mask).bool().expand(torch.broadcast_shapes(mask.shape, offset.shape))
            assert bool(inside[mask].all()) if mask.dim() else (not bool(mask) or bool(inside)), "a load out of bounds"
            offset = torch.where(mask, offset, torch.zeros_like(offset))
        else:
            assert bool(inside.all()), "a load out of bounds"
        value = self.flat[offset.clamp(0, max(self.flat.numel() - 1, 0))]
        if mask is not None:
            value = torch.where(mask, value, torch.as_tensor(other, dtype=value.dtype))
        return value


def _t(x):
    return x if isinstance(x, (torch.Tensor, Pointer)) else torch.as_tensor(x)


def _where(c, a, b):
    if isinstance(a, Pointer) or isinstance(b, Pointer):  # a scalar select between two pointers
        assert _t(c).dim() == 0, "a pointer select on a tensor condition"
        return a if bool(c) else b
    return torch.where(_t(c).bool(), _t(a), _t(b))


GL = types.SimpleNamespace(
    minimum=lambda a, b: torch.minimum(_t(a), _t(b)), maximum=lambda a, b: torch.maximum(_t(a), _t(b)),
    where=_where, cdiv=lambda a, b: -(-a // b), load=lambda ptr, mask=None, other=0: ptr.load(mask, other),
    to_tensor=_t, cast=lambda x, dtype: _t(x).to(dtype), abs=torch.abs, exp=torch.exp, exp2=torch.exp2,
    log=torch.log, log2=torch.log2, sqrt=torch.sqrt, rsqrt=torch.rsqrt, floor=torch.floor, ceil=torch.ceil,
    sin=torch.sin, cos=torch.cos, erf=torch.erf,
    max=lambda x, axis: torch.amax(x, dim=axis), sum=lambda x, axis: x.sum(axis),
    expand_dims=lambda x, axis: x.unsqueeze(axis), convert_layout=lambda x, layout: x,
    arange=lambda start, end, layout=None: torch.arange(start, end), zeros_like=torch.zeros_like,
    full=lambda shape, value, dtype, layout=None: torch.full(shape, value, dtype=dtype),
    zeros=lambda shape, dtype, layout=None: torch.zeros(shape, dtype=dtype),
    SliceLayout=lambda dim, parent: None, static_range=range, constexpr=lambda x: x,
    float32=torch.float32, float64=torch.float64, int32=torch.int64, int64=torch.int64)


def _alibi_slope(h, n_heads):
    p = 2.0 ** math.floor(math.log2(int(n_heads)))
    hf = float(h)
    return 2.0 ** (-8.0 * (hf + 1.0) / p) if hf < p else 2.0 ** (-4.0 * (2.0 * (hf - p) + 1.0) / p)


def _bucket(name):
    nb, md, bd = (int(x) for x in name[len("_bucket_"):].split("_"))

    def bucket(d):
        d = _t(d)
        return torch.tensor([semantics.t5_bucket(x, nb, md, bool(bd)) for x in d.flatten().tolist()]).view(d.shape)
    return bucket


# Helpers run as host functions rather than their text (the others, _floordiv and _floormod among
# them, run as written, with Triton's integer // and %: as_python)
HELPERS = {
    "_ipow": lambda x, K: _t(x) ** K,
    "_shift": lambda x, n: torch.where(_t(n) >= 0, _t(x) << torch.clamp(_t(n), 0, 63),
                                       _t(x) >> torch.clamp(-_t(n), 0, 63)),
    "_tanh": lambda x, fast: torch.tanh(x), "_sin": lambda x, fast: torch.sin(x), "_cos": lambda x, fast: torch.cos(x),
    "_alibi_slope": _alibi_slope,
}


def _trunc_div(a, b):
    """``a // b`` as the kernels compute it: Triton's integer ``//`` truncates toward zero (C's), where
    Python's floors; Python ints (constexprs, folded at compile time) and floats keep Python's."""
    if _int_tensor(a, b):
        return torch.div(_t(a), _t(b), rounding_mode="trunc")
    return a // b


def _trunc_mod(a, b):
    """``a % b`` as the kernels compute it: Triton's integer ``%`` takes the dividend's sign (C's fmod),
    where Python's takes the divisor's."""
    if _int_tensor(a, b):
        return torch.fmod(_t(a), _t(b))
    return a % b


def _int_tensor(a, b) -> bool:
    """Whether ``a op b`` is an integer operation of the kernel: a tensor (a runtime value) among
    integer operands."""
    operands = (a, b)
    return any(isinstance(x, torch.Tensor) for x in operands) and not any(
        isinstance(x, float) or (isinstance(x, torch.Tensor) and x.is_floating_point()) for x in operands)


class _TritonInts(ast.NodeTransformer):
    """``a // b`` and ``a % b`` (operators and augmented assignments) as calls of :func:`_trunc_div` and
    :func:`_trunc_mod`: the fragments' text with Triton's integer semantics on the host."""

    CALLS = {ast.FloorDiv: "_trunc_div", ast.Mod: "_trunc_mod"}

    def visit_BinOp(self, node):
        self.generic_visit(node)
        name = self.CALLS.get(type(node.op))
        if name is None:
            return node
        return ast.copy_location(ast.Call(ast.Name(name, ast.Load()), [node.left, node.right], []), node)

    def visit_AugAssign(self, node):
        self.generic_visit(node)
        name = self.CALLS.get(type(node.op))
        if name is None or not isinstance(node.target, ast.Name):
            return node
        load = ast.Name(node.target.id, ast.Load())
        call = ast.Call(ast.Name(name, ast.Load()), [load, node.value], [])
        return ast.copy_location(ast.Assign([node.target], call), node)


def _host_code(fn):
    """The code of ``fn`` (a @gluon.jit function's Python function) with Triton's integer ``//`` and
    ``%`` (:class:`_TritonInts`), compiled from its source at its own file and lines."""
    lines, first = inspect.getsourcelines(fn)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    tree.body[0].decorator_list = []
    tree = ast.fix_missing_locations(_TritonInts().visit(tree))
    ast.increment_lineno(tree, first - 1)
    scope = {}
    exec(compile(tree, inspect.getsourcefile(fn) or "<fragments>", "exec"), {**fn.__globals__, "gl": GL}, scope)
    return scope[fn.__name__].__code__


def as_python(jit_fn, _done=None, **extra):
    """The Python function a ``@gluon.jit`` function wraps, its ``gl`` bound to torch, Triton's integer
    ``//`` and ``%`` (truncating) in place of Python's, the helpers it calls (and ``extra`` names) to
    host versions: :data:`HELPERS`, or the other @gluon.jit functions it calls, as their own text."""
    from triton.runtime.jit import JITFunction

    if jit_fn is None:
        return None
    fn = jit_fn.fn if hasattr(jit_fn, "fn") else jit_fn
    done = {} if _done is None else _done
    if fn in done:
        return done[fn]
    names = {"gl": GL, "FAST_MATH": True, "_trunc_div": _trunc_div, "_trunc_mod": _trunc_mod}
    # (a plain Python function a test passes, a closure among them, runs as it is)
    code = _host_code(fn) if hasattr(jit_fn, "fn") and fn.__closure__ is None else fn.__code__
    out = types.FunctionType(code, {**fn.__globals__, **names}, fn.__name__, fn.__defaults__, fn.__closure__)
    done[fn] = out
    for n in fn.__code__.co_names:
        if n in HELPERS:
            out.__globals__[n] = HELPERS[n]
        elif n.startswith("_bucket_"):
            out.__globals__[n] = _bucket(n)
        elif isinstance(fn.__globals__.get(n), JITFunction):
            out.__globals__[n] = as_python(fn.__globals__[n], done)
    out.__globals__.update(extra)
    return out


def load_fragments(text: str, folder: Path, name: str):
    """A rendered fragments file (its text) imported from ``folder`` (gluon.jit reads the source
    from the file)."""
    path = Path(folder) / f"{name}_gluon.py"
    path.write_text(text)
    module_name = f"gluon_host_{name}_{abs(hash(text)) % 10**12}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


class Fragments:
    """A fragments module's functions on the host."""

    def __init__(self, module):
        self.module = module
        self.walk = as_python(module.walk)
        self.mask = as_python(module.mask)
        self.score = as_python(module.score)
        self.block = as_python(getattr(module, "block", None))  # block-list walks
        self.segments = module.SEGMENTS
        self.qwalk = as_python(module.qwalk)  # the backward's (None where it does not take these fragments)
        self.qmask = as_python(module.qmask)
        self.score_grad = as_python(module.score_grad)


def _host_module(module, **extra):
    """Every @gluon.jit function of ``module`` on the host, calling each other's host versions."""
    from triton.runtime.jit import JITFunction

    names = {**vars(module), "gl": GL, **extra}
    jits = {n: f for n, f in vars(module).items() if isinstance(f, JITFunction) and f.fn.__module__ == module.__name__}
    for n, f in jits.items():
        fn = f.fn
        names[n] = types.FunctionType(fn.__code__, names, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.SimpleNamespace(**{n: names[n] for n in jits})


# the kernels' inlined functions, on the host (LN2: a gl.constexpr in common.py, a float here)
C = _host_module(common, LN2=math.log(2.0))


def ctx_of(b, h, H, q_last, pattern_args):
    """The fragments' context tuple, its members 0-d int64 tensors (as the kernels' int32 scalars), a
    tensor of ``pattern_args`` a :class:`Pointer` (as the kernels get it)."""
    return C.pattern_context(_t(b), _t(h), H, _t(q_last), tuple(Pointer.of(a) if isinstance(a, torch.Tensor)
                                                                 else _t(a) for a in pattern_args))


def tile_segments(frag: Fragments, q_lo, q_hi, Nk, k_offset, n_q, n_k, block_n, ctx):
    """The walk's raw segments (a flat tuple of 4 * SEGMENTS values) of query tiles [q_lo, q_hi]
    (int64 tensors: one tile, or a vector of them)."""
    return frag.walk(_t(q_lo), _t(q_hi), _t(Nk), _t(k_offset), _t(n_q), _t(n_k), block_n, ctx)


def emulate_forward(frag: Fragments, q, k, v, *, scale, q_offset=0, k_offset=0, n_q=None, n_k=None,
                    pattern_args=(), block_m=32, block_n=16, walked=None, kernel="ws"):
    """(o, lse) of q [B, Hq, Nq, D], k / v [B, Hkv, Nk, D] (float64) through the fragments, tile by
    tile as the ws kernel's consumer walks them (``kernel="pipelined"``: as fwd_pipelined's loop does,
    the walk's blocks by their index in it, a block masked unless ``is_full``). ``walked``: a set
    that collects the (b, h, query block, key block, masked) the loop visits."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    n_q = q_offset + Nq if n_q is None else n_q
    n_k = k_offset + Nk if n_k is None else n_k
    qk_scale = scale * 1.4426950408889634
    nqb, nkb = -(-Nq // block_m), -(-Nk // block_n)
    pad = lambda x, rows: torch.nn.functional.pad(x, (0, 0, 0, rows - x.shape[-2]))  # noqa: E731 (TMA: zeros)
    qp, kp, vp = pad(q, nqb * block_m), pad(k, nkb * block_n + block_n), pad(v, nkb * block_n + block_n)
    o = torch.zeros(B, Hq, Nq, D, dtype=torch.float64)
    lse = torch.zeros(B, Hq, Nq, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hkv)
            ctx = ctx_of(b, h, Hq, q_offset + Nq - 1, pattern_args)
            for qb in range(nqb):
                segs = C.tile_walk(_t(qb), _t(q_offset), _t(Nk), _t(k_offset), _t(n_q), _t(n_k), ctx, frag.walk,
                                   frag.segments, block_m, block_n)
                first, some = C.walk_start(segs, frag.segments)
                rows_i = q_offset + qb * block_m + torch.arange(block_m)
                m_i = torch.full((block_m,), -math.inf, dtype=torch.float64)
                l_i = torch.zeros(block_m, dtype=torch.float64)
                acc = torch.zeros(block_m, D, dtype=torch.float64)
                qt = qp[b, h, qb * block_m:(qb + 1) * block_m]

                def step(t, masked, m_i, l_i, acc):
                    kb = int(C.key_block(_t(t), _t(qb), segs, ctx, getattr(frag, "block", None)))
                    assert 0 <= kb < nkb, f"the walk left the key blocks: {kb} of {nkb}"
                    if walked is not None:
                        walked.add((b, h, qb, kb, masked))
                    rows = slice(kb * block_n, (kb + 1) * block_n)
                    s = qt @ kp[b, hk, rows].transpose(0, 1)
                    s = C.block_scores(s, _t(kb), rows_i, _t(Nk), _t(k_offset), _t(n_q), _t(n_k), ctx, qk_scale,
                                       frag.mask, frag.score, masked, block_n, None)
                    m_i, l_i, p, alpha = C.softmax_update(s, m_i, l_i, C.exp2_scale(qk_scale, frag.score), None,
                                                          torch.float64)
                    return m_i, l_i, C.rescale(acc, alpha, None) + p @ vp[b, hk, rows]

                if kernel == "pipelined":
                    for it in range(int(C.walk_blocks(segs, frag.segments))):
                        t = C.nth_block(segs, _t(it), frag.segments)
                        m_i, l_i, acc = step(t, not bool(C.is_full(segs, t, frag.segments)), m_i, l_i, acc)
                elif bool(some):
                    m_i, l_i, acc = step(first, True, m_i, l_i, acc)
                    for seg in range(frag.segments):
                        start = C.segment_start(segs[4 * seg], first, frag.segments)
                        first_full = torch.maximum(segs[4 * seg + 1], start)
                        past_full = torch.maximum(segs[4 * seg + 2], start)
                        for kb in range(int(start), int(first_full)):
                            m_i, l_i, acc = step(kb, True, m_i, l_i, acc)
                        for kb in range(int(first_full), int(past_full)):
                            m_i, l_i, acc = step(kb, False, m_i, l_i, acc)
                        for kb in range(int(past_full), int(segs[4 * seg + 3])):
                            m_i, l_i, acc = step(kb, True, m_i, l_i, acc)
                out, row_lse, _ = C.finish_rows(acc, m_i, l_i, None)
                rows = slice(qb * block_m, min(Nq, (qb + 1) * block_m))
                o[b, h, rows] = out[:rows.stop - rows.start]
                lse[b, h, rows] = row_lse[:rows.stop - rows.start]
    return o, lse


def fuzz_rendered(rng, prefix: str, tries: int = 400):
    """(n, spec text, pattern, GluonFit) of the fuzz generator's softmax specs (tests/fuzz_specs.py)
    whose Plans take rendered fragments, among its first ``tries`` draws."""
    from fuzz_specs import random_spec

    from attncc.analysis import analyze
    from attncc.analysis.builtin import gluon_fit
    from attncc.analysis.score import canonical_score
    from attncc.spec import SpecError, parse_spec

    for n in range(1, tries + 1):
        text, _ = random_spec(rng)
        try:
            pat = parse_spec(f'name = "{prefix}{n}"\n' + text)
        except SpecError:
            continue
        if pat.kind == "softmax":
            fit = gluon_fit(analyze(canonical_score(pat)))
            if fit.kind == "rendered":
                yield n, text, pat, fit


class EmulatedForward:
    """Stands in for a Gluon forward kernel's ``run`` (``kind``: "ws" or "pipelined"): emulates the
    launch from its own arguments in float64 (:func:`emulate_forward`), writes o (and the LSE) as the
    kernel would, and keeps per launch a namespace of out, lse, walked (the blocks it walked), block_m,
    block_n, q, k (what the kernel read) and args (the bound arguments)."""

    def __init__(self, kernel, kind):
        self.kernel, self.kind = kernel, kind
        self.results = []

    def __call__(self, *args, grid, warmup, **kwargs):
        a = inspect.signature(self.kernel.fn).bind(*args, **{k: v for k, v in kwargs.items()
                                                             if k in self.kernel.arg_names}).arguments
        q, k, v, o = (a[n].base for n in ("q_desc", "k_desc", "v_desc", "o_desc"))
        frag = types.SimpleNamespace(walk=as_python(a["WALK"]), mask=as_python(a["MASK"]),
                                     score=as_python(a["SCORE"]), block=as_python(a.get("BLOCK")),
                                     segments=a["SEGMENTS"], module=None)
        rows = a["q_desc"].block_shape[2] * (2 if self.kind == "ws" else 1)
        block_n = a["k_desc"].block_shape[2]
        walked = set()
        out, lse = emulate_forward(frag, q.double(), k.double(), v.double(), scale=a["qk_scale"] / _LOG2E,
                                   q_offset=a["q_offset"], k_offset=a["k_offset"], n_q=a["n_q"], n_k=a["n_k"],
                                   pattern_args=a["pattern_args"], block_m=rows, block_n=block_n, walked=walked,
                                   kernel=self.kind)
        self.results.append(types.SimpleNamespace(out=out, lse=lse, walked=walked, block_m=rows, block_n=block_n,
                                                  q=q, k=k, args=a))
        o.copy_(out.to(o.dtype))
        write_lse(a, lse)


_LOG2E = 1.4426950408889634


def write_lse(a: dict, lse: torch.Tensor) -> None:
    """What a forward kernel launched with the bound arguments ``a`` writes of the natural-log ``lse``
    [B, H, Nq]: itself with RETURN_LSE, and in log2 units with STORE_RAW too (the backward's)."""
    if a["RETURN_LSE"]:
        a["lse_ptr"].view(lse.shape).copy_(lse.float())
        if a["STORE_RAW"]:
            a["lse_raw_ptr"].view(lse.shape).copy_((lse * _LOG2E).float())


def emulated_forwards(monkeypatch) -> dict:
    """ATTNCC_BACKEND=gluon on the CPU: the device checks a CPU fails stubbed (an sm90 with 132 SMs),
    the bind cache fresh, and the forward kernels' runs emulated; {"ws": ..., "pipelined": ...} of
    their :class:`EmulatedForward` stand-ins."""
    from attncc.runtime import backend, call as call_mod
    from attncc.runtime.gluon import fwd_pipelined, fwd_ws, launch

    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    monkeypatch.setattr(call_mod, "_BOUND", {})
    monkeypatch.setattr(backend, "device_problem", lambda device: None)
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "check_devices", lambda q, k, v: None)
    monkeypatch.setattr(launch, "check_config", lambda config, head_dim: None)  # small tiles on the CPU
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        multi_processor_count=132, name="stub H100"))
    stubs = {"ws": EmulatedForward(fwd_ws.attn_fwd_ws, "ws"),
             "pipelined": EmulatedForward(fwd_pipelined.attn_fwd_pipelined, "pipelined")}
    monkeypatch.setattr(fwd_ws.attn_fwd_ws, "run", stubs["ws"])
    monkeypatch.setattr(fwd_pipelined.attn_fwd_pipelined, "run", stubs["pipelined"])
    return stubs
