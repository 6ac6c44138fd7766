"""Print sympy trees as Triton (kernel code) or Python (host code) expressions.

The printer knows the language's semantics, not the kernel's layout: callers give
it a ``names`` map from each free symbol to the text it should become, and a
``gather`` callback that renders an input access such as ``doc[b, i]``.
Integer ``//`` and ``%`` follow Python (floor) semantics as the language says;
Triton's own operators truncate toward zero, so the printer emits ``_floordiv`` /
``_floormod`` helpers unless sympy proves both operands have the safe signs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Set

import sympy
from sympy.core.function import AppliedUndef

from attncc.spec.builtins import RandomBlocks


@dataclass
class TritonPrinter:
    names: Dict[sympy.Symbol, str]
    gather: Optional[Callable[[AppliedUndef], str]] = None
    random_blocks: Optional[Callable[[RandomBlocks], str]] = None
    helpers: Set[str] = field(default_factory=set)  # helper functions the printed code calls

    def __call__(self, e) -> str:
        return self.p(sympy.sympify(e))

    # ------------------------------------------------------------------
    def p(self, e) -> str:
        if e in self.names:
            return self.names[e]
        if e is sympy.true:
            return "True"
        if e is sympy.false:
            return "False"
        if e.is_Integer:
            return str(int(e))
        if e is sympy.oo:
            return 'float("inf")'
        if e is -sympy.oo:
            return '(-float("inf"))'
        if e.is_Rational:
            return repr(float(e))
        if e.is_Float or e.is_NumberSymbol or (e.is_number and e.is_real):
            return repr(float(e))
        if isinstance(e, sympy.Symbol):
            raise KeyError(f"no kernel name for symbol {e}")
        if isinstance(e, AppliedUndef):
            if self.gather is None:
                raise ValueError(f"input access {e} cannot appear here")
            return self.gather(e)
        method = getattr(self, "_" + type(e).__name__, None)
        if method is None:
            raise NotImplementedError(f"attncc cannot render {type(e).__name__}: {e}")
        return method(e)

    # -- arithmetic ---------------------------------------------------------
    def _Add(self, e):
        terms = sorted(e.args, key=lambda t: t.could_extract_minus_sign())
        out = self.p(terms[0])
        for t in terms[1:]:
            if t.could_extract_minus_sign():
                out += " - " + self._atom(-t)
            else:
                out += " + " + self._atom(t)
        return f"({out})"

    def _Mul(self, e):
        coeff, rest = e.as_coeff_Mul()
        if coeff == -1:
            return f"(-{self._atom(rest)})"
        num, den = sympy.fraction(e)
        if den != 1 and not den.is_number:
            return f"({self._atom(num)} / {self._atom(den)})"
        factors = [self._atom(a) for a in e.args]
        return "(" + " * ".join(factors) + ")"

    def _atom(self, e) -> str:
        return self.p(e)

    def _Pow(self, base, exp=None):
        e = base
        base, exp = e.args
        if base == 2:
            return f"tl.exp2({self._float(exp)})"
        if base == sympy.E:
            return f"tl.exp({self._float(exp)})"
        if exp == sympy.Rational(1, 2):
            return f"tl.sqrt({self._float(base)})"
        if exp == -sympy.Rational(1, 2):
            return f"tl.rsqrt({self._float(base)})"
        if exp.is_Integer and 1 <= abs(int(exp)) <= 4:
            prod = " * ".join([self._atom(base)] * abs(int(exp)))
            return f"({prod})" if exp > 0 else f"(1.0 / ({prod}))"
        return f"tl.exp2({self.p(exp)} * tl.log2({self._float(base)}))"

    def _float(self, e) -> str:
        """An argument of a transcendental function: Triton's math functions take floats only,
        so an integer expression (``tan(b)``, ``exp(h)``) is converted first."""
        x = self.p(e)
        return f"({x} * 1.0)" if e.is_integer else x

    def _exp(self, e):
        return f"tl.exp({self._float(e.args[0])})"

    def _log(self, e):
        return f"tl.log({self._float(e.args[0])})"

    def _sin(self, e):
        self.helpers.add("_sin")
        return f"_sin({self._float(e.args[0])}, FAST_MATH)"

    def _cos(self, e):
        self.helpers.add("_cos")
        return f"_cos({self._float(e.args[0])}, FAST_MATH)"

    def _tan(self, e):
        self.helpers |= {"_sin", "_cos"}
        x = self._float(e.args[0])
        return f"(_sin({x}, FAST_MATH) / _cos({x}, FAST_MATH))"

    def _tanh(self, e):
        self.helpers.add("_tanh")
        return f"_tanh({self._float(e.args[0])}, FAST_MATH)"

    def _Sigmoid(self, e):
        return f"tl.sigmoid({self._float(e.args[0])})"

    def _Abs(self, e):
        return f"tl.abs({self.p(e.args[0])})"

    def _Min(self, e):
        return self._fold("tl.minimum", e.args)

    def _Max(self, e):
        return self._fold("tl.maximum", e.args)

    def _fold(self, fn, args):
        out = self.p(args[0])
        for a in args[1:]:
            out = f"{fn}({out}, {self.p(a)})"
        return out

    def _floor(self, e):
        arg = e.args[0]
        num, den = sympy.fraction(sympy.together(arg))
        if den != 1 and num.is_integer and den.is_integer:
            if _nonnegative(num) and den.is_positive:
                return f"({self._atom(num)} // {self._atom(den)})"
            self.helpers.add("_floordiv")
            return f"_floordiv({self.p(num)}, {self.p(den)})"
        if arg.is_integer:
            return self.p(arg)
        return f"tl.floor({self.p(arg)})"

    def _ceiling(self, e):
        return self.p(-sympy.floor(-e.args[0]))

    def _Mod(self, e):
        a, m = e.args
        if a.is_integer and m.is_integer:
            if _nonnegative(a) and m.is_positive:
                return f"({self._atom(a)} % {self._atom(m)})"
            self.helpers.add("_floormod")
            return f"_floormod({self.p(a)}, {self.p(m)})"
        return f"({self.p(a)} - tl.floor({self.p(a)} / {self.p(m)}) * {self.p(m)})"

    def _Piecewise(self, e):
        (val, cond), rest = e.args[0], e.args[1:]
        if cond is sympy.true:
            return self.p(val)
        other = self.p(sympy.Piecewise(*rest)) if rest else 'float("nan")'
        return f"tl.where({self.p(cond)}, {self.p(val)}, {other})"

    # -- logic --------------------------------------------------------------
    def _rel(self, e, op):
        return f"({self.p(e.lhs)} {op} {self.p(e.rhs)})"

    def _LessThan(self, e):
        return self._rel(e, "<=")

    def _StrictLessThan(self, e):
        return self._rel(e, "<")

    def _GreaterThan(self, e):
        return self._rel(e, ">=")

    def _StrictGreaterThan(self, e):
        return self._rel(e, ">")

    def _Equality(self, e):
        return self._rel(e, "==")

    def _Unequality(self, e):
        return self._rel(e, "!=")

    def _And(self, e):
        return "(" + " & ".join(self.p(a) for a in _ordered(e.args)) + ")"

    def _Or(self, e):
        return "(" + " | ".join(self.p(a) for a in _ordered(e.args)) + ")"

    def _Not(self, e):
        return f"(~{self.p(e.args[0])})"

    # -- built-ins ----------------------------------------------------------
    def _Bucket(self, e):
        nb, md, bd = e.options
        name = f"_bucket_{nb}_{md}_{int(bd)}"
        self.helpers.add(name)
        return f"{name}({self.p(e.args[0])})"

    def _AlibiSlope(self, e):
        self.helpers.add("_alibi_slope")
        h, n_heads = e.args
        return f"_alibi_slope({self.p(h)}, {self.p(n_heads)})"

    def _RandomBlocks(self, e):
        if self.random_blocks is None:
            raise ValueError("random_blocks() cannot appear here")
        return self.random_blocks(e)


def param_var(name: str) -> str:
    """The kernel variable of a spec param: prefixed, so that a param named like a kernel
    local (q, k, p, s, ...) cannot shadow it."""
    return f"prm_{name}"


def _nonnegative(e) -> bool:
    """sympy's assumptions, helped by the fact that a positive integer is at least 1."""
    if e.is_nonnegative:
        return True
    shift = {s: sympy.Dummy(integer=True, nonnegative=True) + 1 for s in e.free_symbols if s.is_integer and s.is_positive}
    return bool(shift) and e.xreplace(shift).is_nonnegative is True


def _ordered(args):
    """A stable order for commutative operands, so regenerated files are identical."""
    return sorted(args, key=sympy.default_sort_key)


class PythonPrinter(TritonPrinter):
    """Host-side (plain Python ints/floats) printing: for values computed at launch."""

    def _Max(self, e):
        return self._fold("max", e.args)

    def _Min(self, e):
        return self._fold("min", e.args)

    def _floor(self, e):
        arg = e.args[0]
        num, den = sympy.fraction(sympy.together(arg))
        if den != 1 and num.is_integer and den.is_integer:
            return f"({self.p(num)} // {self.p(den)})"
        return f"math.floor({self.p(arg)})"

    def _Mod(self, e):
        return f"({self.p(e.args[0])} % {self.p(e.args[1])})"

    def _Abs(self, e):
        return f"abs({self.p(e.args[0])})"

    def _And(self, e):
        return "(" + " and ".join(self.p(a) for a in _ordered(e.args)) + ")"

    def _Or(self, e):
        return "(" + " or ".join(self.p(a) for a in _ordered(e.args)) + ")"

    def _Not(self, e):
        return f"(not {self.p(e.args[0])})"

    def _AlibiSlope(self, e):
        h, n_heads = e.args
        return f"_rt.semantics.alibi_slope({self.p(h)}, {self.p(n_heads)})"
