"""The expression language: Python's ``ast`` with a whitelist, turned into sympy.

Never ``eval``: every node kind, name and function is checked here, and each
result carries its type (bool, int or float) so that a mask that is not boolean,
a bitwise operator on floats or a float index is refused with the column it starts at
(a boolean in arithmetic counts as 0 or 1, contract v1). Reductions are unrolled here.
"""
from __future__ import annotations

import ast
import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import sympy
from sympy.core.function import AppliedUndef
from sympy.printing.precedence import PRECEDENCE

from attncc.spec import symbols as S
from attncc.spec.builtins import (AlibiSlope, BitAnd, BitOr, BitXor, Bucket, FloatDiv, Grouped, RandomBlocks, Shift,
                                  Sigmoid, ToFloat, quotient)
from attncc.spec.errors import SpecError
from attncc.spec.ir import InputDecl, Param

BOOL, INT, FLOAT = "bool", "int", "float"
_FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}

# Resource limits: a few characters must not make the build take minutes or gigabytes.
MAX_EXPRESSION_LENGTH = 2000  # characters
MAX_DEPTH = 100  # nesting of the expression's syntax tree
MAX_EXPONENT = 64  # |n| in x ** n for an x that is not a number (sympy expands powers of sums)
MAX_EXPANDED_TERMS = 256  # terms of an expression once products and powers of sums are expanded
MAX_CONDITION_WORK = 2048  # a condition on numbers made of conditions: its cases times its size (_condition)
MAX_WRITTEN_NODES = 12000  # operations of an expression written out as the kernels print it (_written_size)
MAX_CONSTANT_BITS = 4096  # an exact constant power (2 ** 5000) sympy would compute digit by digit
INT_CONSTANT_LIMIT = 2**63  # integer constants are int64 in the kernels
BUCKET_MAX_BUCKETS = 1024
BUCKET_MAX_DISTANCE = 2**20  # the bucket thresholds are found by a walk up to max_distance
RANDOM_BLOCKS_MAX_R = 1024  # a per-call table holds r key blocks per query block
RANDOM_BLOCKS_MAX_BLOCK = 2**16
SEED_LIMIT = 2**63
MAX_SHIFT = 62  # a constant shift amount: 0 .. 62 (x << 63 is past int64 for every x but 0)
MAX_REDUCTION = 256  # terms of one sum / any / all / dot (the kernels unroll them)
MAX_UNROLLED = 1024  # terms of all the reductions of one expression, nested ones multiplied

_UNARY_MATH = {
    "log": sympy.log,
    "sqrt": sympy.sqrt,
    "exp": sympy.exp,
    "exp2": lambda x: sympy.Integer(2) ** x,
    "log2": lambda x: sympy.log(x, 2),
    "tanh": sympy.tanh,
    "sigmoid": Sigmoid,
    "sin": sympy.sin,
    "cos": sympy.cos,
    "tan": sympy.tan,
    "erf": sympy.erf,
}
REDUCTIONS = ("sum", "any", "all")
FUNCTIONS = ("abs", "min", "max", "where", *_UNARY_MATH, "bucket", "random_blocks", *REDUCTIONS, "dot", "range")
# What an integer cast of a float is in torch (toward 0), which writing x alone would drop
_TRUNC = "where(x >= 0, x // 1, -(-x // 1))"
_TRUNCATES = f"to an integer type torch truncates a float x toward 0: {_TRUNC}"
_TO_INT = f"x for an integer x (no cast); {_TRUNCATES}"
_SIGN = "where(x > 0, 1, where(x < 0, -1, 0))"
_REDUCE = "{}({} for t in range(K)){} (K: the axis's declared extent)"
_DOT = "dot(x[..., :], y[..., :]) (inputs indexed with one ':' over a dim declared with a number)"
# How a FlexAttention score_mod / mask_mod spells what the language has: torch.X(...) (also
# torch.special.X, torch.nn.functional.X, F.X, math.X) and tensor methods x.X(...), each with the
# spelling to write instead (a name of FUNCTIONS is written as is, without its module).
_TORCH_SPELLINGS = {
    "minimum": "min(a, b)", "maximum": "max(a, b)", "clamp": "min(max(x, lo), hi)", "clip": "min(max(x, lo), hi)",
    "clamp_min": "max(x, lo)", "clamp_max": "min(x, hi)", "relu": "max(x, 0)", "silu": "x * sigmoid(x)",
    "logical_and": "a and b", "logical_or": "a or b", "logical_not": "not a", "logical_xor": "a != b",
    "bitwise_and": "a & b", "bitwise_or": "a | b", "bitwise_xor": "a ^ b", "bitwise_not": "~a",
    "floor_divide": "a // b", "remainder": "a % b", "pow": "a ** b", "square": "x ** 2", "neg": "-x",
    "add": "a + b", "sub": "a - b", "mul": "a * b", "div": "a / b (a // b for rounding_mode='floor')",
    "eq": "a == b", "ne": "a != b", "lt": "a < b", "le": "a <= b", "gt": "a > b", "ge": "a >= b",
    "to": "x (no cast: inputs take their [inputs] dtype, and scores are float32; " + _TRUNCATES + ")",
    "float": "x (no cast: scores are float32)", "int": _TO_INT, "long": _TO_INT, "bool": "x != 0",
    "new_zeros": "0", "zeros_like": "0", "ones_like": "1", "full_like": "the value",
    "floor": "x // 1", "ceil": "-(-x // 1)", "trunc": _TRUNC, "log1p": "log(1 + x)", "expit": "sigmoid(x)",
    "expm1": "exp(x) - 1", "log10": "log(x) / log(10)", "rsqrt": "1 / sqrt(x)", "reciprocal": "1 / x",
    "true_divide": "a / b", "sinh": "(exp(x) - exp(-x)) / 2", "cosh": "(exp(x) + exp(-x)) / 2",
    "sign": _SIGN, "sgn": _SIGN, "fmod": "where(a >= 0, abs(a) % abs(b), -(abs(a) % abs(b)))",
    "gelu": "0.5 * x * (1 + erf(x / sqrt(2))) (approximate='tanh': 0.5 * x * (1 + tanh(0.7978845608028654 * "
            "(x + 0.044715 * x ** 3))))",
    "softplus": "log(1 + exp(x))", "logsigmoid": "log(sigmoid(x))", "elu": "where(x > 0, x, exp(x) - 1)",
    "leaky_relu": "where(x >= 0, x, 0.01 * x)", "hardtanh": "min(max(x, -1), 1)",
    "item": "x (an input's element is a number already)", "tensor": "the value", "as_tensor": "the value",
    "scalar_tensor": "the value",
    # torch's reductions over a tensor's axis: the language's take a generator over a fixed axis (§3.3)
    "sum": _REDUCE.format("sum", "x[..., t]", ""), "any": _REDUCE.format("any", "c[..., t]", ""),
    "all": _REDUCE.format("all", "c[..., t]", ""), "mean": _REDUCE.format("sum", "x[..., t]", " / K"),
    "dot": _DOT, "matmul": _DOT, "inner": _DOT,
    **dict.fromkeys(("rand", "randn", "rand_like", "randn_like", "randint", "bernoulli", "dropout"),
                    "[score].dropout = p in the spec (an expression draws no random numbers)"),
}


_MODULES = ("torch", "torch.special", "torch.nn.functional", "F", "math")


def _call_hint(func: ast.expr) -> str:
    """What to write for a call of an attribute (torch.where(...), x.abs(), x.clamp(lo, hi)): the
    language calls its functions by their bare names."""
    if not isinstance(func, ast.Attribute):
        return ""
    name, callee = func.attr, ast.unparse(func)
    if name == "where" and ast.unparse(func.value) not in _MODULES:  # the method: x.where(cond, y)
        return f": write where(cond, x, y) for x.where(cond, y) ({callee}(...))"
    if name in _TORCH_SPELLINGS:
        return f": write {_TORCH_SPELLINGS[name]} for {callee}(...)"
    if name in ("amax", "amin"):
        return f": write {name[1:]}(a, b, ...) for {callee}(...)"
    if name in FUNCTIONS and name not in ("range", "bucket", "random_blocks"):
        return f": write {name}(...) for {callee}(...)"
    return ""


@dataclass(frozen=True)
class Scope:
    """What names an expression may use."""

    params: Tuple[Param, ...] = ()
    inputs: Tuple[InputDecl, ...] = ()
    allow_score: bool = False  # `s`/`score` (and `inf`): [score].mod only

    def known_names(self):
        names = list(S.INDEX_VARS) + ["q_idx", "kv_idx", "causal", "alibi"] + [p.name for p in self.params]
        names += [d.name for d in self.inputs]
        if self.allow_score:
            names += ["s", "score", "inf"]
        return sorted(names)


@dataclass
class _Parser:
    scope: Scope
    file: str
    key: str
    _params: Dict[str, Param] = field(default_factory=dict)
    _inputs: Dict[str, InputDecl] = field(default_factory=dict)
    text: str = ""  # the expression, for quoting parts of it in messages
    written: "_Written" = None  # where the positions of ``text`` are in the expression as written
    _checked: set = field(default_factory=set)  # sub-expressions check_number has seen
    _terms: dict = field(default_factory=dict)  # memo of _expanded_terms
    _written: dict = field(default_factory=dict)  # memo of _written_size
    _locals: Dict[str, sympy.Symbol] = field(default_factory=dict)  # loop variables of enclosing reductions
    _unrolled: int = 0  # terms of the reductions parsed so far (nested ones multiplied)
    counts: set = field(default_factory=set)  # int params used as a reduction's count (range(K))

    def __post_init__(self):
        self._params = {p.name: p for p in self.scope.params}
        self._inputs = {d.name: d for d in self.scope.inputs}

    def fail(self, node, message):
        col = getattr(node, "col_offset", None)
        raise SpecError(self.file, self.key, message,
                        **({} if col is None else self.written.place(node.lineno, col)))

    def value_note(self, node, value) -> str:
        """`` (= value)`` where sympy's form of ``node`` says more than its text."""
        text = _text(value)
        return "" if text.replace(" ", "") == self.source(node).replace(" ", "") else f" (= {text})"

    def source(self, node) -> str:
        """The text of ``node`` as written, shortened."""
        return _text(ast.get_source_segment(self.text, node) or "this expression")

    # -- dispatch -----------------------------------------------------------
    def visit(self, node) -> Tuple[sympy.Basic, str]:
        method = getattr(self, "visit_" + type(node).__name__, None)
        if method is None:
            self.fail(node, f"{_describe(node)} is not part of the expression language{_node_hint(node)}")
        try:
            expr, typ = method(node)
        except SpecError:
            raise
        except (TypeError, ValueError, ArithmeticError) as e:  # sympy refusing to build a node
            self.fail(node, f"{self.source(node)} cannot be built: {_text(e, 120)}")
        if expr.has(sympy.ITE):  # sympy's if-then-else of a condition on booleans-as-numbers: no stage takes it
            expr = expr.replace(lambda e: isinstance(e, sympy.ITE),
                                lambda e: sympy.Or(sympy.And(e.args[0], e.args[1]), sympy.And(sympy.Not(e.args[0]), e.args[2])))
        if _written_size(expr, self._written) > MAX_WRITTEN_NODES:
            self.fail(node, f"{self.source(node)} is more than {MAX_WRITTEN_NODES} operations written out: a reduction "
                            "is written out term by term (nested ones multiplied), a condition used inside another "
                            "condition (where(where(...), ...), a boolean as a number compared again) is copied into "
                            "each use, and an input read inside an input's index three times (its bounds check); nest "
                            "fewer of them or reduce over fewer terms")
        if typ != BOOL:
            self.check_number(node, expr, typ)
        if typ == FLOAT:
            expr = _folded(expr)
        return expr, typ

    # -- limits -------------------------------------------------------------
    def check_number(self, node, expr, typ):
        """The language is real-valued and its numbers fit the kernels: every constant part of
        ``expr`` is a finite real (float64; integers int64), and expanding it stays small."""
        for part in _constant_parts(expr, self._checked):
            if part in (sympy.oo, -sympy.oo) and self.scope.allow_score:
                continue  # inf, -inf as written in [score].mod
            try:
                value = _real_value(part)
            except _NotReal as e:
                self.fail(node, f"{self.source(node)} {e.args[0]}{self.value_note(node, part)}; the language is real-valued")
            if value is not None and not math.isfinite(value):
                self.fail(node, f"{self.source(node)} is not a finite number in float64{self.value_note(node, part)}")
            if part.is_Integer and abs(int(part)) >= INT_CONSTANT_LIMIT:
                self.fail(node, self.wide_constant(node, expr, part))
        if expr.has(Grouped):  # score code takes the grouping off (analysis.integer.ungrouped) and may expand
            expr = expr.replace(lambda x: isinstance(x, Grouped), lambda x: x.args[0])
        terms = _expanded_terms(expr, self._terms)
        if terms > MAX_EXPANDED_TERMS:
            bias = " (in [score].mod, an added term without the score can go to [score].bias, counted apart)" \
                if self.scope.allow_score else ""
            self.fail(node, f"{self.source(node)} expands to about {terms if terms < 10**12 else 'more than 10**12'} "
                            f"terms (at most {MAX_EXPANDED_TERMS}, each term of a reduction counted, products and powers of "
                            f"sums multiplied out); write the power or product of sums differently or reduce over fewer "
                            f"terms{bias}")

    def wide_constant(self, node, expr, part) -> str:
        """The refusal of an integer constant past int64: the node itself, or a constant that the
        expression's expanded form holds (``(i - 7) << 62`` is ``2**62 * i - 7 * 2**62``, refused
        whatever values it takes at the call's positions)."""
        if _text(part).replace(" ", "") == self.source(node).replace(" ", ""):
            return f"{self.source(node)} is an integer constant beyond int64 (|n| < 2**63)"
        if part == expr:
            return f"{self.source(node)} is {_text(part)}, an integer constant beyond int64 (|n| < 2**63)"
        return (f"{self.source(node)} expands to {_text(expr)}, whose constant {_text(part)} is beyond int64 "
                f"(|n| < 2**63; the kernels compute the expanded form): keep every constant it multiplies out to "
                f"within int64")

    def power(self, node, a, exponent):
        """``a ** exponent``, refused before sympy computes a huge exact constant or the analysis expands
        a huge power of a sum. An exponent ``c + x`` counts as ``c``: sympy turns ``2 ** (c + x)``
        into ``2**c * 2**x`` at once, and expand splits ``y ** (c + x)`` into ``y**c * y**x``."""
        base, power = a, exponent
        # the checks see through the grouping of float arithmetic (Grouped: the values are the same)
        a, exponent = (x.args[0] if isinstance(x, Grouped) else x for x in (a, exponent))
        b = exponent.as_coeff_Add()[0] if exponent.is_Add else exponent
        if b.is_Number:
            if not b.is_finite:
                self.fail(node, "the exponent must be finite")
            if a.is_Rational and b.is_Rational and a not in (0, 1, -1):
                p, q = a.as_numer_denom() if not a.is_Integer else (a, 1)
                bits = max(int(abs(p)).bit_length(), int(q).bit_length())
                if abs(b) * bits > MAX_CONSTANT_BITS:
                    shown = _text(a) if a.is_Integer else f"({_text(a)})"
                    self.fail(node, f"{self.source(node)} is too large to compute exactly ({shown} ** {_text(b)} "
                                    f"has more than {MAX_CONSTANT_BITS} bits)")
            elif not a.is_Number and abs(b) > MAX_EXPONENT:
                self.fail(node, f"{self.source(node)}: a power of anything but a plain number takes exponents up to "
                                f"{MAX_EXPONENT} in magnitude, got {_text(b)}")
        return base**power

    def number(self, node, what) -> Tuple[sympy.Expr, str]:
        """A number; a boolean counts as 0 or 1 (contract v1: ``s + is_image[b, j]``, ``(i < j) * 2``)."""
        return as_number(*self.visit(node))

    def boolean(self, node, what) -> sympy.Basic:
        expr, typ = self.visit(node)
        if typ != BOOL:
            self.fail(node, f"{what} needs a boolean expression, got a number ({typ})")
        return expr

    # -- leaves -------------------------------------------------------------
    def visit_Constant(self, node):
        v = node.value
        if isinstance(v, bool):
            return (sympy.true if v else sympy.false), BOOL
        if isinstance(v, int):
            if abs(v) >= INT_CONSTANT_LIMIT:
                self.fail(node, f"{self.source(node)} is an integer constant beyond int64 (|n| < 2**63)")
            return sympy.Integer(v), INT
        if isinstance(v, float):
            if not math.isfinite(v):
                self.fail(node, f"{self.source(node)} is not a finite number in float64")
            return sympy.Float(v), FLOAT
        self.fail(node, f"constant {v!r} is not allowed (numbers and True/False only)")

    def visit_Name(self, node):
        if node.id in self._locals:  # the variable of an enclosing sum / any / all
            return self._locals[node.id], INT
        name = S.ALIASES.get(node.id, node.id)
        if name in S.INDEX_VARS:
            return S.INDEX_VARS[name], INT
        if name in self._params:
            p = self._params[name]
            return p.symbol, (INT if p.kind == "int" else FLOAT)
        if name in self._inputs:
            d = self._inputs[name]
            if not d.dims:  # a 0-d input (dims = []): a scalar, used by name
                return self.access(d, [])
            self.fail(node, f"input '{name}' must be indexed with {len(d.dims)} indices ({', '.join(map(str, d.dims))})")
        if name == "causal":
            return sympy.Le(S.j, S.i), BOOL
        if name == "alibi":
            return AlibiSlope(S.h, S.n_heads) * (S.j - S.i), FLOAT
        if name == "s" and self.scope.allow_score:
            return S.s, FLOAT
        if name == "inf" and self.scope.allow_score:
            return sympy.oo, FLOAT
        if name in ("s", "score", "inf"):
            self.fail(node, f"'{node.id}' is only allowed in [score].mod")
        if name in FUNCTIONS:
            self.fail(node, f"'{name}' is a function: call it, e.g. {name}(...)")
        self.fail(node, f"unknown variable '{node.id}' (known: {', '.join(self.scope.known_names())}){_flex_name_hint(node.id)}")

    # -- operators ----------------------------------------------------------
    def visit_UnaryOp(self, node):
        if isinstance(node.op, ast.Not):
            return sympy.Not(self.boolean(node.operand, "'not'")), BOOL
        if isinstance(node.op, ast.Invert):  # logical on a boolean; on an integer ~x = -x - 1 (Python's)
            expr, typ = self.visit(node.operand)
            if typ == BOOL:
                return sympy.Not(expr), BOOL
            if typ != INT:
                self.fail(node, f"'~' needs an integer or a boolean, got a float: {self.source(node.operand)}")
            return -expr - 1, INT
        expr, typ = self.number(node.operand, "unary minus" if isinstance(node.op, ast.USub) else "unary plus")
        return (-expr if isinstance(node.op, ast.USub) else expr), typ

    def bitwise(self, node):
        """``& | ^``: logical on two booleans (``^`` is xor), bitwise on integers (a boolean with an
        integer counts as 0 or 1); ``<< >>``: shifts of integers."""
        op = type(node.op)
        name = {ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.LShift: "<<", ast.RShift: ">>"}[op]
        (a, ta), (b, tb) = self.visit(node.left), self.visit(node.right)
        if ta == tb == BOOL and op not in (ast.LShift, ast.RShift):
            return {ast.BitAnd: sympy.And, ast.BitOr: sympy.Or, ast.BitXor: sympy.Xor}[op](a, b), BOOL
        for side, t in ((node.left, ta), (node.right, tb)):
            if t == FLOAT:
                self.fail(side, f"'{name}' needs integers (or booleans), got a float: {self.source(side)}")
        (a, _), (b, _) = as_number(a, ta), as_number(b, tb)
        if op in (ast.BitAnd, ast.BitOr, ast.BitXor):
            fn = {ast.BitAnd: BitAnd, ast.BitOr: BitOr, ast.BitXor: BitXor}[op]
            return fn(*sorted((a, b), key=sympy.default_sort_key)), INT
        if b.is_Integer:  # by a constant: exact arithmetic the analysis understands
            if not 0 <= int(b) <= MAX_SHIFT:
                what = "a negative shift count" if b < 0 else "a shift count past int64"
                self.fail(node.right, f"{what}: constant shift amounts are 0 to {MAX_SHIFT}, got {_text(b)}")
            return (a * 2 ** int(b) if op is ast.LShift else sympy.floor(a / 2 ** int(b))), INT
        return Shift(a, b if op is ast.LShift else -b), INT

    def visit_BinOp(self, node):
        op = type(node.op)
        if op in (ast.BitAnd, ast.BitOr, ast.BitXor, ast.LShift, ast.RShift):
            return self.bitwise(node)
        sym = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}.get(op)
        if sym is None:
            hint = f": write {_DOT} for a @ b" if op is ast.MatMult else ""
            self.fail(node, f"operator {type(node.op).__name__} is not part of the expression language{hint}")
        a, ta = self.number(node.left, f"'{sym}'")
        b, tb = self.number(node.right, f"'{sym}'")
        typ = INT if (ta == INT and tb == INT) else FLOAT
        if op in (ast.Div, ast.FloorDiv, ast.Mod) and b.is_zero:  # 0 and 0.0
            self.fail(node, "modulo by zero" if op is ast.Mod else "division by zero")
        if op is ast.Div or (op is ast.Pow and typ == INT and not (b.is_Integer and b >= 0)):
            typ = FLOAT
        if typ == FLOAT:  # float arithmetic as written (builtins.ToFloat)
            folded = _python_float(op, a, ta, b, tb)
            if folded is not None:
                return folded, FLOAT
            a, b = _grouped(op, a, b), _grouped(op, b, a)
        if op in (ast.Add, ast.Sub, ast.Mult, ast.Div):
            out = a + b if op is ast.Add else a - b if op is ast.Sub else a * b if op is ast.Mult else _divide(a, b)
            self.no_cancelled_infinity(node, sym, (a, b), out)
            return out, (FLOAT if op is ast.Div else typ)
        if op is ast.FloorDiv:  # of floats: the floor of the exact quotient (Python's), see quotient()
            return sympy.floor(_divide(a, b) if typ == FLOAT else a / b), typ
        if op is ast.Mod:
            return sympy.Mod(a, b), typ
        return self.power(node, a, b), typ

    def no_cancelled_infinity(self, node, sym, operands, out):
        """sympy simplifies ``0 * where(c, s, -inf)`` and ``w - w`` (``w`` such a where) to 0, where
        Python (and torch, and FlexAttention) computes ``0 * -inf`` and ``-inf - -inf`` as NaN on the
        pairs that take the infinite branch: the kernels and the reference would then agree with
        each other on a finite score that the expression as written does not have. A branch that
        can be infinite must survive ``+ - * /`` (Python's ``inf + x`` is never finite), so a
        result that lost one is refused."""
        for x in operands:
            for p in _infinite_branches(x):
                if not out.has(p):
                    self.fail(node, f"'{sym}' {CANCELLED_INFINITY.format(_text(p))}")

    def visit_BoolOp(self, node):
        name = "and" if isinstance(node.op, ast.And) else "or"
        parts = [self.boolean(v, f"'{name}'") for v in node.values]
        return (sympy.And(*parts) if name == "and" else sympy.Or(*parts)), BOOL

    def visit_Compare(self, node):
        """Comparisons (chained: ``a < b < c`` is ``a < b and b < c``). ``==`` and ``!=`` of two
        booleans compare them as booleans; any other comparison takes a boolean as 0 or 1."""
        ops = {ast.Lt: sympy.Lt, ast.LtE: sympy.Le, ast.Gt: sympy.Gt, ast.GtE: sympy.Ge, ast.Eq: sympy.Eq, ast.NotEq: sympy.Ne}
        left = self.visit(node.left)
        parts = []
        for op, right_node in zip(node.ops, node.comparators):
            rel = ops.get(type(op))
            if rel is None:
                self.fail(node, f"comparison {type(op).__name__} is not allowed")
            right = self.visit(right_node)
            if left[1] == right[1] == BOOL and rel in (sympy.Eq, sympy.Ne):
                differ = sympy.Xor(left[0], right[0])
                parts.append(differ if rel is sympy.Ne else sympy.Not(differ))
            else:
                a, b = as_number(*left)[0], as_number(*right)[0]
                # two numbers: decided now. An unevaluated Eq(0, 0) is taken as false by sympy's
                # Piecewise: (0 == 0) as a number was 0, (0 != 0) 1, where(0 == 0, a, b) was b
                exact = rel in (sympy.Eq, sympy.Ne) and not (a.is_Number and b.is_Number)
                parts.append(rel(a, b, evaluate=False) if exact else rel(a, b))
            left = right
        return sympy.And(*parts), BOOL

    def visit_IfExp(self, node):
        self.fail(node, "conditional expressions are written where(cond, a, b)")

    # -- indexing and calls -------------------------------------------------
    def visit_Subscript(self, node):
        return self.subscript(node)

    def subscript(self, node, axis_var=None):
        """An input access ``x[...]``. ``axis_var``: the loop variable of ``dot()``, which takes the
        place of the one ``:`` the access must have (over a dim declared with a number); then
        returns ``(expr, type, extent)``."""
        node = _flatten_subscripts(node)
        if not isinstance(node.value, ast.Name) or node.value.id not in self._inputs:
            target = f"'{node.value.id}'" if isinstance(node.value, ast.Name) else _describe(node.value)
            self.fail(node, f"only inputs from [inputs] can be indexed; {target} is not one")
        decl = self._inputs[node.value.id]
        if not decl.dims:
            self.fail(node, f"input '{decl.name}' has no dims (dims = []): use it by name, without []")
        idx = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if len(idx) != len(decl.dims):
            self.fail(node, f"input '{decl.name}' has {len(decl.dims)} dims ({', '.join(map(str, decl.dims))}), indexed with {len(idx)}")
        args, extent = [], None
        for k, sub in enumerate(idx):
            if isinstance(sub, ast.Slice):
                if axis_var is None:
                    self.fail(sub, f"a slice ':' in an index of '{decl.name}' is only allowed in dot(...)")
                if sub.lower is not None or sub.upper is not None or sub.step is not None:
                    self.fail(sub, f"dot() takes a whole axis ':' of '{decl.name}', not a part of it")
                if extent is not None:
                    self.fail(sub, f"dot() takes one ':' per input, '{decl.name}' has more")
                if type(decl.dims[k]) is not int:
                    self.fail(sub, f"dot() reduces over a dim declared with a number (such as 64), but dim {k} of "
                                   f"'{decl.name}' is {decl.dims[k]!r}")
                extent = decl.dims[k]
                args.append(axis_var)
                continue
            e, t = self.visit(sub)
            if t != INT:
                self.fail(sub, f"index {k} of '{decl.name}' must be an integer expression, got {t}")
            args.append(e)
        if axis_var is not None:
            if extent is None:
                self.fail(node, f"dot() needs one ':' in the index of '{decl.name}' (the axis it reduces)")
            return (*self.access(decl, args), extent)
        return self.access(decl, args)

    def access(self, decl, args):
        typ = FLOAT if decl.dtype in _FLOAT_DTYPES else (BOOL if decl.dtype == "bool" else INT)
        app = decl.symbol(*args)
        if typ == BOOL:
            return sympy.Ne(app, 0), BOOL
        return app, typ

    # -- reductions -------------------------------------------------------
    def reduce(self, node, name):
        """``sum(e for t in range(K))``, ``any(...)``, ``all(...)``: unrolled into K terms (the kernels
        unroll them). ``K`` is a literal or an int param; for a param the terms go up to its value in
        the spec, each kept only where ``t < K``, and a call may pass any K up to that value (the
        runtime refuses more)."""
        usage = f"{name}() takes one generator: {name}(e for t in range(K))"
        if node.keywords or len(node.args) != 1 or not isinstance(node.args[0], ast.GeneratorExp):
            self.fail(node, usage)
        gen = node.args[0]
        if len(gen.generators) != 1:
            self.fail(gen, f"{name}() takes one 'for' clause, got {len(gen.generators)}")
        comp = gen.generators[0]
        if comp.ifs:
            self.fail(comp.ifs[0], f"'if' in the generator is not part of the language: write the condition into "
                                   f"the term ({'where(c, e, 0)' if name == 'sum' else 'c and e' if name == 'any' else '(not c) or e'})")
        if comp.is_async:
            self.fail(gen, usage)
        var = self.loop_variable(comp.target)
        count, param = self.count(comp.iter, usage)
        t = sympy.Dummy(var, integer=True, nonnegative=True)
        mark = self._unrolled
        self._locals[var] = t
        try:
            body, typ = self.visit(gen.elt)
        finally:
            del self._locals[var]
        self.budget(node, mark, count)
        if name == "sum":
            body, typ = as_number(body, typ)
        elif typ != BOOL:
            self.fail(gen.elt, f"{name}() needs a boolean expression, got a number ({typ})")
        terms = [body.xreplace({t: sympy.Integer(k)}) for k in range(count)]
        if param is not None:  # the terms past the call's K are left out
            keep = [sympy.Lt(k, param.symbol) for k in range(count)]
            if name == "sum":
                terms = [sympy.Piecewise((e, c), (0, True)) for e, c in zip(terms, keep)]
            elif name == "any":
                terms = [sympy.And(c, e) for e, c in zip(terms, keep)]
            else:
                terms = [sympy.Or(sympy.Not(c), e) for e, c in zip(terms, keep)]
        if name == "sum":
            return sympy.Add(*terms), typ
        return (sympy.Or(*terms) if name == "any" else sympy.And(*terms)), BOOL

    def dot(self, node):
        """``dot(x[..., :, ...], y[..., :, ...])``: the sum over one axis of the product of two inputs,
        each with one ``:`` over a dim declared with a number, of one extent."""
        if node.keywords or len(node.args) != 2 or not all(isinstance(a, ast.Subscript) for a in node.args):
            self.fail(node, "dot() takes two inputs indexed with one ':' each, e.g. dot(x[b, h, i, :], y[b, 0, j, :])")
        t = sympy.Dummy("axis", integer=True, nonnegative=True)
        mark = self._unrolled
        (a, ta, na), (b, tb, nb) = (self.subscript(arg, axis_var=t) for arg in node.args)
        if na != nb:
            self.fail(node, f"dot() of two axes of different extents: {na} and {nb}")
        self.budget(node, mark, na)
        (a, ta), (b, tb) = as_number(a, ta), as_number(b, tb)
        typ = INT if ta == tb == INT else FLOAT
        return sympy.Add(*[(a * b).xreplace({t: sympy.Integer(k)}) for k in range(na)]), typ

    def budget(self, node, mark: int, count: int):
        """``count`` copies of what was parsed since ``mark`` (nested reductions multiply)."""
        if count > MAX_REDUCTION:
            self.fail(node, f"a reduction takes at most {MAX_REDUCTION} terms (the kernels unroll it), got {_text(count)}")
        self._unrolled = mark + count * (1 + self._unrolled - mark)
        if self._unrolled > MAX_UNROLLED:
            self.fail(node, f"the reductions of this expression unroll to more than {MAX_UNROLLED} terms in all "
                            f"(nested ones multiply)")

    def loop_variable(self, target) -> str:
        if not isinstance(target, ast.Name):
            self.fail(target, "the loop variable of a reduction is one name (for t in range(K))")
        name = target.id
        taken = (set(S.INDEX_VARS) | set(S.ALIASES) | set(self._params) | set(self._inputs) | set(self._locals)
                 | set(FUNCTIONS) | {"s", "inf", "causal", "alibi", "n_heads"})
        if name in taken:
            self.fail(target, f"the loop variable '{name}' is already a name of the expression; choose another")
        return name

    def count(self, node, usage):
        """``(K, param)`` of ``range(K)``: a literal (param None) or an int param (K its spec value)."""
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range"
                and len(node.args) == 1 and not node.keywords):
            self.fail(node, usage)
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and type(arg.value) is int and arg.value >= 0:
            if arg.value > MAX_REDUCTION:
                self.fail(arg, f"a reduction takes at most {MAX_REDUCTION} terms (the kernels unroll it), got {_text(arg.value)}")
            return arg.value, None
        if isinstance(arg, ast.Name) and arg.id in self._params and self._params[arg.id].kind == "int":
            p = self._params[arg.id]
            if not 0 <= p.value <= MAX_REDUCTION:
                self.fail(arg, f"param '{p.name}' counts a reduction's terms: its value in the spec is the most a "
                               f"call may pass (the kernels unroll to it), from 0 to {MAX_REDUCTION}; got {_text(p.value)}")
            self.counts.add(p.name)
            return p.value, p
        self.fail(arg, f"range() takes a non-negative integer literal or an int param, got {self.source(arg)}")

    def visit_Call(self, node):
        if not isinstance(node.func, ast.Name):
            self.fail(node, "only the language's functions can be called, by their bare names" + _call_hint(node.func))
        name = node.func.id
        if name not in FUNCTIONS:
            hint = " (the language's infinities and NaN are the names inf and nan: -inf for float('-inf'))" \
                if name == "float" else ""
            self.fail(node, f"unknown function '{name}'{hint} (known: {', '.join(FUNCTIONS)})")
        if name in REDUCTIONS:
            return self.reduce(node, name)
        if name == "dot":
            return self.dot(node)
        if name == "range":
            self.fail(node, "range() is only the iterable of a reduction: sum(e for t in range(K))")
        if name == "bucket":
            return self._bucket(node)
        if name == "random_blocks":
            return self._random_blocks(node)
        if node.keywords:
            self.fail(node, f"{name}() takes no keyword arguments")
        args = node.args
        if name in _UNARY_MATH or name == "abs":
            if len(args) != 1:
                self.fail(node, f"{name}() takes 1 argument, got {len(args)}")
            x, t = self.number(args[0], f"{name}()")
            if name == "abs":
                return _applied(sympy.Abs, x), t
            if name == "exp2":
                return self.power(node, sympy.Integer(2), x), FLOAT
            return _applied(_UNARY_MATH[name], x), FLOAT
        if name in ("min", "max"):
            if len(args) < 2:
                self.fail(node, f"{name}() takes at least 2 arguments, got {len(args)}")
            vals = [self.number(a, f"{name}()") for a in args]
            typ = INT if all(t == INT for _, t in vals) else FLOAT
            f = sympy.Min if name == "min" else sympy.Max
            return _applied(f, *[v for v, _ in vals]), typ
        # where(cond, a, b)
        if len(args) != 3:
            self.fail(node, f"where() takes 3 arguments (cond, a, b), got {len(args)}")
        cond = self.boolean(args[0], "where()'s condition")
        (a, ta), (b, tb) = self.visit(args[1]), self.visit(args[2])
        if (ta == BOOL) != (tb == BOOL):  # a boolean with a number counts as 0 or 1
            (a, ta), (b, tb) = as_number(a, ta), as_number(b, tb)
        if ta == BOOL:
            return sympy.Or(sympy.And(cond, a), sympy.And(sympy.Not(cond), b)), BOOL
        return sympy.Piecewise((a, _condition(cond)), (b, True)), (INT if ta == tb == INT else FLOAT)

    def _options(self, node, positional, defaults):
        """Bind a built-in's arguments: the first ``positional`` are expressions, the rest constants."""
        names = list(defaults)
        bound = {}
        if len(node.args) > positional + len(names):
            self.fail(node, f"{node.func.id}() takes at most {positional + len(names)} arguments")
        exprs = node.args[:positional]
        if len(exprs) < positional:
            self.fail(node, f"{node.func.id}() needs {positional} positional argument(s)")
        for name, a in zip(names, node.args[positional:]):
            bound[name] = a
        for kw in node.keywords:
            if kw.arg not in defaults:
                self.fail(node, f"{node.func.id}() has no option '{kw.arg}' (options: {', '.join(names)})")
            if kw.arg in bound:
                self.fail(node, f"{node.func.id}() got option '{kw.arg}' twice")
            bound[kw.arg] = kw.value
        values = dict(defaults)
        for name, a in bound.items():
            if not isinstance(a, ast.Constant) or isinstance(a.value, float) or a.value is None:
                self.fail(a, f"{node.func.id}()'s option '{name}' must be a constant integer" + (" or boolean" if isinstance(defaults[name], bool) else ""))
            if isinstance(defaults[name], bool) != isinstance(a.value, bool):
                kind = "a boolean" if isinstance(defaults[name], bool) else "an integer"
                self.fail(a, f"{node.func.id}()'s option '{name}' must be {kind}, got {a.value!r}")
            values[name] = a.value
        return exprs, values

    def _bucket(self, node):
        (d_node,), o = self._options(node, 1, {"num_buckets": 32, "max_distance": 128, "bidirectional": True})
        d, t = self.visit(d_node)
        if t != INT:
            self.fail(d_node, f"bucket()'s distance must be an integer expression, got {t}")
        if o["num_buckets"] < 2 or o["max_distance"] < 1:
            self.fail(node, "bucket() needs num_buckets >= 2 and max_distance >= 1")
        if o["bidirectional"] and o["num_buckets"] < 4:  # T5 splits the buckets by sign, then halves them
            self.fail(node, f"bucket() needs num_buckets >= 4 when bidirectional, got {o['num_buckets']}")
        if o["num_buckets"] > BUCKET_MAX_BUCKETS or o["max_distance"] > BUCKET_MAX_DISTANCE:
            self.fail(node, f"bucket() takes num_buckets <= {BUCKET_MAX_BUCKETS} and max_distance <= "
                            f"{BUCKET_MAX_DISTANCE}, got {_text(o['num_buckets'])} and {_text(o['max_distance'])}")
        return Bucket(d, o["num_buckets"], o["max_distance"], int(o["bidirectional"])), INT

    def _random_blocks(self, node):
        (r_node,), o = self._options(node, 1, {"block": 64, "seed": 0})
        if not isinstance(r_node, ast.Constant) or type(r_node.value) is not int or r_node.value < 0:
            self.fail(r_node, "random_blocks()'s count r must be a constant non-negative integer")
        if r_node.value > RANDOM_BLOCKS_MAX_R:
            self.fail(r_node, f"random_blocks() takes r <= {RANDOM_BLOCKS_MAX_R} random blocks per query block, "
                              f"got {_text(r_node.value)}")
        if not 1 <= o["block"] <= RANDOM_BLOCKS_MAX_BLOCK:
            self.fail(node, f"random_blocks()'s block must be between 1 and {RANDOM_BLOCKS_MAX_BLOCK}, got {_text(o['block'])}")
        if not 0 <= o["seed"] < SEED_LIMIT:
            self.fail(node, f"random_blocks()'s seed must be between 0 and 2**63 - 1, got {_text(o['seed'])}")
        return RandomBlocks(S.i, S.j, S.n_k, r_node.value, o["block"], o["seed"]), BOOL


_PYTHON_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def _python_float(op, a, ta, b, tb) -> Optional[sympy.Float]:
    """``a op b`` of two numbers whose result is a float, computed as Python computes it (sympy
    keeps ``1 / 3`` exact, and ``1 / 3 * 3`` would be 1); None when either is not a number, or
    Python raises (sympy's form then meets the checks of its own)."""
    if not (a.is_Number and b.is_Number):
        return None
    x, y = (float(v) if t == FLOAT else int(v) for v, t in ((a, ta), (b, tb)))
    try:
        value = _PYTHON_OPS[op](x, y)
    except (ArithmeticError, ValueError):
        return None
    return sympy.Float(value) if isinstance(value, float) else None


def _grouped(op, e, other):
    """``e``, an operand of the float arithmetic ``op`` with ``other``, as one value
    (``Grouped(e)``, builtins "Float arithmetic as written") where sympy would take it apart or
    merge it with what is around it: a sum, a product or a power, except a sum times anything but
    a number (sympy distributes only a number over a sum: ``slopes[h] * (j - i)`` stays as it is)."""
    if isinstance(e, (sympy.Mul, sympy.Pow)) or (isinstance(e, sympy.Add) and not (op is ast.Mult and not other.is_Number)):
        return Grouped(e)
    return e


def _divide(a, b):
    """``a / b`` as one division: by an integer literal sympy's ``a * (1/c)``, which the printers
    and the reference divide (``sympy.fraction``); by anything else a FloatDiv: sympy would
    multiply by the reciprocal of a float literal, and a pass that hoists ``b**-1`` out of
    ``a * b**-1`` (mask code's hoister with ``j / t``) would too."""
    return a / b if b.is_Integer else FloatDiv(a, b)


def as_number(expr, typ) -> Tuple[sympy.Basic, str]:
    """``(expr, typ)`` with a boolean as the integer 0 or 1 (contract v1)."""
    if typ == BOOL:
        return sympy.Piecewise((sympy.Integer(1), _condition(expr)), (sympy.Integer(0), True)), INT
    return expr, typ


def _condition(cond):
    """``cond``, to be the condition of a Piecewise (a ``where``, a boolean counted as 0 or 1): sympy
    writes a condition that compares Piecewise numbers (``where(c, x, y) < 3``, ``(i < j) * 2 > (j <
    4)``, ``sum(i >= t[b, u] ...) == sum(j >= t[b, u] ...)`` as a number) out case by case, one case
    per combination of their branches, each with the branches' conditions, and puts the result in
    conjunctive normal form: 2**10 cases, or ten such comparisons nested, took minutes (2**32, a
    FlexAttention document count over 16 starts in a where(), never ended). Refused (a ValueError,
    which the parser reports at the node) where the cases times the condition's size pass
    MAX_CONDITION_WORK.

    A comparison that sympy's canonical form does not settle is written as one side minus the
    other against 0 first: sympy turns ``2 * j - i <= i - j`` into ``i - 2*j >= -i + j``, that
    into ``i - j >= -i + 2*j`` and back, and a Piecewise on it rebuilds itself until Python's
    recursion limit (``where(2 * j - i <= i - j, s, 0)`` was refused as "nested too deeply").
    Only such comparisons are rewritten; ``lhs - rhs`` is what sympy would compare anyway."""
    if isinstance(cond, sympy.Basic):
        unsettled = {r: r.func(r.lhs - r.rhs, 0) for r in cond.atoms(sympy.core.relational.Relational)
                     if r.canonical != r.canonical.canonical}
        if unsettled:
            cond = cond.xreplace(unsettled)
    if isinstance(cond, sympy.Basic) and cond.has(sympy.Piecewise):
        cases = 1
        for pw in cond.atoms(sympy.Piecewise):
            cases = min(cases * len(pw.args), MAX_CONDITION_WORK + 1)
        if cases * _written_size(cond, {}) > MAX_CONDITION_WORK:
            raise ValueError("a condition comparing numbers made of conditions (a where(), or a boolean counted "
                             "as 0 or 1) is written out case by case, here too many cases; compare fewer of them "
                             "(a condition on positions alone can go in [mask].where)")
    return cond


def compares_numbers(e) -> bool:
    """Whether the comparison ``e`` compares numbers, not two booleans (``==`` of two booleans has
    no arithmetic of its own). Tested with ``is_Boolean``: a sympy ``Symbol`` (``j``, a param) is a
    ``Boolean`` subclass, but a number in this language, so ``isinstance(x, Boolean)`` would take
    ``where(j < f, ...)`` for a comparison of booleans (and leave it to float32)."""
    return not any(x.is_Boolean or isinstance(x, sympy.Rel) for x in e.args)


CANCELLED_INFINITY = ("cancels a branch that can be infinite ({}): Python computes 0 * inf and inf - inf as NaN "
                      "there; write the mask as where(c, e, -inf) around the finite arithmetic instead")


def _infinite_branches(x):
    """The wheres whose infinite branch reaches ``x``'s value through ``+ - * / **``."""
    if isinstance(x, sympy.Piecewise):
        if any(e in (sympy.oo, -sympy.oo, sympy.zoo) for e, _ in x.args):
            yield x
        for e, _ in x.args:
            yield from _infinite_branches(e)
    elif x.is_Add or x.is_Mul or x.is_Pow or isinstance(x, Grouped):
        for a in x.args:
            yield from _infinite_branches(a)


def score_algebra(e):
    """A score expression (``[score].bias``, ``[score].mod``) as the kernels compute it where that
    differs from the grouping as written: score code is float32 and takes the parser's grouping
    of float arithmetic off (``attncc.analysis.integer.ungrouped``), after which sympy cancels and
    cancels terms (``(s + x[b, j]) - x[b, j]`` is ``s``, ``(s + F) - F`` too). Where a
    variable, param or input read is gone that way (or merged: ``(s * x + x) - x`` is ``s * x``),
    that algebra is the expression (§1: terms that cancel are gone, in the kernels and in
    ``attncc.reference`` alike, whatever values they would have had: ``x[b, j]`` of inf, ``F`` of
    1e20); elsewhere ``e`` keeps its grouping (the
    reference's float64 as written, §3.3). Its conditions on the score are score code too; the
    others are mask code and keep their grouping. A
    ``where`` with an infinite branch that cancels is a ValueError, as in the parser."""
    flat = _without_grouping(e)
    if _reads(flat) == _reads(e):
        return e
    for p in _infinite_branches(e):
        if not flat.has(_without_grouping(p)):  # as the parser refuses w - w (Parser.no_cancelled_infinity)
            raise ValueError(f"the score {CANCELLED_INFINITY.format(_text(p))}")
    return flat


def _without_grouping(e):
    if isinstance(e, Grouped):
        inner = _without_grouping(e.args[0])
        return ToFloat(inner) if inner.is_integer else inner
    if isinstance(e, sympy.Piecewise):
        return sympy.Piecewise(*[(_without_grouping(x), _without_grouping(c)) for x, c in e.args])
    if isinstance(e, sympy.core.relational.Relational) and S.s not in e.free_symbols:
        return e  # a condition on positions and inputs: mask code, as written (§3.3)
    if not isinstance(e, sympy.Basic) or e.is_Atom or not e.args:
        return e
    args = [_without_grouping(a) for a in e.args]
    return e if all(a is b for a, b in zip(args, e.args)) else e.func(*args)


def _reads(e) -> Dict[sympy.Basic, int]:
    """How often each variable, param and input read occurs in ``e``."""
    counts: Dict[sympy.Basic, int] = {}
    for x in sympy.preorder_traversal(e):
        if isinstance(x, (sympy.Symbol, AppliedUndef)):
            counts[x] = counts.get(x, 0) + 1
    return counts


def integer_comparison(e):
    """``e`` compared in integers where it is a comparison of integers that sympy wrote with rational
    coefficients: both sides multiplied by the least common multiple of their denominators.

    A Piecewise (a ``where``, a boolean counted as 0 or 1) makes each comparison in its conditions
    canonical by dividing it by its leading coefficient, and does so again whenever it is rebuilt
    (a derivative, a substitution): ``where(i - j < 3 * (h + 1), s, -inf)`` holds ``h > i/3 - j/3 -
    1``, whose right side float64 rounds (``8/3 - 5/3 - 1`` is ``-2.2e-16``, so ``h = 0`` took the
    pair ``(8, 5)``). Multiplied back, ``3*h > i - j - 3`` is the written comparison, exact in the
    kernels' and the reference's integers. Only sums of terms that are a rational times an integer
    qualify; a float (``0.5 * i``) or an operand of float arithmetic kept as written (``(i - j) /
    7``, a :class:`~attncc.spec.builtins.Grouped`: not an integer) leaves ``e`` as it is."""
    if not isinstance(e, sympy.Rel) or not compares_numbers(e):
        return e
    denominators = []
    for term in sympy.Add.make_args(e.lhs) + sympy.Add.make_args(e.rhs):
        c, rest = term.as_coeff_Mul()
        if not (c.is_Rational and rest.is_integer):
            return e
        denominators.append(c.q)
    m = sympy.ilcm(1, *denominators)
    return e if m == 1 else e.func(m * e.lhs, m * e.rhs)


def _applied(f, *args):
    """``f(*args)`` (min, max, abs, a math function), with a ``where`` whose every branch is infinite
    (``where(j <= i, inf, -inf)``, also inside an argument: ``2 * ... + 1``) folded out of the arguments first:
    sympy's assumptions misjudge such a Piecewise (``s - where(c, inf, -inf)`` "is nonnegative",
    ``tanh`` of it "is zero"), so ``min(s, where(j <= i, inf, -inf))`` was the where itself (+inf for
    the allowed pairs, NaN rows), ``max(s, where(j <= i, -inf, inf))`` was ``s`` and
    ``tanh(tanh(where(s > 0, inf, -inf)))`` was 0. Folded, each branch is evaluated with its own
    infinity (``min(s, inf)`` is ``s``)."""
    if any(isinstance(a, sympy.Basic) and any(all(p.expr.is_infinite for p in w.args) for w in a.atoms(sympy.Piecewise))
           for a in args):
        return sympy.piecewise_fold(f(*args, evaluate=False))
    return f(*args)


def _folded(expr):
    """A constant float expression (``sqrt(5) + 3.0``, ``log2(0.6)``) as the one float64 number it
    is, as Python computes it: sympy keeps ``sqrt(5)`` exact and ``Grouped`` wraps it, which the
    printers cannot turn into a literal nor sympy compare (``max(..., log2(0.6) ** 0.5)``)."""
    if expr.is_Float or expr.free_symbols or expr.atoms(AppliedUndef) or expr.has(sympy.oo, -sympy.oo, sympy.zoo):
        return expr
    try:
        value = _real_value(expr)
    except _NotReal:
        return expr
    return expr if value is None or not math.isfinite(value) else sympy.Float(value)


def _flatten_subscripts(node):
    """``x[a][b]`` (chained integer indexing, as FlexAttention ports write ``bias[q_idx][kv_idx]``) is
    ``x[a, b]``: for integer indices torch and Python give the same element. A chain with a slice
    (``x[:, a][b]``) is left as it is (and refused as before)."""
    parts = []
    base = node
    while isinstance(base, ast.Subscript):
        idx = base.slice.elts if isinstance(base.slice, ast.Tuple) else [base.slice]
        parts.append(list(idx))
        base = base.value
    if len(parts) < 2 or any(isinstance(e, ast.Slice) for p in parts for e in p):
        return node
    elts = [e for p in reversed(parts) for e in p]
    flat = ast.Subscript(value=base, slice=ast.Tuple(elts=elts, ctx=ast.Load()), ctx=ast.Load())
    return ast.copy_location(flat, node)


# Constants a FlexAttention function reads as attributes (math.inf, torch.pi), with the spelling to write
_ATTRIBUTE_SPELLINGS = {"inf": "inf", "nan": "nan", "pi": "3.141592653589793", "e": "exp(1)"}
_FINFO_SPELLING = ("{sign}3.4028234663852886e+38 (float32's; -inf removes a pair, as the mask does, and a score this large "
                   "becomes infinite in the kernels, §1)")


# The language's names for a FlexAttention score_mod's parameters, by place (a mask_mod's: all but score)
_SCORE_MOD_PARAMETERS = ("score", "b", "h", "q_idx", "kv_idx")


def _renames(args: ast.arguments) -> str:
    """The language's names for a pasted score_mod's (5) or mask_mod's (4) parameters, where they differ."""
    names = [a.arg for a in args.args]
    flex = {5: _SCORE_MOD_PARAMETERS, 4: _SCORE_MOD_PARAMETERS[1:]}.get(len(names))
    if flex is None:
        return f"its parameters named {', '.join(_SCORE_MOD_PARAMETERS)}"
    moved = [f"{a} as {f}" for a, f in zip(names, flex) if a != f]
    return "its parameters " + (f"renamed: {', '.join(moved)}" if moved else "as named")


# A FlexAttention function's own names for its parameters, as its tests and attention-gym write them
_FLEX_PARAMETER_NAMES = {"q", "kv", "m", "n", "token_q", "token_kv", "k_idx", "qk", "batch", "head"}


def _flex_name_hint(name: str) -> str:
    if name not in _FLEX_PARAMETER_NAMES:
        return ""
    return ("; a FlexAttention function's parameters are named here by their place, whatever the function "
            f"calls them: ({', '.join(_SCORE_MOD_PARAMETERS)}) for a score_mod, ({', '.join(_SCORE_MOD_PARAMETERS[1:])}) "
            "for a mask_mod")


def _node_hint(node) -> str:
    """What to write for a node the language lacks, where a FlexAttention function has it: a constant
    read as an attribute (``-math.inf``, ``torch.finfo(torch.float32).min``), a pasted lambda."""
    if isinstance(node, ast.Lambda):
        return f": write its body alone, {_renames(node.args)}"
    if not isinstance(node, ast.Attribute):
        return ""
    if node.attr in _ATTRIBUTE_SPELLINGS and ast.unparse(node.value) in _MODULES + ("np", "numpy"):
        return f": write {_ATTRIBUTE_SPELLINGS[node.attr]} for {ast.unparse(node)}"
    if node.attr in ("min", "max") and isinstance(node.value, ast.Call) and ast.unparse(node.value.func).endswith("finfo"):
        return f": write {_FINFO_SPELLING.format(sign='-' if node.attr == 'min' else '')} for {ast.unparse(node)}"
    return ""


def _statements_hint(text: str) -> str:
    """For a function body pasted as written (``return ...``, local names, a ``def``): the spec takes
    one expression, the value returned."""
    try:
        body = ast.parse("def _f():\n" + "\n".join("    " + line for line in text.splitlines())).body[0].body
    except SyntaxError:
        return ""
    defs = [n for n in body if isinstance(n, ast.FunctionDef)]
    if defs:
        return (f"; a spec takes a function's returned value as one expression: write what it returns, "
                f"{_renames(defs[0].args)}")
    if any(isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)) for n in body):
        return ("; an expression has no statements: write the returned value alone, each local name (x = ...) "
                "replaced by its value")
    if any(isinstance(n, ast.Return) for n in body):
        return "; write the returned value alone, without 'return'"
    return ""


def _lines_hint(text: str) -> str:
    """For an expression over several lines that parses in parentheses (Python joins lines only
    inside brackets): say so."""
    if "\n" not in text:
        return ""
    try:
        ast.parse(f"(\n{text}\n)", mode="eval")
    except SyntaxError:
        return ""
    return "; an expression over several lines needs parentheses around it, as in Python: (...)"


def _describe(node) -> str:
    return {"Lambda": "lambda", "Attribute": "attribute access", "List": "a list", "Tuple": "a tuple",
            "Dict": "a dict", "Starred": "unpacking", "NamedExpr": "':='",
            "GeneratorExp": "a generator expression outside sum(), any() or all()",
            "ListComp": "a list comprehension"}.get(type(node).__name__,
                                                                             f"'{type(node).__name__}'")


class _SpecText(sympy.printing.str.StrPrinter):
    """Expressions as the spec language writes them: ``where(c, a, b)``, ``-inf``, an input read
    ``d[b]`` (not sympy's ``d(b)``, which would suggest a call), ``a == b`` and ``a != b``."""

    def _print_Piecewise(self, e):
        out = self._print(e.args[-1].expr)
        for value, cond in reversed(e.args[:-1]):
            out = f"where({self._print(cond)}, {self._print(value)}, {out})"
        return out

    def _print_NegativeInfinity(self, e):
        return "-inf"

    def _print_Infinity(self, e):
        return "inf"

    def _print_Function(self, e):
        if isinstance(e, AppliedUndef):
            return f"{e.func.__name__}[{', '.join(self._print(a) for a in e.args)}]"
        return super()._print_Function(e)

    def _print_Mod(self, e):  # an integer % (Python's, as sympy's Mod)
        a, m = (self.parenthesize(x, PRECEDENCE["Mul"], strict=True) for x in e.args)
        return f"{a} % {m}"

    def _print_floor(self, e):  # floor(a / b) of integers is a // b
        num, den = quotient(e.args[0])
        if not (num.is_integer and den.is_integer and den != 1):
            return super()._print_Function(e)
        a, b = (self.parenthesize(x, PRECEDENCE["Mul"], strict=True) for x in (num, den))
        return f"{a} // {b}"

    def _print_Relational(self, e):
        if e.rel_op in ("==", "!="):
            return f"{self._print(e.lhs)} {e.rel_op} {self._print(e.rhs)}"
        return super()._print_Relational(e)


def spec_text(e) -> str:
    """``e`` (a sympy expression of a Pattern) in the spec language's spelling, for messages and reports."""
    return _SpecText().doprint(e)


def _text(value, limit: int = 60) -> str:
    """A number or expression for a message, shortened (10 ** 5000 has 5001 digits)."""
    if isinstance(value, (int, sympy.Integer)) and int(value).bit_length() > 4 * limit:
        return f"an integer of {int(value).bit_length()} bits"
    try:
        text = str(value)
    except ValueError:  # Python's int-to-text limit (4300 digits), inside a rational
        return "a number too long to print"
    return text if len(text) <= limit else text[:limit] + "..."


def _depth(tree) -> int:
    """Nesting depth of a syntax tree, without recursion."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        stack.extend((child, d + 1) for child in ast.iter_child_nodes(node))
    return deepest


class _NotReal(Exception):
    pass


_REAL_FUNCTIONS = {
    sympy.exp: math.exp, sympy.sin: math.sin, sympy.cos: math.cos, sympy.tan: math.tan,
    sympy.tanh: math.tanh, sympy.Abs: abs, sympy.floor: math.floor, sympy.ceiling: math.ceil, sympy.erf: math.erf,
    Sigmoid: lambda x: 0.5 * (1.0 + math.tanh(0.5 * x)),
}


def _real_value(e) -> Optional[float]:
    """The value of a constant sympy expression in float64 (+-inf where it overflows), without
    sympy's exact arithmetic or arbitrary precision (exp(exp(exp(100))) would take forever).
    Raises _NotReal (with what) where it is complex or undefined; None for a node it cannot
    evaluate (then nothing is checked)."""
    if e is sympy.nan or e is sympy.zoo:
        raise _NotReal("is undefined")
    if isinstance(e, sympy.AccumBounds):  # sympy's cos(-oo): NaN in Python, torch and the kernels
        raise _NotReal("is undefined where a where's branch is infinite (sin, cos, tan of inf are NaN; apply the "
                       "function to the finite branch, inside the where)")
    if e is sympy.I:
        raise _NotReal("is not a real number")
    if isinstance(e, ToFloat):  # Grouped too: the value of its argument, as a float
        inner = _real_value(e.args[0])
        return None if inner is None else float(inner)
    if isinstance(e, FloatDiv):
        a, b = (_real_value(x) for x in e.args)
        return None if a is None or b is None or b == 0 else a / b
    if e.is_Number or e.is_NumberSymbol:
        try:
            return float(e)
        except OverflowError:
            return math.inf if e > 0 else -math.inf
    if isinstance(e, (sympy.Add, sympy.Mul, sympy.Pow, sympy.log, sympy.Min, sympy.Max, sympy.Mod)) or e.func in _REAL_FUNCTIONS:
        args = [_real_value(a) for a in e.args]
        if any(a is None for a in args):
            return None
        try:
            value = _apply(e, args)
        except OverflowError:
            return math.inf  # only exp, pow and floor overflow, towards +inf here
        except (ValueError, ZeroDivisionError):
            raise _NotReal("is undefined") from None
        if math.isnan(value):
            raise _NotReal("is undefined")
        return value
    return None


def _apply(e, args):
    if isinstance(e, sympy.Add):
        return math.fsum(args) if all(map(math.isfinite, args)) else sum(args)
    if isinstance(e, sympy.Mul):
        return math.prod(args)
    if isinstance(e, sympy.Pow):
        base, power = args
        if base < 0 and not float(power).is_integer():
            raise _NotReal("is not a real number (a negative number to a fractional power)")
        if base == 0 and power < 0:
            raise _NotReal("is undefined (0 to a negative power)")
        return math.pow(base, power)
    if isinstance(e, sympy.log):  # log(x, 2) is log(x) / log(2) in sympy: one argument
        if args[0] < 0:
            raise _NotReal("is not a real number (the log of a negative number)")
        if args[0] == 0:
            raise _NotReal("is undefined (log(0))")
        return math.log(args[0])
    if isinstance(e, sympy.Min):
        return min(args)
    if isinstance(e, sympy.Max):
        return max(args)
    if isinstance(e, sympy.Mod):
        return args[0] % args[1]  # floor modulo, as sympy's Mod; ZeroDivisionError for 0
    value = _REAL_FUNCTIONS[e.func](*args)
    return float(value)


def _constant_parts(expr, seen: set):
    """The largest constant sub-expressions of ``expr`` (numbers, pi, exp(1000), ...) not yet in
    ``seen``; each is added to it (every node is checked once, however often it is visited)."""
    stack = [expr]
    while stack:
        e = stack.pop()
        if e in seen:
            continue
        seen.add(e)
        if isinstance(e, sympy.Expr) and not e.free_symbols and not e.atoms(AppliedUndef):
            yield e
        else:
            stack.extend(a for a in e.args if isinstance(a, sympy.Basic))


def _written_size(e, memo: dict) -> int:
    """How many operations ``e`` is as a tree, as the printers write it: each shared sub-expression
    counted at every use, an input read's indices three times (the kernels' load names each index
    in its address and in its bounds mask). sympy keeps shared parts once, so a few characters of
    nested conditions (``where(where(where(...), ...), ...)``: each level holds its condition twice)
    or reads (``x[x[x[...]]]``) make a tree that doubles or triples per level, which sympy, the
    analysis and the printers walk whole: minutes and gigabytes at 20 levels. Memoized by object
    (``memo`` keeps each object, so that its id stays its own): linear in the distinct parts."""
    found = memo.get(id(e))
    if found is not None:
        return found[0]
    weight = 3 if isinstance(e, AppliedUndef) else 1
    n = 1 + weight * sum(_written_size(a, memo) for a in e.args if isinstance(a, sympy.Basic))
    memo[id(e)] = (n, e)
    return n


def _expanded_terms(e, memo: dict) -> int:
    """About how many terms ``sympy.expand(e)`` has (an upper bound: products and powers of sums
    multiplied out); the analysis and codegen expand scores and bounds."""
    if e in memo:
        return memo[e]
    if e.is_Add:
        n = sum(_expanded_terms(a, memo) for a in e.args)
    elif e.is_Mul:
        n = math.prod(_expanded_terms(a, memo) for a in e.args)
    elif e.is_Pow and (e.exp.as_coeff_Add()[0] if e.exp.is_Add else e.exp).is_Rational:
        c = e.exp.as_coeff_Add()[0] if e.exp.is_Add else e.exp  # y ** (c + x) expands to y**c * y**x
        base, k = _expanded_terms(e.base, memo), int(abs(c))
        n = math.comb(k + base - 1, base - 1) if base > 1 and k >= 1 else 1
        if e.exp.is_Add:
            n = max(n, _expanded_terms(e.exp, memo))
    else:
        n = 1
        for a in e.args:  # a function's argument is expanded inside it
            if isinstance(a, sympy.Basic):
                n = max(n, _expanded_terms(a, memo))
    n = min(n, 10**12)
    memo[e] = n
    return n


@dataclass(frozen=True)
class _Written:
    """An expression as written (``text``) and the white space stripped before the part that is
    parsed (``lead``): where a position of the parsed part is in the text as written. A message names
    the line too where the text has several (a TOML multi-line string), else the column alone."""

    text: str
    lead: str

    def place(self, lineno: int, col: int) -> dict:
        """SpecError's ``column`` and ``line`` (1-based, as written) of the 0-based column ``col`` of
        line ``lineno`` (1-based) of the parsed part."""
        if lineno == 1:  # the parsed part's first line starts after the lead's last one
            col += len(self.lead) - (self.lead.rfind("\n") + 1)
        if "\n" not in self.text:
            return {"column": col + 1}
        return {"column": col + 1, "line": lineno + self.lead.count("\n")}

    def offset(self, index: int, parsed: str) -> dict:
        """:meth:`place` of character ``index`` of the parsed part ``parsed``."""
        before = parsed[:index]
        return self.place(before.count("\n") + 1, index - (before.rfind("\n") + 1))


def parse_expression(text: str, scope: Scope, file: str = "<string>", key: str = "",
                     counts: Optional[set] = None) -> Tuple[sympy.Basic, str]:
    """Parse ``text`` into (sympy expression, type) where type is "bool", "int" or "float".
    ``counts``: a set that receives the names of the int params used as a reduction's count."""
    if not isinstance(text, str):
        raise SpecError(file, key, f"expected an expression as a string, got {type(text).__name__} {_text(repr(text))}")
    written = _Written(text, text[:len(text) - len(text.lstrip())])
    text = text.strip()
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise SpecError(file, key, f"expressions are at most {MAX_EXPRESSION_LENGTH} characters, got {len(text)}")
    if not text.isascii():  # Python folds look-alikes (NFKC): a fullwidth j, a Roman numeral i would read as j, i
        column, ch = next((n, c) for n, c in enumerate(text) if not c.isascii())
        raise SpecError(file, key, f"expressions are ASCII, got {ch!r} (U+{ord(ch):04X})",
                        **written.offset(column, text))
    try:
        with warnings.catch_warnings():  # "1and j": Python warns; the language refuses
            warnings.simplefilter("error", SyntaxWarning)
            tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        at = written.place(e.lineno, e.offset - 1) if e.lineno and e.offset else {}  # 0: no position
        hint = _statements_hint(text) or _lines_hint(text)
        raise SpecError(file, key, f"syntax error: {e.msg}{hint}", **at) from None
    except (RecursionError, MemoryError):
        raise SpecError(file, key, f"the expression is nested too deeply (at most {MAX_DEPTH} levels)") from None
    if _depth(tree.body) > MAX_DEPTH:
        raise SpecError(file, key, f"the expression is nested too deeply (at most {MAX_DEPTH} levels)")
    try:
        parser = _Parser(scope, file, key, text=text, written=written)
        result = parser.visit(tree.body)
        if counts is not None:
            counts |= parser.counts
        return result
    except RecursionError:  # its depth was checked above: sympy rewrote something without end
        raise SpecError(file, key, "sympy could not settle a comparison of this expression (its canonical form "
                                   "alternates between two spellings); write the comparison as one side minus the "
                                   "other against 0, e.g. where(a - b <= 0, ...) for where(a <= b, ...)") from None
