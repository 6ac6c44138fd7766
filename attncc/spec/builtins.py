"""Built-ins of the expression language as sympy functions.

They stay opaque nodes in the sympy trees (the analysis knows what they mean;
codegen renders them), with numeric evaluation from :mod:`attncc.runtime.semantics`.
"""
from __future__ import annotations

import sympy
from sympy.logic.boolalg import BooleanFunction
from sympy.printing.precedence import PRECEDENCE

from attncc.core import semantics


class Bucket(sympy.Function):
    """T5 relative position bucket: ``Bucket(d, num_buckets, max_distance, bidirectional)``
    with ``d = j - i``; bidirectional is 1 or 0."""

    is_integer = True
    nargs = 4

    @classmethod
    def eval(cls, d, num_buckets, max_distance, bidirectional):
        if all(a.is_Integer for a in (d, num_buckets, max_distance, bidirectional)):
            return sympy.Integer(semantics.t5_bucket(int(d), int(num_buckets), int(max_distance), bool(bidirectional)))
        return None

    @property
    def options(self):
        _, nb, md, bd = self.args
        return int(nb), int(md), bool(bd)


class AlibiSlope(sympy.Function):
    """ALiBi slope of query head ``h`` among ``n_heads`` heads: ``AlibiSlope(h, n_heads)``."""

    is_real = True
    is_positive = True
    nargs = 2

    @classmethod
    def eval(cls, h, n_heads):
        if h.is_Integer and n_heads.is_Integer:
            return sympy.Float(semantics.alibi_slope(int(h), int(n_heads)))
        return None


class Sigmoid(sympy.Function):
    """The logistic function; derivative sigmoid(x) * (1 - sigmoid(x))."""

    is_real = True
    nargs = 1

    def fdiff(self, argindex=1):
        x = self.args[0]
        return Sigmoid(x) * (1 - Sigmoid(x))

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return 1 / (1 + sympy.exp(-x))

    def _eval_evalf(self, prec):
        # numeric when its argument is: makes sigmoid(0.5) comparable (min, max, where)
        if self.args[0].is_number:
            return self._eval_rewrite_as_exp(self.args[0])._eval_evalf(prec)
        return None


class _Bitwise(sympy.Function):
    """An integer bitwise operator of two integers, with Python's semantics (two's complement of
    infinite precision: ``-1 & x == x``; in the kernels' int32 / int64 arithmetic the same for
    every value they hold). A step function of its operands: derivative 0."""

    nargs = 2
    is_integer = True
    symbol = ""
    python = None

    @classmethod
    def eval(cls, a, b):
        if a.is_Integer and b.is_Integer:
            return sympy.Integer(cls.python(int(a), int(b)))
        return None

    def fdiff(self, argindex=1):
        return sympy.Integer(0)

    def _sympystr(self, printer):
        return "(" + f" {self.symbol} ".join(printer._print(a) for a in self.args) + ")"


class BitAnd(_Bitwise):
    """``a & b`` of integers."""

    symbol = "&"
    python = staticmethod(lambda a, b: a & b)

    def _eval_is_nonnegative(self):
        return True if any(a.is_nonnegative for a in self.args) else None


class BitOr(_Bitwise):
    """``a | b`` of integers."""

    symbol = "|"
    python = staticmethod(lambda a, b: a | b)

    def _eval_is_nonnegative(self):
        return True if all(a.is_nonnegative for a in self.args) else None

    def _eval_is_odd(self):  # x | 1 is odd (so never 0) for every int x
        return True if any(a.is_odd for a in self.args) else None


class BitXor(_Bitwise):
    """``a ^ b`` of integers."""

    symbol = "^"
    python = staticmethod(lambda a, b: a ^ b)

    def _eval_is_nonnegative(self):
        return True if all(a.is_nonnegative for a in self.args) else None


SHIFT_LIMIT, shift = semantics.SHIFT_LIMIT, semantics.shift  # (defined where the runtime's bounds take them too)


class Shift(sympy.Function):
    """``x << n`` (and ``x >> n`` as ``Shift(x, -n)``) for a shift amount ``n`` that is not a
    constant: ``floor(x * 2**n)`` for every integer ``n`` (a negative amount shifts the other way;
    see :func:`shift` for the clamp). Shifts by constants are ``x * 2**k`` and ``x // 2**k``."""

    nargs = 2
    is_integer = True

    @classmethod
    def eval(cls, x, n):
        if x.is_Integer and n.is_Integer:
            return sympy.Integer(shift(int(x), int(n)))
        return None

    def _eval_is_nonnegative(self):
        return True if self.args[0].is_nonnegative else None

    def _eval_is_positive(self):  # 1 << h: floor(x * 2**n) >= x >= 1 for n >= 0
        x, n = self.args
        return True if x.is_positive and n.is_nonnegative else None

    def fdiff(self, argindex=1):
        return sympy.Integer(0)

    def _sympystr(self, printer):  # as written: x << n, or x >> m for n = -m
        x, n = self.args
        if n.could_extract_minus_sign():
            return f"({printer._print(x)} >> {printer._print(-n)})"
        return f"({printer._print(x)} << {printer._print(n)})"


class RandomBlocks(BooleanFunction):
    """BigBird random blocks: true when key block ``j // block`` is one of the ``r``
    seeded random key blocks of query block ``i // block`` (out of ``ceil(n_k / block)``).
    Args: ``(i, j, n_k, r, block, seed)``."""

    nargs = 6

    @classmethod
    def eval(cls, i, j, n_k, r, block, seed):
        if all(a.is_Integer for a in (i, j, n_k, r, block, seed)):
            nkb = -(-int(n_k) // int(block))
            chosen = semantics.random_block_set(int(i) // int(block), nkb, int(r), int(seed))
            return sympy.true if int(j) // int(block) in chosen else sympy.false
        return None

    @property
    def options(self):
        _, _, _, r, block, seed = self.args
        return int(r), int(block), int(seed)

    def _eval_simplify(self, **kwargs):
        return self

    def to_nnf(self, simplify=True):
        return self

    def to_anf(self, deep=True):
        return self


# ---------------------------------------------------------------------------
# Float arithmetic as written
# ---------------------------------------------------------------------------
# sympy rewrites arithmetic as it builds it: a number times a sum is distributed
# (``(i - j) / 7`` is ``i/7 - j/7``), sums and products are flattened and their constants
# folded (``x + 0.1 + 0.2`` is ``x + 0.3``), ``x / 2.5`` is ``0.4*x``. In integers that is
# exact; in float64 each form rounds differently, and a mask decides pairs on the last bit.
# The parser therefore keeps every operand of float arithmetic that sympy could take apart
# or merge inside a Grouped (a ToFloat), and writes a division by a float literal as FloatDiv: what remains is
# one operation on two opaque operands, which sympy can only reorder where that is exact.


class ToFloat(sympy.Function):
    """``x`` computed on its own, then a float: the integer arithmetic of an integer ``x`` is
    exact, one conversion follows (float64 in the reference and mask code, float32 in score
    code); a float ``x`` is its own value. An opaque function, so no sympy pass distributes a
    coefficient over it or merges its terms with the expression around it.

    Made by the parser (float arithmetic as written, above) and by
    :func:`attncc.analysis.integer.integer_sums` in score code (``0.1*j - 0.1*i`` is
    ``0.1 * ToFloat(j - i)``: one rounding instead of two)."""

    nargs = 1
    is_real = True  # and no claim is_integer = False: sympy would decide Eq(ToFloat(x), 10) False at once

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return sympy.Float(x)
        if isinstance(x, ToFloat):
            return x
        return None

    def fdiff(self, argindex=1):
        return sympy.Integer(1)

    def _eval_is_finite(self):
        return True

    def _sympystr(self, printer):
        return f"float({printer.doprint(self.args[0])})"


class Grouped(ToFloat):
    """An operand of float arithmetic kept as written by the parser: ``x`` computed on its own
    (its integer arithmetic exact), as a float64. A ToFloat of its own kind so that score code,
    which is float32 and groups integer sums its own way, can take the parser's grouping off
    (:func:`attncc.analysis.integer.integer_sums`) and leave its own in place."""

    def _sympystr(self, printer):
        return f"({printer.doprint(self.args[0])})"


class FloatDiv(sympy.Function):
    """``a / b`` as one division (Python's), for a divisor ``b`` that is not an integer literal:
    sympy would make it a product with a reciprocal (``x / 2.5`` is ``0.4*x``, off by an ulp for a
    third of the integers x; ``j / t`` is ``j * t**-1``, and a pass may compute ``t**-1`` apart)."""

    nargs = 2
    is_real = True

    @classmethod
    def eval(cls, a, b):
        if a.is_Number and b.is_Number and not b.is_zero:
            return sympy.Float(float(a) / float(b))
        return None

    def fdiff(self, argindex=1):
        a, b = self.args
        return 1 / b if argindex == 1 else -a / b**2

    def _eval_is_finite(self):
        return True

    def _sympystr(self, printer):
        a, b = (printer.parenthesize(x, PRECEDENCE["Mul"], strict=True) for x in self.args)
        return f"({a} / {b})"


def quotient(e):
    """``(numerator, denominator)`` of a quotient the way the language divides: a FloatDiv's two
    operands, else sympy's fraction (``ToFloat(i - j) / 7`` is ``(ToFloat(i - j), 7)``), a
    divisor ``where`` included: sympy writes ``j / where(c, d, -7)`` as ``j * Piecewise((1/d, c),
    (-1/7, True))``, which is ``(j, Piecewise((d, c), (-7, True)))``."""
    if isinstance(e, FloatDiv):
        return e.args
    num, den = sympy.fraction(sympy.together(e))
    wheres = [f for f in sympy.Mul.make_args(num) if _reciprocal_where(f)]
    if not wheres:
        return num, den
    rest = [f for f in sympy.Mul.make_args(num) if f not in wheres]
    dens = [sympy.Piecewise(*[(1 / v, c) for v, c in f.args]) for f in wheres]
    return sympy.Mul(*rest), sympy.Mul(den, *dens)


def divides(e) -> bool:
    """``e`` holds a ``//`` or ``%`` (sympy's floor, ceiling, Mod)."""
    return isinstance(e, sympy.Basic) and e.has(sympy.floor, sympy.ceiling, sympy.Mod)


def _reciprocal_where(f) -> bool:
    """``f`` is a Piecewise of reciprocals ``±1/d`` (``1``, ``1/7``, ``-1/2`` too, and such Piecewise
    nested): sympy's ``1 / where(...)``."""
    return isinstance(f, sympy.Piecewise) and all(abs(sympy.fraction(v)[0]) == 1 or _reciprocal_where(v)
                                                  for v, _ in f.args)
