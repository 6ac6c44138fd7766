"""What the kernels make of the score: its terms, what leaves the key loop (pure sympy; no torch).

- :func:`softcap_of_mod`: ``c * tanh(s / c)`` (c a positive number) is the built-in softcap;
  :func:`canonical_score` rewrites such a pattern so that both produce the same kernel.
- :func:`split_mod_along_j`: the terms of a top-level sum that depend on neither the score
  nor the key position (``tan(b)``, ``f(h, i)``) shift every score of a row equally: the
  softmax cancels them, so the kernels leave them out of the key loop and add them to the
  LSE only. Not with a softcap (the tanh after the transform does not commute with a shift).
- :func:`score_terms`: the mask, the bias and the mod as the key loop computes them, their
  loop-invariant parts hoisted (:mod:`attncc.analysis.hoist`), and the terms constant along j;
  the code generator renders these, and explain reports them.
- :func:`score_report`: what the kernels do to a score (scale, bias, mod, softcap, what the
  key loop hoists and drops), for ``attncc explain``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import sympy

from attncc.analysis.derivative import score_derivative
from attncc.analysis.exact import exact_parts
from attncc.analysis.hoist import Hoister, split_along_j
from attncc.analysis.integer import integer_ops, integer_sums, recentered, ungrouped
from attncc.spec import symbols as S
from attncc.spec.builtins import FloatDiv
from attncc.spec.expr import spec_text
from attncc.spec.ir import Pattern


def softcap_of_mod(mod) -> Optional[float]:
    """``c`` when ``mod`` is ``c * tanh(s / c)`` with ``c`` a positive number, else None."""
    if mod is None:
        return None
    # the parser's float grouping and divisions as written (s / 7.5): plain arithmetic here (score code
    # is float32, and the recognized softcap computes s / c its own way)
    mod = ungrouped(mod).replace(lambda x: isinstance(x, FloatDiv), lambda x: x.args[0] / x.args[1])
    if not isinstance(mod, sympy.Mul):
        return None
    coeff, rest = mod.as_coeff_Mul()
    if not (coeff.is_number and coeff.is_positive) or not isinstance(rest, sympy.tanh):
        return None
    c = sympy.nsimplify(coeff) if coeff.is_Float else coeff
    if sympy.simplify(rest.args[0] - S.s / c) != 0:
        return None
    return float(coeff)


def canonical_score(pattern):
    """The pattern the kernels are rendered from: a mod that is a softcap becomes one, and a mod
    ``s + g`` beside a bias adds ``g`` to the bias (:func:`mod_shift`)."""
    if pattern.kind != "softmax" or pattern.softcap is not None:
        return pattern
    cap = softcap_of_mod(pattern.mod)
    if cap is not None:
        return pattern.replace(mod=None, softcap=cap)
    shift = mod_shift(pattern.mod) if pattern.bias is not None else None
    return pattern if shift is None else pattern.replace(mod=None, bias=pattern.bias + shift)


def mod_shift(mod) -> Optional[sympy.Expr]:
    """``g`` when ``mod`` is ``s + g`` with ``g`` free of the score and finite (FlexAttention's
    ``score + bias`` mods), else None. Such a mod beside a ``[score].bias`` is one bias: as the bias
    its terms constant along j leave the key loop and its terms linear in j are computed from the
    distance (:func:`along_j`); as a mod on a score that already held the bias, ``0.05 * j`` was
    computed from the absolute key position in float32 (o 5e-4 off at positions near 2**20)."""
    if mod is None:
        return None
    terms = sympy.Add.make_args(integer_sums(exact_parts(integer_ops(mod))))  # as split_mod_along_j's terms
    rest = [t for t in terms if t != S.s]
    if len(rest) != len(terms) - 1 or any(S.s in t.free_symbols or _non_finite(t) for t in rest):
        return None
    return sympy.Add(*rest)


def split_mod_along_j(mod) -> Tuple[sympy.Expr, Optional[sympy.Expr]]:
    """(the part of ``mod`` the key loop computes, the terms constant along j or None).

    Only terms of the top-level sum that are free of ``s`` and ``j`` are split off (no
    expansion: ``(s + tan(b)) * 2`` stays whole), after its integer terms are added up
    (``s + 0.1*i - 0.1*j`` is ``s + 0.1 * (i - j)``, one term along j: analysis.integer), and a
    term linear in j is computed from the distance (``0.1 * j``: ``0.1 * (j - i)`` in the loop,
    ``0.1 * i`` constant along j; analysis.integer.recentered). A term
    holding an infinity or NaN stays in the loop: ``-inf`` removes pairs there, which no shift of
    the LSE does (a transform that is ``-inf`` everywhere leaves each row without keys)."""
    loop, const = [], []
    for t in sympy.Add.make_args(integer_sums(exact_parts(integer_ops(mod)))):  # float64 steps keep their grouping
        moved = None if S.s in t.free_symbols or _non_finite(t) else recentered(t)
        if moved is not None:  # c * j: c * (j - i) in the loop, c * i constant along j
            loop.append(moved[0])
            const.append(moved[1])
        elif {S.s, S.j} & t.free_symbols or _non_finite(t):
            loop.append(t)
        else:
            const.append(t)
    if not const:
        return mod, None
    return sympy.Add(*loop), sympy.Add(*const)


def _non_finite(e) -> bool:
    """Whether ``e`` holds an infinity or NaN (``where(i < 5, 0, -inf)``, ``-inf``)."""
    return e.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan)


def mask_hoister(**kw) -> Hoister:
    """The hoister of mask code: its values are printed in float64 (as the mask is), so they
    get names of their own (``mc<n>``, ``mrow<n>``), apart from the score's, and keep the
    reference's order of operations (no integer sums regrouped: float64 is exact there)."""
    kw.setdefault("row_prefix", "mrow")
    return Hoister(scalar_prefix="mc", float32=False, **kw)


def along_j(pattern: Pattern):
    """(bias along j, mod along j, the terms constant along j or None) of ``pattern`` (the kernels'
    pattern: :func:`canonical_score`'s). Terms of the bias (or of the mod, without a softcap) that
    do not vary with j shift a whole row of scores: the softmax cancels them, so they leave the key
    loop and go to the LSE only (in float32: a call's LSE holds them to float32's precision)."""
    bias_j, mod_j, lse_row = pattern.bias, pattern.mod, None
    if pattern.bias is not None and pattern.mod is None and pattern.softcap is None:
        bias_j, lse_row = split_along_j(pattern.bias)
        bias_j = None if bias_j == 0 else bias_j
        lse_row = None if lse_row == 0 else lse_row
    if pattern.mod is not None and pattern.softcap is None:
        mod_j, lse_row = split_mod_along_j(pattern.mod)
    return bias_j, mod_j, lse_row


def score_terms(pattern: Pattern, hoist: Hoister, mask_hoist: Hoister):
    """(mask, bias along j, mod, row-constant terms, simple_bias) with loop-invariant parts hoisted
    (the mask's by ``mask_hoist``: mask code is printed in float64); :func:`along_j` splits them."""
    simple_bias = pattern.mod is None and pattern.softcap is None
    if pattern.mask is not None and pattern.mask.has(S.s):
        raise ValueError(f"{pattern.source}: the mask depends on the score s; score conditions stay in "
                         f"[score].mod (attncc.spec.load.split_mod_mask)")
    bias_j, mod_j, lse_row = along_j(pattern)
    mask = mask_hoist(pattern.mask) if pattern.mask is not None else None
    bias_j = hoist(bias_j) if bias_j is not None else None
    mod = hoist(mod_j) if mod_j is not None and mod_j != S.s else None
    return mask, bias_j, mod, lse_row, simple_bias


def score_report(pattern, head_dim: Optional[int] = None, plan=None) -> dict:
    """The ``score`` section of ``attncc explain``: what the kernels do to a score, from the
    split the code generator renders (:func:`score_terms`, on the pattern it renders:
    :func:`canonical_score`).

    Keys: ``scale`` (the number; ``scale_default``: it is 1/sqrt(head_dim), None without a head
    dim), ``bias``, ``mod`` (as written; the mask taken out of it in ``mask_from_mod``),
    ``softcap`` (the spec's or the one recognized in the mod: ``softcap_from_mod``),
    ``conditions`` (``{where, on_score}``: the conditions of the mod's ``where`` that the key
    loop evaluates per pair, on the score or not), ``dropped`` (terms constant along j: kept out of the key loop, added to the LSE only),
    ``hoisted_per_program`` / ``hoisted_per_row`` (sub-expressions computed once per program, of
    b and h, or once per query row, of b, h and i), ``loop_bias`` / ``loop_mod`` (what the key
    loop computes per pair, with the hoisted names), ``key_loop`` (its lines, in order),
    ``derivative`` (d mod / d s, which the backward uses), ``dropout`` and ``tile_dots`` (the dots
    ``plan``, the pattern's Plan, has the kernels compute as tile products: the key loop names their
    values ``dot<k>``)."""
    out = {"scale": None, "scale_default": pattern.scale is None, "bias": None, "mod": None, "mask_from_mod": None,
           "softcap": None, "softcap_from_mod": None, "conditions": [], "dropped": [], "hoisted_per_program": [],
           "hoisted_per_row": [], "loop_bias": None, "loop_mod": None, "key_loop": [], "derivative": None,
           "dropout": getattr(pattern, "dropout", 0.0) or None,
           "tile_dots": [f"dot{d.index} = {d.written}, over {d.extent} entries (padded to {d.width})"
                         for d in (plan.dots if plan is not None else ())]}
    if pattern.kind != "softmax":
        return out
    if pattern.scale is not None:
        out["scale"] = float(pattern.scale)
    elif head_dim:
        out["scale"] = 1.0 / float(head_dim) ** 0.5
    mod_mask = getattr(pattern, "mod_mask", None)
    if mod_mask is not None:
        out["mask_from_mod"] = spec_text(mod_mask)
    out["bias"] = None if pattern.bias is None else spec_text(pattern.bias)
    out["mod"] = None if pattern.mod is None else spec_text(pattern.mod)
    canon = canonical_score(plan.kernel_pattern if plan is not None else pattern)
    out["softcap"] = canon.softcap
    if pattern.softcap is None and canon.softcap is not None:
        out["softcap_from_mod"] = canon.softcap
    qk = "scale*qk"
    if canon.bias is None and canon.mod is None and canon.softcap is None:
        out["key_loop"] = [f"s = {qk}"]
        return out
    hoist = Hoister()
    _, bias_j, mod, lse_row, _ = score_terms(canon, hoist, mask_hoister())
    # the hoisted values by their kernel names (Dummies print as _c0)
    named = {sym: sympy.Symbol(sym.name) for table in (hoist.scalars, hoist.rows) for sym in table.values()}
    bias_j, mod = (None if e is None else e.xreplace(named) for e in (bias_j, mod))
    out["dropped"] = [spec_text(t) for t in sympy.Add.make_args(lse_row)] if lse_row is not None else []
    out["hoisted_per_program"] = [f"{sym.name} = {spec_text(e)}" for e, sym in hoist.scalars.items()]
    out["hoisted_per_row"] = [f"{sym.name} = {spec_text(e)}" for e, sym in hoist.rows.items()]
    out["loop_bias"] = None if bias_j is None else spec_text(bias_j)
    out["loop_mod"] = None if mod is None else spec_text(mod)
    out["key_loop"] = [f"s = {qk}" + ("" if bias_j is None else f" + {spec_text(bias_j)}")]
    if mod is not None:
        out["key_loop"].append(f"s = {spec_text(mod)}")
        out["conditions"] = [{"where": spec_text(c), "on_score": c.has(S.s)}
                             for pw in sorted(mod.atoms(sympy.Piecewise), key=sympy.default_sort_key)
                             for _, c in pw.args if c is not sympy.true]
    if canon.softcap is not None:
        out["key_loop"].append(f"s = {canon.softcap!r}*tanh(s/{canon.softcap!r})  (a removed pair stays -inf)")
    if canon.mod is not None:
        try:
            out["derivative"] = spec_text(sympy.simplify(score_derivative(canon.mod)))
        except Exception as e:  # noqa: BLE001 - the report says why there is none
            out["derivative"] = f"none: {e}"
    return out


def report_lines(score: dict) -> List[str]:
    """``score_report``'s result as the text lines of ``attncc explain``."""
    if score["scale"] is None and not score["key_loop"]:
        return []  # linear attention: no scores
    scale = "?" if score["scale"] is None else f"{score['scale']:.6g}"
    how = " = 1/sqrt(head_dim)" if score["scale_default"] else " (the spec's)"
    lines = [f"  score       scale = {scale}{how}"]
    if score["bias"] is not None:
        lines.append(f"    bias      {score['bias']}")
    if score["mod"] is not None:
        lines.append(f"    mod       {score['mod']}")
    if score["mask_from_mod"] is not None:
        lines.append(f"    mask      where({score['mask_from_mod']}, ..., -inf) became the mask (block sparsity applies)")
    if score["softcap"] is not None:
        note = "  (recognized in the mod: the built-in softcap)" if score["softcap_from_mod"] is not None else ""
        lines.append(f"    softcap   {score['softcap']!r}{note}")
    for c in score["conditions"]:
        on = ", on the score after scale and bias" if c["on_score"] else ""
        lines.append(f"    per pair  {c['where']}  (a condition the key loop evaluates per pair{on})")
    for t in score["dropped"]:
        lines.append(f"    dropped   {t}  (constant along j: cancels in the softmax, added to the LSE only)")
    for t in score.get("tile_dots", ()):
        lines.append(f"    tile dot  {t}  (one tl.dot per tile; its gradients two more)")
    for t in score["hoisted_per_program"]:
        lines.append(f"    hoisted   {t}  (once per program)")
    for t in score["hoisted_per_row"]:
        lines.append(f"    hoisted   {t}  (once per query row)")
    for n, line in enumerate(score["key_loop"]):
        lines.append(f"    {'key loop' if n == 0 else '':<10}{line}")
    if score["derivative"] is not None:
        lines.append(f"    d/ds      {score['derivative']}")
    if score["dropout"]:
        lines.append(f"    dropout   p = {score['dropout']!r} (of the probabilities, after the softmax)")
    return lines

