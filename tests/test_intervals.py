"""The overflow guard's bounds are sound: random integer expressions, their ``_int_reach``
source (attncc.codegen.bounds) evaluated at random call numbers, against the exact value of
every sub-expression at random pairs of that call. And the float sums of score code
(attncc.analysis.integer.integer_sums) keep their value."""
from __future__ import annotations

import random

import pytest
import sympy

from attncc.codegen.bounds import _BoundPrinter
from attncc.analysis.integer import FloorDiv, FloorMod, ToFloat, integer_ops, integer_sums
from attncc.analysis.separable import ModSum, SumCarry, separated
from attncc.runtime.intervals import CallNumbers
from attncc.spec import symbols as S
from attncc.spec.ir import Param, Pattern

W = sympy.Symbol("w", integer=True)
LEAVES = [S.i, S.j, S.b, S.h, S.n_q, S.n_k, S.n_heads, W]


def _random_expr(rng: random.Random, depth: int):
    if depth == 0 or rng.random() < 0.25:
        return rng.choice(LEAVES + [sympy.Integer(rng.randint(-9, 9)), sympy.Integer(rng.choice([3, 1000, 100000]))])
    op = rng.choice(["add", "sub", "mul", "div", "mod", "abs", "min", "max", "pow", "where"])
    a, b = _random_expr(rng, depth - 1), _random_expr(rng, depth - 1)
    if op in ("div", "mod"):
        b = sympy.Max(b, 1) if rng.random() < 0.5 else sympy.Integer(rng.choice([2, 7, -3, 64]))
        return FloorDiv(a, b) if op == "div" else FloorMod(a, b)
    return {"add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b, "abs": lambda: sympy.Abs(a),
            "min": lambda: sympy.Min(a, b), "max": lambda: sympy.Max(a, b), "pow": lambda: a ** rng.choice([2, 3]),
            "where": lambda: sympy.Piecewise((a, S.i < S.j), (b, True))}[op]()


def _value(e, env):
    """The exact integer value of ``e`` (Python ints)."""
    if e.is_Integer:
        return int(e)
    if isinstance(e, sympy.Symbol):
        return env[e]
    args = [_value(a, env) for a in e.args] if not isinstance(e, sympy.Piecewise) else None
    if isinstance(e, sympy.Add):
        return sum(args)
    if isinstance(e, sympy.Mul):
        out = 1
        for a in args:
            out *= a
        return out
    if isinstance(e, sympy.Pow):
        return args[0] ** args[1]
    if isinstance(e, FloorDiv):
        return args[0] // args[1]
    if isinstance(e, FloorMod):
        return args[0] % args[1]
    if isinstance(e, ModSum):
        return (args[0] + args[1]) % args[2]
    if isinstance(e, SumCarry):
        return (args[0] + args[1]) // args[2]
    if isinstance(e, sympy.Abs):
        return abs(args[0])
    if isinstance(e, sympy.Min):
        return min(args)
    if isinstance(e, sympy.Max):
        return max(args)
    if isinstance(e, sympy.Piecewise):
        (a, cond), (b, _) = e.args
        return _value(a, env) if env[S.i] < env[S.j] else _value(b, env)
    raise NotImplementedError(type(e))


def _nodes(e):
    """The values computing ``e`` (not a power's exponent, not a where's condition)."""
    if isinstance(e, sympy.Pow):
        return [e] + _nodes(e.args[0])
    if isinstance(e, sympy.Piecewise):
        return [e] + [n for value, _ in e.args for n in _nodes(value)]
    return [e] + [n for a in e.args for n in _nodes(a)]


def test_bounds_cover_every_value_and_intermediate_value():
    rng = random.Random(15)
    pattern = Pattern(name="t", source="t", params=(Param("w", 5, "int"),))
    printer = _BoundPrinter(pattern)
    checked = 0
    for _ in range(150):
        e = integer_ops(_random_expr(rng, 3))
        if not e.is_integer or e.is_Atom:
            continue
        code = printer(e)
        for _ in range(4):  # call numbers
            P, B, H = rng.choice([50, 60000, 2**31]), rng.randint(1, 4), rng.randint(1, 40)
            n_q, n_k, w = rng.randint(0, P), rng.randint(0, P), rng.choice([-7, 0, 3, 50000, -(2**31)])
            x = CallNumbers("t", positions=P, batch=B, heads=H, n_q=n_q, n_k=n_k, params={"w": w})
            iv = eval(code, {"x": x})  # noqa: S307 - the generated source, as a module runs it
            for _ in range(10):  # pairs of that call (positions past the last one by up to the padding)
                env = {S.i: rng.randint(0, P + 4096), S.j: rng.choice([0, P, rng.randint(0, P)]),
                       S.b: rng.randint(0, B - 1), S.h: rng.randint(0, H - 1), S.n_q: n_q, S.n_k: n_k,
                       S.n_heads: H, W: w}
                assert iv.lo <= _value(e, env) <= iv.hi, (e, env, iv)
                for node in _nodes(e):
                    assert abs(_value(node, env)) <= iv.reach, (node, e, env, iv)
                checked += 1
    assert checked > 3000


def _helper_values(e, env):
    """The values the kernels' helpers compute on the way to each ModSum and SumCarry of ``e``
    (templates/helpers.j2: _mod_wraps, _mod_sum): ``m - y``, ``m - y + (m < 0)``, ``-y``."""
    out = []
    for node in sympy.preorder_traversal(e):
        if isinstance(node, (ModSum, SumCarry)):
            _, y, m = (_value(a, env) for a in node.args)
            out += [m - y, m - y + (m < 0), -y]
    return out


def test_bounds_cover_the_separated_forms():
    """``%`` and ``//`` of a sum of a row part and a column part, written with residues
    (attncc.analysis.separable): the bounds cover their values and the helpers' intermediate ones,
    in both loop orientations, for divisors of either sign up to the smallest int param."""
    rng = random.Random(16)
    pattern = Pattern(name="t", source="t", params=(Param("w", 5, "int"),))
    printer = _BoundPrinter(pattern)
    checked = 0
    for _ in range(120):
        a = rng.choice([1, -2, 3]) * S.i + _random_expr(rng, 2).xreplace({S.j: S.i})  # the row part, the column's
        b = rng.choice([1, -1, 2]) * S.j + _random_expr(rng, 2).xreplace({S.i: S.j})
        m = rng.choice([W, W, sympy.Integer(rng.choice([3, -5, 7, 1000, -(2**31)])),
                        sympy.Max(_random_expr(rng, 1).xreplace({S.i: 3, S.j: 5}), 1)])
        whole = rng.choice([FloorMod, FloorDiv])(a + b, m)
        inner, outer = rng.choice([(S.j, S.i), (S.i, S.j)])
        e = separated(integer_ops(whole), inner, outer)
        if not e.has(ModSum, SumCarry):
            continue
        code = printer(e)
        for _ in range(4):
            P, B, H = rng.choice([50, 60000, 2**31]), rng.randint(1, 4), rng.randint(1, 40)
            n_q, n_k, w = rng.randint(0, P), rng.randint(0, P), rng.choice([-7, 3, 50000, -(2**31), 2**31 - 1])
            x = CallNumbers("t", positions=P, batch=B, heads=H, n_q=n_q, n_k=n_k, params={"w": w})
            iv = eval(code, {"x": x})  # noqa: S307 - the generated source, as a module runs it
            for _ in range(10):
                env = {S.i: rng.randint(0, P + 4096), S.j: rng.choice([0, P, rng.randint(0, P)]),
                       S.b: rng.randint(0, B - 1), S.h: rng.randint(0, H - 1), S.n_q: n_q, S.n_k: n_k,
                       S.n_heads: H, W: w}
                assert _value(e, env) == _value(integer_ops(whole), env), (whole, e, env)
                assert iv.lo <= _value(e, env) <= iv.hi, (e, env, iv)
                for v in [_value(node, env) for node in _nodes(e)] + _helper_values(e, env):
                    assert abs(v) <= iv.reach, (v, e, env, iv)
                checked += 1
    assert checked > 1500


def test_integer_sums_keep_the_value():
    i, j, s = S.i, S.j, S.s
    x = sympy.Function("x")(S.h)
    w = sympy.Symbol("w", real=True)
    cases = [0.1 * (i - j), s + 0.1 * (i - j), sympy.tanh(0.1 * (i - j)), s + i - j + 3, 0.2 * i - 0.1 * j,
             0.3 * i - 0.1 * j, w * i - w * j + x * i - x * j + 0.5, sympy.Rational(1, 3) * (i - j), x * (j - i) ** 2]
    env = {i: 2**20 + 7, j: 2**20 - 13, s: 0.75, w: 0.3, x: 1.25}
    for e in cases:
        grouped = integer_sums(sympy.expand(e))
        exact = float(e.xreplace(env))
        got = float(grouped.replace(lambda a: isinstance(a, ToFloat), lambda a: a.args[0]).xreplace(env))
        assert got == pytest.approx(exact, rel=1e-12), (e, grouped)
    assert integer_sums(sympy.expand(0.1 * (i - j))).has(ToFloat)
    assert not integer_sums(0.3 * i - 0.1 * j).has(ToFloat)  # 0.3 is no integer multiple of 0.1 in binary
    assert integer_sums(i + j) == i + j  # integer already
