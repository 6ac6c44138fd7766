"""Compile a mask's sympy tree into an :class:`~attncc.runtime.tiles.IntervalProgram`.

Each numeric sub-expression becomes an interval over a tile and each boolean one a
tri-state (see :mod:`attncc.runtime.tiles`); a float-valued (non-integer) one is widened
(``tiles.widen``) to hold its float64 rounding in any order of operations. The translation is sound node by node:
whatever the analysis cannot bound (``sin``, an input indexed by anything but bare
variables, ...) becomes ``unbounded()`` / "don't know", which only costs precision.
Repeated sub-expressions are computed once.

Leaf names are injective in what they stand for (two inputs ``x`` read at ``[b, i]`` and
``x_b`` read at ``[i]`` are two leaves): positions ``b h i j n_q n_k``, params ``p_<name>``,
input reads ``in_<name>_at_<index>`` (the index entries are ``b h i j`` or integers, never
``at``, so the last ``_at_`` separates name and index); steps are ``v<n>``. A leaf name
that would stand for two different things is an error, never a silent merge.
"""
from __future__ import annotations

from typing import Dict, List, Tuple, Union

import sympy
from sympy.logic.boolalg import BooleanFalse, BooleanTrue

from attncc.core.tiles import BlockStat, IntervalProgram
from attncc.spec import symbols as S
from attncc.spec.builtins import AlibiSlope, BitAnd, BitOr, BitXor, Bucket, FloatDiv, RandomBlocks, Shift, Sigmoid, ToFloat
from attncc.spec.ir import Pattern

Value = Union[str, int, float]  # a step's result name, or a literal number (a point interval)

_POSITION_VARS = {S.b: "b", S.h: "h", S.i: "i", S.j: "j"}
_MONOTONE = {sympy.exp: "exp_", sympy.log: "log_", sympy.tanh: "tanh_", Sigmoid: "sigmoid_", sympy.erf: "erf_"}
_BITWISE = {BitAnd: "bitand", BitOr: "bitor", BitXor: "bitxor", Shift: "shift_"}
_RELATIONS = {sympy.Le: "le", sympy.Lt: "lt", sympy.Eq: "eq", sympy.Ne: "ne"}


def compile_mask(pattern: Pattern) -> IntervalProgram:
    """The interval program of ``pattern.mask`` (which must not be None)."""
    c = _Compiler(pattern)
    result = c.boolean(pattern.mask)
    return IntervalProgram(leaves=tuple(c.leaves.values()), steps=tuple(c.steps), result=result)


def _signed_terms(e):
    """The additive terms of ``e`` with a positive coefficient, and the negated others."""
    pos, neg = [], []
    for term in sorted(sympy.Add.make_args(e), key=sympy.default_sort_key):
        if term.could_extract_minus_sign():
            neg.append(-term)
        else:
            pos.append(term)
    return pos, neg


def _integer_valued(e) -> bool:
    """``e`` is an integer at every pair, computed exactly by the kernels (integer ``//`` and ``%``,
    :mod:`attncc.analysis.integer`) and the reference: its interval is never widened. Unlike
    sympy's ``is_integer``, ``floor(i / w)`` and ``i % w`` with ``w`` an int param count (sympy
    cannot rule out ``w = 0``, where the mask is undefined anyway), and a floor or ceiling of
    float arithmetic counts too (its argument is widened, the rounding to an integer is exact)."""
    if e.is_integer or isinstance(e, (sympy.floor, sympy.ceiling)):
        return True
    if isinstance(e, (sympy.Mod, sympy.Add, sympy.Mul, sympy.Min, sympy.Max, sympy.Abs)):
        return all(_integer_valued(a) for a in e.args)
    if isinstance(e, sympy.Pow):
        return bool(_integer_valued(e.base) and e.exp.is_Integer and e.exp >= 0)
    return False


class _Compiler:
    def __init__(self, pattern: Pattern):
        self.pattern = pattern
        self.params = {p.symbol: p for p in pattern.params}
        self.inputs = {d.name: d for d in pattern.inputs}
        self.steps: List[Tuple[str, str, tuple]] = []
        self.leaves: Dict[str, Tuple[str, str, tuple]] = {}
        self.memo: Dict[tuple, str] = {}

    # -- plumbing -----------------------------------------------------------
    def emit(self, op: str, *args) -> str:
        key = (op, args)
        if key not in self.memo:
            name = f"v{len(self.steps)}"
            self.steps.append((name, op, tuple(args)))
            self.memo[key] = name
        return self.memo[key]

    def leaf(self, name: str, kind: str, detail: tuple = ()) -> str:
        entry = self.leaves.setdefault(name, (name, kind, detail))
        if entry != (name, kind, detail):  # the naming scheme (module docstring) makes this impossible
            raise AssertionError(f"interval program leaf {name!r} would stand for {entry} and {(name, kind, detail)}")
        return name

    def unknown_number(self) -> str:
        return self.emit("unbounded")

    def unknown_bool(self) -> str:
        return self.emit("tri", True, True)

    # -- numbers ------------------------------------------------------------
    def number(self, e) -> Value:
        try:
            value = self._number(e)
        except (TypeError, ValueError, ZeroDivisionError, sympy.PolynomialError):
            return self.unknown_number()  # sympy could not take this node apart: sound, not precise
        if (_integer_valued(e) or e.is_Atom or isinstance(e, sympy.core.function.AppliedUndef)
                or isinstance(value, (int, float))):
            return value  # exact: integer arithmetic, leaves and literals
        # float arithmetic: the kernels and the reference round it in their own order (tiles.widen)
        return self.emit("widen", value)

    def _number(self, e) -> Value:
        if e.is_Integer:
            return int(e)
        if e.is_Rational or e.is_Float:
            return float(e)
        if e in (sympy.oo, -sympy.oo, sympy.zoo, sympy.nan) or e.is_Number:
            return self.unknown_number()
        if e.is_Symbol:
            return self.symbol(e)
        if isinstance(e, sympy.Add):
            return self.add(e)
        if isinstance(e, sympy.Mul):
            return self.mul(e)
        if isinstance(e, sympy.Pow):
            return self.power(e)
        if isinstance(e, (sympy.floor, sympy.ceiling)):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            if isinstance(e, sympy.ceiling):  # ceil(n / d) = -floor(-n / d)
                if den == 1:
                    return self.emit("neg", self.emit("floor_", self.emit("neg", self.number(num))))
                return self.emit("neg", self.emit("floordiv", self.emit("neg", self.number(num)), self.number(den)))
            if den == 1:
                return self.emit("floor_", self.number(num))
            return self.emit("floordiv", self.number(num), self.number(den))
        if isinstance(e, sympy.Mod):
            return self.emit("mod", self.number(e.args[0]), self.number(e.args[1]), _integer_valued(e))
        if isinstance(e, sympy.Abs):
            return self.emit("abs_", self.number(e.args[0]))
        if isinstance(e, (sympy.Min, sympy.Max)):
            return self.emit("min_" if isinstance(e, sympy.Min) else "max_", *[self.number(a) for a in e.args])
        if isinstance(e, sympy.Piecewise):
            value = self.number(e.args[-1].expr) if e.args[-1].cond is sympy.true else self.unknown_number()
            pieces = e.args[:-1] if e.args[-1].cond is sympy.true else e.args
            for expr_k, cond_k in reversed(pieces):
                value = self.emit("select", self.boolean(cond_k), self.number(expr_k), value)
            return value
        if isinstance(e, ToFloat):  # exact conversion; the float arithmetic around it is widened
            return self.number(e.args[0])
        if isinstance(e, FloatDiv):
            return self.emit("div", self.number(e.args[0]), self.number(e.args[1]))
        if isinstance(e, Bucket):
            nb, md, bd = e.options
            return self.emit("bucket", self.number(e.args[0]), nb, md, int(bd))
        if isinstance(e, AlibiSlope):
            return self.emit("span", 0.0, 1.0)  # every ALiBi slope is in (0, 1]
        if type(e) in _BITWISE:
            return self.emit(_BITWISE[type(e)], *[self.number(a) for a in e.args])
        for fn, op in _MONOTONE.items():
            if isinstance(e, fn):
                return self.emit(op, self.number(e.args[0]))
        if isinstance(e, sympy.core.function.AppliedUndef) and e.func.__name__ in self.inputs:
            return self.input(e)
        return self.unknown_number()

    def symbol(self, e) -> Value:
        if e in _POSITION_VARS:
            name = _POSITION_VARS[e]
            return self.leaf(name, name)
        if e == S.n_q or e == S.n_k:
            return self.leaf(e.name, e.name)
        if e in self.params:
            p = self.params[e]
            return self.leaf(f"p_{p.name}", "param", (p.name, p.value))  # prefix-free against in_, v<n>
        return self.unknown_number()

    def add(self, e) -> Value:
        # positive terms first, then subtract the others: j - i is one sub, not neg + add
        pos, neg = _signed_terms(e)
        value = None
        for term in pos:
            part = self.number(term)
            value = part if value is None else self.emit("add", value, part)
        for term in neg:
            part = self.number(term)
            value = self.emit("neg", part) if value is None else self.emit("sub", value, part)
        return value

    def mul(self, e) -> Value:
        coeff, rest = e.as_coeff_Mul()
        numer, denom = [], []
        for f in sympy.Mul.make_args(rest):
            if isinstance(f, sympy.Pow) and f.exp.is_Integer and f.exp < 0:
                denom.append(f.base ** (-f.exp))
            else:
                numer.append(f)
        value = None
        for f in numer:
            part = self.number(f)
            value = part if value is None else self.emit("mul", value, part)
        if denom:
            d = self.number(sympy.Mul(*denom))
            value = self.emit("div", 1 if value is None else value, d)
        if coeff == -1:
            return self.emit("neg", value)
        if coeff != 1:
            c = int(coeff) if coeff.is_Integer else None
            if c is None and coeff.is_Rational:  # x * p/q: divide by q so a point stays exact
                if coeff.p != 1:
                    value = self.emit("mul", value, int(coeff.p))
                return self.emit("div", value, int(coeff.q))
            return self.emit("mul", value, c if c is not None else float(coeff))
        return value

    def power(self, e) -> Value:
        base, exp = e.args
        if exp.is_Integer:
            return self.emit("pow_int", self.number(base), int(exp))
        if exp.is_Rational and exp > 0:
            return self.emit("pow_frac", self.number(base), float(exp))
        if base.is_Number and base > 0:
            return self.emit("pow_base", float(base), self.number(exp))
        return self.unknown_number()

    def input(self, app) -> Value:
        decl = self.inputs[app.func.__name__]
        index = []
        for a in app.args:
            if a in _POSITION_VARS:
                index.append(_POSITION_VARS[a])
            elif a.is_Integer and int(a) >= 0:
                index.append(int(a))
            else:  # only bare variables and constants are reduced per block
                return self.unknown_number()
        named = [v for v in index if isinstance(v, str)]
        if len(set(named)) != len(named) or len(index) != len(decl.dims):
            return self.unknown_number()
        pos = sorted(v for v in named if v in ("i", "j"))
        axis = "".join(pos) or None
        block = "".join("m" if v == "i" else "n" for v in pos) or None
        stat = BlockStat(decl.name, axis, block, tuple(index))
        name = f"in_{decl.name}_at_" + "_".join(str(v) for v in index)  # injective: module docstring
        return self.leaf(name, "input", (stat,))

    # -- booleans -----------------------------------------------------------
    def boolean(self, e) -> str:
        try:
            return self._boolean(e)
        except (TypeError, ValueError, ZeroDivisionError, sympy.PolynomialError):
            return self.unknown_bool()

    def _boolean(self, e) -> str:
        if isinstance(e, BooleanTrue):
            return self.emit("tri", True, False)
        if isinstance(e, BooleanFalse):
            return self.emit("tri", False, True)
        if isinstance(e, sympy.Not):
            return self.emit("not_", self.boolean(e.args[0]))
        if isinstance(e, (sympy.And, sympy.Or, sympy.Xor)):
            parts = [self.boolean(a) for a in sorted(e.args, key=sympy.default_sort_key)]
            return self.emit({sympy.And: "and_", sympy.Or: "or_", sympy.Xor: "xor_"}[type(e)], *parts)
        if isinstance(e, sympy.core.relational.Relational):
            lhs, rhs = e.lhs, e.rhs
            op = _RELATIONS.get(type(e))
            if op is None:  # Ge / Gt
                op, lhs, rhs = {sympy.Ge: "le", sympy.Gt: "lt"}[type(e)], rhs, lhs
            # the difference cancels what both sides share (i - n_q vs j - n_k); its terms
            # of either sign go to the side where they are positive: j - i <= 0 is j <= i
            pos, neg = _signed_terms(lhs - rhs)
            side = lambda terms: self.number(sympy.Add(*terms)) if terms else 0  # noqa: E731
            return self.emit(op, side(pos), side(neg))
        if isinstance(e, RandomBlocks):
            i_, j_, n_k = e.args[:3]
            if (i_, j_, n_k) != (S.i, S.j, S.n_k):
                return self.unknown_bool()
            r, block, seed = e.options
            return self.emit("random_blocks", self.leaf("i", "i"), self.leaf("j", "j"), self.leaf("n_k", "n_k"),
                             r, block, seed)
        return self.unknown_bool()
