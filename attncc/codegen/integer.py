"""Integer ``//`` and ``%`` as nodes that no code-generation pass can take apart.

The spec language's ``a // b`` is sympy's ``floor(a / b)``, a product with ``b**-1`` inside,
and ``a % b`` is ``Mod(a, b)``. The analysis reasons about those forms; code generation must
not: a pass that walks sub-expressions (the hoister moving loop-invariant values out of the
key loop) sees ``1 / w`` in ``floor(j / w)`` as a value of its own, hoists it as a float and
leaves ``floor(j * c0)`` to be printed in float32, which is wrong for many divisors (and a
float in a pointer offset when the quotient indexes an input).

So before code generation hoists or prints an expression, :func:`integer_ops` rewrites every
floor division of integers into ``FloorDiv(a, b)`` and every modulo of integers into
``FloorMod(a, b)``: functions whose arguments are the two integer operands, which a pass can
only treat as a whole (it may hoist ``a`` or ``b``, never a part of the division). The
printers render them as integer operations with Python's floor semantics for any signs
(:mod:`attncc.codegen.printer`). The rewrite is idempotent; ``ceiling(a / b)`` becomes
``-FloorDiv(-a, b)``. Floor and modulo of non-integers stay sympy's ``floor`` / ``Mod``.
"""
from __future__ import annotations

import sympy
from sympy.printing.precedence import PRECEDENCE


class FloorDiv(sympy.Function):
    """``a // b`` of two integer expressions (Python's floor division, any signs)."""

    nargs = 2
    is_integer = True
    precedence = PRECEDENCE["Mul"] - 1  # printed "a // b": parenthesized inside a product

    @classmethod
    def eval(cls, a, b):
        if a.is_Integer and b.is_Integer and b != 0:
            return sympy.Integer(int(a) // int(b))
        return None

    def _eval_is_nonnegative(self):
        a, b = self.args
        if a.is_nonnegative and b.is_positive:
            return True
        return None

    def fdiff(self, argindex=1):
        return sympy.Integer(0)  # a step function: derivative 0 almost everywhere

    def _sympystr(self, printer):
        a, b = (printer.parenthesize(x, PRECEDENCE["Mul"], strict=True) for x in self.args)
        return f"{a} // {b}"


class FloorMod(sympy.Function):
    """``a % b`` of two integer expressions (Python's: the sign follows the divisor)."""

    nargs = 2
    is_integer = True
    precedence = PRECEDENCE["Mul"] - 1

    @classmethod
    def eval(cls, a, b):
        if a.is_Integer and b.is_Integer and b != 0:
            return sympy.Integer(int(a) % int(b))
        return None

    def _eval_is_nonnegative(self):
        return True if self.args[1].is_positive else None

    def fdiff(self, argindex=1):
        a, b = self.args
        return sympy.Integer(1) if argindex == 1 else -FloorDiv(a, b)

    def _sympystr(self, printer):
        a, b = (printer.parenthesize(x, PRECEDENCE["Mul"], strict=True) for x in self.args)
        return f"{a} % {b}"


def integer_fraction(x):
    """``(num, den)`` when ``x`` is a quotient of two integer expressions (``den != 1``), else None."""
    num, den = sympy.fraction(sympy.together(x))
    if den != 1 and num.is_integer and den.is_integer:
        return num, den
    return None


def _rewrite(e):
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        arg = e.args[0]
        frac = integer_fraction(arg)
        if frac is not None:
            num, den = frac
            return FloorDiv(num, den) if isinstance(e, sympy.floor) else -FloorDiv(-num, den)
        return arg if arg.is_integer else e
    if isinstance(e, sympy.Mod):
        a, m = e.args
        if a.is_integer and m.is_integer:
            return FloorMod(a, m)
    return e


def integer_ops(e):
    """``e`` with integer floor divisions and modulos as :class:`FloorDiv` / :class:`FloorMod`."""
    if not isinstance(e, sympy.Basic) or not e.has(sympy.floor, sympy.ceiling, sympy.Mod):
        return e
    return e.replace(lambda x: isinstance(x, (sympy.floor, sympy.ceiling, sympy.Mod)), _rewrite)
