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

from attncc.analysis.exact import EXACT
from attncc.spec import symbols as S
from attncc.spec.builtins import FloatDiv, Grouped, ToFloat, quotient


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
    if isinstance(x, FloatDiv):
        return None
    num, den = quotient(x)
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


# ---------------------------------------------------------------------------
# Sums of integer terms in float code
# ---------------------------------------------------------------------------

def _exact(c) -> sympy.Rational:
    """The exact value of a sympy number (a Float is a binary fraction)."""
    return sympy.Rational(c) if c.is_Float else c


def _split_term(t):
    """``(coefficient, key, integer part)`` of a term ``coefficient * key * integer part``: the
    coefficient a number, the key the product of its non-integer factors (1 if none); None when
    the term has no integer factor (nothing to gain)."""
    coeff, rest = t.as_coeff_Mul()
    if rest == 1:  # a number: an integer one joins the integer terms
        return (sympy.Integer(1), sympy.Integer(1), coeff) if coeff.is_Integer else None
    factors = sympy.Mul.make_args(rest)
    ints = [f for f in factors if f.is_integer]
    if not ints:
        return None
    key = sympy.Mul(*[f for f in factors if not f.is_integer])
    return coeff, key, sympy.Mul(*ints)


def _group_sum(e: sympy.Add):
    """``e`` with its terms ``c_k * key * n_k`` (same key, every ``c_k`` an integer multiple
    ``r_k`` of the smallest) written ``c * key * ToFloat(sum r_k * n_k)``."""
    groups, others = {}, []
    for t in e.args:
        parts = _split_term(t)
        if parts is None:
            others.append(t)
        else:
            groups.setdefault(parts[1], []).append(parts)
    out = list(others)
    for key, members in groups.items():
        members.sort(key=lambda m: abs(_exact(m[0])))
        subgroups = []  # [(base coefficient, [(ratio, integer part)])]
        for coeff, _, n in members:
            for base, items in subgroups:
                ratio = _exact(coeff) / _exact(base)
                if ratio.is_Integer:
                    items.append((ratio, n))
                    break
            else:
                subgroups.append((coeff, [(sympy.Integer(1), n)]))
        for base, items in subgroups:
            if len(items) == 1:
                out.append(base * key * items[0][1])
            else:
                out.append(base * key * ToFloat(sympy.Add(*[r * n for r, n in items])))
    return sympy.Add(*out)


def _whole(x) -> bool:
    """Whether ``x``, an operand of float arithmetic, is integer arithmetic that must be computed
    whole before it meets the float: an integer sum (``p0 - 1000000000``), or a product or power
    with one inside (``(j - i) * (p0 - 1000000000)``)."""
    return isinstance(x, (sympy.Add, sympy.Mul, sympy.Pow)) and x.is_integer is True and x.has(sympy.Add)


def integer_operands(e):
    """``e`` with every integer sum that is a factor of float arithmetic as one value,
    ``ToFloat(sum)``: computed in integers, converted once (the reference's order, docs §3).
    sympy distributes a number over a sum as soon as the two meet (``0.01 * (p0 - 1000000000)``
    is ``0.01*p0 - 10000000.0``, and so is ``c * a`` of any pass that multiplies them), and
    ``sympy.expand`` distributes any factor: in float32 the two products cancel (p0 = 1000000003:
    10000000 - 10000000 = 0, not 0.03), where the integer sum is exactly 3. Idempotent."""
    return _operands(e, ungroup=False)


def ungrouped(e):
    """``e`` without the parser's grouping of float arithmetic (:class:`Grouped`): score code is
    float32, where the grouping as written gains nothing, and :func:`integer_sums` groups the
    integer sums its own way. The score's steps computed in float64 keep it (:mod:`.exact`).
    Integer arithmetic with a sum in it stays one value where it meets a float
    (:func:`integer_operands`): ``Grouped(p0 - 1000000000)`` is ``ToFloat(p0 - 1000000000)``,
    and so is an integer sum that is a factor of a float product."""
    return _operands(e, ungroup=True)


def integer_factors(e, args):
    """``args``, the new arguments of ``e``, with those that are integer arithmetic holding a sum
    wrapped (``ToFloat``) where ``e`` is a product of float arithmetic: to rebuild ``e`` without
    sympy distributing a number over them."""
    if isinstance(e, sympy.Mul) and e.is_integer is not True:
        return [ToFloat(a) if _whole(a) else a for a in args]
    return args


def substituted(e, subs):
    """``e.xreplace(subs)`` where ``subs`` gives integer symbols integer sums (``j -> m*j + c``),
    each keeping its sum whole where it lands in a product of float arithmetic (:func:`integer_factors`):
    ``0.1 * j`` is ``0.1 * ToFloat(m*j + c)``, as the reference computes ``0.1 * j`` at that position,
    not ``0.1*m*j + 0.1*c`` (0.9000000000000001 at j = 9, m = 3: ``j * 0.1 <= 0.9`` lost key 9)."""
    if e in subs:
        return subs[e]
    if not isinstance(e, sympy.Basic) or e.is_Atom or not (e.free_symbols & set(subs)):
        return e
    return e.func(*integer_factors(e, [substituted(a, subs) for a in e.args]))


def _operands(e, ungroup: bool):
    if not isinstance(e, sympy.Basic) or e.is_Atom or isinstance(e, EXACT):
        return e
    if ungroup and isinstance(e, Grouped):
        inner = _operands(e.args[0], ungroup)
        return ToFloat(inner) if _whole(inner) else inner
    # wrapped before the product is made: sympy distributes a number over a sum at once
    args = integer_factors(e, [_operands(a, ungroup) for a in e.args])
    if all(a is b for a, b in zip(args, e.args)):
        return e
    return e.func(*args)


def integer_sums(e):
    """``e`` with the integer terms of every float sum added up as integers first
    (:class:`ToFloat`): ``c*j - c*i`` is ``c * ToFloat(j - i)``, ``s + i - j`` is
    ``s + ToFloat(i - j)``, ``0.2*i - 0.1*j`` is ``0.1 * ToFloat(2*i - j)``. For score code
    (float32; the parser's grouping is taken off first, :func:`ungrouped`); mask code keeps the
    reference's order of operations (float64, exact there)."""
    return _integer_sums(ungrouped(e))


def _integer_sums(e):
    if not isinstance(e, sympy.Basic) or e.is_Atom or isinstance(e, EXACT):
        return e
    args = [_integer_sums(a) for a in e.args]
    if any(a is not b for a, b in zip(args, e.args)):
        e = e.func(*args)
    if isinstance(e, sympy.Add) and not e.is_integer:
        return _group_sum(e)
    return e


def recentered(term):
    """``(loop term, row term)`` when ``term``, a term of a score's sum that the key loop computes,
    is linear in the key position: ``c * (a*j + r)`` (``a``, ``c`` free of ``i`` and ``j``, ``r`` free
    of ``j``) is ``c * a*(j - i)`` in the loop plus ``c * (a*i + r)``, a constant along the row
    that the softmax cancels (the LSE gets it back). ``0.1 * j`` at position 2**20 is 1e5 in
    float32, a rounding of ~4e-3 that differs per key; ``0.1 * (j - i)`` is exact to float32's
    relative precision. None when there is nothing to gain (``c * (j - i)`` already, or not linear)."""
    coeff, rest = term.as_coeff_Mul()
    factors = sympy.Mul.make_args(rest)
    casts = [f for f in factors if isinstance(f, ToFloat)]
    ints = [f for f in factors if f.is_integer]
    if len(casts) > 1 or not (casts or ints):
        return None
    n = sympy.Mul(*ints, *[f.args[0] for f in casts])  # the integer part
    c = coeff * sympy.Mul(*[f for f in factors if f not in casts and f not in ints])
    if S.j in c.free_symbols:
        return None
    n = sympy.expand(n)
    a = n.coeff(S.j)
    r = sympy.expand(n - a * S.j)
    if a == 0 or ({S.i, S.j} & a.free_symbols) or S.j in r.free_symbols or not a.is_integer:
        return None
    if sympy.expand(r + a * S.i) == 0:
        return None  # a * (j - i) already
    row = r + a * S.i  # a * i of a sum a (p0 - 1000000000) as a product: no int64 needed for its terms
    a = ToFloat(a) if isinstance(a, sympy.Add) else a  # p0 - 1000000000: one value (integer_operands)
    return c * a * ToFloat(S.j - S.i), c * (ToFloat(row) if not row.is_Atom else row)


def expanded(e):
    """``sympy.expand(e)`` (products of sums written out, powers of sums and exponentials of sums
    kept whole) that leaves the values it must not take apart as they are: an integer operand
    (``ToFloat``: ``0.01 * ToFloat(p0 - 1000000000)`` stays, its sum is not expanded into
    products that the call must then compute in int64) and a score's float64 step (:mod:`.exact`)."""
    opaque = {x: sympy.Dummy(real=True) for x in e.atoms(ToFloat, *EXACT)} if isinstance(e, sympy.Basic) else {}
    # power_exp=False: exp(a + b) and x ** (a + b) stay whole (exp((j - i) / 10) split into
    # exp(-i/10) * exp(j/10), 0.9 ** (i - j) into 0.9**i / 0.9**j, overflow to inf / underflow to 0 in
    # float32 a few hundred positions in: NaN scores). multinomial=False: powers of sums stay whole
    # ((i - j + 0.5) ** 7 written out is 0.0078125 + 0.109375 * (a polynomial of i, j) + (i**7 - j**7),
    # whose terms cancel in float32 to 0 where the power is 0.0078: an inf bias, NaN rows)
    out = sympy.expand(e.xreplace(opaque), power_exp=False, multinomial=False)
    return out.xreplace({d: x for x, d in opaque.items()})
