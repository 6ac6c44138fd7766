"""The naive, dense, float64 truth of the spec semantics (``attncc.reference``).

Nothing clever: every (b, h, i, j) is evaluated, the scores are a dense
``[B, Hq, Nq, Nk]`` tensor and the softmax is ``torch``'s. The sympy trees of a
Pattern are walked node by node (:func:`evaluate`: :mod:`attncc.evaluator` on torch
tensors), never printed to source and ``eval``-ed, so the reference shares no code
with the analysis or the templates it checks. Built-ins take their numbers from
:mod:`attncc.core.semantics`, the one place that defines them.

Public: :func:`reference`, :func:`pair_mask`, :func:`evaluate`, :func:`index_env`,
:func:`rotary`, :func:`feature_map`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from attncc.core import semantics
from attncc.core.feature_maps import LINEAR_DENOMINATOR_EPS, performer_projection
from attncc.evaluator import Evaluator, TorchArrays
from attncc.spec.ir import Pattern

_INT, _FLOAT, _BOOL = torch.int64, torch.float64, torch.bool
# The reference's keywords besides attention()'s, each taken only where no param or input of the
# spec has its name (the spec's name wins, as a param `scale` takes attention()'s scale=; a spec
# with dropout may name none of them: attncc.spec.names.REFERENCE_DROPOUT_KEYWORDS).
_EXTRA_KEYWORDS = ("scale", "dropout_p", "keep_mask")
# A linear pattern's (it has no params or inputs): its attention()'s own keywords, as they mean there
_LINEAR_KEYWORDS = ("initial_state", "return_state", "seed")

# --------------------------------------------------------------------------------------
# sympy -> torch
# --------------------------------------------------------------------------------------


def evaluate(expr, env: Mapping[str, Any], live: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Evaluate a Pattern expression on broadcastable tensors.

    ``env`` maps names to values: symbol names (``"b"``, ``"h"``, ``"i"``, ``"j"``,
    ``"n_q"``, ``"n_k"``, ``"n_heads"``, ``"s"``, params) to tensors or Python numbers,
    and input names to the input tensors. Integer results are int64, real results
    float64, conditions bool; the result broadcasts over the shapes in ``env``.
    Integer ``//`` and ``%`` follow Python (floor) semantics exactly.
    (:class:`attncc.evaluator.Evaluator` on torch tensors, on the device of ``env``'s tensors.)
    ``live`` (bool, broadcastable): the pairs whose value is used; autograd passes no gradient
    through the others, even where the expression's derivative is not finite there.
    """
    device = next((v.device for v in env.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    return Evaluator(TorchArrays(device), env, live)(expr)


# --------------------------------------------------------------------------------------
# the index grids and the mask
# --------------------------------------------------------------------------------------


def _param_values(pattern: Pattern, overrides: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    values = dict(pattern.param_values)
    for name, v in (overrides or {}).items():
        if name not in values:
            raise TypeError(f"pattern '{pattern.name}' has no param '{name}' (params: {', '.join(values) or 'none'})")
        p = pattern.param(name)  # the one check of a param's value, the generated modules' calls' own
        values[name] = semantics.param_value(name, p.kind, v, count=p.value if p.count else None,
                                             who=f"pattern '{pattern.name}'")
    # float params as the generated modules take them (-0.0 is 0.0: semantics.param_float)
    return {name: semantics.param_float(v) if pattern.param(name).kind == "float" else v for name, v in values.items()}


def _check_inputs(pattern: Pattern, inputs: Mapping[str, Any], batch: int, heads: int,
                  positions: Optional[int] = None, ends: Optional[Tuple[int, int]] = None) -> Dict[str, torch.Tensor]:
    """Check the inputs as the generated modules do (shape, an ``"n"`` dim covering ``positions``, or
    only the query (key) positions' ``ends`` where the pattern reads it at those alone,
    dtype) and return them with the values the kernels read: a float tensor's values rounded to the
    declared float type (a float64 tensor in a float32 input is rounded to float32's values, kept in float64,
    a float32 one in a bfloat16 input to bfloat16), an integer one given to a bool input as ``!= 0``,
    integer ones at their own values. A float tensor for an integer or bool input, a bool one for
    an integer input and an integer or bool one for a float input are refused (``TypeError``)."""
    out = {}
    for decl in pattern.inputs:
        if decl.name not in inputs or inputs[decl.name] is None:
            raise ValueError(f"pattern '{pattern.name}' needs input '{decl.name}' "
                             f"(dims {list(decl.dims)}, dtype {decl.dtype}); it was not given")
        t = inputs[decl.name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"input '{decl.name}' must be a torch.Tensor, got {type(t).__name__}")
        expected = {"b": batch, "h": heads}
        need = [semantics.positions_to_cover(a, ends, positions) for a in pattern.position_axes(decl.name)]
        ok = t.dim() == len(decl.dims) and all(
            (d == "n" and (need[k] is None or t.shape[k] >= need[k])) or t.shape[k] == expected.get(d, d)
            for k, d in enumerate(decl.dims))
        if not ok:
            want = ", ".join((f"n>={need[k]}" if need[k] is not None else "n>=positions") if d == "n"
                             else str(expected.get(d, d)) for k, d in enumerate(decl.dims))
            raise ValueError(f"input '{decl.name}' has dims {list(decl.dims)}: expected shape [{want}] (an 'n' dim covers "
                             f"every position of the call), got {tuple(t.shape)}")
        want = getattr(torch, decl.dtype)
        want_float = want.is_floating_point
        if not semantics.input_dtype_accepted(t.dtype, want):
            also = "another float type" if want_float else "an integer type, read as != 0" if want == torch.bool \
                else "another integer type"
            raise TypeError(f"input '{decl.name}' must be {decl.dtype} (or {also}), got {str(t.dtype).replace('torch.', '')}"
                            f"{semantics.input_dtype_hint(t.dtype)}")
        if t.dtype != want and want_float:
            # the values the kernels read (rounded to the declared type), in a dtype that holds the
            # given and the declared values exactly, with the gradient of the given tensor: a float64
            # table declared float32 keeps float64 arithmetic and float64 gradients
            wide = torch.promote_types(t.dtype, want)
            rounded = t.to(want).to(wide)
            t = t.to(wide)
            # (an entry the rounding keeps is taken as it is: -inf + (-inf - -inf) would be NaN, where
            # a -inf bias entry removes its pair)
            t = torch.where(rounded == t, t, t + (rounded - t).detach())
        elif t.dtype != want and want == torch.bool:
            t = t.to(want)  # integers to bool: != 0
        out[decl.name] = t
    unknown = set(inputs) - {d.name for d in pattern.inputs}
    if unknown:
        raise TypeError(f"pattern '{pattern.name}' has no input(s) {sorted(unknown)} "
                        f"(inputs: {', '.join(d.name for d in pattern.inputs) or 'none'})")
    return out


def index_env(pattern: Pattern, *, batch: int, heads: int, q_rows: int, k_rows: int, q_offset: int = 0,
              k_offset: int = 0, n_q: Optional[int] = None, n_k: Optional[int] = None,
              inputs: Optional[Mapping[str, torch.Tensor]] = None, params: Optional[Mapping[str, Any]] = None,
              device=None, sequence: Optional[int] = None) -> Dict[str, Any]:
    """The environment :func:`evaluate` needs for ``pattern``: broadcast int64 grids
    ``b [B,1,1,1]``, ``h [1,H,1,1]``, ``i [1,1,Nq,1]`` (= q_offset + row), ``j [1,1,1,Nk]``
    (= k_offset + row), the scalars ``n_q``, ``n_k``, ``n_heads`` (= heads), the params
    (defaults overridden by ``params``) and the input tensors. ``sequence``: sequence ``s`` of a
    packed call, whose ``b`` grid is that one row, ``b = s`` (the inputs hold ``batch`` rows)."""
    inputs = _check_inputs(pattern, dict(inputs or {}), batch, heads,
                           positions=max(q_offset + q_rows, k_offset + k_rows),
                           ends=(q_offset + q_rows, k_offset + k_rows))
    if device is None:
        device = next((t.device for t in inputs.values()), torch.device("cpu"))
    ar = lambda n, start=0: torch.arange(start, start + n, dtype=_INT, device=device)  # noqa: E731
    env: Dict[str, Any] = {
        "b": (ar(batch) if sequence is None else ar(1, sequence)).view(-1, 1, 1, 1),
        "h": ar(heads).view(1, -1, 1, 1),
        "i": ar(q_rows, q_offset).view(1, 1, -1, 1),
        "j": ar(k_rows, k_offset).view(1, 1, 1, -1),
        "n_q": q_offset + q_rows if n_q is None else int(n_q),
        "n_k": k_offset + k_rows if n_k is None else int(n_k),
        "n_heads": heads,
    }
    env.update(_param_values(pattern, params))
    env.update(inputs)
    return env


def pair_mask(pattern: Pattern, *, q_rows: int, k_rows: int, q_offset: int = 0, k_offset: int = 0,
              n_q: Optional[int] = None, n_k: Optional[int] = None, batch: int = 1, heads: int = 1,
              inputs: Optional[Mapping[str, torch.Tensor]] = None, params: Optional[Mapping[str, Any]] = None,
              device=None) -> torch.Tensor:
    """``pattern.mask`` on every pair: a bool tensor ``[batch, heads, q_rows, k_rows]``.

    Entry ``[b, h, r, c]`` tells whether query position ``i = q_offset + r`` may attend to
    key position ``j = k_offset + c``. ``n_q``/``n_k`` default to ``q_offset + q_rows`` and
    ``k_offset + k_rows``; ``params`` overrides param defaults by name; ``inputs`` maps
    input names to tensors. A pattern without a mask (``None``) allows every pair; a linear
    pattern's causality lives in its feature map, not here. ``device`` defaults to the
    inputs' device, else the CPU.
    """
    _check_pattern("pair_mask", pattern)
    env = index_env(pattern, batch=batch, heads=heads, q_rows=q_rows, k_rows=k_rows, q_offset=q_offset,
                    k_offset=k_offset, n_q=n_q, n_k=n_k, inputs=inputs, params=params, device=device)
    return _mask_from_env(pattern, env, (batch, heads, q_rows, k_rows))


def _check_pattern(who: str, pattern) -> None:
    """A TypeError that says how to get a Pattern, for anything else (a spec path, TOML text, a dict or a
    generated module raised AttributeError "... has no attribute 'heads_q'")."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"{who}(): pattern must be an attncc Pattern, from attncc.load_spec(path) or "
                        f"attncc.parse_spec(toml_text), got {type(pattern).__name__}")


def _mask_from_env(pattern: Pattern, env, shape) -> torch.Tensor:
    device = env["i"].device
    if pattern.mask is None:
        return torch.ones(shape, dtype=_BOOL, device=device)
    return evaluate(pattern.mask, env).to(_BOOL).expand(shape).clone()


# --------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float, style: str, rotary_dim: int) -> torch.Tensor:
    """Rotary embedding of ``x [..., N, D]`` at ``positions [N]`` (float64 math).

    Frequencies ``theta ** (-2m / rotary_dim)``, ``m = 0 .. rotary_dim/2 - 1``; only the first
    ``rotary_dim`` dims rotate. ``"neox"`` pairs dim ``m`` with ``m + rotary_dim/2`` (GPT-NeoX,
    LLaMA); ``"gptj"`` pairs ``2m`` with ``2m + 1`` (GPT-J).
    """
    half = rotary_dim // 2
    inv_freq = theta ** (-2.0 * torch.arange(half, dtype=_FLOAT, device=x.device) / rotary_dim)
    angle = positions.to(_FLOAT)[:, None] * inv_freq[None, :]  # [N, half]
    cos, sin = angle.cos(), angle.sin()
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if style == "neox":
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    elif style == "gptj":
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    else:
        raise ValueError(f"unknown rope style {style!r} (expected 'neox' or 'gptj')")
    return torch.cat([out, rest], dim=-1)


def feature_map(x: torch.Tensor, fmap, positions: Optional[torch.Tensor] = None, period: Optional[int] = None) -> torch.Tensor:
    """Linear attention's ``phi`` on the last dim of ``x`` (float64). cosFormer also needs the
    rows' ``positions`` (``[N]``, along dim -2) and ``period`` M (the sequence length)."""
    name = fmap.name
    if name == "elu+1":
        return F.elu(x) + 1.0
    if name == "relu":
        return F.relu(x)
    if name == "identity":
        return x
    if name == "performer":
        d = x.shape[-1]
        w = performer_projection(fmap.features, d, fmap.seed, dtype=x.dtype, device=x.device)
        xs = x * d**-0.25
        return torch.exp(xs @ w.T - 0.5 * (xs * xs).sum(-1, keepdim=True)) / math.sqrt(fmap.features)
    if name == "cosformer":
        # relu(x_i) [cos, sin](pi i / 2M): phi(q_i).phi(k_j) = relu(q_i).relu(k_j) cos(pi (i - j) / 2M)
        if positions is None or period is None:
            raise ValueError("the cosformer feature map needs the rows' positions and the period M")
        angle = (math.pi / (2 * period)) * positions.to(x.dtype)[:, None]
        return torch.cat([F.relu(x) * torch.cos(angle), F.relu(x) * torch.sin(angle)], dim=-1)
    if name == "taylor":
        # [x / d^(1/4), vec(x x^T) / sqrt(2 d), 1]: phi(q).phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d)
        d = x.shape[-1]
        quadratic = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2 * d)
        return torch.cat([x * d**-0.25, quadratic, torch.ones_like(x[..., :1])], dim=-1)
    raise NotImplementedError(f"the reference does not implement the {name!r} feature map yet")


def _check_qkv(pattern: Pattern, q, k, v):
    for n, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{n} must be a 4-D tensor [B, H, N, D], got {got}")
        if t.is_complex():  # (cast to float64, its imaginary part was dropped with a warning)
            raise TypeError(f"{n} must be a real tensor (computed in float64), got {str(t.dtype).replace('torch.', '')}")
    (bq, hq, _, d), (bk, hk, nk, dk), (bv, hv, nv, dv) = q.shape, k.shape, v.shape
    if not (d and dv):  # (the default scale 1/sqrt(D) raised ZeroDivisionError)
        raise ValueError(f"head dims D and Dv must be at least 1 (as a call's), got D = {d}, Dv = {dv}")
    if not (bq == bk == bv or bk == bv == 1):
        raise ValueError(f"q, k, v batch sizes differ: {bq}, {bk}, {bv} (k and v take q's batch size, or 1)")
    if dk != d:
        raise ValueError(f"q and k head dims differ: {d} and {dk}")
    if hk != hv or nk != nv:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on heads and length")
    if hq == 0 or hk == 0:
        raise ValueError(f"q has {hq} heads, k/v have {hk}: each needs at least one head (as a call's)")
    if hq % hk:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hk})")
    if pattern.heads_q is not None and hq != pattern.heads_q:
        raise ValueError(f"pattern '{pattern.name}' fixes {pattern.heads_q} query heads, q has {hq}")
    if pattern.heads_kv is not None and hk != pattern.heads_kv:
        raise ValueError(f"pattern '{pattern.name}' fixes {pattern.heads_kv} key/value heads, k has {hk}")


def reference(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, /, *, return_lse: bool = False,
              q_offset: int = 0, k_offset: int = 0, n_q: Optional[int] = None, n_k: Optional[int] = None,
              cu_seqlens_q: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
              max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None, **inputs_and_params):
    """The semantics of ``pattern`` on ``q [B,Hq,Nq,D]``, ``k [B,Hkv,Nk,D]``, ``v [B,Hkv,Nk,Dv]``.

    Computes densely in float64 on q's device and returns ``o [B,Hq,Nq,Dv]`` (float64), or
    ``(o, lse)`` with ``lse [B,Hq,Nq]`` (float64, natural log) when ``return_lse``. Query
    head ``h`` reads kv head ``h // (Hq // Hkv)``; positions are ``i = q_offset + row``,
    ``j = k_offset + row``. Inputs and param overrides come by keyword; two more keywords
    are accepted unless a param or input has that name: ``scale`` (overrides the
    pattern's scale), ``dropout_p`` (default ``pattern.dropout``) and ``keep_mask`` (below).
    ``pattern``, ``q``, ``k``, ``v`` are positional only: a param or input may be named ``pattern``.

    Softmax: rows with no allowed key give ``o = 0`` and ``lse = -inf``. Dropout applies
    only when ``keep_mask`` (bool, broadcastable to ``[B,Hq,Nq,Nk]``) is given: ``p`` is
    multiplied by ``keep_mask / (1 - dropout_p)`` after the softmax (lse is unaffected).

    Packed sequences (softmax), as the generated ``attention`` takes them (docs §5): with
    ``cu_seqlens_q`` / ``cu_seqlens_k`` (int32 / int64 ``[S + 1]``) q, k, v are ``[1, H, total, D]``
    and sequence ``s`` is computed on its own rows (:func:`_packed`).

    Linear: ``o_i = phi(q_i).S_i / (phi(q_i).z_i + 1e-6)`` (the ``1e-6``,
    ``attncc.runtime.feature_maps.LINEAR_DENOMINATOR_EPS``, keeps an all-zero denominator
    from giving NaN), causal over global positions ``j <= i`` when the feature map is.
    cosFormer's M is ``max(n_q, n_k)``. Its keywords are the generated ``attention``'s:
    ``initial_state``, ``return_state`` and the performer's ``seed`` (:func:`_linear`).
    """
    _check_pattern("reference", pattern)
    _check_qkv(pattern, q, k, v)
    known_inputs = [d.name for d in pattern.inputs]
    known_params = [p.name for p in pattern.params]
    extras = [x for x in (_LINEAR_KEYWORDS if pattern.kind == "linear" else _EXTRA_KEYWORDS)
              if x not in known_inputs and x not in known_params]
    inputs, params, opts = {}, {}, {}
    for name, value in inputs_and_params.items():
        if name in known_inputs:
            inputs[name] = value
        elif name in known_params:
            params[name] = value
        elif name in extras:
            opts[name] = value
        else:
            known = known_inputs + known_params + extras
            raise TypeError(f"reference() got an unexpected keyword '{name}' for pattern '{pattern.name}' "
                            f"(inputs: {', '.join(known_inputs) or 'none'}; params: {', '.join(known_params) or 'none'}; "
                            f"also: {', '.join(extras)}; known: {', '.join(known)})"
                            + semantics.foreign_keyword_hints([name]))
    # checked whether or not a keep mask applies it, as the generated modules check theirs
    dropout_p = (semantics.dropout_probability("reference(): dropout_p", opts["dropout_p"]) if "dropout_p" in opts
                 else pattern.dropout)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    packing = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if any(x is not None for x in packing):
        if (q_offset is not False and q_offset != 0) or (k_offset is not False and k_offset != 0) \
                or n_q is not None or n_k is not None:
            raise ValueError("q_offset, k_offset, n_q, n_k cannot be combined with cu_seqlens: every packed sequence "
                             "starts at position 0 and has its own n_q, n_k")
        o, lse = _packed(pattern, q, k, v, *packing, inputs=inputs, params=params, opts=opts, dropout_p=dropout_p)
        return (o, lse) if return_lse else o
    q_offset, k_offset, n_q, n_k = _positions(q_offset, k_offset, n_q, n_k, q.shape[2], k.shape[2])
    if opts.get("keep_mask") is not None:
        opts["keep_mask"] = _keep_mask(opts["keep_mask"], (*q.shape[:3], k.shape[2]), "[B, Hq, Nq, Nk]")
    if k.shape[0] != q.shape[0]:  # k, v of batch 1: broadcast over q's batch (as FlexAttention)
        k, v = k.expand(q.shape[0], *k.shape[1:]), v.expand(q.shape[0], *v.shape[1:])
    return _attention(pattern, q, k, v, return_lse=return_lse, q_offset=q_offset, k_offset=k_offset, n_q=n_q, n_k=n_k,
                      inputs=inputs, params=params, opts=opts, dropout_p=dropout_p)


def _positions(q_offset, k_offset, n_q, n_k, Nq: int, Nk: int):
    """The call's offsets and lengths checked as the generated modules check them (ints, numpy's ints or
    one-element tensors, no booleans; offsets from 0, ``n_q >= q_offset + Nq``, ``n_k >= k_offset + Nk``,
    positions below 2**62): the reference computed with ``q_offset=2.5``, ``True`` or an ``n_q`` shorter
    than the rows, which a call refuses. ``n_q``, ``n_k`` stay None when not given."""
    q_offset = semantics.int_argument("reference(): q_offset", q_offset)
    k_offset = semantics.int_argument("reference(): k_offset", k_offset)
    if max(q_offset + Nq, k_offset + Nk) >= semantics.INT_LIMIT:
        raise ValueError(f"positions must stay below 2**62, got q_offset + Nq = {q_offset + Nq}, "
                         f"k_offset + Nk = {k_offset + Nk}")
    lengths = []
    for arg, n, offset, rows, which in (("n_q", n_q, q_offset, Nq, "query"), ("n_k", n_k, k_offset, Nk, "key")):
        if n is not None:
            n = semantics.int_argument(f"reference(): {arg}", n)
            if n < offset + rows:
                raise ValueError(f"{arg} = {n} is shorter than the call's {which} rows, which are positions "
                                 f"{offset}..{offset + rows - 1} ({arg} must be >= {offset + rows})")
        lengths.append(n)
    return (q_offset, k_offset, *lengths)


def _keep_mask(keep, shape: Tuple[int, ...], dims: str) -> torch.Tensor:
    """``keep_mask`` as a bool tensor broadcast to ``shape`` (named ``dims``): True (or 1) where a pair is
    kept. Any other value is refused (an int mask holding 2 doubled the pair's weight), and so is a mask
    that does not broadcast to the call's pairs (a 5-D one made o 5-D; a wrong length raised torch's
    broadcasting error, which named neither keep_mask nor the shape it takes)."""
    keep = torch.as_tensor(keep)
    if keep.dtype != torch.bool:
        if keep.is_complex() or not bool(((keep == 0) | (keep == 1)).all()):
            raise ValueError(f"reference(): keep_mask must be bool (or hold only 0 and 1: dropout_keep_mask's "
                             f"pairs kept), got {str(keep.dtype).replace('torch.', '')} values other than 0 and 1")
        keep = keep != 0
    if keep.dim() > len(shape) or not all(n in (1, m) for n, m in zip(keep.shape[::-1], shape[::-1])):
        raise ValueError(f"reference(): keep_mask must broadcast to the call's pairs {dims} = {list(shape)}, got "
                         f"shape {list(keep.shape)}")
    return keep.broadcast_to(shape)


def _attention(pattern: Pattern, q, k, v, *, return_lse: bool, q_offset: int, k_offset: int, n_q, n_k, inputs: dict,
               params: dict, opts: dict, dropout_p: float, sequence: Optional[int] = None, batch: Optional[int] = None):
    """:func:`reference` of checked arguments (k, v of q's batch). ``sequence``, ``batch``: sequence
    ``s`` of a packed call of ``batch`` sequences, whose rows q, k, v are (see :func:`_packed`)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    device = q.device
    qf, kf, vf = q.to(device=device, dtype=_FLOAT), k.to(device=device, dtype=_FLOAT), v.to(device=device, dtype=_FLOAT)
    group = Hq // Hkv
    kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    q_pos = torch.arange(q_offset, q_offset + Nq, dtype=_INT, device=device)
    k_pos = torch.arange(k_offset, k_offset + Nk, dtype=_INT, device=device)

    if pattern.kind == "linear":
        if return_lse:
            raise ValueError(f"return_lse applies to softmax patterns; '{pattern.name}' is kind = 'linear'")
        _check_inputs(pattern, inputs, B, Hq)
        _param_values(pattern, params)
        period = max(q_offset + Nq if n_q is None else n_q, k_offset + Nk if n_k is None else n_k, 1)
        return _linear(pattern, qf, kf, vf, q_pos, k_pos, period, group=group, **opts)

    env = index_env(pattern, batch=B if batch is None else batch, heads=Hq, q_rows=Nq, k_rows=Nk, q_offset=q_offset,
                    k_offset=k_offset, n_q=n_q, n_k=n_k, inputs=inputs, params=params, device=device, sequence=sequence)
    if pattern.rope is not None:
        rd = pattern.rope.rotary_dim or D
        if rd % 2 or rd > D:
            raise ValueError(f"rotary_dim {rd} must be even and <= the head dim {D}")
        qf = rotary(qf, q_pos, pattern.rope.theta, pattern.rope.style, rd)
        kf = rotary(kf, k_pos, pattern.rope.theta, pattern.rope.style, rd)
    scale = opts.get("scale", pattern.scale)
    scale = 1.0 / math.sqrt(D) if scale is None else semantics.plain_number(scale, "reference(): scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a positive number, got {type(scale).__name__} {scale!r}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")

    allowed = _mask_from_env(pattern, env, (B, Hq, Nq, Nk))
    # Non-finite values in q, k, v (contract v1, "Non-finite values") reach exactly the rows that
    # attend to them, in the forward and in autograd's backward: each pair's factors are masked
    # before they meet (a disallowed pair multiplies zeros, never 0 * NaN). Finite inputs take the
    # plain matrix products.
    exact = not all(bool(torch.isfinite(t).all()) for t in (qf, kf, vf))
    if exact:
        pair = allowed[..., None]
        s = scale * (torch.where(pair, qf[:, :, :, None, :], 0.0) * torch.where(pair, kf[:, :, None, :, :], 0.0)).sum(-1)
    else:
        s = scale * (qf @ kf.transpose(-1, -2))  # [B, Hq, Nq, Nk]

    def scores(qk, live):
        """Steps 1-3 on the scaled products ``qk``; a pair outside ``live`` passes no gradient back."""
        out = TorchArrays.gradient_only_where(qk, live)
        if pattern.bias is not None:
            out = out + evaluate(pattern.bias, env, live).to(_FLOAT)
        if pattern.mod is not None:
            out = evaluate(pattern.mod, {**env, "s": out}, live).to(_FLOAT).expand(B, Hq, Nq, Nk)
        if pattern.softcap is not None:  # -inf (a pair the mod removes) stays -inf
            out = torch.where(out == -math.inf, out, pattern.softcap * torch.tanh(out / pattern.softcap))
        return out

    # A pair without weight (masked, or a score of -inf) passes no gradient to q, k or an input, as
    # in the kernels (dS is 0 where P is): a derivative of the bias, the mod or the softcap that is
    # inf or NaN there (abs(s) ** t at a score of 0, w[h] * pad[b, j] at pad = -inf) must not make 0 * inf.
    live = allowed
    if torch.is_grad_enabled() and (s.requires_grad or any(isinstance(t, torch.Tensor) and t.requires_grad
                                                           for t in inputs.values())):
        with torch.no_grad():
            live = allowed & (scores(s, None) != -math.inf)
    s = scores(s, live)

    s = torch.where(allowed, s, torch.full_like(s, -math.inf))
    # Rows without a key (every score -inf: masked, or removed by the transform) give o = 0 and
    # lse = -inf, and zero gradients: their logsumexp is taken of zeros (its backward at all -inf
    # would be 0 * NaN). A NaN or +inf LSE (a NaN or +inf score) stays, and makes its row NaN: a
    # non-finite value is never turned into zeros.
    empty = (s == -math.inf).all(-1)
    lse = torch.logsumexp(torch.where(empty[..., None], torch.zeros_like(s), s), dim=-1)
    lse = torch.where(empty, torch.full_like(lse, -math.inf), lse)
    # torch's softmax (against the row's max), not exp(s - lse): where the scores are so large that
    # the LSE rounds log(n) away (a bias of 1e17: lse = 1e17 + log(n) is 1e17 in float64), the
    # weights exp(s - lse) summed to n, not 1 (o was n times the average of v)
    p = torch.softmax(torch.where(empty[..., None], torch.zeros_like(s), s), dim=-1)
    p = torch.where(allowed & ~empty[..., None], p, torch.zeros_like(p))
    keep_mask = opts.get("keep_mask")
    if keep_mask is not None:
        p = p * keep_mask.to(device=device, dtype=_FLOAT) / (1.0 - dropout_p)
    if exact:
        pair = allowed[..., None]
        o = (torch.where(pair, p[..., None], 0.0) * torch.where(pair, vf[:, :, None, :, :], 0.0)).sum(-2)
    else:
        o = p @ vf
    return (o, lse) if return_lse else o


def _packed(pattern: Pattern, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, inputs: dict,
            params: dict, opts: dict, dropout_p: float):
    """(o, lse) of a packed call, as the generated ``attention`` defines it (docs §5): sequence ``s`` is
    rows ``cu_q[s]:cu_q[s+1]`` of q and ``cu_k[s]:cu_k[s+1]`` of k, v, at positions from 0 with its own
    ``n_q``, ``n_k`` (its lengths) and ``b = s`` (inputs with a ``"b"`` dim hold S rows, an ``"n"`` dim
    covers ``max_seqlen``); rows past ``cu_q[-1]`` give ``o = 0``, ``lse = -inf``. A ``keep_mask`` is the
    padded batch's, broadcastable to ``[S, Hq, max_seqlen_q, max_seqlen_k]`` (sequence ``s`` reads row
    ``s``, as the kernels draw it). The cu_seqlens are checked as the generated modules check CPU ones."""
    if pattern.kind == "linear":
        raise TypeError(f"cu_seqlens apply to softmax patterns; '{pattern.name}' is kind = 'linear' (its attention "
                        f"takes no packed sequences)")
    if cu_seqlens_q is None or cu_seqlens_k is None:
        given = "cu_seqlens_q" if cu_seqlens_q is not None else "cu_seqlens_k" if cu_seqlens_k is not None \
            else "max_seqlen only"
        raise ValueError(f"packed sequences need both cu_seqlens_q and cu_seqlens_k, got {given}")
    if q.shape[0] != 1 or k.shape[0] != 1:
        raise ValueError(f"with cu_seqlens q, k, v are packed as [1, H, total, D]; got batch {q.shape[0]} (q) and "
                         f"{k.shape[0]} (k)")
    ends, longest = [], []
    for arg, cu, total, given in (("cu_seqlens_q", cu_seqlens_q, q.shape[2], max_seqlen_q),
                                  ("cu_seqlens_k", cu_seqlens_k, k.shape[2], max_seqlen_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64):
            got = str(cu.dtype).replace("torch.", "") if isinstance(cu, torch.Tensor) else type(cu).__name__
            raise TypeError(f"{arg} must be an int32 or int64 tensor, got {got}")
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{arg} must have shape [S + 1] with S >= 1 sequences, got shape {tuple(cu.shape)}")
        at = cu.tolist()
        if at[0] != 0:
            raise ValueError(f"{arg} must start at 0, got {at[0]}")
        if any(b < a for a, b in zip(at, at[1:])):
            raise ValueError(f"{arg} must be non-decreasing (cumulative lengths)")
        if at[-1] > total:
            raise ValueError(f"{arg} ends at {at[-1]}, past the {total} packed rows")
        most = max(b - a for a, b in zip(at, at[1:]))
        if given is not None:
            name = arg.replace("cu_seqlens", "max_seqlen")
            given = semantics.int_argument(f"reference(): {name}", given)
            if given < most:
                raise ValueError(f"{name} = {given} is less than the longest sequence ({most})")
        ends.append(at)
        longest.append(min(most if given is None else given, total))  # (no sequence is longer than the rows)
    if len(ends[0]) != len(ends[1]):
        raise ValueError(f"cu_seqlens_q has {len(ends[0]) - 1} sequences, cu_seqlens_k {len(ends[1]) - 1}")
    S, Hq = len(ends[0]) - 1, q.shape[1]
    # the inputs as a packed call checks them: S batch rows, "n" covering max_seqlen
    _check_inputs(pattern, inputs, S, Hq, positions=max(longest), ends=tuple(longest))
    keep = opts.get("keep_mask")
    if keep is not None:
        keep = _keep_mask(keep, (S, Hq, *longest), "[S, Hq, max_seqlen_q, max_seqlen_k]")
    o = [torch.zeros(1, Hq, 0, v.shape[3], dtype=_FLOAT, device=q.device)]
    lse = [torch.zeros(1, Hq, 0, dtype=_FLOAT, device=q.device)]
    for s, (a, b, c, d) in enumerate(zip(ends[0], ends[0][1:], ends[1], ends[1][1:])):
        if b == a:
            continue
        o_s, lse_s = _attention(pattern, q[:, :, a:b], k[:, :, c:d], v[:, :, c:d], return_lse=True, q_offset=0,
                                k_offset=0, n_q=None, n_k=None, inputs=inputs, params=params,
                                opts=opts if keep is None else {**opts, "keep_mask": keep[s:s + 1, :, :b - a, :d - c]},
                                dropout_p=dropout_p, sequence=s, batch=S)
        o.append(o_s)
        lse.append(lse_s)
    rest = q.shape[2] - ends[0][-1]  # rows past every sequence
    o.append(torch.zeros(1, Hq, rest, v.shape[3], dtype=_FLOAT, device=q.device))
    lse.append(torch.full((1, Hq, rest), -math.inf, dtype=_FLOAT, device=q.device))
    return torch.cat(o, 2), torch.cat(lse, 2)


def _linear(pattern: Pattern, q, k, v, q_pos, k_pos, period, *, group: int = 1, initial_state=None,
            return_state=False, seed=None):
    """Linear attention on q and the k, v of every query head (kv heads repeated ``group`` times), with
    the generated ``attention``'s keywords: ``initial_state = (S [B, Hkv, F, Dv], z [B, Hkv, F])``, the
    state of keys before these, added to each row's sums; ``return_state``: also the state after
    every key, ``(o, (S, z))``; ``seed``: the performer's projection (default the spec's)."""
    fmap = pattern.feature_map
    if not isinstance(return_state, bool):
        raise TypeError(f"return_state must be a bool, got {return_state!r}")
    if seed is not None:
        if fmap.name != "performer":
            raise TypeError(f"seed= applies to the performer feature map; this one is {fmap.name!r}")
        fmap = dataclasses.replace(fmap, seed=semantics.int_argument("reference(): seed", seed, 0, 2**63 - 1))
    phi_q, phi_k = feature_map(q, fmap, q_pos, period), feature_map(k, fmap, k_pos, period)
    # the state is per kv head: row h * group of the repeated keys is kv head h
    keys, values = phi_k[:, ::group], v[:, ::group]
    state = None if initial_state is None else _state(initial_state, (*keys.shape[:2], keys.shape[-1], v.shape[-1]),
                                                     q.device)
    # phi(q_i).S_i = sum_j (phi(q_i).phi(k_j)) v_j and phi(q_i).z_i = sum_j phi(q_i).phi(k_j):
    # the quadratic form of the same sums, masked to j <= i when causal.
    if fmap.causal and not all(bool(torch.isfinite(t).all()) for t in (phi_q, phi_k, v)):
        # A non-finite feature or value reaches only the rows that sum over it (j <= i), in the
        # forward and in autograd's backward: each pair's factors are masked before they meet (a
        # masked product NaN * 0 is NaN), as the softmax path does. Row i then depends on keys
        # j <= i only, as the kernels and two calls carrying the state compute it.
        pair = (k_pos[None, :] <= q_pos[:, None])[..., None]
        a = (torch.where(pair, phi_q[:, :, :, None, :], 0.0) * torch.where(pair, phi_k[:, :, None, :, :], 0.0)).sum(-1)
        o = (torch.where(pair, a[..., None], 0.0) * torch.where(pair, v[:, :, None, :, :], 0.0)).sum(-2)
    else:
        a = phi_q @ phi_k.transpose(-1, -2)  # [B, H, Nq, Nk]
        if fmap.causal:
            a = a * (k_pos[None, :] <= q_pos[:, None]).to(a.dtype)
        o = a @ v
    den = a.sum(-1, keepdim=True)
    if state is not None:
        s0, z0 = (t.repeat_interleave(group, dim=1) for t in state)
        o, den = o + phi_q @ s0, den + phi_q @ z0[..., None]
    if fmap.normalize:
        o = o / (den + LINEAR_DENOMINATOR_EPS)
    if not return_state:
        return o
    s, z = keys.transpose(-1, -2) @ values, keys.sum(-2)
    return o, ((s, z) if state is None else (state[0] + s, state[1] + z))


def _state(state, shape, device):
    """A linear call's ``initial_state`` ``(S, z)``, checked against ``shape`` ``[B, Hkv, F, Dv]`` as the
    generated modules check it, in float64."""
    if not (isinstance(state, (tuple, list)) and len(state) == 2 and all(isinstance(t, torch.Tensor) for t in state)):
        raise TypeError(f"initial_state must be a pair (S, z) of tensors, S {list(shape)} and z {list(shape[:3])}, "
                        f"got {type(state).__name__}")
    for label, t, want in (("S", state[0], shape), ("z", state[1], shape[:3])):
        if tuple(t.shape) != tuple(want):
            raise ValueError(f"initial_state {label} must have shape {list(want)}, got {list(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"initial_state {label} must be floating, got {t.dtype}")
    return tuple(t.to(device=device, dtype=_FLOAT) for t in state)
