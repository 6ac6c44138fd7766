"""What the code generator makes of ``[score].mod`` (pure sympy; no torch).

- :func:`softcap_of_mod`: ``c * tanh(s / c)`` (c a positive number) is the built-in softcap;
  :func:`canonical_score` rewrites such a pattern so that both produce the same kernel.
- :func:`split_mod_along_j`: the terms of a top-level sum that depend on neither the score
  nor the key position (``tan(b)``, ``f(h, i)``) shift every score of a row equally: the
  softmax cancels them, so the kernels leave them out of the key loop and add them to the
  LSE only. Not with a softcap (the tanh after the transform does not commute with a shift).
- :func:`score_report`: the above plus what the key loop hoists, for ``attncc explain``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import sympy

from attncc.spec import symbols as S


def softcap_of_mod(mod) -> Optional[float]:
    """``c`` when ``mod`` is ``c * tanh(s / c)`` with ``c`` a positive number, else None."""
    if mod is None or not isinstance(mod, sympy.Mul):
        return None
    coeff, rest = mod.as_coeff_Mul()
    if not (coeff.is_number and coeff.is_positive) or not isinstance(rest, sympy.tanh):
        return None
    c = sympy.nsimplify(coeff) if coeff.is_Float else coeff
    if sympy.simplify(rest.args[0] - S.s / c) != 0:
        return None
    return float(coeff)


def canonical_score(pattern):
    """The pattern the kernels are rendered from: a mod that is a softcap becomes one."""
    if pattern.kind != "softmax" or pattern.softcap is not None:
        return pattern
    cap = softcap_of_mod(pattern.mod)
    return pattern if cap is None else pattern.replace(mod=None, softcap=cap)


def split_mod_along_j(mod) -> Tuple[sympy.Expr, Optional[sympy.Expr]]:
    """(the part of ``mod`` the key loop computes, the terms constant along j or None).

    Only terms of the top-level sum that are free of ``s`` and ``j`` are split off (no
    expansion: ``(s + tan(b)) * 2`` stays whole), after its integer terms are added up
    (``s + 0.1*i - 0.1*j`` is ``s + 0.1 * (i - j)``, one term along j: codegen.integer), and a
    term linear in j is computed from the distance (``0.1 * j``: ``0.1 * (j - i)`` in the loop,
    ``0.1 * i`` constant along j; codegen.integer.recentered). A term
    holding an infinity or NaN stays in the loop: ``-inf`` removes pairs there, which no shift of
    the LSE does (a transform that is ``-inf`` everywhere leaves each row without keys)."""
    from attncc.codegen.integer import integer_sums, recentered  # sympy only

    loop, const = [], []
    for t in sympy.Add.make_args(integer_sums(mod)):
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


def score_report(pattern) -> dict:
    """The ``score`` section of ``attncc explain``: the transform, the mask taken out of it,
    a softcap recognized in it, the terms dropped from the key loop (kept in the LSE only),
    the sub-expressions computed once per program (of b, h) or per row (of b, h, i), and the
    derivative the backward uses."""
    from attncc.codegen.hoist import Hoister  # sympy only

    out = {"mod": None, "mask_from_mod": None, "softcap_from_mod": None, "dropped": [], "hoisted_per_program": [],
           "hoisted_per_row": [], "loop_mod": None, "derivative": None}
    mod_mask = getattr(pattern, "mod_mask", None)
    if mod_mask is not None:
        out["mask_from_mod"] = str(mod_mask)
    if pattern.mod is None:
        return out
    out["mod"] = str(pattern.mod)
    canon = canonical_score(pattern)
    if canon.mod is None:
        out["softcap_from_mod"] = canon.softcap
        return out
    mod, dropped = canon.mod, None
    if canon.softcap is None:
        mod, dropped = split_mod_along_j(canon.mod)
    out["dropped"] = [str(t) for t in sympy.Add.make_args(dropped)] if dropped is not None else []
    hoist = Hoister()
    loop = hoist(mod)
    out["loop_mod"] = str(loop)
    out["hoisted_per_program"] = [f"{sym} = {e}" for e, sym in hoist.scalars.items()]
    out["hoisted_per_row"] = [f"{sym} = {e}" for e, sym in hoist.rows.items()]
    try:
        from attncc.codegen.backward import score_derivative

        out["derivative"] = str(sympy.simplify(score_derivative(canon.mod)))
    except Exception as e:  # noqa: BLE001 - the report says why there is none
        out["derivative"] = f"none: {e}"
    return out


def report_lines(score: dict) -> List[str]:
    """``score_report``'s result as the text lines of ``attncc explain``."""
    lines = []
    if score["mod"] is not None:
        lines.append(f"  score mod   {score['mod']}")
    if score["mask_from_mod"] is not None:
        lines.append(f"    mask      where({score['mask_from_mod']}, ..., -inf) became the mask (block sparsity applies)")
    if score["softcap_from_mod"] is not None:
        lines.append(f"    softcap   recognized: the built-in softcap = {score['softcap_from_mod']!r}")
    for t in score["dropped"]:
        lines.append(f"    dropped   {t}  (constant along j: cancels in the softmax, added to the LSE only)")
    for t in score["hoisted_per_program"]:
        lines.append(f"    hoisted   {t}  (once per program)")
    for t in score["hoisted_per_row"]:
        lines.append(f"    hoisted   {t}  (once per query row)")
    if score["loop_mod"] is not None:
        lines.append(f"    key loop  s = {score['loop_mod']}")
    if score["derivative"] is not None:
        lines.append(f"    d/ds      {score['derivative']}")
    return lines
