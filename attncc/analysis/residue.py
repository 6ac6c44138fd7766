"""Residue classes: masks that only pair positions of one class modulo m.

A mask with a top-level conjunct ``(i - j) % m == 0`` (m a literal >= 2 or an int param; dilated
windows) allows a pair only where ``i`` and ``j`` leave the same remainder modulo m. Its tiles are
sparse in any order of the rows (1 pair in m at best), but the rows of one class, ``i = c + m*a``,
and the keys of that class, ``j = c + m*b``, make tiles as dense as the rest of the mask: a dilated
window of width w is a plain window of width w / m there.

:func:`residue_split` gives what the kernels need for that: the pattern with the positions written
through three hidden int params, ``i -> STEP*i + CQ`` and ``j -> STEP*j + CK``. With ``STEP = 1,
CQ = CK = 0`` (their defaults) it is the pattern itself; the runtime (attncc.runtime.residue) runs
the rows and keys of class c as strided views with ``STEP = m`` and CQ, CK the positions of their
first row and key. The mask, bias and transform are the spec's own, evaluated at the true positions,
so the split is exact whatever else the mask says: the conjunct is true on every pair of a class,
and the classified tiles of the views (block lists) are exact for them.

Only for patterns whose walks are block lists anyway (the residue term mixes i and j, so no closed
form), without [inputs], RoPE, dropout or random_blocks() (those read the kernels' row positions
outside the spec's expressions), and whose bias and mod do not read the positions (:func:`_splittable`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import sympy

from attncc.analysis.integer import substituted
from attncc.analysis.score import along_j, canonical_score
from attncc.core.splits import COLUMN_PARAMS, RESIDUE_PARAMS
from attncc.spec import symbols as S
from attncc.spec.builtins import RandomBlocks
from attncc.spec.ir import Param, Pattern

HIDDEN = tuple(name for name, _ in RESIDUE_PARAMS)  # the residue split's params (attncc.core.splits)
COLUMN_HIDDEN = tuple(name for name, _ in COLUMN_PARAMS)


@dataclass(frozen=True)
class ResidueSplit:
    """``pattern``: the pattern the kernels are generated from (positions through the hidden
    params); ``modulus``: the name of the int param m, or its literal value."""

    pattern: Pattern
    modulus: object  # str (an int param's name) or int


def _modulus(conjunct, int_params) -> Optional[sympy.Expr]:
    """m of ``Eq(Mod(i - j, m), 0)`` (or ``j - i``) or ``Eq(Mod(i, m), Mod(j, m))``, m an int param
    or a literal >= 2; else None."""
    if not isinstance(conjunct, sympy.Eq):
        return None
    lhs, rhs = conjunct.args
    if isinstance(lhs, sympy.Mod) and isinstance(rhs, sympy.Mod) and lhs.args[1] == rhs.args[1] \
            and {lhs.args[0], rhs.args[0]} == {S.i, S.j}:
        m = lhs.args[1]  # i % m == j % m
    else:
        if rhs != 0:
            lhs, rhs = rhs, lhs
        if rhs != 0 or not isinstance(lhs, sympy.Mod):
            return None
        x, m = lhs.args
        if sympy.expand(x - (S.i - S.j)) != 0 and sympy.expand(x - (S.j - S.i)) != 0:
            return None
    if m in int_params or (m.is_Integer and m >= 2):
        return m
    return None


def _splittable(pattern: Pattern, rewritten) -> bool:
    """Whether the pattern reads positions only through its mask's ``rewritten`` symbols (see the
    module doc). Its bias and mod may not read them: the kernels keep a score's terms constant along
    j out of the key loop (in the LSE), and rewritten positions make such a term as large as a
    position (``0.1 * (i - j)`` at j -> m*j + ck: ``0.1 * (i - ck - m*i)``), rounded in float32 where
    the whole call had none: an LSE off by ~1e-2 at 2**20, which the column split's merge turns into
    an error of o (fuzzed, found in review)."""
    mask = pattern.mask
    return not (pattern.kind != "softmax" or mask is None or pattern.inputs or pattern.rope is not None
                or pattern.dropout or any(p.name.startswith("_") for p in pattern.params)
                or any(e is not None and e.has(RandomBlocks) for e in (mask, pattern.bias, pattern.mod))
                or any(e is not None and e.free_symbols & set(rewritten) for e in (pattern.bias, pattern.mod)))


def _rewritten(pattern: Pattern, mask, positions: dict, hidden) -> Pattern:
    """``pattern`` with ``mask``, its bias and mod read at ``positions`` ({i: ..., j: ...}) and the
    hidden int params ``hidden`` ((name, default), ...) after its own."""
    def at(e):
        return None if e is None else substituted(e, positions)  # float arithmetic: at the true positions

    return pattern.replace(mask=at(mask), bias=at(pattern.bias), mod=at(pattern.mod),
                           params=tuple(pattern.params) + tuple(Param(n, v, "int", hidden=True) for n, v in hidden))


def residue_split(pattern: Pattern) -> Optional[ResidueSplit]:
    """The split of ``pattern`` by residue class (see the module doc), or None."""
    mask = pattern.mask
    if not _splittable(pattern, (S.i, S.j)):
        return None
    int_params = {p.symbol for p in pattern.params if p.kind == "int"}
    conjuncts = mask.args if isinstance(mask, sympy.And) else (mask,)
    moduli = [m for m in (_modulus(c, int_params) for c in conjuncts) if m is not None]
    if not moduli:
        return None
    m = moduli[0]
    step, cq, ck = (sympy.Symbol(n, integer=True) for n in HIDDEN)
    split = _rewritten(pattern, mask, {S.i: step * S.i + cq, S.j: step * S.j + ck}, RESIDUE_PARAMS)
    return ResidueSplit(split, m.name if isinstance(m, sympy.Symbol) else int(m))


# --------------------------------------------------------------------------------------------
# Columns of one residue class beside the rest: strided (Sparse Transformer) masks

@dataclass(frozen=True)
class ColumnSplit:
    """A mask ``C and (X or Y)`` whose clause Y allows only keys ``j % m == r`` (the summary columns
    of strided attention: ``j <= i and (i - j < m or j % m == m - 1)``). The kernels' pattern
    (``pattern``) reads ``j`` as ``SK*j + CK`` and takes a hidden ``PART``: 0 computes ``C and X``,
    1 ``C and Y and not X``, 2 (the default) the spec's mask. The runtime (attncc.runtime.residue)
    runs part 0 over every key and part 1 over the keys of class r only, a strided view of k and v
    (``SK = m``), and merges the two by their log-sum-exp: part 1's tiles are dense where the
    whole call's column tiles held one column in m. ``modulus``: m (an int param's name or a
    literal); ``residue``: r as an expression of int params and literals (the class is ``r % m``:
    a key in it satisfies ``j % m == r`` exactly when ``0 <= r < m``, and no key does otherwise,
    which the kernels' mask still checks)."""

    pattern: Pattern
    modulus: object
    residue: sympy.Expr

    @property
    def terms(self):
        """r as (its integer constant, the names of the int params it adds), as the runtime sums it."""
        parts = sympy.Add.make_args(self.residue)
        return int(sum(t for t in parts if t.is_Integer)), tuple(t.name for t in parts if not t.is_Integer)


def _column_class(clause, int_params):
    """(m, r) of a conjunct ``Eq(Mod(j, m), r)`` of ``clause`` (r free of i, j), or None."""
    for c in (clause.args if isinstance(clause, sympy.And) else (clause,)):
        if not isinstance(c, sympy.Eq):
            continue
        for lhs, rhs in (c.args, c.args[::-1]):
            if isinstance(lhs, sympy.Mod) and lhs.args[0] == S.j and not rhs.free_symbols - int_params \
                    and all(isinstance(a, (sympy.Symbol, sympy.Integer)) for a in sympy.Add.make_args(rhs)):
                m = lhs.args[1]
                if m in int_params or (m.is_Integer and m >= 2):
                    return m, rhs
    return None


def column_split(pattern: Pattern) -> Optional[ColumnSplit]:
    """The split of ``pattern``'s summary columns from the rest of its mask (:class:`ColumnSplit`), or None.

    Not for a score with terms constant along j (``bias = "c + 0.1 * i"``, ``mod = "s - 3e5 * h"``):
    the kernels add those to each part's float32 LSE, where a large one rounds away the difference
    of the two parts' LSEs that the merge weighs them by (o off by 1.0 at i = 2**29, by 3e-3 with a
    constant 1e5: found by a probe of session 13). The whole call keeps them out of o exactly."""
    if not _splittable(pattern, (S.j,)) or along_j(canonical_score(pattern))[2] is not None:
        return None
    int_params = {p.symbol for p in pattern.params if p.kind == "int"}
    mask = pattern.mask
    conjuncts = list(mask.args) if isinstance(mask, sympy.And) else [mask]
    for n, union in enumerate(conjuncts):
        if not isinstance(union, sympy.Or):
            continue
        common = conjuncts[:n] + conjuncts[n + 1:]
        for k, clause in enumerate(union.args):
            found = _column_class(clause, int_params)
            if found is None:
                continue
            rest = sympy.Or(*(union.args[:k] + union.args[k + 1:]))
            sk, ck, part = (sympy.Symbol(name, integer=True) for name in COLUMN_HIDDEN)
            # C and (X or Y) at part 2, C and X at 0, C and Y and not X at 1: C, X and Y written once
            parts = sympy.And(*common, sympy.Or(sympy.And(sympy.Ne(part, 1), rest),
                                                sympy.And(sympy.Ne(part, 0), clause, sympy.Not(rest))))
            split = _rewritten(pattern, parts, {S.j: sk * S.j + ck}, COLUMN_PARAMS)
            m = found[0]
            return ColumnSplit(split, m.name if isinstance(m, sympy.Symbol) else int(m), found[1])
    return None


def split_of(pattern: Pattern):
    """The split a generated module of ``pattern`` runs its calls by (:class:`ResidueSplit`,
    :class:`ColumnSplit`), or None: only where the walks are exact block lists of a static mask."""
    from attncc.analysis.plan import analyze
    from attncc.analysis.walks import Iteration

    plan = analyze(pattern)
    if plan.iteration is not Iteration.BLOCK_LIST or plan.dynamic:
        return None
    return residue_split(pattern) or column_split(pattern)
