"""Move work out of the key loop.

A sub-expression that does not depend on the key position ``j`` is the same for
every key tile: if it also ignores ``i`` it is computed once per program (a scalar),
otherwise once per query row (a vector of BLOCK_M) before the loop. The key loop
then only reads the results.

Integer ``//`` and ``%`` are whole nodes here (:mod:`attncc.analysis.integer`): the hoister
may move out either operand, never a part of the division (``1 / w`` of ``floor(j / w)``
hoisted as a float is what made ``//`` by a param inexact). Those of a sum of a row part and a
column part (``(i - j) % w``) are first written with the residues of each part
(:mod:`attncc.analysis.separable`): the row's residue is hoisted, the column's is a vector per
key tile, and no division is left per pair.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import sympy
from sympy.core.function import AppliedUndef
from sympy.functions.elementary.piecewise import ExprCondPair

from attncc.analysis.exact import EXACT, exact_parts
from attncc.analysis.integer import expanded, integer_ops, integer_sums, recentered, ungrouped
from attncc.analysis.separable import separated
from attncc.spec import symbols as S
from attncc.spec.builtins import RandomBlocks


def depends_on(e: sympy.Basic, sym: sympy.Symbol) -> bool:
    return sym in e.free_symbols


class Hoisted(sympy.Dummy):
    """The name of a hoisted value; ``definition`` is the expression it stands for."""

    definition: sympy.Basic


def resolve(e: sympy.Basic, definitions=None) -> sympy.Basic:
    """``e`` with every hoisted name (and every symbol of ``definitions``) replaced by what it
    stands for, until none is left."""
    for _ in range(64):  # definitions may use earlier ones (bound steps): a few rounds at most
        subs = {a: a.definition for a in e.atoms(Hoisted)}
        subs.update({k: v for k, v in (definitions or {}).items() if k in e.free_symbols})
        if not subs:
            return e
        e = e.xreplace(subs)
    raise ValueError(f"definitions refer to each other without end: {e}")


@dataclass
class Hoister:
    """Collects hoisted sub-expressions across several expressions (shared names).

    ``inner`` is the position the loop walks (``j`` in the forward and dQ kernels; ``i`` in
    the dK/dV kernel, which walks query blocks), ``outer`` the one fixed per program; the
    score ``s`` varies per pair and is never hoisted. ``rows`` hold the sub-expressions of
    ``outer`` (vectors named ``row_prefix<n>``), ``scalars`` those of neither (named
    ``scalar_prefix<n>``; mask code has a hoister of its own, ``mc`` / ``mrow``, because it is
    printed in float64).
    """

    scalars: Dict[sympy.Basic, sympy.Symbol] = field(default_factory=dict)
    rows: Dict[sympy.Basic, sympy.Symbol] = field(default_factory=dict)
    inner: sympy.Symbol = S.j
    outer: sympy.Symbol = S.i
    row_prefix: str = "row"
    scalar_prefix: str = "c"
    float32: bool = True  # score code: integer sums added up before the float arithmetic (integer.integer_sums)

    def __call__(self, e: sympy.Basic) -> sympy.Basic:
        # % and // of a sum of a row part and a column part: with residues, the row's hoisted here
        e = separated(integer_ops(e), self.inner, self.outer)
        # score code: its steps free of s are float64 values, never taken apart (analysis.exact)
        return self._walk(integer_sums(exact_parts(e)) if self.float32 else e)

    def _walk(self, e):
        if e.is_Atom or isinstance(e, RandomBlocks):
            return e
        if isinstance(e, ExprCondPair):  # a (value, condition) of a Piecewise is no value of its own
            return e.func(*[self._walk(a) for a in e.args])
        whole = isinstance(e, EXACT)  # hoisted whole or not at all
        if not (depends_on(e, self.inner) or depends_on(e, S.s)):
            if isinstance(e, sympy.Symbol) or (e.is_number):
                return e
            if depends_on(e, self.outer):
                if not _worth_a_row(e):
                    return e if whole else e.func(*[self._walk(a) for a in e.args])
                return self._name(self.rows, e, self.row_prefix)
            return self._name(self.scalars, e, self.scalar_prefix)
        if whole:
            return e
        return e.func(*[self._walk(a) for a in e.args]) if e.args else e

    @staticmethod
    def _name(table, e, prefix):
        if e not in table:
            kw = {"integer": True} if e.is_integer else ({} if e.is_Boolean or isinstance(e, sympy.Rel) else {"real": True})
            # a Dummy: never equal to a spec's own symbol of the same name (a param ``c0``)
            name = Hoisted(f"{prefix}{len(table)}", **kw)
            name.definition = e
            table[e] = name
        return table[e]

    def definitions(self, table) -> List[Tuple[sympy.Symbol, sympy.Basic]]:
        return [(sym, e) for e, sym in table.items()]


def _worth_a_row(e) -> bool:
    """A row vector costs registers: hoist only what is dearer than an add per pair."""
    return bool(e.atoms(AppliedUndef) or e.atoms(sympy.Function)) or sympy.count_ops(e) > 2


def inputs_in(e: sympy.Basic) -> List[AppliedUndef]:
    return sorted(e.atoms(AppliedUndef), key=sympy.default_sort_key)


def split_along_j(bias: sympy.Expr) -> Tuple[sympy.Expr, sympy.Expr]:
    """Split ``bias`` into (terms that vary with j, terms that do not).

    Terms constant along j shift every score of a row equally: the softmax cancels them,
    and only the log-sum-exp needs them back. Integer sums are added up first
    (:func:`integer_sums`): ``slope * (j - i)`` stays one term of the key loop, computed from
    the distance rather than from two products of absolute positions; a term linear in ``j``
    is computed from the distance too (:func:`recentered`: ``0.1 * j`` is ``0.1 * (j - i)`` in
    the loop and ``0.1 * i`` in the row terms).
    """
    along, const = [], []
    # the score's float64 steps and integer operands stay whole (integer.expanded)
    for t in sympy.Add.make_args(integer_sums(expanded(ungrouped(exact_parts(integer_ops(bias)))))):
        if not depends_on(t, S.j):
            const.append(t)
            continue
        moved = recentered(t)  # c * j: c * (j - i) here, c * i to the row terms
        along.append(t if moved is None else moved[0])
        const += [] if moved is None else [moved[1]]
    return sympy.Add(*along), sympy.Add(*const)
