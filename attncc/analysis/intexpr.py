"""The analysis' integer programs on plain Python ints: one call's or one row's values.

A walk's steps and precondition (:mod:`attncc.analysis.walks`) and a band's key bounds
(:mod:`attncc.analysis.bands`) are sympy expressions over integers: ``+``, ``*``, ``**`` by a
non-negative integer, ``floor`` / ``ceiling`` of a quotient, ``Max``, ``Min``, ``Piecewise``,
comparisons, ``And`` / ``Or`` / ``Not``. :func:`compile_int` turns one into a Python closure with the semantics of
:func:`attncc.analysis.walks._value` (floor division of integers, the first true piece of a
``Piecewise``, the last piece as the default), for scalar values: there, building tensors
costs more than the arithmetic, and importing torch takes seconds (``attncc explain`` of a
static spec and a host's precondition check need neither).
"""
from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Mapping

import sympy

Env = Mapping[Any, Any]
IntFn = Callable[[Env], Any]

_RELATIONS = {sympy.LessThan: operator.le, sympy.StrictLessThan: operator.lt, sympy.GreaterThan: operator.ge,
              sympy.StrictGreaterThan: operator.gt, sympy.Equality: operator.eq, sympy.Unequality: operator.ne}


class Unsupported(ValueError):
    """A node that is not integer arithmetic (a float, a function of the spec's language)."""


@functools.lru_cache(maxsize=4096)
def compile_int(expr: sympy.Basic) -> IntFn:
    """``expr`` as a function of an environment: symbols are looked up as themselves first (the
    steps' Dummies, :data:`~attncc.analysis.bands.FIRST` / ``LAST``), else by name (params,
    ``n_q``, ``n_k``, ``b``, ``h``, the bound symbols). Raises :class:`Unsupported` for a node
    outside integer arithmetic."""
    if expr is sympy.true or expr is sympy.false:
        value = bool(expr)
        return lambda env: value
    if expr.is_Integer:
        value = int(expr)
        return lambda env: value
    if expr.is_Symbol:
        sym, name = expr, expr.name

        def lookup(env):
            if sym in env:
                return env[sym]
            if name not in env:
                raise KeyError(f"no value for symbol '{name}' of a walk")
            return env[name]
        return lookup
    if isinstance(expr, sympy.Piecewise):
        pieces = [(compile_int(c), compile_int(v)) for v, c in expr.args[:-1]]
        default = compile_int(expr.args[-1].expr)

        def piecewise(env):
            for cond, value in pieces:
                if cond(env):
                    return value(env)
            return default(env)
        return piecewise
    if isinstance(expr, (sympy.floor, sympy.ceiling)):
        num, den = (compile_int(e) for e in sympy.fraction(sympy.together(expr.args[0])))
        if isinstance(expr, sympy.ceiling):
            return lambda env: -(-num(env) // den(env))
        return lambda env: num(env) // den(env)
    if isinstance(expr, sympy.Pow) and expr.exp.is_Integer and expr.exp >= 0:
        # a closed form's precondition multiplied through by a positive length (n_q**2 of
        # ``j >= (i * n_k) // n_q - w``, taken times n_q)
        base, exp = compile_int(expr.base), int(expr.exp)
        return lambda env: base(env) ** exp
    args = [compile_int(a) for a in expr.args]
    if isinstance(expr, sympy.Add):
        return lambda env: sum(a(env) for a in args)
    if isinstance(expr, sympy.Mul):
        return functools.partial(_product, args)
    if isinstance(expr, sympy.Max):
        return lambda env: max(a(env) for a in args)
    if isinstance(expr, sympy.Min):
        return lambda env: min(a(env) for a in args)
    if isinstance(expr, sympy.And):
        return lambda env: all(a(env) for a in args)
    if isinstance(expr, sympy.Or):
        return lambda env: any(a(env) for a in args)
    if isinstance(expr, sympy.Not):
        return lambda env: not args[0](env)
    if type(expr) in _RELATIONS:
        op, (lhs, rhs) = _RELATIONS[type(expr)], args
        return lambda env: op(lhs(env), rhs(env))
    raise Unsupported(f"not integer arithmetic: {type(expr).__name__} in {expr}")


def _product(args, env):
    out = 1
    for a in args:
        out = out * a(env)
    return out


def int_value(expr: sympy.Basic, env: Env):
    """``expr`` evaluated on ``env`` (:func:`compile_int`)."""
    return compile_int(expr)(env)
