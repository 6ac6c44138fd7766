"""Integer ``%`` and ``//`` of a sum that separates into a row part and a column part, without a
division per pair.

A kernel's tile computes ``(i - j) % dilation`` for every pair: an integer division by a runtime
value, which GPUs have no instruction for (some twenty instructions each). But the argument
separates: ``A + B`` with ``A`` free of the loop's position (the outer one: ``i`` in the forward
and dQ kernels, ``j`` in the dK/dV kernel, which walks query blocks) and ``B`` of the loop's
position alone, and the divisor ``m`` is free of both. With the residues ``x = A % m`` (once per
row: the hoister moves it out of the loop, :mod:`attncc.analysis.hoist`) and ``y = B % m`` (once
per column of a tile: a ``[1, BLOCK_N]`` vector), ``x + y`` lies within two periods of ``m``, so

- ``(A + B) % m`` is ``x + y`` reduced by one conditional subtraction of ``m`` (:class:`ModSum`);
- ``(A + B) // m`` is ``A // m + B // m`` plus the carry of that subtraction (:class:`SumCarry`);
- ``(A + B) % m == 0`` is ``A % m == (-B) % m`` (one comparison per pair; ``!=`` alike).

Python's floor semantics for either sign of ``m``: the residues take ``m``'s sign, and the sum
wraps when it reaches ``m`` (``m > 0``: ``x + y >= m``; ``m < 0``: ``x + y <= m``). The printers
write the subtraction as ``x - (m - y)`` or ``x + y``, never ``x + y - m``: no value computed passes
``|m|`` (:meth:`attncc.runtime.intervals.CallNumbers.mod_sum` bounds them for the overflow guard).

A divisor that is a positive power of two keeps ``%`` and ``//`` of the difference: a mask and a
shift per pair are cheaper than the separated form (its ``== 0`` test is still separated).
"""
from __future__ import annotations

from typing import Optional, Tuple

import sympy
from sympy.printing.precedence import PRECEDENCE

from attncc.analysis.integer import FloorDiv, FloorMod, integer_factors
from attncc.spec import symbols as S


class _SumOfResidues(sympy.Function):
    """A function of ``(x, y, m)``: two residues modulo ``m`` (``x % m == x``, ``y % m == y``) and ``m``."""

    nargs = 3
    is_integer = True
    precedence = PRECEDENCE["Mul"] - 1  # printed "(x + y) % m": parenthesized inside a product

    def fdiff(self, argindex=1):
        return sympy.Integer(0)  # a step function: derivative 0 almost everywhere (as //)


class ModSum(_SumOfResidues):
    """``(x + y) % m`` of two residues modulo ``m``: ``x + y`` reduced by at most one period."""

    def fdiff(self, argindex=1):  # as FloorMod's: x + y - m * carry
        return -SumCarry(*self.args) if argindex == 3 else sympy.Integer(1)

    @classmethod
    def eval(cls, x, y, m):
        if x.is_Integer and y.is_Integer and m.is_Integer and m != 0:
            return sympy.Integer((int(x) + int(y)) % int(m))
        return None

    def _eval_is_nonnegative(self):
        return True if self.args[2].is_positive else None

    def _sympystr(self, printer):
        x, y, m = self.args
        return f"({printer.doprint(x + y)}) % {printer.parenthesize(m, PRECEDENCE['Mul'], strict=True)}"


class SumCarry(_SumOfResidues):
    """``(x + y) // m`` of two residues modulo ``m``: 1 where ``x + y`` passes a period, else 0."""

    @classmethod
    def eval(cls, x, y, m):
        if x.is_Integer and y.is_Integer and m.is_Integer and m != 0:
            return sympy.Integer((int(x) + int(y)) // int(m))
        return None

    def _eval_is_nonnegative(self):
        return True

    def _sympystr(self, printer):
        x, y, m = self.args
        return f"({printer.doprint(x + y)}) // {printer.parenthesize(m, PRECEDENCE['Mul'], strict=True)}"


def _power_of_two(m) -> bool:
    """A positive power-of-two literal: ``%`` and ``//`` by it are a mask and a shift (printer)."""
    return bool(m.is_Integer and m > 0 and int(m) & (int(m) - 1) == 0)


def split_sum(a, inner, outer) -> Optional[Tuple[sympy.Expr, sympy.Expr]]:
    """``(A, B)`` with ``a = A + B``, ``A`` free of ``inner`` and depending on ``outer``, ``B`` of
    ``inner`` and free of ``outer``, both integer; None when ``a`` does not separate so (a term of
    both positions, ``i * j``), or when nothing would be gained (``a`` of one position only)."""
    for expand in (False, True):  # 2 * (i - j) as written, (i + 1) * 3 - j only expanded
        form = sympy.expand(a) if expand else a
        row, column = [], []
        for t in sympy.Add.make_args(form):
            free = t.free_symbols
            if inner in free and outer in free:
                break
            (column if inner in free else row).append(t)
        else:
            A, B = sympy.Add(*row), sympy.Add(*column)
            if outer in A.free_symbols and B != 0 and A.is_integer and B.is_integer:
                return A, B
            return None
    return None


def _divisor(m, inner, outer) -> bool:
    """A divisor the same for every pair of a program: free of both positions and of the score."""
    return not ({inner, outer, S.s} & m.free_symbols)


def _residue_test(e, inner, outer):
    """``Eq(x, y)`` (``Ne``) for ``Eq((A + B) % m, 0)`` (either side 0), else None. Written with
    the residues of ``A`` and ``-B``, or of ``-A`` and ``B`` where ``A`` reads as a negation (the
    dK/dV kernel's ``-j``), so that both kernels compute ``i % m`` and ``j % m``."""
    lhs, rhs = e.args
    if lhs == 0:
        lhs, rhs = rhs, lhs
    if rhs != 0 or not isinstance(lhs, FloorMod) or not _divisor(lhs.args[1], inner, outer):
        return None
    parts = split_sum(lhs.args[0], inner, outer)
    if parts is None:
        return None
    A, B = parts
    m = lhs.args[1]
    pair = (FloorMod(-A, m), FloorMod(B, m)) if A.could_extract_minus_sign() else (FloorMod(A, m), FloorMod(-B, m))
    return e.func(*pair)


def _separated_node(e, inner, outer):
    """``e`` (a FloorMod or FloorDiv) in the separated form, or ``e`` when it does not separate."""
    a, m = e.args
    if not _divisor(m, inner, outer) or _power_of_two(m):
        return e
    parts = split_sum(a, inner, outer)
    if parts is None:
        return e
    A, B = parts
    x, y = FloorMod(A, m), FloorMod(B, m)
    if isinstance(e, FloorMod):
        return ModSum(x, y, m)
    return FloorDiv(A, m) + FloorDiv(B, m) + SumCarry(x, y, m)


def separated(e, inner=S.j, outer=S.i):
    """``e`` (after :func:`attncc.analysis.integer.integer_ops`) with every integer ``%`` and ``//``
    of a separable sum written with residues (see the module docstring): a row part free of
    ``inner``, a column part free of ``outer``. Idempotent."""
    if not isinstance(e, sympy.Basic) or e.is_Atom or not e.has(FloorDiv, FloorMod):
        return e
    if isinstance(e, (sympy.Eq, sympy.Ne)):
        test = _residue_test(e, inner, outer)
        if test is not None:
            return test
    args = [separated(a, inner, outer) for a in e.args]
    if any(a is not b for a, b in zip(args, e.args)):
        # a separated // is a sum (A // m + B // m + carry): a factor of float arithmetic keeps it
        # whole, as the reference computes it (sympy distributes a number over a sum at once:
        # ((j - i) // 3) / 7 was j // 3 / 7 + ... in float64, -5.6e-17 at j - i = 1, a pair lost)
        e = e.func(*integer_factors(e, args))
    if isinstance(e, (FloorMod, FloorDiv)):
        return _separated_node(e, inner, outer)
    return e
