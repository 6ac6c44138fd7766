"""Which kernels run a softmax call: the generated ``tl`` kernels, or the Gluon sm90 forward and
backward (:mod:`attncc.runtime.gluon`, docs/gluon.md).

A generated module whose Plan the Gluon kernels compute (``SpecInfo.gluon``: "dense" or "causal",
a built-in walk, or "rendered", the fragments codegen rendered from the Plan into the module's
``_gluon.py`` file; :mod:`attncc.analysis.builtin` decides) starts its ``_forward`` with
``if _rt.gluon_selected(call): return _rt.gluon_forward(call, "causal")``. The eager call, the
``torch.compile`` custom op and attncc.distributed all run that ``_forward``, so they choose alike.
``ATTNCC_BACKEND`` (read on every call) says what to choose:

- unset, empty or ``auto``: the Gluon forward where it can run the call and was measured faster than
  the ``tl`` one (:func:`auto_picks_gluon`: the spec's ``SpecInfo.gluon_auto``, head dims 128 and 256),
  else the ``tl`` kernels, without an error;
- ``triton``: the ``tl`` kernels;
- ``gluon``: the Gluon forward; a call it cannot run raises a ``ValueError`` that says why (the
  spec's pattern, the device, the dtype, the head dims, ...), and so does a call of a spec the Gluon
  forward does not compute (:func:`refuse_forced`, from ``run_attention``).

Anything else is a ``ValueError`` naming the allowed values.

The backward reads only the forward's O and natural-log LSE, the same from either forward, so it is
chosen on its own: those modules' ``_backward`` opens with
``if _rt.gluon_backward_selected(call): return _rt.gluon_backward(call, "causal", o, lse, do, dlse)``
(``"rendered"``: the fragments' query-block walk, ``qmask`` and ``score_grad`` too, where the Plan's
transposed walk has a closed form; a call that breaks its precondition runs the ``tl`` backward).
``triton``: the ``tl`` backward; ``auto``: the ``tl`` backward (``attncc.runtime.gluon.AUTO_SELECTS_GLUON_BACKWARD``:
measured no faster) except where the spec's Plan picks the Gluon one (``SpecInfo.gluon_backward_auto``:
the built-in walks and single-segment rendered ones, measured faster; ws, or split under deterministic
algorithms; not with ``ATTNCC_GLUON_BWD=fused``: :func:`auto_picks_gluon_backward`);
``gluon``: the Gluon backward where it can run the call, else the ``tl`` one (it never refuses: the
forward already refused what Gluon cannot run at all, and what is left is the Gluon backward's own
limit, head dim 256, where the ``tl`` backward on the Gluon forward's output is what ran before it existed;
``attncc explain`` says which). ``decode()`` and linear attention are ``tl`` kernels whatever the setting.

``ATTNCC_GLUON_BWD`` (read on every call) says which Gluon backward runs when one does: ``split`` is
bwd.py's two kernels, deterministic (every gradient element written once by one program); ``fused`` is
bwd_fused.py's one kernel with dQ added into an fp32 accumulator by TMA reduce-adds (FlashAttention-3's
5 GEMMs per tile pair instead of 7), whose dQ may differ in its last bits from run to run; ``ws`` is
bwd_ws.py, the fused kernel warp-specialized (a producer warp, a dQ writer warp and two consumer
warpgroups), not deterministic either, as FlashAttention's backward by default. Unset or empty: ``ws``,
the fastest (H100, session 28: f+b 0.82-0.95x split's time on dense, causal, GQA, ALiBi, softcap and
D = 64 causal, within 3% of it either way on the short walks), except under
``torch.use_deterministic_algorithms(True)``, where it is ``split`` (read on every call, so the setting
can change between calls); all three passed their GPU tests on an H100 (docs/gluon.md). Anything else
is a ``ValueError``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import torch

from attncc.runtime.autograd import (alert_not_deterministic, keep_raw_lse, no_pairs, no_pairs_backward, raw_lse,
                                     seal_raw_lse)
from attncc.runtime.call import Call, dtype_name, env, interpreting
from attncc.runtime import gluon
from attncc.runtime.gluon import BWD_HEAD_DIMS, CAPABILITY, DTYPES, HEAD_DIMS

# The walks the Gluon backward has (attncc.runtime.gluon.walks: dense_qwalk, causal_qwalk).
BUILTIN_BACKWARD_WALKS = ("dense", "causal")
BACKENDS = ("auto", "triton", "gluon")
# ATTNCC_GLUON_BWD: which Gluon backward (attncc.runtime.gluon.launch.BWD_METHODS); the deterministic one
# first. Unset: DEFAULT_GLUON_BWD, or the first under torch.use_deterministic_algorithms (module docstring).
GLUON_BWD_METHODS = ("split", "fused", "ws")
DEFAULT_GLUON_BWD = "ws"


def backend_setting() -> str:
    """``ATTNCC_BACKEND``: "auto" (unset or empty), "triton" or "gluon"."""
    value = env("ATTNCC_BACKEND", "") or "auto"
    if value not in BACKENDS:
        raise ValueError(f"ATTNCC_BACKEND must be one of {', '.join(BACKENDS)} (unset: auto), got {value!r}")
    return value


def gluon_bwd_method() -> str:
    """``ATTNCC_GLUON_BWD``: "split", "fused" or "ws"; unset or empty: "ws", or "split" under
    ``torch.use_deterministic_algorithms(True)`` (module docstring)."""
    value = env("ATTNCC_GLUON_BWD", "")
    if not value:
        return GLUON_BWD_METHODS[0] if torch.are_deterministic_algorithms_enabled() else DEFAULT_GLUON_BWD
    if value not in GLUON_BWD_METHODS:
        raise ValueError(f"ATTNCC_GLUON_BWD must be one of {', '.join(GLUON_BWD_METHODS)} (unset: "
                         f"{DEFAULT_GLUON_BWD}, or {GLUON_BWD_METHODS[0]} under torch.use_deterministic_algorithms), "
                         f"got {value!r}")
    return value


def gluon_selected(call: Call) -> bool:
    """Whether the Gluon sm90 forward runs ``call`` (module docstring); raises a ``ValueError``
    saying why not when ``ATTNCC_BACKEND=gluon`` forces it on a call it cannot run."""
    setting = backend_setting()
    if setting == "triton" or (setting == "auto" and not auto_picks_gluon(call)):
        return False
    problems = gluon_problems(call)
    if problems and setting == "gluon":
        raise ValueError(forced_message(call, problems))
    return not problems


def auto_picks_gluon(call: Call) -> bool:
    """Whether ATTNCC_BACKEND=auto takes the Gluon forward for ``call`` where it can run it: the switch
    (``gluon.AUTO_SELECTS_GLUON``), the spec's Plan (``SpecInfo.gluon_auto``: not where the Gluon forward
    was measured slower), the head dim (``gluon.AUTO_HEAD_DIMS``) and the call's size
    (``gluon.AUTO_MIN_PAIRS``: smaller calls are host-bound, where the tl forward launches faster)."""
    return (gluon.AUTO_SELECTS_GLUON and call.spec.gluon_auto and call.D in gluon.AUTO_HEAD_DIMS
            and call.B * call.Hq * call.Nq * call.Nk >= gluon.AUTO_MIN_PAIRS)


def refuse_forced(call: Call) -> None:
    """A ``ValueError`` when ``ATTNCC_BACKEND=gluon`` asks for the Gluon forward on a spec that has
    none (its generated ``_forward`` has no Gluon branch); checks the setting's value for every spec."""
    if backend_setting() == "gluon" and call.spec.gluon is None:
        raise ValueError(forced_message(call, gluon_problems(call)))


def forced_message(call: Call, problems) -> str:
    return (f"{call.spec.name}.attention: ATTNCC_BACKEND=gluon, but the Gluon sm90 forward cannot run this call: "
            + "; ".join(problems) + " (ATTNCC_BACKEND=triton or auto runs the tl kernels)")


def gluon_problems(call: Call) -> Tuple[str, ...]:
    """Why the Gluon sm90 forward cannot run ``call``, one clause per reason (empty: it can).

    What depends on the call's signature only is worked out once per signature (``Call.memo``);
    the interpreter setting and the dropout probability are looked at on every call."""
    problems = call.cached("gluon_problems", lambda: _signature_problems(call))
    if interpreting():
        problems += ("Triton's interpreter (TRITON_INTERPRET=1) cannot run Gluon kernels",)
    if call.dropout_p > 0:
        problems += (f"dropout (p = {call.dropout_p}): the Gluon kernels have none",)
    return problems


def _signature_problems(call: Call) -> Tuple[str, ...]:
    spec = call.spec
    out = []
    if spec.gluon is None:
        why = f": {spec.gluon_reason}" if spec.gluon_reason else ""
        out.append(f"{spec.name}'s pattern is not one the Gluon kernels compute{why} (`attncc explain {spec.source}`)")
    where = device_problem(call.q.device)
    if where:
        out.append(where)
    if dtype_name(call.q.dtype) not in DTYPES:
        out.append(f"q, k, v are {dtype_name(call.q.dtype)}; the Gluon kernels take {' or '.join(DTYPES)}")
    if call.D not in HEAD_DIMS:
        out.append(f"head dim D = {call.D}; the Gluon kernels take {', '.join(map(str, HEAD_DIMS))}")
    if call.Dv != call.D:
        out.append(f"v's head dim Dv = {call.Dv} differs from D = {call.D}; the Gluon kernels take Dv = D")
    if call.varlen:
        out.append("packed variable-length sequences (cu_seqlens): the Gluon kernels take [B, H, N, D] batches only")
    if call.wide:
        out.append(f"positions reach {call.positions}, past the int32 arithmetic of the Gluon kernels")
    if not call.scale > 0:
        out.append(f"scale = {call.scale}; the Gluon kernels need a scale > 0")
    if call.D in HEAD_DIMS:
        try:
            from attncc.runtime.gluon import launch
        except ImportError as e:  # a Triton without Gluon
            out.append(f"this Triton has no Gluon ({e})")
        else:
            try:
                launch.check_config(gluon_config(call.D), call.D)
            except ValueError as e:
                out.append(str(e))
            if spec.gluon == "rendered":
                out += _fragment_problems(call)
    return tuple(out)


def _fragment_problems(call: Call) -> Tuple[str, ...]:
    """Why the rendered fragments of ``call``'s module cannot run it: they do not load, or the
    walk's closed form is not exact for the call (its precondition: the tl kernels then run it on
    exact block lists)."""
    try:
        fragments = call.spec.gluon_fragments.load()
    except Exception as e:  # noqa: BLE001 - any failure to import them is a reason to stay on tl
        return (f"its Gluon fragments do not load ({type(e).__name__}: {e})",)
    if not fragments.exact(call):
        return ("this call breaks the precondition of the pattern's closed-form walk (its params, lengths or "
                "offsets; `attncc explain` prints it): the tl kernels run it on exact block lists",)
    return ()


def device_problem(device: torch.device) -> Optional[str]:
    """Why the Gluon sm90 kernels cannot run on ``device`` (None: they can)."""
    if device.type != "cuda":
        return f"q is on {device}, not a CUDA GPU"
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) != CAPABILITY:
        return (f"q's GPU ({torch.cuda.get_device_name(device)}) has compute capability "
                f"{capability[0]}.{capability[1]}; the Gluon kernels are built for sm90 "
                f"({CAPABILITY[0]}.{CAPABILITY[1]}: H100, H200)")
    return None


@functools.lru_cache(maxsize=None)
def gluon_config(head_dim: int):
    """The tiles the wired forward uses: the FlashAttention-3-structured ``ws`` kernel without
    ping-pong, the fastest variant on an H200 at head dim 128 (0.96-1.00x cuDNN, docs/gluon.md;
    the other head dims not timed yet)."""
    from attncc.runtime.gluon import launch

    return dataclasses.replace(launch.default_config(head_dim, "ws"), pingpong=False)


@functools.lru_cache(maxsize=None)
def narrowed(config, head_dim: int, block_n: Optional[int]):
    """``config`` with at most ``block_n`` keys per block (a fragments file's ``BLOCK_N``: per-pair
    work that 128-key tiles would spill), the deepest K/V ring up to 4 stages that fits."""
    from attncc.runtime.gluon import launch

    if block_n is None or config.block_n <= block_n:
        return config
    for stages in (4, 3, 2):
        narrow = dataclasses.replace(config, block_n=block_n, stages=stages)
        if launch.shared_bytes(narrow, head_dim) <= launch.SM90_SHARED_BYTES - 1024:
            return narrow
    return dataclasses.replace(config, block_n=block_n)


def gluon_forward(call: Call, walk: str, lists=None, rotated=None, raw: bool = False):
    """``(o, lse)`` of ``call`` from the Gluon sm90 forward with the built-in ``walk`` ("dense",
    "causal"), or with the module's rendered fragments (``walk`` "rendered"), as the generated ``tl``
    forward returns them: o [B, Hq, Nq, D] in q's dtype, the natural-log LSE [B, Hq, Nq] in float32
    (-inf, and o = 0, on rows without an allowed key), so that the module's ``tl`` backward takes
    them unchanged. The LSE is always written (a backward may follow). ``lists(block_m, block_n)``:
    the call's forward block lists (attncc.runtime.blocks.BlockLists) for tiles of that shape, which
    fragments with a block-list walk read (``LISTS``): the module's own, as its ``tl`` kernels get them.
    ``rotated()``: q and k rotated at their positions (RoPE: the module's pre-pass), which the kernel
    then reads instead of the call's. ``raw``: the spec's score has no terms constant along j (its
    scores are those the ``tl`` backward recomputes), so the forward also writes, where a backward
    follows, the LSE in log2 units that backward reads (attncc.runtime.autograd.keep_raw_lse)."""
    if call.B == 0 or call.Nq == 0 or call.Nk == 0:  # no pair: what the tl path gives such calls (an empty
        return no_pairs(call)  # batch too: a TMA descriptor of a 0-sized dim fails Triton's assert "shape must be positive")
    kw = dict(scale=call.scale, q_offset=call.q_offset, k_offset=call.k_offset, n_q=call.n_q, n_k=call.n_k,
              return_lse=True, config=gluon_config(call.D))
    if raw and call.for_backward is not None:
        lse = torch.empty(call.B, call.Hq, call.Nq, dtype=torch.float32, device=call.q.device)
        kw.update(lse_out=lse, lse_raw_out=keep_raw_lse(call, lse))
        out = _gluon_forward(call, walk, lists, rotated, kw)
        seal_raw_lse(call)
        return out
    return _gluon_forward(call, walk, lists, rotated, kw)


def _gluon_forward(call: Call, walk: str, lists, rotated, kw: dict):
    from attncc.runtime.gluon import launch

    if walk == "rendered":
        f = call.spec.gluon_fragments.load()
        kw["config"] = narrowed(kw["config"], call.D, getattr(f, "BLOCK_N", None))
        if getattr(f, "LISTS", False):
            if lists is None:
                raise ValueError(f"{call.spec.name}: its Gluon walk reads block lists, and none were passed")
            cfg = kw["config"]
            args = f.pattern_args(call, lists(cfg.block_m, cfg.block_n), cfg.block_m)
        else:
            args = f.pattern_args(call)
        q, k = rotated() if rotated is not None else (call.q, call.k)
        return launch.attention(q, k, call.v, walk=f.walk, mask=f.mask, score=f.score,
                                segments=f.SEGMENTS, pattern_args=args, block=getattr(f, "block", None), **kw)
    return launch.attention(call.q, call.k, call.v, pattern=walk, **kw)


def gluon_backward_selected(call: Call) -> bool:
    """Whether the Gluon sm90 backward runs ``call``'s backward (module docstring); never raises for
    a call it cannot run (the ``tl`` backward runs it)."""
    setting = backend_setting()
    if setting == "triton" or (setting == "auto" and not auto_picks_gluon_backward(call)):
        return False
    return not gluon_backward_problems(call)


def auto_picks_gluon_backward(call: Call) -> bool:
    """Whether ATTNCC_BACKEND=auto takes the Gluon backward for ``call`` where it can run it: everywhere
    with the switch ``gluon.AUTO_SELECTS_GLUON_BACKWARD`` (off), else where the spec's Plan has it
    picked (``SpecInfo.gluon_backward_auto``: the built-in walks and single-segment rendered ones,
    measured faster) when the method is split or ws (``ATTNCC_GLUON_BWD`` unset, ``split`` or ``ws``:
    the ones measured there; the fused one was slower than ``tl`` on chunked local), ws only where
    deterministic algorithms are off (under ``torch.use_deterministic_algorithms`` the non-deterministic
    kernels raise where auto's ``tl`` backward runs), at ``gluon.AUTO_BWD_HEAD_DIMS`` and calls of at
    least ``gluon.AUTO_MIN_PAIRS`` pairs."""
    if gluon.AUTO_SELECTS_GLUON_BACKWARD:
        return True
    if not (call.spec.gluon_backward_auto and call.D in gluon.AUTO_BWD_HEAD_DIMS
            and call.B * call.Hq * call.Nq * call.Nk >= gluon.AUTO_MIN_PAIRS):
        return False
    method = gluon_bwd_method()
    return method == GLUON_BWD_METHODS[0] or (method == DEFAULT_GLUON_BWD
                                              and not torch.are_deterministic_algorithms_enabled())


def gluon_backward_problems(call: Call) -> Tuple[str, ...]:
    """Why the Gluon sm90 backward (the ``ATTNCC_GLUON_BWD`` method) cannot run ``call`` (empty: it
    can): the forward's reasons, and its own head dims and tiles (worked out once per call signature,
    method and ``ATTNCC_GLUON_BWD_TILES``)."""
    method, tiles = gluon_bwd_method(), env("ATTNCC_GLUON_BWD_TILES", "")
    return gluon_problems(call) + call.cached(("gluon_backward_problems", method, tiles),
                                              lambda: _backward_signature_problems(call, method))


# CUDA's cap on grid axes 1 and 2; the Gluon backward's grids put B x H on axis 1 (the tl kernels,
# attncc/runtime/gluon/fwd_ws.py's persistent forward and the generated ones, split it over two axes).
MAX_GRID_AXIS = 65535


def _backward_signature_problems(call: Call, method: str = GLUON_BWD_METHODS[0]) -> Tuple[str, ...]:
    if call.B * call.Hq > MAX_GRID_AXIS:
        return (f"B x Hq = {call.B} x {call.Hq} programs on one grid axis, past CUDA's {MAX_GRID_AXIS}: "
                f"the tl backward runs it",)
    if call.D not in HEAD_DIMS:  # the forward's reasons say it
        return ()
    if call.spec.gluon == "rendered":
        try:
            fragments = call.spec.gluon_fragments.load()
        except Exception:  # noqa: BLE001 - the forward's reasons say it
            return ()
        if fragments.qwalk is None:
            return (f"the Gluon backward does not take {call.spec.name}'s fragments: {fragments.BACKWARD_REASON}",)
        if not fragments.backward_exact(call):
            return ("this call breaks the precondition of the pattern's closed-form query-block walk (the dK/dV "
                    "kernel's): the tl backward runs it on exact block lists",)
    elif call.spec.gluon not in BUILTIN_BACKWARD_WALKS:
        return (f"the Gluon backward has no {call.spec.gluon} walk",)
    if call.D not in BWD_HEAD_DIMS:
        return (f"head dim D = {call.D}; the Gluon backward takes {', '.join(map(str, BWD_HEAD_DIMS))}",)
    try:
        from attncc.runtime.gluon import launch
    except ImportError as e:
        return (str(e),)
    config = gluon_bwd_config(call.D)  # a misspelt ATTNCC_GLUON_BWD_TILES raises, naming the variable
    try:
        launch.check_bwd_config(config, call.D, method)
    except ValueError as e:
        return (str(e),)
    return ()


def gluon_bwd_config(head_dim: int):
    """The tiles of the ``ATTNCC_GLUON_BWD`` method's kernels: ``launch.default_bwd_config``, with the
    fields that ``ATTNCC_GLUON_BWD_TILES="kv_block_n=64,kv_stages=2"`` forces (benchmarks: ``python -m
    bench CASE --sweep gluon-bwd-tiles``; read on every call, checked by ``launch.check_bwd_config``
    where used)."""
    return _gluon_bwd_config(head_dim, gluon_bwd_method(), env("ATTNCC_GLUON_BWD_TILES", ""))


@functools.lru_cache(maxsize=None)
def _gluon_bwd_config(head_dim: int, method: str, tiles: str):
    from attncc.runtime.configs import parse_fields
    from attncc.runtime.gluon import launch

    names = tuple(f.name for f in dataclasses.fields(launch.GluonBwdConfig))
    return dataclasses.replace(launch.default_bwd_config(head_dim, method),
                               **parse_fields("ATTNCC_GLUON_BWD_TILES", tiles, names))


def gluon_backward(call: Call, walk: str, o, lse, do, dlse=None, raw: bool = False):
    """``(dq, dk, dv, {})`` of ``call`` from the Gluon sm90 backward with the built-in ``walk`` ("dense",
    "causal") or the module's rendered fragments (``walk`` "rendered"), as the generated ``tl`` backward
    returns them; ``o``, ``lse`` are the forward's (either forward's), ``do``, ``dlse`` the gradients of
    the loss (``dlse`` None when the loss does not use the LSE). ``ATTNCC_GLUON_BWD`` picks the split
    (deterministic), the fused or the ws kernels (the default: :func:`gluon_bwd_method`), for either kind of walk. ``raw``: the spec's score
    has no terms constant along j, so the LSE in log2 units the forward kept for this ``lse`` (either
    forward's, :func:`gluon_forward`) is the one these kernels recompute their weights from."""
    from attncc.runtime.gluon import launch

    if call.B == 0 or call.Nq == 0 or call.Nk == 0:  # no pair (an empty batch too): what the tl path gives
        return no_pairs_backward(call, o, lse, do, dlse)
    method = gluon_bwd_method()
    if method != GLUON_BWD_METHODS[0] and torch.are_deterministic_algorithms_enabled():
        alert_not_deterministic(f"{call.spec.name}.attention's Gluon backward with ATTNCC_GLUON_BWD={method}",
                                "dQ's partials are added in float32 by TMA reduce-adds in no fixed order; "
                                "ATTNCC_GLUON_BWD=split is deterministic")
    kw = dict(scale=call.scale, q_offset=call.q_offset, k_offset=call.k_offset, n_q=call.n_q, n_k=call.n_k,
              config=gluon_bwd_config(call.D), method=method)
    if walk == "rendered":
        f = call.spec.gluon_fragments.load()
        kw.update(walk=f.walk, qwalk=f.qwalk, mask=f.mask, qmask=f.qmask, score=f.score, score_grad=f.score_grad,
                  segments=f.SEGMENTS, qsegments=f.QSEGMENTS, pattern_args=f.pattern_args(call))
    else:
        kw.update(pattern=walk)
    dq, dk, dv = launch.attention_backward(call.q, call.k, call.v, o, lse, do.to(call.q.dtype), dlse,
                                           lse_raw=raw_lse(call, lse) if raw else None, **kw)
    # already q's (= k's = v's) dtype and shapes (Dv = D); a Gluon spec has no [inputs]
    return dq, dk, dv, {}
