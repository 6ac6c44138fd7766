"""A static mask as a union of monotone bands: the closed forms whose tile classes are exact.

Every DNF clause (:mod:`attncc.analysis.normal_form`) is tried as a :class:`Band`: a guard on
the call (params, lengths, ``b``, ``h``), a range of rows ``x`` (query positions; key
positions in the transposed walk) and per row the key interval ``[L(x), U(x)]`` where

- ``L`` is a min over groups of a max over *pieces*, ``U`` a max over groups of a min over
  pieces (one group each for a plain clause; two when clauses merge, see below);
- a piece is a non-decreasing function of ``x`` built from ``x``, integers, int params,
  ``n_q`` / ``n_k``, sums, products by non-negative constants and ``floor`` / ``ceiling`` by
  positive constants or int params: ``x - w + 1``, ``C*floor(x/C)``, ``floor((3*x + 7)/2)``.

Atoms with ``//`` and ``%`` reach this form by ``a % m = a - m*floor(a/m)`` and by solving for
the key: ``c*floor((j + c0)/D) <= y(x)`` holds iff ``j <= D*floor(y/c) + D - 1 - c0`` (c > 0),
so chunks (``i // C == j // C``, ``j >= i - i % C``) are bands. A key that enters through a
non-monotone term (``j % S``: strides; ``(i - j) % d``: dilations; ``i % W - j % W``: 2D
neighborhoods) has no band: such masks take the exact block lists (:mod:`attncc.analysis.plan`).

Why monotone bands are exact. Take the rows ``[a, b]`` of a query block that exist and lie in
the band's row range. Key ``y`` is allowed on some row iff some row has ``L(x) <= y <= U(x)``:

- the union over the rows of ``[L(x), U(x)]`` is ``[L(a), U(b)]`` when consecutive rows leave no
  hole between them. A hole ``y`` needs a row ``z`` with ``U(z-1) < y < L(z)`` (and
  ``L(a) <= y <= U(b)``); a constant piece can never be the bound at a hole (``y < L(z) = c <=
  L(a)`` or ``y > U(z-1) = c >= U(b)``), so it suffices that each non-constant lower piece
  ``l`` and upper piece ``u`` have ``l(z) <= u(z-1) + 1`` (:attr:`Band.chain`). With linear
  envelopes ``s*x + lo <= piece(x) <= s*x + hi`` this is linear in ``z``: checked at the two
  ends of the call's rows, on the host (a *precondition*: where it fails, the walk takes the
  exact block lists instead);
- the keys allowed on every row are ``[L(b), U(a)]`` when every row of the block is in the row
  range, else none: exact by monotonicity alone, no precondition.

A union of bands is exact in closed form when it has at most one band that varies with ``x``
(a :class:`Cover`): besides it, *full rows* (all keys on rows ``x <= r`` or ``x >= r``: global
rows) and *columns* (constant key intervals on every row: global columns, sinks). Columns do
not depend on the row, so the keys allowed on every row of a block are the columns plus
``[L(b'), U(a')]`` over the rows no full-row band covers (``∩(C ∪ I(x)) = C ∪ ∩ I(x)``):
a tile straddling a column's end and the band is FULL when it should be. Two bands with the
same lower bound (or the same upper one), row range and guard merge into one band whose upper
(lower) bound is the max (min) of theirs, exactly: prefix-LM ``j < P or j <= i`` is the one
band ``j <= max(P - 1, i)``. Any other union takes the exact block lists.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import FrozenSet, List, Optional, Sequence, Tuple, Union

import sympy
from sympy.logic.boolalg import BooleanFalse, BooleanTrue

from attncc.analysis.integer import ungrouped
from attncc.analysis.normal_form import Clause, LinearAtom, OtherAtom
from attncc.spec import symbols as S



class _CallRow(sympy.Dummy):
    """A row position of the call: a Dummy, so never equal to a spec's param of the same name (an
    int param ``last_row`` is ``Symbol("last_row", integer=True)``, which a Symbol would be too),
    printed by its name."""

    def _sympystr(self, printer):
        return self.name


X = sympy.Symbol("x", integer=True, nonnegative=True)  # the row position of a walk
FIRST = _CallRow("first_row", integer=True, nonnegative=True)  # first row position of the call
LAST = _CallRow("last_row", integer=True)  # last row position of the call

Pieces = Tuple[sympy.Expr, ...]
# The closed forms solve atoms of a few operations (a band, a chunk: under 20); a larger one is
# left to the exact block lists rather than to sympy (a budget in size, not in time, so that a
# build writes the same code on every machine).
MAX_ATOM_OPS = 120


class NoBand(Exception):
    """This clause (or union) has no exact closed form; the message says why."""


@dataclass(frozen=True)
class Band:
    """Rows ``x`` with ``guard`` true and ``row_lo <= x <= row_hi`` allow the keys
    ``[L(x), U(x)]``: ``L = min over lower groups of max over their pieces`` (no group: no lower
    bound), ``U = max over upper groups of min over their pieces``. Pieces are sympy expressions
    in :data:`X`, each non-decreasing in it. ``row_lo`` / ``row_hi``: None when unbounded.
    ``positive``: int params that must be >= 1 for the pieces to be non-decreasing (divisors,
    multipliers): part of the precondition."""

    guard: sympy.Basic = sympy.true
    row_lo: Optional[sympy.Expr] = None
    row_hi: Optional[sympy.Expr] = None
    lower: Tuple[Pieces, ...] = ()
    upper: Tuple[Pieces, ...] = ()
    positive: FrozenSet[sympy.Symbol] = frozenset()

    @property
    def keys_unbounded(self) -> bool:
        return not self.lower and not self.upper

    @property
    def constant(self) -> bool:
        """Its key interval is the same on every row (and it has no row bound): a column."""
        return (self.row_lo is None and self.row_hi is None
                and not any(p.has(X) for groups in (self.lower, self.upper) for g in groups for p in g))

    def lower_at(self, x) -> Optional[sympy.Expr]:
        return _fold(sympy.Min, [_fold(sympy.Max, [p.subs(X, x) for p in g]) for g in self.lower])

    def upper_at(self, x) -> Optional[sympy.Expr]:
        return _fold(sympy.Max, [_fold(sympy.Min, [p.subs(X, x) for p in g]) for g in self.upper])

    def chain(self) -> sympy.Basic:
        """Consecutive rows' key intervals leave no hole between them (module docstring), for
        the call's rows ``[FIRST, LAST]``: a condition on params, lengths and those two."""
        conds = []
        z0 = FIRST if self.row_lo is None else sympy.Max(FIRST, self.row_lo)
        z1 = LAST if self.row_hi is None else sympy.Min(LAST, self.row_hi)
        for lg in self.lower:
            for ug in self.upper:
                for lp in lg:
                    for up in ug:
                        if lp.has(X) and up.has(X):
                            conds.append(_no_hole(lp, up, z0, z1))
        return sympy.And(*conds)

    def predicate(self, i, j) -> sympy.Basic:
        """Whether the pair (query position ``i``, key position ``j``) is in the band, with the key
        alone on one side of each comparison."""
        conds = [self.guard]
        if self.row_lo is not None:
            conds.append(sympy.Ge(i, self.row_lo))
        if self.row_hi is not None:
            conds.append(sympy.Le(i, self.row_hi))
        for groups, rel in ((self.lower, sympy.Ge), (self.upper, sympy.Le)):
            if groups:  # j >= min_g max_p p: some group's every piece; j <= max_g min_p p alike
                conds.append(sympy.Or(*[sympy.And(*[rel(j, p.subs(X, i)) for p in g]) for g in groups]))
        return sympy.And(*conds)

    def text(self) -> str:
        parts = []
        if self.guard is not sympy.true:
            parts.append(f"if {self.guard}:")
        if self.row_lo is not None or self.row_hi is not None:
            parts.append(f"rows {'-inf' if self.row_lo is None else self.row_lo} <= x <= "
                         f"{'inf' if self.row_hi is None else self.row_hi}:")
        lo = "-inf" if not self.lower else _describe(self.lower, "min", "max")
        hi = "inf" if not self.upper else _describe(self.upper, "max", "min")
        parts.append(f"{lo} <= j <= {hi}")
        return " ".join(parts)


def _describe(groups, outer, inner) -> str:
    def one(g):
        return str(g[0]) if len(g) == 1 else f"{inner}({', '.join(map(str, g))})"

    return one(groups[0]) if len(groups) == 1 else f"{outer}({', '.join(one(g) for g in groups)})"


def _fold(fn, items):
    items = [x for x in items if x is not None]
    if not items:
        return None
    return items[0] if len(items) == 1 else fn(*items)


@dataclass(frozen=True)
class Cover:
    """A union of bands with an exact closed form: ``rows`` (all keys on one-sided row ranges:
    ``row_hi`` only, ``row_lo`` only, or neither), ``columns`` (:attr:`Band.constant`) and at
    most one ``band`` varying with the row. ``precondition``: host-side condition (params,
    lengths, ``FIRST`` / ``LAST``) under which the closed form is exact. ``monotone``: its part
    that the pieces' monotonicity needs (int params >= 1, params only): where it holds, the
    closed form is sound even when the rest fails (it may visit blocks without an allowed pair,
    never skip one, and its FULL blocks stay FULL); where it fails, it may skip allowed pairs."""

    rows: Tuple[Band, ...] = ()
    columns: Tuple[Band, ...] = ()
    band: Optional[Band] = None
    precondition: sympy.Basic = sympy.true
    monotone: sympy.Basic = sympy.true

    @property
    def intervals(self) -> int:
        """Key intervals per query block (columns and the band): 1 walks as one segment."""
        return len(self.columns) + (self.band is not None)

    def predicate(self, i, j) -> sympy.Basic:
        """The union as a predicate of a pair, each band solved for the key: the mask, exactly, where
        :attr:`monotone` holds (every atom was solved for ``j`` exactly, divisors taken >= 1). A
        kernel that compares the key with a function of the row keeps no per-key values across its
        key loop (``j - n_k <= i - n_q`` is ``j <= i + n_k - n_q`` here)."""
        return sympy.Or(*[b.predicate(i, j) for b in self.rows + self.columns + ((self.band,) if self.band else ())])

    def lines(self) -> Tuple[str, ...]:
        out = [f"rows: {b.text()}" for b in self.rows] + [f"column: {b.text()}" for b in self.columns]
        if self.band is not None:
            out.append(f"band: {self.band.text()}")
        if self.precondition is not sympy.true:
            out.append(f"exact when: {self.precondition}")
        return tuple(out) or ("never true",)


# ---------------------------------------------------------------------------------------------
# atoms -> bounds
# ---------------------------------------------------------------------------------------------

@dataclass
class _Parts:
    guard: List[sympy.Basic] = field(default_factory=list)
    row_lo: List[sympy.Expr] = field(default_factory=list)
    row_hi: List[sympy.Expr] = field(default_factory=list)
    lower: List[sympy.Expr] = field(default_factory=list)
    upper: List[sympy.Expr] = field(default_factory=list)
    positive: set = field(default_factory=set)


def _atom_expr(atom) -> sympy.Expr:
    """``e`` with the atom meaning ``e <= 0`` over the integers."""
    if isinstance(atom, LinearAtom):
        return atom.a * S.i + atom.b * S.j + atom.c
    rel = atom.expr()
    if rel.atoms(sympy.Float):  # float arithmetic (float64 in the kernels, op for op): no exact integer bound
        raise NoBand(f"{atom} compares float arithmetic")
    if isinstance(rel, sympy.LessThan):
        return rel.lhs - rel.rhs
    if isinstance(rel, sympy.StrictLessThan) and _integral(rel.lhs - rel.rhs):
        return rel.lhs - rel.rhs + 1
    raise NoBand(f"{atom} is not a comparison of integers")


def _integral(e) -> bool:
    """Whether ``e`` is an integer wherever the call runs: sympy leaves ``floor(i / d)`` undecided
    (d = 0 would make it zoo), but every divisor of a call is checked nonzero first
    (codegen/bounds.py check_divisors, the call's divisor check), so floors and remainders of
    integers are integers, and so are sums, products and non-negative integer powers of them."""
    if e.is_integer:
        return True
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        return True
    if isinstance(e, sympy.Mod):
        return all(_integral(a) for a in e.args)
    if isinstance(e, (sympy.Add, sympy.Mul)):
        return all(_integral(a) for a in e.args)
    if isinstance(e, sympy.Pow):
        return e.exp.is_integer and e.exp.is_nonnegative and _integral(e.base)
    return False


def _no_mod(e):
    """``a % m`` as ``a - m*floor(a/m)`` (Python's definition, for any sign of m)."""
    return e.replace(sympy.Mod, lambda a, m: a - m * sympy.floor(a / m))


class _Solver:
    def __init__(self, int_params: FrozenSet[sympy.Symbol]):
        self.int_params = frozenset(int_params)
        self.constants = self.int_params | {S.n_q, S.n_k}

    def clause(self, clause: Clause) -> Band:
        parts = _Parts()
        for atom in sorted(clause, key=str):  # a clause is a frozenset: a fixed order, the same code every build
            self.atom(atom, parts)
        return Band(guard=sympy.And(*parts.guard), row_lo=_fold(sympy.Max, parts.row_lo),
                    row_hi=_fold(sympy.Min, parts.row_hi), lower=(tuple(_unique(parts.lower)),) if parts.lower else (),
                    upper=(tuple(_unique(parts.upper)),) if parts.upper else (), positive=frozenset(parts.positive))

    def atom(self, atom, parts: _Parts) -> None:
        e = _no_mod(_atom_expr(atom))
        if sympy.count_ops(e) > MAX_ATOM_OPS:  # a budget on the sympy reasoning below (deterministic)
            raise NoBand(f"an atom of more than {MAX_ATOM_OPS} operations is beyond the closed forms' budget")
        e = sympy.expand(e)
        if not (e.has(S.i) or e.has(S.j)):  # a guard on the call (b, h allowed: the kernel knows them)
            if e.free_symbols - self.constants - {S.b, S.h}:
                raise NoBand(f"{atom}: a condition on {e.free_symbols - self.constants - {S.b, S.h}}")
            parts.guard.append(sympy.Le(e, 0))
            return
        if e.has(S.b) or e.has(S.h):
            raise NoBand(f"{atom}: a position bound that depends on b or h")
        var = S.j if e.has(S.j) else S.i
        var_part, rest = [], []
        for term in sympy.Add.make_args(e):
            if term.has(S.i) and term.has(S.j):
                raise NoBand(f"{atom}: the term {term} mixes i and j")
            (var_part if term.has(var) else rest).append(term)
        side, bound = self.solve(sympy.Add(*var_part), var, sympy.Add(*rest), parts, atom)
        bound = _no_integer_rounding(bound)
        parts.positive.update(_signed_params(bound, self.int_params))
        if var is S.j:
            bound = bound.subs(S.i, X)
            if _monotone(bound, X) is None or _monotone(bound, X) < 0:
                raise NoBand(f"{atom}: the key bound {bound} does not grow with the row")
            (parts.upper if side == "le" else parts.lower).append(bound)
        else:
            (parts.row_hi if side == "le" else parts.row_lo).append(bound)

    def solve(self, g, var, rest, parts: _Parts, atom):
        """``g(var) + rest <= 0`` as ``var <= bound`` ("le") or ``var >= bound`` ("ge"), for
        ``g = beta*var`` or ``g = gamma*floor((var + c0)/D)``."""
        other = set().union(*[t.free_symbols for t in sympy.Add.make_args(rest)]) - self.constants - {S.i}
        if other:
            raise NoBand(f"{atom}: a bound on {var} over {other}")
        poly_ok = g.is_polynomial(var)
        if poly_ok:
            beta = g.coeff(var)
            if not (beta.is_Rational and g == beta * var and beta != 0):
                raise NoBand(f"{atom}: {g} is not linear in {var}")
            if beta > 0:
                return "le", sympy.floor(-rest / beta)
            return "ge", sympy.ceiling(rest / -beta)
        gamma, fl = self._floor_term(g, var, parts, atom)
        num, den = sympy.fraction(sympy.together(fl.args[0]))
        c0 = sympy.expand(num - var)
        if c0.has(var) or not self._positive(den, parts):
            raise NoBand(f"{atom}: {fl} is not floor((position + c) / D) with D > 0")
        if gamma.as_coeff_Mul()[0] > 0:  # (int params in gamma are >= 1) floor((var + c0)/D) <= floor(-rest/gamma)
            #                                 <=>  var + c0 <= D*(that + 1) - 1
            return "le", den * sympy.floor(-rest / gamma) + den - 1 - c0
        return "ge", den * sympy.ceiling(rest / -gamma) - c0

    def _floor_term(self, g, var, parts, atom):
        coeff, factors = g.as_coeff_mul()
        floors = [f for f in factors if isinstance(f, sympy.floor) and f.has(var)]
        others = [f for f in factors if not (isinstance(f, sympy.floor) and f.has(var))]
        if len(floors) != 1 or not all(self._positive(f, parts) for f in others):
            raise NoBand(f"{atom}: {var} enters as {g}, which does not grow with {var} (a stride, a dilation or a "
                         f"2D neighborhood)")
        return coeff * sympy.Mul(*others), floors[0]

    def _positive(self, e, parts: _Parts) -> bool:
        """``e`` is a positive integer, or a product of those and int params (then required >= 1)."""
        if e.is_Integer:
            return e > 0
        factors = sympy.Mul.make_args(e)
        if all(f.is_Integer and f > 0 or f in self.int_params for f in factors):
            parts.positive.update(f for f in factors if f in self.int_params)
            return True
        return False


def _unique(items):
    out = []
    for x in items:
        if x not in out:
            out.append(x)
    return out


def _integer_valued(e) -> bool:
    """``e`` is an integer for every value of its (integer) symbols. Unlike sympy's ``is_integer``,
    a floor counts as one whatever its argument (``floor(x/C)`` with C a symbol: sympy cannot
    rule out C = 0)."""
    if e.is_Integer or (e.is_Symbol and e.is_integer) or isinstance(e, (sympy.floor, sympy.ceiling)):
        return True
    if isinstance(e, (sympy.Add, sympy.Mul, sympy.Max, sympy.Min)):
        return all(_integer_valued(a) for a in e.args)
    return False


def _no_integer_rounding(e):
    """floor / ceiling of an integer-valued argument replaced by the argument (printed kernels
    would otherwise round an integer as a float)."""
    return e.replace(lambda n: isinstance(n, (sympy.floor, sympy.ceiling)) and _integer_valued(n.args[0]),
                     lambda n: n.args[0])


def _signed_params(e, int_params) -> set:
    """Int params whose sign the monotonicity and envelopes of ``e`` assume positive: factors of
    a product with a position-dependent factor, and floor / ceiling denominators."""
    out = set()
    for node in sympy.preorder_traversal(e):
        if isinstance(node, sympy.Mul) and node.has(S.i, S.j, X):
            out.update(f for f in node.args if f in int_params)
        elif isinstance(node, (sympy.floor, sympy.ceiling)):
            out.update(f for f in sympy.fraction(sympy.together(node.args[0]))[1].free_symbols if f in int_params)
    return out


def _monotone(e, x) -> Optional[int]:
    """+1 non-decreasing, -1 non-increasing, 0 constant in ``x``; None unknown. Int params count
    as positive (their positivity is part of the precondition where it matters)."""
    if not e.has(x):
        return 0
    if e == x:
        return 1
    if isinstance(e, sympy.Add):
        signs = {_monotone(t, x) for t in e.args} - {0}
        return signs.pop() if len(signs) == 1 and None not in signs else None
    if isinstance(e, sympy.Mul):
        coeff, rest = e.as_coeff_Mul()
        factors = sympy.Mul.make_args(rest)
        varying = [f for f in factors if f.has(x)]
        if len(varying) != 1 or any(f.is_negative for f in factors if not f.has(x)):
            return None
        inner = _monotone(varying[0], x)
        return None if inner is None else inner * (1 if coeff > 0 else -1)
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        num, den = sympy.fraction(sympy.together(e.args[0]))
        if den.has(x) or den.is_negative:
            return None
        return _monotone(num, x)
    if isinstance(e, (sympy.Max, sympy.Min)):
        signs = {_monotone(t, x) for t in e.args} - {0}
        return signs.pop() if len(signs) == 1 and None not in signs else None
    return None


def _envelope(e, x) -> Tuple[sympy.Expr, sympy.Expr, sympy.Expr]:
    """``(s, lo, hi)`` with ``s*x + lo <= e <= s*x + hi`` for every integer ``x`` (e a piece)."""
    if not e.has(x):
        return sympy.Integer(0), e, e
    if e == x:
        return sympy.Integer(1), sympy.Integer(0), sympy.Integer(0)
    if isinstance(e, sympy.Add):
        parts = [_envelope(t, x) for t in e.args]
        return tuple(sympy.Add(*[p[k] for p in parts]) for k in range(3))
    if isinstance(e, sympy.Mul):
        coeff, rest = e.as_independent(x, as_Add=False)
        s, lo, hi = _envelope(rest, x)
        if coeff.is_negative:
            return coeff * s, coeff * hi, coeff * lo
        return coeff * s, coeff * lo, coeff * hi
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        num, den = sympy.fraction(sympy.together(e.args[0]))
        s, lo, hi = _envelope(num, x)
        if isinstance(e, sympy.floor):  # integer n: (n - D + 1)/D <= floor(n/D) <= n/D
            return s / den, (lo - den + 1) / den, hi / den
        return s / den, lo / den, (hi + den - 1) / den
    raise NoBand(f"no linear envelope for {e}")


def _no_hole(lower_piece, upper_piece, z0, z1) -> sympy.Basic:
    """``l(z) <= u(z - 1) + 1`` for every row ``z`` in ``[z0 + 1, z1]``, from the envelopes
    (linear in z: its two ends suffice), with the denominators cleared."""
    sl, _, hl = _envelope(lower_piece, X)
    su, lu, _ = _envelope(upper_piece, X)

    def at(z):
        num, den = sympy.fraction(sympy.together(sympy.expand(sl * z + hl - su * (z - 1) - lu - 1)))
        return sympy.Le(num, 0) if den.is_positive or _positive_product(den) else sympy.Le(num / den, 0)

    if sympy.expand(sl - su) == 0:
        cond = at(X)
        if not cond.has(X):  # equal slopes: one condition on the constants
            return cond
    return sympy.Or(z1 < z0 + 1, sympy.And(at(z0 + 1), at(z1)))


def _positive_product(e) -> bool:
    return all((f.is_Integer and f > 0) or (f.is_Symbol and f.is_integer) for f in sympy.Mul.make_args(e))


# ---------------------------------------------------------------------------------------------
# clauses -> a cover
# ---------------------------------------------------------------------------------------------

def _settled(r):
    """The comparison ``r``, or sympy's true / false where its symbols' assumptions decide it once
    the grouping of float arithmetic is off (``ceiling(-Grouped(3**w)) <= 0`` is true): what the
    printers make of it, so a settled comparison is no precondition to check (the host's code
    printed as ``True`` while the walk switched to block lists it did not render)."""
    value = ungrouped(r)
    return value if isinstance(value, (BooleanTrue, BooleanFalse)) else r


def cover(clauses: Sequence[Clause], int_params: FrozenSet[sympy.Symbol]) -> Cover:
    """The :class:`Cover` of a DNF; raises :class:`NoBand` (saying why) when it has none."""
    solver = _Solver(int_params)
    bands = [solver.clause(c) for c in clauses]
    bands = [b for b in bands if not isinstance(b.guard, BooleanFalse)]
    rows, columns, varying = [], [], []
    for b in bands:
        if b.keys_unbounded:
            if b.row_lo is not None and b.row_hi is not None:
                raise NoBand("a clause allows every key on a range of rows bounded on both sides")
            rows.append(b)
        elif b.constant:
            columns.append(b)
        else:
            varying.append(b)
    varying = _merge_all(varying + columns)
    columns = [b for b in varying if b.constant]
    varying = [b for b in varying if not b.constant]
    if len(varying) > 1:
        raise NoBand(f"a union of {len(varying)} bands that vary with the row")
    band = varying[0] if varying else None
    if len(columns) + len(varying) > 2:
        raise NoBand(f"{len(columns)} columns and {len(varying)} band: more than two key intervals per row")
    positive = set().union(*[b.positive for b in bands]) if bands else set()
    monotone = sympy.And(*[sympy.Ge(p, 1) for p in sorted(positive, key=str)])
    pre = [monotone]
    if band is not None:
        pre.append(band.chain())
    precondition = sympy.And(*pre).replace(lambda x: isinstance(x, sympy.Rel), _settled)
    if isinstance(precondition, BooleanFalse):
        raise NoBand("consecutive rows of the band leave holes between them")
    if precondition.free_symbols & {S.b, S.h}:
        raise NoBand("its precondition depends on b or h")
    return Cover(rows=tuple(rows), columns=tuple(columns), band=band, precondition=precondition, monotone=monotone)


def _merge_all(bands: List[Band]) -> List[Band]:
    """Merge bands pairwise while two share their lower (or upper) bound, row range and guard."""
    bands = list(bands)
    merged = True
    while merged:
        merged = False
        for a in range(len(bands)):
            for b in range(a + 1, len(bands)):
                m = _merge(bands[a], bands[b])
                if m is not None:
                    bands[a] = m
                    del bands[b]
                    merged = True
                    break
            if merged:
                break
    return bands


def _merge(p: Band, q: Band) -> Optional[Band]:
    if (p.guard, p.row_lo, p.row_hi) != (q.guard, q.row_lo, q.row_hi):
        return None
    positive = p.positive | q.positive
    if set(p.lower) == set(q.lower):  # [L, max(U_p, U_q)]; no upper bound on either side: none
        upper = tuple(_unique(p.upper + q.upper)) if p.upper and q.upper else ()
        return Band(p.guard, p.row_lo, p.row_hi, p.lower, upper, positive)
    if set(p.upper) == set(q.upper):  # [min(L_p, L_q), U]
        lower = tuple(_unique(p.lower + q.lower)) if p.lower and q.lower else ()
        return Band(p.guard, p.row_lo, p.row_hi, lower, p.upper, positive)
    return None


def cover_of(clauses: Sequence[Clause], int_params: FrozenSet[sympy.Symbol]) -> Union[Cover, str]:
    """:func:`cover`, or the reason there is none."""
    try:
        return cover(clauses, int_params)
    except NoBand as e:
        return str(e)


def is_true(e) -> bool:
    return isinstance(e, BooleanTrue) or e is sympy.true
