"""The expression language: Python's ``ast`` with a whitelist, turned into sympy.

Never ``eval``: every node kind, name and function is checked here, and each
result carries its type (bool, int or float) so that a mask that is not boolean,
an arithmetic on booleans or a float index is refused with the column it starts at.
"""
from __future__ import annotations

import ast
import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import sympy
from sympy.core.function import AppliedUndef

from attncc.spec import symbols as S
from attncc.spec.builtins import AlibiSlope, Bucket, RandomBlocks, Sigmoid
from attncc.spec.errors import SpecError
from attncc.spec.ir import InputDecl, Param

BOOL, INT, FLOAT = "bool", "int", "float"
_FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}

# Resource limits: a few characters must not make the build take minutes or gigabytes.
MAX_EXPRESSION_LENGTH = 2000  # characters
MAX_DEPTH = 100  # nesting of the expression's syntax tree
MAX_EXPONENT = 64  # |n| in x ** n for an x that is not a number (sympy expands powers of sums)
MAX_EXPANDED_TERMS = 256  # terms of an expression once products and powers of sums are expanded
MAX_CONSTANT_BITS = 4096  # an exact constant power (2 ** 5000) sympy would compute digit by digit
INT_CONSTANT_LIMIT = 2**63  # integer constants are int64 in the kernels
BUCKET_MAX_BUCKETS = 1024
BUCKET_MAX_DISTANCE = 2**20  # the bucket thresholds are found by a walk up to max_distance
RANDOM_BLOCKS_MAX_R = 1024  # a per-call table holds r key blocks per query block
RANDOM_BLOCKS_MAX_BLOCK = 2**16
SEED_LIMIT = 2**63

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
}
FUNCTIONS = ("abs", "min", "max", "where", *_UNARY_MATH, "bucket", "random_blocks")


@dataclass(frozen=True)
class Scope:
    """What names an expression may use."""

    params: Tuple[Param, ...] = ()
    inputs: Tuple[InputDecl, ...] = ()
    allow_score: bool = False  # `s`/`score` (and `inf`): [score].mod only

    def known_names(self):
        names = list(S.INDEX_VARS) + ["causal", "alibi"] + [p.name for p in self.params]
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
    _checked: set = field(default_factory=set)  # sub-expressions check_number has seen
    _terms: dict = field(default_factory=dict)  # memo of _expanded_terms

    def __post_init__(self):
        self._params = {p.name: p for p in self.scope.params}
        self._inputs = {d.name: d for d in self.scope.inputs}

    def fail(self, node, message):
        col = getattr(node, "col_offset", None)
        raise SpecError(self.file, self.key, message, None if col is None else col + 1)

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
            self.fail(node, f"{_describe(node)} is not part of the expression language")
        try:
            expr, typ = method(node)
        except SpecError:
            raise
        except (TypeError, ValueError, ArithmeticError) as e:  # sympy refusing to build a node
            self.fail(node, f"{self.source(node)} cannot be built: {_text(e, 120)}")
        if typ != BOOL:
            self.check_number(node, expr, typ)
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
                self.fail(node, f"{self.source(node)} is an integer constant beyond int64 (|n| < 2**63)")
        terms = _expanded_terms(expr, self._terms)
        if terms > MAX_EXPANDED_TERMS:
            self.fail(node, f"{self.source(node)} expands to about {terms if terms < 10**12 else 'more than 10**12'} "
                            f"terms (at most {MAX_EXPANDED_TERMS}); write the power or product of sums differently")

    def power(self, node, a, exponent):
        """``a ** exponent``, refused before sympy computes a huge exact constant or the analysis expands
        a huge power of a sum. An exponent ``c + x`` counts as ``c``: sympy turns ``2 ** (c + x)``
        into ``2**c * 2**x`` at once, and expand splits ``y ** (c + x)`` into ``y**c * y**x``."""
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
        return a**exponent

    def number(self, node, what) -> Tuple[sympy.Expr, str]:
        expr, typ = self.visit(node)
        if typ == BOOL:
            self.fail(node, f"{what} needs a number, got a boolean expression")
        return expr, typ

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
        name = S.ALIASES.get(node.id, node.id)
        if name in S.INDEX_VARS:
            return S.INDEX_VARS[name], INT
        if name in self._params:
            p = self._params[name]
            return p.symbol, (INT if p.kind == "int" else FLOAT)
        if name in self._inputs:
            d = self._inputs[name]
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
        self.fail(node, f"unknown variable '{node.id}' (known: {', '.join(self.scope.known_names())})")

    # -- operators ----------------------------------------------------------
    def visit_UnaryOp(self, node):
        if isinstance(node.op, (ast.Not, ast.Invert)):
            sym = "not" if isinstance(node.op, ast.Not) else "~"
            return sympy.Not(self.boolean(node.operand, f"'{sym}'")), BOOL
        expr, typ = self.number(node.operand, "unary minus" if isinstance(node.op, ast.USub) else "unary plus")
        return (-expr if isinstance(node.op, ast.USub) else expr), typ

    def visit_BinOp(self, node):
        op = type(node.op)
        if op in (ast.BitAnd, ast.BitOr):
            name = "&" if op is ast.BitAnd else "|"
            a = self.boolean(node.left, f"'{name}'")
            b = self.boolean(node.right, f"'{name}'")
            return (sympy.And(a, b) if op is ast.BitAnd else sympy.Or(a, b)), BOOL
        sym = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}.get(op)
        if sym is None:
            self.fail(node, f"operator {type(node.op).__name__} is not part of the expression language")
        a, ta = self.number(node.left, f"'{sym}'")
        b, tb = self.number(node.right, f"'{sym}'")
        typ = INT if (ta == INT and tb == INT) else FLOAT
        if op is ast.Add:
            return a + b, typ
        if op is ast.Sub:
            return a - b, typ
        if op is ast.Mult:
            return a * b, typ
        if op is ast.Div:
            if b.is_zero:  # 0 and 0.0
                self.fail(node, "division by zero")
            return a / b, FLOAT
        if op is ast.FloorDiv:
            if b.is_zero:
                self.fail(node, "division by zero")
            return sympy.floor(a / b), typ
        if op is ast.Mod:
            if b.is_zero:
                self.fail(node, "modulo by zero")
            return sympy.Mod(a, b), typ
        if typ == INT and not (b.is_Integer and b >= 0):
            typ = FLOAT
        return self.power(node, a, b), typ

    def visit_BoolOp(self, node):
        name = "and" if isinstance(node.op, ast.And) else "or"
        parts = [self.boolean(v, f"'{name}'") for v in node.values]
        return (sympy.And(*parts) if name == "and" else sympy.Or(*parts)), BOOL

    def visit_Compare(self, node):
        ops = {ast.Lt: sympy.Lt, ast.LtE: sympy.Le, ast.Gt: sympy.Gt, ast.GtE: sympy.Ge, ast.Eq: sympy.Eq, ast.NotEq: sympy.Ne}
        left, _ = self.number(node.left, "a comparison")
        parts = []
        for op, right_node in zip(node.ops, node.comparators):
            rel = ops.get(type(op))
            if rel is None:
                self.fail(node, f"comparison {type(op).__name__} is not allowed")
            right, _ = self.number(right_node, "a comparison")
            parts.append(rel(left, right, evaluate=False) if rel in (sympy.Eq, sympy.Ne) else rel(left, right))
            left = right
        return sympy.And(*parts), BOOL

    def visit_IfExp(self, node):
        self.fail(node, "conditional expressions are written where(cond, a, b)")

    # -- indexing and calls -------------------------------------------------
    def visit_Subscript(self, node):
        if not isinstance(node.value, ast.Name) or node.value.id not in self._inputs:
            target = node.value.id if isinstance(node.value, ast.Name) else _describe(node.value)
            self.fail(node, f"only inputs from [inputs] can be indexed; '{target}' is not one")
        decl = self._inputs[node.value.id]
        idx = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if len(idx) != len(decl.dims):
            self.fail(node, f"input '{decl.name}' has {len(decl.dims)} dims ({', '.join(map(str, decl.dims))}), indexed with {len(idx)}")
        args = []
        for k, sub in enumerate(idx):
            if isinstance(sub, ast.Slice):
                self.fail(sub, f"slices are not allowed in an index of '{decl.name}'")
            e, t = self.visit(sub)
            if t != INT:
                self.fail(sub, f"index {k} of '{decl.name}' must be an integer expression, got {t}")
            args.append(e)
        typ = FLOAT if decl.dtype in _FLOAT_DTYPES else (BOOL if decl.dtype == "bool" else INT)
        app = decl.symbol(*args)
        if typ == BOOL:
            return sympy.Ne(app, 0), BOOL
        return app, typ

    def visit_Call(self, node):
        if not isinstance(node.func, ast.Name):
            self.fail(node, "only the language's functions can be called")
        name = node.func.id
        if name not in FUNCTIONS:
            self.fail(node, f"unknown function '{name}' (known: {', '.join(FUNCTIONS)})")
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
                return sympy.Abs(x), t
            if name == "exp2":
                return self.power(node, sympy.Integer(2), x), FLOAT
            return _UNARY_MATH[name](x), FLOAT
        if name in ("min", "max"):
            if len(args) < 2:
                self.fail(node, f"{name}() takes at least 2 arguments, got {len(args)}")
            vals = [self.number(a, f"{name}()") for a in args]
            typ = INT if all(t == INT for _, t in vals) else FLOAT
            f = sympy.Min if name == "min" else sympy.Max
            return f(*[v for v, _ in vals]), typ
        # where(cond, a, b)
        if len(args) != 3:
            self.fail(node, f"where() takes 3 arguments (cond, a, b), got {len(args)}")
        cond = self.boolean(args[0], "where()'s condition")
        (a, ta), (b, tb) = self.visit(args[1]), self.visit(args[2])
        if (ta == BOOL) != (tb == BOOL):
            self.fail(node, "where()'s two branches must both be booleans or both numbers")
        if ta == BOOL:
            return sympy.Or(sympy.And(cond, a), sympy.And(sympy.Not(cond), b)), BOOL
        return sympy.Piecewise((a, cond), (b, True)), (INT if ta == tb == INT else FLOAT)

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


def _describe(node) -> str:
    return {"Lambda": "lambda", "Attribute": "attribute access", "List": "a list", "Tuple": "a tuple",
            "Dict": "a dict", "Starred": "unpacking", "NamedExpr": "':='"}.get(type(node).__name__,
                                                                             f"'{type(node).__name__}'")


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
    sympy.tanh: math.tanh, sympy.Abs: abs, sympy.floor: math.floor, sympy.ceiling: math.ceil,
    Sigmoid: lambda x: 0.5 * (1.0 + math.tanh(0.5 * x)),
}


def _real_value(e) -> Optional[float]:
    """The value of a constant sympy expression in float64 (+-inf where it overflows), without
    sympy's exact arithmetic or arbitrary precision (exp(exp(exp(100))) would take forever).
    Raises _NotReal (with what) where it is complex or undefined; None for a node it cannot
    evaluate (then nothing is checked)."""
    if e is sympy.nan or e is sympy.zoo:
        raise _NotReal("is undefined")
    if e is sympy.I:
        raise _NotReal("is not a real number")
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


def parse_expression(text: str, scope: Scope, file: str = "<string>", key: str = "") -> Tuple[sympy.Basic, str]:
    """Parse ``text`` into (sympy expression, type) where type is "bool", "int" or "float"."""
    if not isinstance(text, str):
        raise SpecError(file, key, f"expected an expression as a string, got {type(text).__name__} {_text(repr(text))}")
    text = text.strip()
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise SpecError(file, key, f"expressions are at most {MAX_EXPRESSION_LENGTH} characters, got {len(text)}")
    try:
        with warnings.catch_warnings():  # "1and j": Python warns; the language refuses
            warnings.simplefilter("error", SyntaxWarning)
            tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise SpecError(file, key, f"syntax error: {e.msg}", e.offset or None) from None  # 0: no position
    except (RecursionError, MemoryError):
        raise SpecError(file, key, f"the expression is nested too deeply (at most {MAX_DEPTH} levels)") from None
    if _depth(tree.body) > MAX_DEPTH:
        raise SpecError(file, key, f"the expression is nested too deeply (at most {MAX_DEPTH} levels)")
    try:
        return _Parser(scope, file, key, text=text).visit(tree.body)
    except RecursionError:
        raise SpecError(file, key, f"the expression is nested too deeply (at most {MAX_DEPTH} levels)") from None
