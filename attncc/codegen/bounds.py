"""The host functions that keep a module's integer arithmetic exact: ``_int_reach(x)`` and
``_int_divisors(x)``.

While a module is rendered, every integer expression a printer writes into a kernel is
recorded (:func:`attncc.codegen.printer.printed_integers`). Here they become a host function
of the call's numbers (:class:`attncc.runtime.intervals.CallNumbers`): ``_int_reach`` returns
the largest magnitude the arithmetic can reach, and a call runs WIDE (int64) past int32
(``attncc.runtime`` caches it per call signature); ``_int_divisors`` raises for a divisor of
params and sizes that is 0 (every call).

Left out: expressions holding an input's values (the gathers make them int64 in every call,
the reference's type) and those a kernel computes in float (``floor(0.5 * i) + j``).

:func:`check_divisors` refuses, when the module is built, a ``//`` or ``%`` whose divisor varies
per pair (with ``b``, ``h``, ``i``, ``j`` or an input's values) and may be 0: Python would raise
there, a kernel cannot.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import sympy
from sympy.core.function import AppliedUndef

from attncc.analysis.integer import FloorDiv, FloorMod, integer_ops
from attncc.analysis.separable import ModSum, SumCarry
from attncc.codegen.printer import Defined
from attncc.codegen.text import escaped, py_str
from attncc.spec import symbols as S
from attncc.spec.builtins import BitAnd, BitOr, BitXor, Bucket, Shift, divides
from attncc.spec.signs import nonzero, per_pair, signs_of
from attncc.spec.errors import SpecError
from attncc.spec.expr import spec_text
from attncc.spec.ir import Pattern

# The kernels' bound symbols (analysis steps) by name: positions and offsets, or tile sides.
_POSITION_NAMES = frozenset({"q_lo", "q_hi", "k_lo", "k_hi", "q_offset", "k_offset", "N_K", "N_Q"})
_BLOCK_NAMES = frozenset({"BLOCK_M", "BLOCK_N"})
_RELATIONS = ("<", "<=", ">", ">=", "==", "!=")  # runtime.intervals.CallNumbers.compare's
_BITWISE = {BitAnd: "and", BitOr: "or", BitXor: "xor"}  # runtime.intervals.CallNumbers.bitwise's names
# Values that do not vary per pair (the host knows them at the call)
_CALL_SIZES = (S.n_q, S.n_k, S.n_heads)


class _Float(Exception):
    """The expression is computed in float by the kernel (no integer overflow)."""


class _BoundPrinter:
    """A recorded integer expression as interval arithmetic over ``x`` (runtime.intervals)."""

    def __init__(self, pattern: Pattern):
        self.params = {p.symbol: p.name for p in pattern.params if p.kind == "int"}
        self.defined = {}  # kernel variables (walk steps) -> the local holding their bound

    def __call__(self, e) -> str:
        if e.is_Integer:
            return str(int(e))
        if isinstance(e, sympy.Symbol):
            return self._symbol(e)
        if isinstance(e, sympy.Add):
            return self._call("add", e.args)
        if isinstance(e, sympy.Mul):
            if not e.is_integer or any(not a.is_integer for a in e.args):
                raise _Float(e)
            if e.args[0] == -1:
                return f"x.neg({self(sympy.Mul(*e.args[1:]))})"
            return self._call("mul", e.args)
        if isinstance(e, sympy.Pow):
            base, exp = e.args
            if not (base.is_integer and exp.is_Integer and exp >= 0):
                raise _Float(e)  # 2 ** h: tl.exp2, a float
            return f"x.pow({self(base)}, {int(exp)})"
        if isinstance(e, FloorDiv):
            return self._call("floordiv", e.args)
        if isinstance(e, FloorMod):
            return self._call("floormod", e.args)
        if isinstance(e, ModSum):
            return self._call("mod_sum", e.args)
        if isinstance(e, SumCarry):
            return self._call("sum_carry", e.args)
        if isinstance(e, sympy.Abs):
            return self._call("abs", e.args)
        if isinstance(e, sympy.Min):
            return self._call("min", e.args)
        if isinstance(e, sympy.Max):
            return self._call("max", e.args)
        if isinstance(e, sympy.Piecewise):
            conds = [self.condition(cond) for _, cond in e.args]
            if all(c in ("None", "True") for c in conds):  # per pair: any branch
                return self._call("select", [value for value, _ in e.args])
            # conditions of the call's numbers (a divisor where(w > 0, w, 1)): the branches they take
            return f"x.cases({', '.join(f'({self(value)}, {c})' for (value, _), c in zip(e.args, conds))})"
        if isinstance(e, Bucket):
            return f"x.bucket({self(e.args[0])}, {e.options[0]})"
        if isinstance(e, Shift):
            return self._call("shift", e.args)
        if type(e) in _BITWISE:
            return f"x.bitwise({py_str(_BITWISE[type(e)])}, {', '.join(self(a) for a in e.args)})"
        if isinstance(e, (sympy.floor, sympy.ceiling, sympy.Mod)) or not e.is_integer:
            raise _Float(e)  # floor of a float, a float's remainder: float arithmetic
        return "x.unbounded()"  # nothing here bounds it: WIDE, to be safe

    def condition(self, c) -> str:
        """A condition's truth at the call's numbers: ``True``, ``False`` or ``None`` (unknown: it
        reads more than params and sizes, or is no integer comparison these bounds decide)."""
        if c in (sympy.true, sympy.false):
            return str(bool(c))
        if c.atoms(AppliedUndef) or not c.free_symbols <= set(self.params) | set(_CALL_SIZES):
            return "None"
        if isinstance(c, sympy.Not):
            return f"x.negated({self.condition(c.args[0])})"
        if isinstance(c, (sympy.And, sympy.Or)):
            op = "all_of" if isinstance(c, sympy.And) else "any_of"
            return f"x.{op}({', '.join(self.condition(a) for a in c.args)})"
        if isinstance(c, sympy.core.relational.Relational) and c.rel_op in _RELATIONS:
            try:
                return f"x.compare({py_str(c.rel_op)}, {self(c.lhs)}, {self(c.rhs)})"
            except _Float:
                return "None"
        return "None"

    def _call(self, op: str, args) -> str:
        return f"x.{op}({', '.join(self(a) for a in args)})"

    def _symbol(self, sym) -> str:
        if sym in self.defined:
            return self.defined[sym]
        if sym in self.params:
            return f"x.param({py_str(self.params[sym])})"
        if sym in (S.i, S.j, S.b, S.h, S.n_q, S.n_k, S.n_heads):
            return f"x.{sym.name}"
        if sym.name in _POSITION_NAMES:
            return "x.position"
        if sym.name in _BLOCK_NAMES:
            return "x.block"
        if not sym.is_integer:
            raise _Float(sym)
        return "x.unbounded()"


def _definitions(printed: Iterable, printer: "_BoundPrinter") -> List[str]:
    """``local = bound`` lines of the kernel variables the record defines (walk steps), in the
    order the kernels compute them; later lines (and the terms) name earlier locals. A step in
    float (none today) or boolean (a condition) is no integer arithmetic: left out."""
    lines = []
    for d in printed:
        if not isinstance(d, Defined) or d.symbol in printer.defined:
            continue
        value = integer_ops(d.value)  # Max(k, c * floor(q / c)) is integer only once written with //
        if not value.is_integer:
            continue
        try:
            code = printer(value)
        except _Float:
            continue
        local = f"step{len(printer.defined)}"
        printer.defined[d.symbol] = local
        lines.append(f"{local} = {code}  # {escaped(d.symbol.name)} = {escaped(value)}")
    return lines


def _kept(printed: Iterable[sympy.Basic], printer: "_BoundPrinter") -> List[Tuple[sympy.Basic, str]]:
    """``(expression, its bound's source)`` of the recorded expressions whose arithmetic is int32
    below WIDE: no input values inside (int64), not float arithmetic; each once, and none inside
    another one kept (whose bound covers it)."""
    seen, out = set(), []
    for e in printed:
        if isinstance(e, Defined):
            continue
        e = integer_ops(e)
        if e.is_Atom or e.atoms(AppliedUndef) or e in seen:
            continue
        seen.add(e)
        try:
            out.append((e, printer(e)))
        except _Float:
            continue
    inner = set()
    for e, _ in out:
        inner |= {a for a in sympy.preorder_traversal(e) if a is not e}
    for d in printed:  # a step's bound covers its value's arithmetic
        if isinstance(d, Defined) and d.symbol in printer.defined:
            inner |= set(sympy.preorder_traversal(integer_ops(d.value)))
    return [(e, code) for e, code in out if e not in inner]


def divisors(pattern: Pattern) -> List[Tuple[str, sympy.Basic, sympy.Basic]]:
    """``(key, divisor, whole)`` of every integer ``//`` and ``%`` in the pattern's expressions."""
    return [(key, d, whole) for key, d, _, whole in _guarded_divisors_of(pattern)]


def _guarded_divisors(e, signs: dict):
    """``(divisor, signs, whole)`` of every integer ``//`` and ``%`` in ``e``, with the signs
    (:func:`attncc.spec.signs.signs_of`) that guard the divisor: a conjunct that divides is computed where the
    conjuncts that do not divide hold, as the reference computes it (``attncc.evaluator``'s
    ``conjunction``: sympy writes a condition on a ``where`` divisor out case by case)."""
    if isinstance(e, (sympy.floor, sympy.ceiling, sympy.Mod)):
        for node in sympy.preorder_traversal(integer_ops(e)):
            if isinstance(node, (FloorDiv, FloorMod)):
                yield node.args[1], signs, node
        return
    held = {}
    if isinstance(e, sympy.And) and any(divides(a) for a in e.args):
        for a in e.args:
            if not divides(a):
                held.update(signs_of(a, True))
    for a in e.args:
        yield from _guarded_divisors(a, {**signs, **held} if divides(a) else signs)


def _guarded_divisors_of(pattern: Pattern):
    """``(key, divisor, signs, whole)`` of :func:`_guarded_divisors` in each of the pattern's expressions."""
    for key, e in (("[mask].where", pattern.mask), ("[score].bias", pattern.bias), ("[score].mod", pattern.mod)):
        for d, signs, whole in _guarded_divisors(e, {}) if e is not None else ():
            yield key, d, signs, whole


def check_divisors(pattern: Pattern) -> None:
    """Refuse (SpecError) a ``//`` or ``%`` whose divisor varies per pair and may be 0."""
    for key, d, signs, whole in _guarded_divisors_of(pattern):
        if per_pair(d) and not nonzero(d.xreplace(signs), at_pairs=True):
            raise SpecError(pattern.source, key,
                            f"the divisor of {spec_text(whole)} may be 0 (Python would raise there; a kernel "
                            f"cannot): write one that cannot be, e.g. max({spec_text(d)}, 1), or a "
                            f"where whose every value is nonzero where it is taken (where(d == 0, 1, d))")


def _host_checks(pattern: Pattern, printer: _BoundPrinter) -> List[str]:
    """``x.nonzero(...)`` lines for the divisors of params and sizes only."""
    wholes = {}  # divisor -> the expressions dividing by it (sorted by text: builds are deterministic)
    for _, d, signs, whole in _guarded_divisors_of(pattern):
        # (one guarded by a conjunct beside it is never taken at 0, as for the per-pair ones: the
        # mod's where(i // where(w <= 0, 1, w) == j, s, -inf), written out as w > 0 and j == i // w)
        if not (d.is_number or per_pair(d) or (signs and nonzero(d.xreplace(signs)))):
            wholes.setdefault(d, set()).add(spec_text(whole))
    lines = []
    for d in sorted(wholes, key=str):
        names = ", ".join(s.name for s in sorted(d.free_symbols, key=lambda s: s.name))
        lines.append(f"x.nonzero({printer(d)}, {py_str(names)}, {py_str(' and '.join(sorted(wholes[d])))})")
    return lines


def arithmetic_functions(pattern: Pattern, printed: Iterable[sympy.Basic], spec: Optional[Pattern] = None) -> List[str]:
    """The source lines of ``_int_divisors(x)`` (None when no divisor needs a check) and
    ``_int_reach(x)`` for the expressions ``printed`` into the kernels of ``pattern``. ``spec``: the
    spec's own pattern where the kernels' is rewritten (a residue or column split: the same
    divisors, of params only), whose expressions the division-by-zero errors name."""
    printer = _BoundPrinter(pattern)
    printed = list(printed)
    steps = _definitions(printed, printer)
    terms = sorted((code, str(e)) for e, code in _kept(printed, printer))
    terms += [(local, f"{sym.name}, a step") for sym, local in printer.defined.items()]
    checks = _host_checks(spec or pattern, printer)
    lines = []
    if checks:
        lines += ["def _int_divisors(x):",
                  '    """Divisors of // and % made of params and sizes only: 0 raises ValueError (a kernel cannot)."""']
        lines += [f"    {c}" for c in checks]
    else:
        lines += ["_int_divisors = None  # no // or % by params or sizes"]
    lines += ["", "",
              "def _int_reach(x):",
              '    """The largest magnitude a value of the kernels\' integer arithmetic can reach at a call\'s numbers',
              '    (x: attncc.runtime.intervals.CallNumbers); past 2**31 - 1 the call runs WIDE, in int64."""']
    if not terms:
        return lines + ["    return 0"]
    lines += [f"    {line}" for line in steps]
    lines.append("    return x.reach(")
    lines += [f"        {code},  # {escaped(text)}" for code, text in terms]
    lines.append("    )")
    return lines
