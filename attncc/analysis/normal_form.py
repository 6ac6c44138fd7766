"""A mask in disjunctive normal form, with each atom sorted by what the bounds can do with it.

The mask is an Or of clauses, each clause an And of atoms. Atoms are kept small and
comparable: every comparison becomes one or more ``e <= 0`` over the integers
(``abs``, ``min``, ``max`` and ``where`` of numbers are split into And/Or of their
branches; ``==`` into two inequalities; ``!=`` into an Or of two strict ones; a strict
``e < 0`` of integers into ``e + 1 <= 0``). Then each ``e <= 0`` is either

- a :class:`LinearAtom` ``a*i + b*j + c <= 0`` with integers ``a, b`` and ``c`` an integer
  polynomial of int params, ``n_q``, ``n_k``, ``h`` and ``b``: ``b != 0`` bounds the keys
  of a row, ``b == 0, a != 0`` bounds the rows, ``a == b == 0`` is a guard on the call;
- or an :class:`OtherAtom` (modular arithmetic, floor, products, inputs, random blocks...):
  :mod:`attncc.analysis.bands` solves the ones with ``//`` and ``%`` it can make monotone
  bounds of; the others leave the mask to the exact block lists.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import FrozenSet, List, Optional, Tuple

import sympy
from sympy.logic.boolalg import BooleanFalse, BooleanTrue

from attncc.spec import symbols as S

MAX_CLAUSES = 64


@dataclass(frozen=True)
class LinearAtom:
    """``a*i + b*j + c <= 0`` over the integers."""

    a: int
    b: int
    c: sympy.Expr

    def expr(self) -> sympy.Basic:
        return sympy.Le(self.a * S.i + self.b * S.j + self.c, 0)

    def __str__(self):
        return _pretty(self.a * S.i + self.b * S.j + self.c)


@dataclass(frozen=True)
class OtherAtom:
    """A boolean that is not linear in i and j (kept as a sympy expression)."""

    expr_: sympy.Basic

    def expr(self) -> sympy.Basic:
        return self.expr_

    def __str__(self):
        return str(self.expr_)


Atom = object  # LinearAtom | OtherAtom
Clause = FrozenSet[Atom]


class TooComplex(Exception):
    """The DNF would have more than MAX_CLAUSES clauses."""


def _pretty(e) -> str:
    """``e <= 0`` written with the j terms on the left, as a person would."""
    jpart = sum((t for t in sympy.Add.make_args(e) if t.has(S.j)), sympy.Integer(0))
    rest = e - jpart
    if jpart == 0:
        ipart = sum((t for t in sympy.Add.make_args(e) if t.has(S.i)), sympy.Integer(0))
        if ipart != 0:
            rest = e - ipart
            return f"{ipart} <= {-rest}" if ipart.could_extract_minus_sign() is False else f"{-ipart} >= {rest}"
        return f"{e} <= 0"
    if jpart.could_extract_minus_sign():
        return f"{-jpart} >= {rest}"
    return f"{jpart} <= {-rest}"


def to_dnf(mask: sympy.Basic, int_params: FrozenSet[sympy.Symbol]) -> Tuple[Clause, ...]:
    """The clauses of ``mask`` (an empty tuple: never true; a clause with no atom: always
    true). Raises TooComplex past MAX_CLAUSES clauses."""
    allowed = frozenset(int_params) | {S.n_q, S.n_k, S.h, S.b}
    clauses = _Converter(allowed).dnf(mask, False)
    return _absorb(clauses)


def _absorb(clauses: List[Clause]) -> Tuple[Clause, ...]:
    """Drop duplicate clauses and clauses that contain another one (A or (A and B) = A)."""
    unique = sorted(set(clauses), key=len)
    kept: List[Clause] = []
    for c in unique:
        if not any(k <= c for k in kept):
            kept.append(c)
    return tuple(sorted(kept, key=lambda c: sorted(map(str, c))))


def _product(a: List[Clause], b: List[Clause]) -> List[Clause]:
    out = [x | y for x in a for y in b]
    if len(out) > MAX_CLAUSES:
        raise TooComplex
    return out


def _union(a: List[Clause], b: List[Clause]) -> List[Clause]:
    out = a + b
    if len(out) > MAX_CLAUSES:
        raise TooComplex
    return out


TRUE: List[Clause] = [frozenset()]
FALSE: List[Clause] = []


class _Converter:
    def __init__(self, allowed):
        self.allowed = allowed
        self.memo = {}  # (e, neg) -> clauses: xor asks for both polarities of its operands

    def dnf(self, e, neg: bool) -> List[Clause]:
        key = (e, neg)
        if key not in self.memo:
            self.memo[key] = self._dnf(e, neg)
        return self.memo[key]

    def _dnf(self, e, neg: bool) -> List[Clause]:
        if isinstance(e, BooleanTrue):
            return FALSE if neg else TRUE
        if isinstance(e, BooleanFalse):
            return TRUE if neg else FALSE
        if isinstance(e, sympy.Not):
            return self.dnf(e.args[0], not neg)
        if isinstance(e, (sympy.And, sympy.Or)):
            parts = [self.dnf(a, neg) for a in e.args]
            conj = isinstance(e, sympy.And) != neg
            return reduce(_product if conj else _union, parts, TRUE if conj else FALSE)
        if isinstance(e, sympy.Xor):  # an odd number of operands true: (x and not y) or (not x and y), folded
            odd, even = self.dnf(e.args[0], False), self.dnf(e.args[0], True)
            for a in e.args[1:]:
                yes, no = self.dnf(a, False), self.dnf(a, True)
                odd, even = (_union(_product(odd, no), _product(even, yes)),
                             _union(_product(odd, yes), _product(even, no)))
            return even if neg else odd
        if isinstance(e, sympy.core.relational.Relational):
            return self.relation(e, neg)
        return [frozenset([OtherAtom(sympy.Not(e) if neg else e)])]

    def relation(self, rel, neg: bool) -> List[Clause]:
        e = rel.lhs - rel.rhs
        kind = {sympy.Le: "le", sympy.Lt: "lt", sympy.Eq: "eq", sympy.Ne: "ne"}.get(type(rel))
        if kind is None:  # Ge / Gt: flip the sides
            e, kind = -e, {sympy.Ge: "le", sympy.Gt: "lt"}[type(rel)]
        if neg:  # not (e <= 0) is -e < 0; not (e < 0) is -e <= 0
            e, kind = {"le": (-e, "lt"), "lt": (-e, "le"), "eq": (e, "ne"), "ne": (e, "eq")}[kind]
        return self.split(e, kind)

    def split(self, e, kind: str) -> List[Clause]:
        if kind == "eq":
            return _product(self.split(e, "le"), self.split(-e, "le"))
        if kind == "ne":
            return _union(self.split(e, "lt"), self.split(-e, "lt"))
        if kind == "lt":
            if e.is_integer:
                return self.split(e + 1, "le")
            return self.split_terms(e, "lt")
        return self.split_terms(e, "le")

    def split_terms(self, e, kind: str) -> List[Clause]:
        """Split on the first additive term ``coeff * F`` with F an abs/min/max/where."""
        for term in sympy.Add.make_args(e):
            coeff, f = term.as_coeff_Mul()
            if coeff == 0 or not isinstance(f, (sympy.Abs, sympy.Max, sympy.Min, sympy.Piecewise)):
                continue
            rest = e - term
            if isinstance(f, sympy.Piecewise):
                # e <= 0  <=>  OR_k (cond_k and no earlier cond and rest + coeff*expr_k <= 0)
                out, earlier = FALSE, TRUE
                for expr_k, cond_k in f.args:
                    here = _product(earlier, self.dnf(cond_k, False))
                    out = _union(out, _product(here, self.split(rest + coeff * expr_k, kind)))
                    earlier = _product(earlier, self.dnf(cond_k, True))
                return out
            parts = [f.args[0], -f.args[0]] if isinstance(f, sympy.Abs) else list(f.args)
            is_max = not isinstance(f, sympy.Min)
            if coeff < 0:  # c * max(...) is min(c * ...) for c < 0
                is_max = not is_max
            pieces = [self.split(rest + coeff * p, kind) for p in parts]
            # max(...) <= 0 needs every part <= 0; min(...) <= 0 needs one
            return reduce(_product if is_max else _union, pieces, TRUE if is_max else FALSE)
        return self.atom(e, kind)

    def atom(self, e, kind: str) -> List[Clause]:
        relation = sympy.Le if kind == "le" else sympy.Lt
        try:
            rel = relation(e, 0)
        except TypeError:  # not comparable as real numbers: keep it, unevaluated
            return [frozenset([OtherAtom(relation(e, 0, evaluate=False))])]
        if isinstance(rel, BooleanTrue):
            return TRUE
        if isinstance(rel, BooleanFalse):
            return FALSE
        if kind == "le":
            lin = linear_form(e, self.allowed)
            if lin is not None:
                return [frozenset([lin])]
        return [frozenset([OtherAtom(rel)])]


def linear_form(e, allowed) -> Optional[LinearAtom]:
    """``e <= 0`` as ``a*i + b*j + c <= 0`` with integer coefficients, or None."""
    e = sympy.expand(e)
    try:
        poly = sympy.Poly(e, S.i, S.j)
    except sympy.PolynomialError:
        return None
    if poly.total_degree() > 1:
        return None
    a, b, c = poly.coeff_monomial(S.i), poly.coeff_monomial(S.j), poly.coeff_monomial(1)
    if not (a.is_Rational and b.is_Rational):
        return None
    c = sympy.expand(c)
    if c.atoms(sympy.Float) or c.atoms(sympy.Function) or not c.free_symbols <= allowed:
        return None
    syms = sorted(c.free_symbols, key=str)
    if syms:
        if not c.is_polynomial(*syms):
            return None
        coeffs = sympy.Poly(c, *syms).coeffs()
    else:
        coeffs = [c]
    if not all(k.is_Rational for k in coeffs):
        return None
    scale = sympy.ilcm(*[sympy.Rational(k).q for k in [a, b, *coeffs]], 1)
    return LinearAtom(int(a * scale), int(b * scale), sympy.expand(c * scale))
