"""Print sympy trees as Triton (kernel code) or Python (host code) expressions.

The printer knows the language's semantics, not the kernel's layout: callers give
it a ``names`` map from each free symbol to the text it should become, and a
``gather`` callback that renders an input access such as ``doc[b, i]``.

Integer ``//`` and ``%`` are integer operations with Python's (floor) semantics, exact at
every position: every expression is first put through
:func:`attncc.analysis.integer.integer_ops`, which turns them into ``FloorDiv`` / ``FloorMod``
nodes (so no pass can have split them), printed as Triton's ``//`` / ``%`` when sympy proves
the operands have the safe signs (Triton's operators truncate toward zero) and as the
``_floordiv`` / ``_floormod`` helpers otherwise. Integer code is printed without casts, in
whatever integer type the positions and params have.

Two modes for the floats:

- score code (``float64=False``, the default): float32, as the kernels compute scores;
- mask code (``float64=True``): a boolean predicate's float arithmetic is computed in float64
  the way :mod:`attncc._reference` computes it (the same operations in the same order:
  sums left to right over sympy's terms, a quotient as one division, every integer operand
  converted to float64 first), so that ``+ - * /``, ``floor``, comparisons, ``x ** 2`` and
  ``sqrt`` decide each pair exactly as the reference does. Transcendental functions and other
  powers are float64 too, and may differ from the reference in the last bit.
"""
from __future__ import annotations

import ast
import collections
import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

import sympy
from sympy.core.function import AppliedUndef
from sympy.logic.boolalg import Boolean, BooleanAtom

from attncc.analysis.exact import ExactCondition, exact_parts, float_comparison
from attncc.analysis.derivative import Tie
from attncc.analysis.hoist import resolve
from attncc.analysis.integer import integer_fraction, integer_ops, integer_sums
from attncc.analysis.separable import separated
from attncc.codegen.names import dot_value, float64_text
from attncc.spec import symbols as S
from attncc.spec.builtins import RandomBlocks, ToFloat, quotient
from attncc.spec.expr import integer_comparison

# The integer expressions the printers write while :func:`printed_integers` is active, and the
# kernel variables defined on the way (:class:`Defined`).
_PRINTED: contextvars.ContextVar[Optional[List[sympy.Basic]]] = contextvars.ContextVar("attncc_printed_integers",
                                                                                        default=None)


@dataclass(frozen=True)
class Defined:
    """A kernel variable ``symbol = value`` (a walk's step): the record's expressions may name it."""

    symbol: sympy.Symbol
    value: sympy.Basic


def record_definitions(steps) -> None:
    """Record the kernel variables ``steps`` [(symbol, value)], in the order a kernel computes them,
    for :func:`printed_integers` (their bounds are computed once, in that order, not substituted:
    the steps of a walk name earlier steps, and substituting them grows without limit)."""
    log = _PRINTED.get()
    if log is not None:
        log.extend(Defined(sym, value) for sym, value in steps)


@contextlib.contextmanager
def printed_integers():
    """Collect every integer expression any printer writes while the block runs, each with its
    hoisted names replaced by what they stand for: the integer arithmetic of a module's kernels,
    which the host keeps within int32 or switches to int64 (:mod:`attncc.codegen.bounds`)."""
    log: List[sympy.Basic] = []
    token = _PRINTED.set(log)
    try:
        yield log
    finally:
        _PRINTED.reset(token)


class Temporaries:
    """Common-subexpression elimination of printed code, with named temporaries: what a
    statement computes more than once is defined once before it (:meth:`name_repeats`). One per
    group of printers whose code shares kernel functions, so that the names it gives
    (``bucket0``, ``tmp1``) differ there."""

    def __init__(self):
        self._next: Dict[str, int] = {}

    def fresh(self, hint: str) -> str:
        """A name not given before: ``<hint><n>``."""
        n = self._next.get(hint, 0)
        self._next[hint] = n + 1
        return f"{hint}{n}"

    def name_repeats(self, code: str) -> Tuple[List[Tuple[str, str]], str]:
        """``(definitions [(name, value)] to write first, in order, code)``: ``code`` (a printed
        expression) with each sub-expression it writes more than once (outermost first; a
        name, a number or ``offs_i[:, None]`` is not worth one) replaced by a name. Printed
        code has no side effects and no assignments, so equal text is an equal value."""
        defs: List[List[str]] = []
        while True:
            texts = [value for _, value in defs] + [code]
            where: Dict[int, List[Tuple[int, ast.expr]]] = collections.defaultdict(list)
            shapes: Dict[tuple, int] = {}  # one number per distinct sub-expression (_structure)
            for k, text in enumerate(texts):
                tree = ast.parse(text, mode="eval")
                keys: Dict[int, int] = {}
                _structure(tree, shapes, keys)
                for node in ast.walk(tree):
                    if isinstance(node, ast.expr) and _worth_naming(node):
                        where[keys[id(node)]].append((k, node))
            repeated = [found for found in where.values() if len(found) > 1]
            if not repeated:
                return [(name, value) for name, value in defs], code
            found = max(repeated, key=lambda f: (_length(f[0][1]), -f[0][0]))  # the outermost
            k0, first = found[0]
            value = _segment(texts[k0], first)
            name = self.fresh("bucket" if value.startswith("_bucket_") else "tmp")
            for k in sorted({k for k, _ in found}):
                texts[k] = _replaced(texts[k], [node for kk, node in found if kk == k], name)
            defs = [[n, t] for (n, _), t in zip(defs, texts)]
            code = texts[-1]
            first_use = min(k for k, _ in found)
            defs.insert(first_use if first_use < len(defs) else len(defs), [name, value])


def _float_power_compared(e) -> bool:
    """Whether ``e`` compares a power by a symbol (``(-1) ** p``), which sympy calls an integer for an
    integer ``p`` but the kernels compute as a float power (torch.pow's): a comparison of float
    scalars, which :meth:`TritonPrinter._logic` makes an int1 (``(h == j) | ((-1) ** p >= 3)``
    raised a TypeError in the interpreter's ``|``)."""
    return isinstance(e, sympy.Rel) and any(isinstance(x, sympy.Pow) and not x.exp.is_Integer
                                            for x in sympy.preorder_traversal(e))


def _inputs_first(e, args):
    """The terms (factors) of an integer sum (product) ``e`` in the order to print them: those
    holding an input's values first, a stable sort. Triton computes ``a + b + c`` left to right
    in the type of the operands so far, and the gathers make input values int64 while positions
    and params are int32 unless the call runs WIDE, which the host decides from the arithmetic
    free of inputs alone (codegen/bounds.py): ``4 * w * x[b, j]`` computed ``4 * w`` in int32
    first (wrapped at ``w = 2**30``), ``x[b, j] * 4 * w`` is int64 from the first product."""
    if not e.is_integer or not e.atoms(AppliedUndef):
        return list(args)
    return sorted(args, key=lambda a: not a.atoms(AppliedUndef))


def conjunction(checks: List[str], tests: List[str] = ()) -> str:
    """``checks & tests``, one text: the integer conditions (bounds checks of indices, which may
    compare a per-program int64 scalar, ``(b + 1 < size<d>_<table>)``) first, then the tests of float
    values (``(dg0 != 0.0)``). Triton's interpreter gives ``a & b`` the numpy data of
    ``a``'s type: a float comparison's tile ``&`` a per-program int64 comparison (spread as int64
    data) became a float32 array, which the next ``&`` refused (TypeError: ufunc 'bitwise_and'
    not supported); begun with an integer condition, a chain stays integer data. The same
    conjunction on the GPU (:meth:`TritonPrinter._narrow_last` does it for printed logic)."""
    return " & ".join(list(checks) + list(tests))


def joined(op: str, terms: List[str]) -> str:
    """``(t0 op t1 op ...)`` for an associative ``op`` (``|``, ``&``, ``^``), as groups of at most
    JOIN_GROUP terms when there are more: Python parses a chain of n terms n levels deep, and an
    ``any()`` of 992 terms or ``random_blocks(1024)`` (both within the language's limits) was a
    RecursionError in the printer (and would be in Triton's code generator, which recurses per
    level too); grouped, 1024 terms are 64 levels. Up to JOIN_GROUP terms the text is the chain."""
    if len(terms) > JOIN_GROUP:
        terms = [joined(op, terms[k:k + JOIN_GROUP]) for k in range(0, len(terms), JOIN_GROUP)]
    return "(" + f" {op} ".join(terms) + ")"


JOIN_GROUP = 32


def _structure(node: ast.AST, shapes: Dict[tuple, int], keys: Dict[int, int]) -> int:
    """A number for ``node``'s code, equal for two nodes exactly when their ``ast.dump`` is (the
    node types, fields and constants' reprs; not the positions): ``keys[id(n)]`` for ``node``
    and every node under it. Computed bottom-up once per parse (``ast.dump`` of every node
    re-formats each subtree at every level above it: a printed expression with deeply nested
    reads or functions took minutes to compile)."""
    parts: list = [type(node).__name__]
    for _, value in ast.iter_fields(node):
        if isinstance(value, ast.AST):
            parts.append(_structure(value, shapes, keys))
        elif isinstance(value, list):
            parts.append(tuple(_structure(x, shapes, keys) if isinstance(x, ast.AST) else ("=", repr(x)) for x in value))
        else:
            parts.append(("=", repr(value)))
    key = shapes.setdefault(tuple(parts), len(shapes))
    keys[id(node)] = key
    return key


def _worth_naming(node: ast.expr) -> bool:
    """Whether a printed sub-expression computes something: not a name, a constant (``-1.5``),
    an attribute (``tl.float64``), a name's index (``offs_i[:, None]``) or its parts, nor a
    name converted to float (``b * 1.0``, ``tl.cast(h, tl.float64)``)."""
    if isinstance(node, (ast.Name, ast.Constant, ast.Attribute, ast.Slice, ast.Tuple)):
        return False
    if isinstance(node, ast.UnaryOp) and isinstance(node.operand, ast.Constant):
        return False
    if isinstance(node, ast.Subscript):
        return not isinstance(node.value, ast.Name)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult) and isinstance(node.right, ast.Constant):
        return node.right.value != 1.0 or _worth_naming(node.left)
    if isinstance(node, ast.Call) and ast.unparse(node.func) in ("tl.cast", "gl.cast"):
        return any(_worth_naming(a) for a in node.args)
    return True


def _length(node: ast.expr) -> int:
    return node.end_col_offset - node.col_offset  # printed code is one line


def _segment(text: str, node: ast.expr) -> str:
    raw = text.encode()  # ast offsets count bytes
    return raw[node.col_offset:node.end_col_offset].decode()


def _replaced(text: str, nodes: List[ast.expr], name: str) -> str:
    """``text`` with the code of ``nodes`` (on its one line) replaced by ``name``, and the
    parentheses that only grouped it dropped."""
    raw = text.encode()
    for node in sorted(nodes, key=lambda n: n.col_offset, reverse=True):
        start, end = node.col_offset, node.end_col_offset
        grouped = (start > 0 and end < len(raw) and raw[start - 1:start] == b"(" and raw[end:end + 1] == b")"
                   and not (start > 1 and (raw[start - 2:start - 1].isalnum() or raw[start - 2:start - 1] in b"_)]")))
        if grouped:
            start, end = start - 1, end + 1
        raw = raw[:start] + name.encode() + raw[end:]
    return raw.decode()


@dataclass
class TritonPrinter:
    names: Dict[sympy.Symbol, str]
    gather: Optional[Callable[[AppliedUndef], str]] = None
    random_blocks: Optional[Callable[[RandomBlocks], str]] = None
    helpers: Set[str] = field(default_factory=set)  # helper functions the printed code calls
    float64: bool = False  # mask code: float arithmetic in float64, as the reference (module docstring)
    # what symbols of ``names`` stand for (bound steps), for the record of printed integer arithmetic
    definitions: Dict[sympy.Symbol, sympy.Basic] = field(default_factory=dict)
    temps: Optional[Temporaries] = None  # the names :meth:`statement` gives
    score: bool = False  # score code (float32): its steps free of s in float64, as mask code (analysis.exact)
    records = True  # integer arithmetic of kernels (the host printer's Python ints never overflow)
    lang = "tl"  # the module printed code calls functions of (GluonPrinter: gl, which names them alike)

    def __call__(self, e) -> str:
        e = integer_ops(sympy.sympify(e))
        if self.float64:
            return self.p(e)
        return self.p(integer_sums(exact_parts(e) if self.score else e))

    def statement(self, e) -> Tuple[List[Tuple[str, str]], str]:
        """``e`` printed, what it computes more than once named (:meth:`Temporaries.name_repeats`):
        ``(definitions [(name, value)] to write first, code)``. The record of printed integers
        (:func:`printed_integers`) is that of ``e`` whole, as :meth:`__call__` leaves it."""
        code = self(e)
        return self.temps.name_repeats(code) if self.temps is not None else ([], code)

    def definition(self, e, scalar: bool) -> Tuple[List[Tuple[str, str]], str]:
        """:meth:`statement` of a hoisted value (named once per program, ``scalar``, or once per
        row). A scalar condition is written ``tl.where(c, True, False)``: Triton's interpreter
        gives the result of comparing two float scalars the floats' type, so spread over a tile
        (``c0 & (j <= i)``) it became a float array that ``&`` refuses; the select makes it a
        true int1 there, and is nothing on the GPU."""
        temps, code = self.statement(e)
        if scalar and isinstance(e, Boolean) and not isinstance(e, BooleanAtom):
            code = self._true_condition(code)
        return temps, code

    def _true_condition(self, code: str) -> str:
        """``code``, a condition, as an int1 in the interpreter too (:meth:`definition`, :meth:`_logic`)."""
        return f"{self.lang}.where({code}, True, False)"

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
        if e.is_number and e.is_integer and not isinstance(e, Boolean):
            # an integer constant left unevaluated (Max(3, 15): a walk's heavy rows of two literal
            # row bounds) is an int in the kernel: "15.0" made the dispatch's // a float's (TypeError)
            return str(int(e))
        if e is sympy.oo:
            return 'float("inf")'
        if e is -sympy.oo:
            return '(-float("inf"))'
        if e.is_Rational:
            return repr(int(e.p) / int(e.q))  # Python's int / int: correctly rounded, as the reference
        if e.is_Float or e.is_NumberSymbol or (e.is_number and e.is_real):
            return repr(float(e))
        if isinstance(e, sympy.Symbol):
            raise KeyError(f"no kernel name for symbol {e}")
        if isinstance(e, AppliedUndef):
            if self.gather is None:
                raise ValueError(f"input access {e} cannot appear here")
            if self.float64 and not e.is_integer:  # a float input, as the reference reads it
                return f"{self.gather(e)}.to({self.lang}.float64)"
            return self.gather(e)
        method = getattr(self, "_" + type(e).__name__, None)
        if method is None:
            raise NotImplementedError(f"attncc cannot render {type(e).__name__}: {e}")
        log = _PRINTED.get()
        if log is not None and self.records and e.is_integer:
            log.append(resolve(e, self.definitions))
        return method(e)

    def _DotTile(self, e):
        """A lowered dot's value at the tile's pairs: the variable its tile product defines
        (attncc.codegen.tile_dots)."""
        return dot_value(int(e.args[0]))

    # -- the score's steps free of s, in float64 (analysis.exact) ----------------
    def _exact(self) -> "TritonPrinter":
        """The printer of this one's code in float64, as mask code: float params at their
        float64 value, the same gathers, helpers and record of integer arithmetic."""
        twin = self.__dict__.get("_float64_twin")
        if twin is None:
            names = {sym: float64_text(text) for sym, text in self.names.items() if sym is not S.s}
            if S.s in self.names:  # a comparison of the score computed as written (analysis.exact.merges_numbers)
                names[S.s] = f"{self.lang}.cast({self.names[S.s]}, {self.lang}.float64)"
            twin = TritonPrinter(names, gather=self.gather, random_blocks=self.random_blocks, helpers=self.helpers,
                                 float64=True, definitions=self.definitions)
            self.__dict__["_float64_twin"] = twin
        return twin

    def _ExactCondition(self, e):
        return (self if self.float64 else self._exact()).p(e.args[0])

    def _ExactValue(self, e):
        if self.float64:
            return self.p(e.args[0])
        return f"tl.cast({self._exact().p(e.args[0])}, tl.float32)"

    # -- float64 (mask) mode ------------------------------------------------
    def _f64(self, e) -> str:
        """``e`` as a float64 value: integers are converted (after their integer arithmetic,
        as the reference's ``_common`` does), literals adapt to the float64 operand."""
        if e.is_number and e.is_finite and _number(e) is not None:
            # Triton turns a Python float compared with a tensor (or given to tl.where, minimum,
            # maximum) into a float32 constant first: 0.3 would be 0.30000001192; with a scalar
            # (a float64 param: t / 2.5) the operation itself is float32
            return f"{self.lang}.full((), {repr(float(_number(e)))}, {self.lang}.float64)"
        if e.is_integer or e.is_Boolean or isinstance(e, sympy.Rel):
            return f"{self.lang}.cast({self.p(e)}, {self.lang}.float64)"  # tl.cast: kernel scalars are Python numbers in the interpreter
        return self.p(e)

    def _float_mode(self, e) -> bool:
        """Whether ``e`` is float arithmetic to print the reference's way."""
        return self.float64 and not e.is_integer

    def _Add64(self, e):
        out = self._f64(e.args[0])
        for t in e.args[1:]:  # left to right over sympy's terms, as the reference sums them
            if t.could_extract_minus_sign():
                out += " - " + self._f64(-t)  # x + (-y) is x - y exactly
            else:
                out += " + " + self._f64(t)
        return f"({out})"

    def _Mul64(self, e):
        num, den = sympy.fraction(e)
        if den != 1:  # one division, as the reference: 49 * (1 / 49) is not 1.0
            return f"({self._f64(num)} / {self._f64(den)})"
        if e.args[0] == -1:
            return f"(-{self._f64(sympy.Mul(*e.args[1:]))})"
        return "(" + " * ".join(self._f64(a) for a in e.args) + ")"

    def _Pow64(self, e):
        base, exp = e.args
        if exp.is_Integer and exp < 0:
            return f"(1.0 / {self._f64(base ** -exp)})"
        x, k = self._f64(base), _number(exp)
        if k in (1.0, 2.0, 3.0, 4.0):  # repeated products, as the reference
            return "(" + " * ".join([x] * int(k)) + ")"
        if k == 0.5:
            self.helpers.add("_sqrt64")
            return f"_sqrt64({x})"
        if k == -0.5:
            self.helpers.add("_sqrt64")
            return f"(1.0 / _sqrt64({x}))"
        if base == sympy.E:
            return f"{self.lang}.exp({self._f64(exp)})"
        if base == 2:
            return f"{self.lang}.exp2({self._f64(exp)})"
        if _whole(base) and _whole(exp):  # 3 ** w, 3 ** (w - 4): torch.pow's integer, not exp2's neighbour
            return self._ipow64_code(base, exp)
        return self._general_pow(base, exp, x, self._f64(exp))

    def _ipow64_code(self, base, exp) -> str:
        """``base ** exp`` of an integer and an integer that is no literal, in float64 (the helper
        ``_ipow64``: torch.pow's integer for ``exp >= 0``)."""
        self.helpers |= {"_pow", "_ipow64"}
        return f"_ipow64({self._f64(base)}, {self._f64(exp)})"

    def _general_pow(self, base, exp, x: str, y: str) -> str:
        """``x ** y`` (the printed base and exponent) where no product or root does: exp2 of a log,
        through the sign-aware ``_pow`` (torch.pow's real values) unless exp2(y * log2(x)) is that
        already: a positive number's power, or a nonzero number power of a base that cannot be
        negative (or of any base, when the power is no integer: NaN below 0 either way)."""
        k = _number(exp)
        if (base.is_number and base.is_positive) or (k is not None and k != 0 and (_nonnegative(base) or k != int(k))):
            return f"{self.lang}.exp2({y} * {self.lang}.log2({x}))"
        self.helpers.add("_pow")
        return f"_pow({x}, {y})"

    # -- arithmetic ---------------------------------------------------------
    def _Add(self, e):
        if self._float_mode(e):
            return self._Add64(e)
        terms = _inputs_first(e, sorted(e.args, key=lambda t: t.could_extract_minus_sign()))
        out = self.p(terms[0])
        for t in terms[1:]:
            if t.could_extract_minus_sign():
                out += " - " + self._atom(-t)
            else:
                out += " + " + self._atom(t)
        return f"({out})"

    def _Mul(self, e):
        if self._float_mode(e):
            return self._Mul64(e)
        coeff, rest = e.as_coeff_Mul()
        if coeff == -1:
            return f"(-{self._atom(rest)})"
        num, den = sympy.fraction(e)
        if den != 1 and not den.is_number:
            return f"({self._atom(num)} / {self._atom(den)})"
        args = e.args
        if not e.is_integer:  # a float first: each integer factor then multiplies a float (no int product to overflow)
            args = sorted(args, key=lambda a: a.is_integer is True)
        args = _inputs_first(e, args)
        factors = [self._atom(a) for a in args]
        return "(" + " * ".join(factors) + ")"

    def _atom(self, e) -> str:
        return self.p(e)

    def _Pow(self, e):
        base, exp = e.args
        if self.float64 and not (base.is_integer and exp.is_Integer and exp >= 0):  # 2 ** h: a float, as the reference
            return self._Pow64(e)
        if base == 2:
            return f"{self.lang}.exp2({self._float(exp)})"
        if base == sympy.E:
            return f"{self.lang}.exp({self._float(exp)})"
        if _number(exp) == 0.5:  # Rational(1, 2) from sqrt(), Float(0.5) from x ** 0.5
            return f"{self.lang}.sqrt({self._float(base)})"
        if _number(exp) == -0.5:
            return f"{self.lang}.rsqrt({self._float(base)})"
        if exp.is_Integer and 1 <= abs(int(exp)) <= 4:
            prod = " * ".join([self._atom(base)] * abs(int(exp)))
            return f"({prod})" if exp > 0 else f"(1.0 / ({prod}))"
        if _number(exp) in (1.0, 2.0, 3.0, 4.0):  # x ** 2.0: products, as the reference's
            return "(" + " * ".join([f"({self._float(base)})"] * int(_number(exp))) + ")"
        if exp.is_Integer and exp > 0 and base.is_integer:  # exact, as the reference's integer power
            self.helpers.add("_ipow")
            return f"_ipow({self.p(base)}, {int(exp)})"
        return self._general_pow(base, exp, self._float(base), self.p(exp))

    def _float(self, e) -> str:
        """An argument of a transcendental function: Triton's math functions take floats only,
        so an integer expression (``tan(b)``, ``exp(h)``) is converted first."""
        if self.float64:
            return self._f64(e)
        x = self.p(e)
        return f"({x} * 1.0)" if e.is_integer else x

    def _exp(self, e):
        return f"{self.lang}.exp({self._float(e.args[0])})"

    def _log(self, e):
        return f"{self.lang}.log({self._float(e.args[0])})"

    def _sin(self, e):
        if self.float64:
            return f"{self.lang}.sin({self._float(e.args[0])})"
        self.helpers.add("_sin")
        return f"_sin({self._float(e.args[0])}, FAST_MATH)"

    def _cos(self, e):
        if self.float64:
            return f"{self.lang}.cos({self._float(e.args[0])})"
        self.helpers.add("_cos")
        return f"_cos({self._float(e.args[0])}, FAST_MATH)"

    def _tan(self, e):
        x = self._float(e.args[0])
        if self.float64:
            return f"({self.lang}.sin({x}) / {self.lang}.cos({x}))"
        self.helpers |= {"_sin", "_cos"}
        return f"(_sin({x}, FAST_MATH) / _cos({x}, FAST_MATH))"

    def _tanh(self, e):
        if self.float64:
            self.helpers.add("_tanh64")
            return f"_tanh64({self._float(e.args[0])})"
        self.helpers.add("_tanh")
        return f"_tanh({self._float(e.args[0])}, FAST_MATH)"

    def _ToFloat(self, e):
        """An integer sum converted once (integer.integer_sums); tl.cast: a kernel scalar may be a Python int."""
        return f"{self.lang}.cast({self.p(e.args[0])}, {self.lang}.{'float64' if self.float64 else 'float32'})"

    def _Grouped(self, e):  # float arithmetic as written (builtins.Grouped): its operand, then a float
        return self._ToFloat(e)

    def _FloatDiv(self, e):
        """A division by a float literal, as written (builtins.FloatDiv)."""
        a, b = e.args
        if self.float64:
            return f"({self._f64(a)} / {self._f64(b)})"
        return f"({self._float(a)} / {self.p(b)})"

    def _Sigmoid(self, e):
        return f"{self.lang}.sigmoid({self._float(e.args[0])})"

    def _erf(self, e):
        return f"{self.lang}.erf({self._float(e.args[0])})"

    # integer bitwise operators (attncc.spec.builtins): two's complement in the kernels' int32 /
    # int64 is Python's on every value they hold
    def _BitAnd(self, e):
        return joined("&", [self.p(a) for a in e.args])

    def _BitOr(self, e):
        return joined("|", [self.p(a) for a in e.args])

    def _BitXor(self, e):
        return joined("^", [self.p(a) for a in e.args])

    def _Shift(self, e):
        self.helpers.add("_shift")
        return f"_shift({self.p(e.args[0])}, {self.p(e.args[1])})"

    def _operand(self, e, whole) -> str:
        """An operand of ``whole``: float64 where ``whole`` is float arithmetic of mask code."""
        return self._f64(e) if self._float_mode(whole) else self.p(e)

    def _Abs(self, e):
        return f"{self.lang}.abs({self._operand(e.args[0], e)})"

    def _Min(self, e):
        return self._fold(f"{self.lang}.minimum", e)

    def _Max(self, e):
        return self._fold(f"{self.lang}.maximum", e)

    def _fold(self, fn, e):
        args = e.args
        out = self._operand(args[0], e)
        for a in args[1:]:
            out = f"{fn}({out}, {self._operand(a, e)})"
        return out

    # integer // and % (see integer.py): exact integer operations with Python's signs
    def _float_floor(self, e) -> bool:
        """Whether an integer ``//`` or ``%`` has an operand that is a floor of float arithmetic
        (``(t // 1.1) // 3``): integer-valued, but a float in the kernel (tl.floor)."""
        return any(a.has(sympy.floor, sympy.ceiling) for a in e.args)

    def _FloorDiv(self, e):
        num, den = e.args
        if self._float_floor(e):
            return self._floor(sympy.floor(num / den, evaluate=False))
        if _nonnegative(num) and den.is_positive:
            return f"({self._atom(num)} // {self._atom(den)})"
        if den.is_Integer and den > 1 and int(den) & (int(den) - 1) == 0:
            # by 2**k: an arithmetic shift right floors for either sign (x >> k, as Python's)
            return f"({self._atom(num)} >> {int(den).bit_length() - 1})"
        self.helpers.add("_floordiv")
        return f"_floordiv({self.p(num)}, {self.p(den)})"

    def _FloorMod(self, e):
        a, m = e.args
        if self._float_floor(e):
            return self._Mod(sympy.Mod(a, m, evaluate=False))
        if m.is_Integer and m > 1 and int(m) & (int(m) - 1) == 0:
            # by 2**k: the low bits, for either sign (two's complement: Python's a % 2**k), one operation
            return f"({self._atom(a)} & {int(m) - 1})"
        if _nonnegative(a) and m.is_positive:
            return f"({self._atom(a)} % {self._atom(m)})"
        self.helpers.add("_floormod")
        return f"_floormod({self.p(a)}, {self.p(m)})"

    # (x + y) % m and (x + y) // m of residues x, y (analysis.separable): a comparison, no division
    def _ModSum(self, e):
        self.helpers |= {"_mod_sum", "_mod_wraps"}
        return f"_mod_sum({self._residues(e)})"

    def _SumCarry(self, e):
        self.helpers |= {"_sum_carry", "_mod_wraps"}
        return f"_sum_carry({self._residues(e)})"

    def _residues(self, e) -> str:
        """The arguments of the helpers: ``x, y, m`` and whether ``m > 0`` is known (one operation
        per pair less)."""
        x, y, m = e.args
        return f"{self.p(x)}, {self.p(y)}, {self.p(m)}, M_POSITIVE={m.is_positive is True}"

    def _int_power(self, e, rounding: str) -> Optional[str]:
        """``floor`` / ``ceil`` (``rounding``) of ``e``, an integer's power by an integer that is no
        literal (``4 ** w``, ``-(3 ** w)``: a closed form's bound on positions), as an int64 for
        integer code: the power through ``_ipow64`` (torch.pow's integer for ``w >= 0``), not a
        float32 ``exp2(w * log2(4))``, which loop bounds cannot take and which misses integers
        (``3 ** 5`` is 242.99997 there)."""
        sign, power = (-1, -e) if e.could_extract_minus_sign() else (1, e)
        if self.float64 or self.lang != "tl" or not (power.is_Pow and _whole(power.base) and _whole(power.exp)
                                                     and not power.exp.is_Integer):
            return None
        value = self._ipow64_code(power.base, power.exp)
        if sign < 0:  # floor(-x) is -ceil(x), ceil(-x) is -floor(x)
            rounding = {"floor": "ceil", "ceil": "floor"}[rounding]
        code = f"{self.lang}.cast({self.lang}.{rounding}({value}), {self.lang}.int64)"
        return f"(-{code})" if sign < 0 else code

    def _floor(self, e):
        arg = e.args[0]
        if (integer_fraction(arg) is not None or arg.is_integer) and not arg.has(sympy.floor, sympy.ceiling):  # not rewritten yet
            return self.p(integer_ops(e))
        power = self._int_power(arg, "floor")
        if power is not None:
            return power
        if self.float64:  # Python's float // (the reference's): the floor of the exact quotient
            num, den = quotient(arg)
            if den == 1:
                return f"{self.lang}.floor({self._f64(arg)})"
            self.helpers.add("_floordiv64")
            return f"_floordiv64({self._f64(num)}, {self._f64(den)})"
        return f"{self.lang}.floor({self.p(arg)})"

    def _ceiling(self, e):
        arg = e.args[0]
        if integer_fraction(arg) is not None or arg.is_integer:
            return self.p(integer_ops(e))
        power = self._int_power(arg, "ceil")
        if power is not None:
            return power
        if self.float64:
            num, den = quotient(arg)
            if den == 1:
                return f"{self.lang}.ceil({self._f64(arg)})"
            self.helpers.add("_floordiv64")
            return f"(-_floordiv64(-{self._f64(num)}, {self._f64(den)}))"
        return self.p(-sympy.floor(-arg))

    def _Mod(self, e):
        a, m = e.args
        if a.is_integer and m.is_integer and not e.has(sympy.floor, sympy.ceiling):  # not rewritten yet
            return self.p(integer_ops(e))
        if self.float64:  # the reference's torch.remainder: fmod, then the sign of the divisor
            self.helpers.add("_floormod64")
            return f"_floormod64({self._f64(a)}, {self._f64(m)})"
        return f"({self.p(a)} - {self.lang}.floor({self.p(a)} / {self.p(m)}) * {self.p(m)})"

    def _Piecewise(self, e):
        (val, cond), rest = e.args[0], e.args[1:]
        if cond is sympy.true:
            return self._operand(val, e)
        other = self._operand(sympy.Piecewise(*rest), e) if rest else 'float("nan")'
        code = f"{self.lang}.where({self.p(cond)}, {self._operand(val, e)}, {other})"
        if e.is_integer and (all(v.is_number for v, _ in e.args) or e.atoms(AppliedUndef)):
            return self._int64(code)
        return code

    def _int64(self, code: str) -> str:
        """An integer select of literals (a boolean as a number, ``where(c, 1, 0)``) or of an input's
        values, as int64. Triton gives ``tl.where(c, 1, 0)`` its literals' int32 whatever the call,
        while the host switches WIDE (int64 positions and params) from the reach of the arithmetic
        free of inputs and counts on the gathers' int64 for the rest (codegen/bounds.py). In int32,
        ``(j < 3) + 2**32`` and ``(x[b, j] > 3) + 2**32`` did not compile, and
        ``(j < 3) * 2**30 + (i < 5) * 2**30`` and ``(x[b, j] > 3) * w * 4`` at ``w = 2**30`` wrapped.
        (A select with a position or param in a branch takes its type: int64 in WIDE calls.)"""
        return f"{code}.to({self.lang}.int64)"

    # -- logic --------------------------------------------------------------
    def _rel(self, e, op):
        e = integer_comparison(e)
        if not isinstance(e, sympy.Rel):  # settled once in integers
            return self.p(e)
        if self.float64 and float_comparison(e):  # compared in float64 (== of two booleans: as they are)
            return f"({self._f64(e.lhs)} {op} {self._f64(e.rhs)})"
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

    def _Tie(self, e):  # an argument of a min / max against its result, as computed (derivative.Tie)
        return self._rel(sympy.Eq(*e.args, evaluate=False), "==")

    def _Unequality(self, e):
        return self._rel(e, "!=")

    def _logic(self, a) -> str:
        """An operand of ``&``, ``|``, ``^`` or ``~``. A comparison of float values without i or j
        (params, literals) is written ``tl.where(c, True, False)``, as :meth:`definition` writes
        a hoisted one: Triton's interpreter gives the result of comparing two float scalars the
        floats' type, which ``|`` with a tile refuses. The select is nothing on the GPU, and right
        whatever the operand's shape."""
        code = self.p(a)
        if isinstance(a, ExactCondition):  # a score's comparison computed in float64: the same
            a = a.args[0]
        if isinstance(a, Tie):
            a = sympy.Eq(*a.args, evaluate=False)
        if (float_comparison(a) or _float_power_compared(a)) and not a.has(S.i, S.j):
            return self._true_condition(code)
        return code

    def _narrow(self, a) -> bool:
        """Whether ``a``, an operand of ``&``, ``|`` or ``^``, prints as a comparison of float32
        tiles left as it is (``s >= 0.01 * offs_i[:, None]``: one with i or j; one without is an
        int1, :meth:`_logic`), or as logic of such operands alone. Triton's interpreter keeps the
        result of a comparison in its operands' type, and of ``x & y`` in ``x``'s: begun with such
        an operand, a chain meeting int64 data (a row's condition of b, ``row0 = (b < 1) & (offs_i
        < 5)``) cast that to float32, which the next ``&`` or ``|`` refused (TypeError: ufunc
        'bitwise_or' not supported). Float64 ones (mask code, a score's steps free of s) hold
        any integer data, as every integer operand does: only these go last (:meth:`_narrow_last`)."""
        if self.float64 or isinstance(a, ExactCondition):
            return False
        if isinstance(a, (sympy.And, sympy.Or, sympy.Xor)):
            return all(self._narrow(x) for x in a.args)
        if isinstance(a, sympy.Not):
            return self._narrow(a.args[0])
        if isinstance(a, Tie):
            a = sympy.Eq(*a.args, evaluate=False)
        return (float_comparison(a) or _float_power_compared(a)) and a.has(S.i, S.j)

    def _narrow_last(self, args) -> list:
        """The operands of an ``&``, ``|`` or ``^`` in the order to print them: :func:`_ordered`'s,
        those :meth:`_narrow` last (a stable sort), so that a chain begins with an integer or int1
        operand wherever it has one, and one of float32 tiles alone holds bool data only. The same
        value on the GPU, where the operands are int1 and computed all (no short circuit)."""
        return sorted(_ordered(args), key=self._narrow)

    def _And(self, e):
        return joined("&", [self._logic(a) for a in self._narrow_last(e.args)])

    def _Or(self, e):
        return joined("|", [self._logic(a) for a in self._narrow_last(e.args)])

    def _Not(self, e):
        inner = self._logic(e.args[0])
        if inner in ("True", "False"):  # random_blocks(0): ~False is the int -1, not a condition
            return "False" if inner == "True" else "True"
        return f"(~{inner})"

    def _Xor(self, e):
        return "(" + " ^ ".join(self._logic(a) for a in self._narrow_last(e.args)) + ")"

    def _ITE(self, e):
        """sympy's boolean if-then-else (a walk's case split on a condition of the call's sizes:
        ``(h + (n_q > 5)) % 3 == 1``), a select of conditions: "cannot render ITE" at build."""
        return f"{self.lang}.where({', '.join(self._logic(a) for a in e.args)})"

    # -- built-ins ----------------------------------------------------------
    def _Bucket(self, e):
        nb, md, bd = e.options
        name = f"_bucket_{nb}_{md}_{int(bd)}"
        self.helpers.add(name)
        return f"{name}({self.p(e.args[0])})"

    def _AlibiSlope(self, e):
        h, n_heads = e.args
        if self.float64:
            self.helpers.add("_alibi_slope64")
            return f"_alibi_slope64({self.p(h)}, {self.p(n_heads)})"
        self.helpers.add("_alibi_slope")
        return f"_alibi_slope({self.p(h)}, {self.p(n_heads)})"

    def _RandomBlocks(self, e):
        if self.random_blocks is None:
            raise ValueError("random_blocks() cannot appear here")
        return self.random_blocks(e)


def _whole(x) -> bool:
    """Whether ``x`` is a whole number: an integer expression, or one inside a ToFloat (the parser keeps
    float arithmetic's operands opaque: the exponent of ``3 ** (w - 4)`` is ``ToFloat(w - 4)``, an int
    all the same; session 24 found ``i % 3 ** (w - 7)`` through exp2 of a log, o off by 4.5)."""
    return bool(x.is_integer) or (isinstance(x, ToFloat) and bool(x.args[0].is_integer))


def _number(e) -> Optional[float]:
    """The value of a real number node (``Integer(2)``, ``Float(0.5)``, ``Rational(1, 2)``), else None:
    sympy's ``==`` tells ``Float(0.5)`` from ``Rational(1, 2)``."""
    return float(e) if e.is_number and e.is_real else None


def _nonnegative(e) -> bool:
    """sympy's assumptions, helped by the fact that a positive integer is at least 1."""
    if e.is_nonnegative:
        return True
    shift = {s: sympy.Dummy(integer=True, nonnegative=True) + 1 for s in e.free_symbols if s.is_integer and s.is_positive}
    return bool(shift) and e.xreplace(shift).is_nonnegative is True


def _ordered(args):
    """A stable order for commutative operands, so regenerated files are identical."""
    return sorted(args, key=sympy.default_sort_key)


class GluonPrinter(TritonPrinter):
    """Kernel code for Gluon (``triton.experimental.gluon.language`` as ``gl``): Triton's functions
    under Gluon's names. Positions come as tensors in explicit layouts ([BLOCK_M, 1] and [1, BLOCK_N]
    slices of the S accumulator's), which elementwise code broadcasts like Triton's. What Gluon
    lacks is refused (:class:`NotGluon`) rather than printed: ``sigmoid`` is written out, and float64
    mask code (a literal needs a layout-free float64 constant) is not printed; the Gluon eligibility
    (attncc.analysis.builtin) keeps masks with float arithmetic on the tl kernels."""

    lang = "gl"

    def __call__(self, e) -> str:
        # the fragments hoist nothing, but a separable % or // still leaves the pairs: its residues
        # are computed on the tile's [BLOCK_M, 1] rows and [1, BLOCK_N] columns (analysis.separable)
        return super().__call__(separated(integer_ops(sympy.sympify(e))))

    def _f64(self, e) -> str:
        raise NotGluon(f"float64 arithmetic ({e}) in Gluon fragments")

    def _ToFloat(self, e):
        if self.float64:
            return self._f64(e)
        return super()._ToFloat(e)

    def _AlibiSlope(self, e):
        if self.float64:
            return self._f64(e)
        return super()._AlibiSlope(e)

    def _Sigmoid(self, e):
        return f"(1.0 / (1.0 + gl.exp(-{self._float(e.args[0])})))"

    def _RandomBlocks(self, e):
        if self.random_blocks is None:  # attncc.codegen.gluon passes the rendering with its tables
            raise NotGluon("random_blocks() in Gluon fragments")
        return self.random_blocks(e)


class NotGluon(NotImplementedError):
    """An expression the Gluon fragments cannot compute (GluonPrinter)."""


class PythonPrinter(TritonPrinter):
    """Host-side (plain Python ints/floats) printing: for values computed at launch."""

    records = False

    def _int64(self, code: str) -> str:
        return code  # a Python int

    def _ToFloat(self, e):
        return f"float({self.p(e.args[0])})"

    def _Max(self, e):
        return self._fold("max", e)

    def _Min(self, e):
        return self._fold("min", e)

    def _FloorDiv(self, e):
        return f"({self.p(e.args[0])} // {self.p(e.args[1])})"

    def _FloorMod(self, e):
        return f"({self.p(e.args[0])} % {self.p(e.args[1])})"

    def _ModSum(self, e):
        x, y, m = (self.p(a) for a in e.args)
        return f"(({x} + {y}) % {m})"

    def _SumCarry(self, e):
        x, y, m = (self.p(a) for a in e.args)
        return f"(({x} + {y}) // {m})"

    def _floor(self, e):
        if integer_fraction(e.args[0]) is not None or e.args[0].is_integer:
            return self.p(integer_ops(e))
        return f"math.floor({self.p(e.args[0])})"

    def _ceiling(self, e):
        if integer_fraction(e.args[0]) is not None or e.args[0].is_integer:
            return self.p(integer_ops(e))
        return f"math.ceil({self.p(e.args[0])})"

    def _Mod(self, e):
        return f"({self.p(e.args[0])} % {self.p(e.args[1])})"

    def _Pow(self, e):
        base, exp = e.args
        if _whole(base) and _whole(exp):  # 3 ** w: Python's exact integer (a float below w = 0); 3 ** float(w - 4)
            return f"({self.p(base)} ** {self.p(exp)})"
        return super()._Pow(e)

    def _Abs(self, e):
        return f"abs({self.p(e.args[0])})"

    def _And(self, e):
        return "(" + " and ".join(self.p(a) for a in _ordered(e.args)) + ")"

    def _Or(self, e):
        return "(" + " or ".join(self.p(a) for a in _ordered(e.args)) + ")"

    def _Not(self, e):
        return f"(not {self.p(e.args[0])})"

    def _Piecewise(self, e):
        # a lazy conditional: the branch not taken is never computed (where(w <= 0, 1, w) at w = 0
        # takes 1; an eager select computed 0 ** -1 too and raised ZeroDivisionError on the host)
        (val, cond), rest = e.args[0], e.args[1:]
        if cond is sympy.true:
            return self.p(val)
        other = self.p(sympy.Piecewise(*rest)) if rest else 'float("nan")'
        return f"({self.p(val)} if {self.p(cond)} else {other})"


    def _AlibiSlope(self, e):
        h, n_heads = e.args
        return f"_rt.semantics.alibi_slope({self.p(h)}, {self.p(n_heads)})"

    def _ExactCondition(self, e):  # Python's floats are float64 already
        return self.p(e.args[0])

    def _ExactValue(self, e):
        return self.p(e.args[0])
