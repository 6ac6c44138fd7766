"""The steps of a score that do not depend on it, computed in float64 as the mask is.

Score code is float32 (docs/spec-language.md §3.3), which moves a score by float32's rounding:
harmless where the score is continuous in what was rounded. It is not at a step: a comparison of
float arithmetic (``where(i * 0.1 > j * 0.3, s, s - 5)``: 0.30000000000000004 > 0.3 in float64,
not in float32), a floor, ceiling or modulo of a float (``(i - j) * a // 1.3``: 9.1 // 1.3 is 6.0
in float64, 7.0 in float32) takes the other branch, or a whole unit, for that pair. Mask code
computes such steps in float64 with the reference's order of operations, exactly; the score's
steps free of ``s`` are computed the same way.

:func:`exact_parts` wraps each such step whole (the largest sub-expression that is one, free of
``s``) in :class:`ExactCondition` or :class:`ExactValue`, before any pass of score code
(:class:`~attncc.analysis.hoist.Hoister`: integer sums, hoisting) sees it. The passes treat a
wrapped step as an opaque value of its free symbols: hoisted whole when free of the loop's
position, never taken apart. The printers print its content in float64 as mask code
(:meth:`attncc.codegen.printer.TritonPrinter._ExactCondition`), a value cast to float32 after.
Steps on the score itself (``where(s > 0.5, ...)``) stay float32: they are decided on the score in
its own units, as the kernels compute it. One exception: a comparison of the score whose numbers
sympy would add up across the grouping as written (``(s + 1e30) - 1e30 >= 0``, which score code,
taking the grouping off, saw as ``s >= 0``) is computed in float64 as written, on the score
(:func:`merges_numbers`).
"""
from __future__ import annotations

import sympy
from sympy.logic.boolalg import BooleanAtom, BooleanFunction

from attncc.spec import symbols as S
from attncc.spec.builtins import Grouped
from attncc.spec.expr import compares_numbers, integer_comparison


class ExactCondition(BooleanFunction):
    """A condition of a score, free of ``s`` (but see :func:`merges_numbers`), computed in float64
    (see the module docstring)."""

    nargs = 1

    @classmethod
    def eval(cls, c):
        if isinstance(c, BooleanAtom):
            return c
        return None

    def _sympystr(self, printer):
        return printer.doprint(self.args[0])


class ExactValue(sympy.Function):
    """A floor, ceiling or modulo of float arithmetic in a score, free of ``s``, computed in
    float64 (see the module docstring); a step function: its derivative is 0."""

    nargs = 1
    is_real = True

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return x
        return None

    def fdiff(self, argindex=1):
        return sympy.Integer(0)

    def _sympystr(self, printer):
        return printer.doprint(self.args[0])


EXACT = (ExactCondition, ExactValue)


def float_comparison(e) -> bool:
    """Whether ``e`` is a comparison of numbers that are not both integers: float arithmetic's step."""
    if isinstance(e, sympy.Rel):
        e = integer_comparison(e)
    return isinstance(e, sympy.Rel) and compares_numbers(e) and not (e.lhs.is_integer and e.rhs.is_integer)


def _step(e) -> bool:
    """Whether ``e`` is a step of float arithmetic that float32 may place elsewhere."""
    if isinstance(e, sympy.Rel):
        return float_comparison(e)
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        return not e.args[0].is_integer
    if isinstance(e, sympy.Mod):
        return not all(a.is_integer for a in e.args)
    return False


def merges_numbers(e) -> bool:
    """Whether a sum in ``e`` holds numbers in more than one of its groups as the parser wrote
    them (:class:`~attncc.spec.builtins.Grouped`): sympy adds them up once score code takes the
    grouping off, which changes the value where a large one absorbs the rest. ``(s + 1e30) -
    1e30`` is 0 as written (float32 or float64), ``s`` with the numbers added up: a condition
    ``where((s + 1e30) - 1e30 >= 0, s, -inf)`` tested ``s >= 0``, and removed the pairs of negative
    score that the reference keeps."""
    def numbers(x) -> int:
        if isinstance(x, Grouped):
            return numbers(x.args[0])
        if not isinstance(x, sympy.Add):
            return 1 if x.is_Number and x != 0 else 0
        return sum(numbers(a) for a in x.args if a.is_Number or isinstance(a, (Grouped, sympy.Add)))
    return any(isinstance(a, sympy.Add) and any(isinstance(t, Grouped) for t in a.args) and numbers(a) > 1
               for a in sympy.preorder_traversal(e))


def exact_parts(e):
    """``e`` with each step free of ``s`` wrapped whole, and each comparison of ``s`` whose numbers
    would be added up across its grouping (:func:`merges_numbers`; see the module docstring);
    idempotent."""
    if not isinstance(e, sympy.Basic) or e.is_Atom or isinstance(e, EXACT):
        return e
    if not e.has(S.s) and _step(e):
        return ExactCondition(e) if isinstance(e, sympy.Rel) else ExactValue(e)
    if isinstance(e, sympy.Rel) and merges_numbers(e):
        return ExactCondition(e)
    args = [exact_parts(a) for a in e.args]
    if all(a is b for a, b in zip(args, e.args)):
        return e
    return e.func(*args)
