"""Derivatives of the score's expressions, which the backward kernels compute: ``d mod / d s``
(the chain rule through ``[score].mod``) and the derivatives of the bias and the mod by an
input element (the gradients of learned ``[inputs]``), in nodes the printers render
(``sympy.diff``, then steps and kinks made explicit)."""
from __future__ import annotations

import sympy
from sympy.logic.boolalg import BooleanFunction

from attncc.analysis.integer import integer_operands
from attncc.spec import symbols as S


class BackwardUnsupported(Exception):
    """A pattern whose backward cannot be generated (the module then raises on backward)."""


class _RealAbs(sympy.Function):
    """``abs(u)`` while differentiating: ``sign(u) * du``, whatever sympy knows of u."""

    nargs = 1
    is_real = True

    def fdiff(self, argindex=1):
        return sympy.sign(self.args[0])


def _step_derivative(d: sympy.Derivative):
    """What sympy leaves unevaluated: floor / ceiling are steps (derivative 0 almost everywhere,
    as torch takes it), ``Mod(a, m)`` with ``m`` free of s has a's derivative."""
    e, x = d.expr, d.variables[0]
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        return sympy.Integer(0)
    if isinstance(e, sympy.Mod) and x not in e.args[1].free_symbols:
        return sympy.diff(e.args[0], x)
    return d


def _select(e):
    """``e`` with every product that has a piecewise factor (a kink's Heaviside, the derivative of a
    ``where``) turned into a piecewise of products: ``where(s > 0, 1, 0) / max(s, 0)`` becomes
    ``where(s > 0, 1 / max(s, 0), 0)``. A branch that passes no gradient then passes 0 whatever the
    other factors are there, as torch's backward of max, min and where selects (0 * inf would be
    NaN: ``log(max(s, 0))``, ``max(s, 0) ** 0.5`` at s < 0). A sign (abs) stays a factor, as torch
    multiplies by it."""
    if not e.args or e.is_Atom:
        return e
    args = [_select(a) for a in e.args]
    if any(a is not b for a, b in zip(args, e.args)):  # rebuilt only where a product was
        e = e.func(*args)
    if not e.is_Mul:
        return e
    pw = next((f for f in e.args if isinstance(f, sympy.Piecewise)), None)
    if pw is None:
        return e
    rest = sympy.Mul(*[f for f in e.args if f is not pw])
    return sympy.Piecewise(*[(_select(value * rest), cond) for value, cond in pw.args])


class Tie(BooleanFunction):
    """``a == b`` of two values as the kernel computes them: an argument of a min / max against
    its result, equal exactly where it is the one the min / max returned. Kept whole: a Piecewise
    makes a relation canonical (``Eq(s - 1, m)`` becomes ``Eq(s, m + 1)``), and ``(m + 1) == s``
    in float32 is false at most scores where ``s - 1`` is the max (``s - 1 + 1`` rounds): its
    pair lost its gradient. The printers print it as ``a == b``."""

    nargs = 2

    @classmethod
    def eval(cls, a, b):
        if a == b:
            return sympy.true
        if a.is_number and b.is_number:  # infinities of masked branches: -oo == -oo
            return sympy.Eq(a, b)
        return None

    def _sympystr(self, printer):
        return f"Tie({printer.doprint(self.args[0])}, {printer.doprint(self.args[1])})"


class _Extreme(sympy.Function):
    """min / max of 3+ arguments with torch.amax's gradient at ties: the k arguments equal to the
    result share it, 1/k each (sympy's own derivative gives each tied argument 1/2: 3/2 in all)."""

    is_real = True
    pick = None

    @classmethod
    def eval(cls, *args):
        if all(a.is_number for a in args):  # a branch of masked (infinite) values: a number
            return cls.pick(*args)
        return None

    def fdiff(self, argindex=1):
        top = self.pick(*self.args)
        tied = sympy.Add(*[sympy.Piecewise((1, Tie(a, top)), (0, True)) for a in self.args])
        return sympy.Piecewise((1 / tied, Tie(self.args[argindex - 1], top)), (0, True))


class _MaxN(_Extreme):
    pick = sympy.Max


class _MinN(_Extreme):
    pick = sympy.Min


def _extreme(e):
    """A ``min`` / ``max`` of 3+ arguments as :class:`_Extreme` (differentiated by it)."""
    return (_MaxN if isinstance(e, sympy.Max) else _MinN)(*e.args)


def score_derivative(mod) -> sympy.Expr:
    """d mod / d s, in nodes the printer renders (Heaviside and sign as Piecewise)."""
    return derivative(mod, S.s, what="[score].mod", wrt="s")


def derivative(e, x, *, what: str, wrt: str) -> sympy.Expr:
    """d e / d x (``x`` a symbol, or an input access such as ``rel_bias(h, ...)`` standing for
    the gathered element), in nodes the printer renders (Heaviside and sign as Piecewise)."""
    if not isinstance(x, sympy.Symbol):  # an input access: differentiate by a stand-in symbol
        stand_in = sympy.Dummy("x", real=True)
        return derivative(e.xreplace({x: stand_in}), stand_in, what=what, wrt=wrt).xreplace({stand_in: x})
    # min / max of 3+ arguments: ties share the gradient evenly (torch.amax's rule, as the reference);
    # after the stand-in, which must find an input access as written (its index may hold a min).
    # Two arguments that can both be infinite (max(where(c1, s, -inf), where(c2, 2 * s, -inf)), the
    # union of two masked scores) take the same route: sympy's kink, Heaviside(a - b), folds
    # -inf - (-inf) into a NaN comparison, where the tie test a == max(a, b) stays a comparison
    e = e.replace(lambda a: isinstance(a, (sympy.Min, sympy.Max))
                  and (len(a.args) > 2 or sum(x.has(sympy.oo, -sympy.oo) for x in a.args) > 1), _extreme)
    # |u| of the language is that of a real u: sympy, unable to prove u real (an input's value
    # u[b, j], log(1 + 0.1 * (i - j))), would differentiate it as a complex modulus (re, im, arg)
    # integer sums among float factors stay whole (the product rule multiplies them by numbers,
    # which sympy distributes: 0.01 * (p0 - 1000000000) * j by t[h] gave 0.01*p0*j - 10000000.0*j)
    e = integer_operands(e)
    d = sympy.diff(e.replace(sympy.Abs, _RealAbs), x)  # Sigmoid knows its derivative (builtins.Sigmoid.fdiff)
    d = d.replace(_RealAbs, sympy.Abs).replace(_MaxN, sympy.Max).replace(_MinN, sympy.Min)
    d = d.replace(lambda e: isinstance(e, sympy.Derivative) and len(e.variables) == 1, _step_derivative)
    d = d.replace(lambda e: isinstance(e, sympy.Subs) and not e.expr.has(sympy.Derivative), lambda e: e.doit())
    # the kinks of max and min: at a tie each side gets half the gradient (torch.maximum's backward;
    # both sides got 0 there: a table initialised to zeros never trained)
    d = d.replace(sympy.Heaviside, lambda x, *rest: sympy.Piecewise((1, x > 0), (sympy.S.Half, sympy.Eq(x, 0)), (0, True)))
    d = _select(d)
    d = d.replace(sympy.sign, lambda x: sympy.Piecewise((1, x > 0), (-1, x < 0), (0, True)))
    # a kink of a piecewise value (abs(where(j <= i, s, -1.5)), max(where(c, s, -inf), 0)) compares
    # a Piecewise, which sympy folds into a boolean if-then-else ITE(j <= i, s < 0, True): the
    # printers take it as And / Or / Not
    d = d.replace(lambda e: isinstance(e, sympy.ITE),
                  lambda e: sympy.Or(sympy.And(e.args[0], e.args[1]), sympy.And(sympy.Not(e.args[0]), e.args[2])))
    if d.has(sympy.Derivative) or d.has(sympy.Subs):
        raise BackwardUnsupported(f"cannot differentiate {what} = {e} with respect to {wrt}: {d}")
    if d.has(sympy.I):  # (-2.0) ** s: its log is complex (the forward is torch.pow's, NaN at a fractional s)
        raise BackwardUnsupported(f"cannot differentiate {what} = {e} with respect to {wrt}: the derivative {d} "
                                  f"is not real (a negative base to a power of {wrt})")
    return d
