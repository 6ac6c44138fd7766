"""What conditions say of the signs of the names they compare, and divisors sympy proves nonzero
under them: the one rule by which ``attncc build`` refuses a per-pair divisor that may be 0, a
generated module skips the call-time check of a divisor of params that a conjunct beside it keeps
nonzero (``attncc.codegen.bounds``), and ``attncc.reference`` raises where a module would refuse
(``attncc.evaluator``)."""
from __future__ import annotations

import sympy
from sympy.core.function import AppliedUndef

from attncc.spec import symbols as S


def per_pair(e) -> bool:
    """Whether ``e`` varies per pair (positions, batch row, head, input values), rather than per
    call (params and sizes only)."""
    return bool(e.free_symbols & {S.i, S.j, S.b, S.h} or e.atoms(AppliedUndef))


def nonzero(e, at_pairs: bool = False) -> bool:
    """sympy proves ``e != 0``, with ``n_q``, ``n_k`` only nonnegative (a call may pass 0), or, for
    a value computed at pairs (``at_pairs``: a per-pair divisor), positive: a call with a pair has
    ``n_q > i >= 0`` and ``n_k > j >= 0``, and the parser's algebra takes them so already
    (``where(max(n_k, d[b]) > 0, max(n_k, d[b]), -3)`` is ``max(n_k, d[b])`` when parsed, which
    build then refused as a divisor that may be 0)."""
    if at_pairs:
        return _proven_nonzero(e)
    weaker = {n: sympy.Dummy(n.name, integer=True, nonnegative=True) for n in (S.n_q, S.n_k)}
    return _proven_nonzero(e.xreplace(weaker))


def _proven_nonzero(e) -> bool:
    """``e != 0`` by sympy's assumptions; a ``where`` (Piecewise) when each value is, given the
    conditions under which it is taken (``where(d[b] == 0, 3, d[b])``, ``where(d[b] > 0, d[b], 1)``)."""
    if e.is_nonzero or e.is_positive or e.is_negative:
        return True
    if not isinstance(e, sympy.Piecewise):
        return False
    before = {}  # what the earlier conditions, all false here, say
    for value, cond in e.args:
        if cond is not sympy.false and not (_says_nonzero(cond, value)
                                            or _proven_nonzero(value.xreplace({**before, **signs_of(cond, True)}))):
            return False
        before.update(signs_of(cond, False))
    return True


def _says_nonzero(cond, value) -> bool:
    """Whether ``cond`` (or one of its conjuncts) is ``value`` compared strictly with 0, or unequal
    to it: ``where(j - 3 > 0, j - 3, -3)`` (parsed ``j > 3``), ``where(x[b, j] + 1 != 0, ...)``,
    whose value :func:`signs_of` cannot give a sign (a sum, not a name)."""
    for c in (cond.args if isinstance(cond, sympy.And) else (cond,)):
        if isinstance(c, (sympy.StrictGreaterThan, sympy.StrictLessThan, sympy.Unequality)):
            d = c.lhs - c.rhs
            if sympy.expand(value - d) == 0 or sympy.expand(value + d) == 0:
                return True
    return False


def signs_of(cond, holds: bool) -> dict:
    """``{x: a Dummy with x's sign}`` for the reads and names ``x`` whose sign ``cond`` gives
    where it is ``holds`` (``d[b] > 0``: positive; ``Eq(d[b], 0)`` false: nonzero)."""
    if isinstance(cond, sympy.Not):
        return signs_of(cond.args[0], not holds)
    if isinstance(cond, sympy.And if holds else sympy.Or):
        out = {}
        for c in cond.args:
            out.update(signs_of(c, holds))
        return out
    if not isinstance(cond, sympy.core.relational.Relational):
        return {}
    rel = cond if holds else cond.negated
    if rel.lhs.is_number:
        rel = rel.reversed
    x, c = rel.lhs, rel.rhs
    if not (c.is_number and c.is_real and (x.is_Symbol or isinstance(x, AppliedUndef))):
        return {}
    sign = _RELATION_SIGN.get(rel.rel_op, lambda c: None)(c)
    return {x: sympy.Dummy(str(x), **{sign: True})} if sign else {}


# the sign of x where ``x <op> c`` holds (a number c), None where it allows 0
_RELATION_SIGN = {
    ">": lambda c: "positive" if c >= 0 else None,
    ">=": lambda c: "positive" if c > 0 else None,
    "<": lambda c: "negative" if c <= 0 else None,
    "<=": lambda c: "negative" if c < 0 else None,
    "==": lambda c: "positive" if c > 0 else "negative" if c < 0 else None,
    "!=": lambda c: "nonzero" if c == 0 else None,
}
