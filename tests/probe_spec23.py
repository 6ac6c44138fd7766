"""Probe 23: the spec language's *semantics* against Python's own reading of the same text.

tests/probe_specs.py draws fully parenthesized expressions and writes a Python twin of each;
this draws expressions rendered with the fewest parentheses Python's precedence needs (so the
parser's precedence and associativity are under test: ``-i // 3``, ``i - j - k``, ``2 ** 3 ** 2``,
``-x ** 2``, ``not a == b``, chained comparisons, ``~`` and shifts beside ``+``), and the oracle is
Python evaluating *the very same text* per pair (an AST pass maps the few documented differences:
``~`` of a boolean is ``not``, a shift by a non-constant amount is ``floor(x * 2**n)``, ``/`` is
float64 division with IEEE zeros, a power that is not an int to a non-negative int is torch.pow's),
with ints that refuse to leave int64 (a case that would is skipped: the spec's to avoid).

For one seed, :func:`check_seed` compares

1. ``attncc.reference``'s mask (pair_mask) and bias with the Python oracle on every pair of every
   batch row and query head (GQA: ``h`` is the query head);
2. the generated kernels (interpreter) with a dense float64 softmax written here from the oracle's
   mask and bias (o, LSE; dq, dk, dv for backward seeds);
3. ``explain_data`` (what ``attncc explain --json`` prints) at positions from 0: allowed pairs and,
   per walk, visited / unmasked tiles against brute force over the oracle's mask (exact for masks of
   integer arithmetic, sound for the rest), and the Plan's walk_grid at the call's offsets.

    python tests/probe_spec23.py --cases 200             # print the failures
    python tests/probe_spec23.py --seed 17 --verbose     # one case
    python tests/probe_spec23.py --cases 2000 --no-kernels
"""
from __future__ import annotations

import ast
import math
import random
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import script_env  # noqa: E402,F401  (the interpreter, this checkout on the path: before the imports below)

import torch  # noqa: E402

import attncc  # noqa: E402
from attncc._reference import evaluate, index_env, pair_mask  # noqa: E402
from attncc.spec import SpecError, parse_spec  # noqa: E402
from cases import drawn_spec_main  # noqa: E402
from fuzz_specs import _tile_config, _toml_str, build_spec  # noqa: E402

BOOL, INT, FLOAT = "bool", "int", "float"
# Python's precedence levels (low to high)
OR, AND, NOT, CMP, BOR, BXOR, BAND, SHIFT, ADD, MUL, UNARY, POW, ATOM = range(1, 14)

INT_PARAM_VALUES = (0, 1, 2, 3, 5, 7, -1, -2, -3, -7, 13, 2**31 - 1, -2**31, 2**31)
DIVISOR_VALUES = (1, 2, 3, 5, 7, 13, -1, -2, -3, -5, -13)
FLOAT_PARAM_VALUES = (0.5, -0.5, 0.1, 2.5, -3.0, 1.0 / 3.0, 0.0, 7.0)
BIG = (2**31 - 1, 2**31, 2**32 + 1, 2**53 + 1, 2**62 - 1, 2**40)


# ---------------------------------------------------------------------------------------------
# the oracle: Python on the same text
# ---------------------------------------------------------------------------------------------

class Skip(Exception):
    """A pair whose value leaves what the language defines (an int past int64, a division by 0)."""


class C64(int):
    """An int that refuses to leave int64 (Skip) through + - * ** << // % abs and unary minus."""

    __slots__ = ()

    @staticmethod
    def of(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return v
        if not -2**63 <= v < 2**63:
            raise Skip(f"int past int64: {v}")
        return C64(v)


def _checked(name):
    op = getattr(int, name)

    def f(self, *other):
        if name in ("__floordiv__", "__mod__", "__rfloordiv__", "__rmod__"):
            den = other[0] if name in ("__floordiv__", "__mod__") else self
            if isinstance(den, (int, float)) and den == 0:
                raise Skip("division by 0")
        r = op(self, *other)
        return r if r is NotImplemented else C64.of(r)
    return f


for _n in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__floordiv__", "__rfloordiv__",
           "__mod__", "__rmod__", "__pow__", "__rpow__", "__lshift__", "__rlshift__", "__rshift__", "__rrshift__",
           "__and__", "__rand__", "__or__", "__ror__", "__xor__", "__rxor__", "__neg__", "__pos__", "__abs__",
           "__invert__"):
    setattr(C64, _n, _checked(_n))


def _inv(x):
    return (not x) if isinstance(x, bool) else ~x


def _shift(x, n, left: bool):
    """``x << n`` / ``x >> n``: Python's for a constant amount; floor(x * 2**n) with n in [-63, 63]."""
    n = int(n)
    n = max(-63, min(63, n if left else -n))
    return C64.of(int(x) << n) if n >= 0 else C64.of(int(x) >> -n)


def _div(a, b):
    a, b = float(a), float(b)
    if b == 0.0:
        if a == 0.0 or math.isnan(a):
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)
    return a / b


def _pow(a, b, literal: bool):
    """``a ** b``: an int to a non-negative int literal is an int; anything else torch.pow's float64."""
    if literal and isinstance(a, int) and isinstance(b, int) and not isinstance(b, bool) and b >= 0:
        return C64.of(int(a) ** int(b)) if not isinstance(a, bool) else int(a) ** int(b)
    return float(torch.pow(torch.tensor(float(a), dtype=torch.float64), torch.tensor(float(b), dtype=torch.float64)))


def _floordiv(a, b):
    if b == 0:
        raise Skip("division by 0")
    if isinstance(a, float) or isinstance(b, float):
        return float(a) // float(b)
    return C64.of(int(a) // int(b))


def _mod(a, b):
    if b == 0:
        raise Skip("division by 0")
    if isinstance(a, float) or isinstance(b, float):
        return float(a) % float(b)
    return C64.of(int(a) % int(b))


_CMP = {"Lt": lambda a, b: a < b, "LtE": lambda a, b: a <= b, "Gt": lambda a, b: a > b, "GtE": lambda a, b: a >= b,
        "Eq": lambda a, b: a == b, "NotEq": lambda a, b: a != b}


def _chain(*parts):
    """A chained comparison, an int beside a float taken to float64 (the documented conversion,
    torch's promotion; Python would compare exactly)."""
    out = True
    for k in range(1, len(parts), 2):
        a, op, b = parts[k - 1], parts[k], parts[k + 1]
        if isinstance(a, float) != isinstance(b, float):
            a, b = float(a), float(b)
        out = out and _CMP[op](a, b)
    return out


def _where(c, a, b):
    return a if c else b


NAMESPACE = {"where": _where, "abs": abs, "min": min, "max": max, "sqrt": lambda x: math.sqrt(x) if x >= 0 else math.nan,
             "tanh": math.tanh, "_inv": _inv, "_shift": _shift, "_div": _div, "_pow": _pow,
             "_floordiv": _floordiv, "_mod": _mod, "_chain": _chain, "sum": sum, "any": any, "all": all, "range": range, "True": True, "False": False}


class _ToOracle(ast.NodeTransformer):
    """The documented differences from Python, as calls of the helpers above."""

    def visit_Name(self, node):
        if node.id == "causal":
            return ast.copy_location(ast.parse("j <= i", mode="eval").body, node)
        if node.id in ("q_idx", "kv_idx"):
            return ast.copy_location(ast.Name("i" if node.id == "q_idx" else "j", ast.Load()), node)
        return node

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, ast.Invert):
            return ast.copy_location(ast.Call(ast.Name("_inv", ast.Load()), [node.operand], []), node)
        return node

    def visit_Compare(self, node):
        self.generic_visit(node)
        args = [node.left]
        for op, right in zip(node.ops, node.comparators):
            args += [ast.Constant(type(op).__name__), right]
        return ast.copy_location(ast.Call(ast.Name("_chain", ast.Load()), args, []), node)

    def visit_BinOp(self, node):
        literal = not any(isinstance(n, ast.Name) for n in ast.walk(node.right))
        self.generic_visit(node)
        call = lambda name, *args: ast.copy_location(ast.Call(ast.Name(name, ast.Load()), list(args), []), node)  # noqa
        if isinstance(node.op, (ast.LShift, ast.RShift)):
            if isinstance(node.right, ast.Constant):
                return node  # a constant amount from 0 to 62: Python's
            return call("_shift", node.left, node.right, ast.Constant(isinstance(node.op, ast.LShift)))
        if isinstance(node.op, ast.Div):
            return call("_div", node.left, node.right)
        if isinstance(node.op, ast.Pow):
            return call("_pow", node.left, node.right, ast.Constant(literal))
        if isinstance(node.op, ast.FloorDiv):
            return call("_floordiv", node.left, node.right)
        if isinstance(node.op, ast.Mod):
            return call("_mod", node.left, node.right)
        return node


def oracle_code(text: str):
    tree = _ToOracle().visit(ast.parse(text.strip(), mode="eval"))
    return compile(ast.fix_missing_locations(tree), "<oracle>", "eval")


def oracle_grid(code, env: dict, rows: List[int], cols: List[int], as_float: bool,
                scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The expression on every pair (i in rows, j in cols) by Python, ``s`` the pair's entry of
    ``scores`` where given; Skip propagates."""
    out = torch.empty(len(rows), len(cols), dtype=torch.float64 if as_float else torch.bool)
    e = dict(NAMESPACE, **env)
    for r, i in enumerate(rows):
        e["i"] = C64(i)
        for c, j in enumerate(cols):
            e["j"] = C64(j)
            if scores is not None:
                e["s"] = float(scores[r, c])
            v = eval(code, e)  # noqa: S307 - our own generated text
            if as_float:
                out[r, c] = float(v)
            else:
                if not isinstance(v, bool):
                    raise TypeError(f"mask value {v!r} is not a bool")
                out[r, c] = v
    return out


# ---------------------------------------------------------------------------------------------
# the generator: typed expressions rendered with the fewest parentheses
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class E:
    text: str
    prec: int
    typ: str
    flt: bool = False  # a float operation somewhere (the classifier may be conservative)


class Draw:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.params: Dict[str, object] = {}
        self.budget = 30

    def param(self, kind: str, values) -> str:
        same = [n for n, v in self.params.items() if (isinstance(v, float)) == (kind == FLOAT)]
        if same and self.rng.random() < 0.4:
            return self.rng.choice(same)
        name = f"{'w' if kind == INT else 'x'}{len(self.params)}"
        self.params[name] = self.rng.choice(values)
        return name

    def divisor_param(self) -> str:
        name = f"d{len(self.params)}"
        self.params[name] = self.rng.choice(DIVISOR_VALUES)
        return name


def wrap(e: E, need: int, rng: random.Random) -> str:
    if e.prec < need or rng.random() < 0.08:
        return f"({e.text})"
    return e.text


def binop(d: Draw, a: E, op: str, b: E, prec: int, typ: str, right_assoc: bool = False) -> E:
    rng = d.rng
    ln, rn = (prec + 1, prec) if right_assoc else (prec, prec + 1)
    if op == "**":
        ln, rn = ATOM, UNARY
    return E(f"{wrap(a, ln, rng)} {op} {wrap(b, rn, rng)}", prec, typ, a.flt or b.flt or typ == FLOAT)


def unary(d: Draw, op: str, a: E, typ: str) -> E:
    sep = " " if op == "not" else ""
    need = NOT if op == "not" else UNARY
    return E(f"{op}{sep}{wrap(a, need, d.rng)}", NOT if op == "not" else UNARY, typ, a.flt)


def call(fn: str, args: List[E], typ: str, flt: bool = False) -> E:
    return E(f"{fn}({', '.join(a.text for a in args)})", ATOM, typ, flt or any(a.flt for a in args))


def leaf_int(d: Draw) -> E:
    rng = d.rng
    r = rng.random()
    if r < 0.55:
        return E(rng.choice(("i", "j", "i", "j", "b", "h", "n_q", "n_k", "q_idx", "kv_idx")), ATOM, INT)
    if r < 0.7:
        return E(d.param(INT, INT_PARAM_VALUES), ATOM, INT)
    if r < 0.77:
        return E(str(rng.choice(BIG)), ATOM, INT)
    return E(str(rng.choice((0, 1, 2, 3, 4, 5, 7, 8, 16, 64, 100))), ATOM, INT)


def divisor(d: Draw, depth: int) -> E:
    rng = d.rng
    r = rng.random()
    if r < 0.4:
        v = rng.choice((1, 2, 3, 5, 7, 13, 41, 64))
        e = E(str(v), ATOM, INT)
        return unary(d, "-", e, INT) if rng.random() < 0.35 else e
    if r < 0.6:
        return E(d.divisor_param(), ATOM, INT)
    e = draw_int(d, depth + 1)
    return rng.choice((binop(d, call("abs", [e], INT), "+", E("1", ATOM, INT), ADD, INT),
                       call("max", [e, E("1", ATOM, INT)], INT),
                       unary(d, "-", E(f"(abs({e.text}) + 2)", ATOM, INT, e.flt), INT)))


def draw_int(d: Draw, depth: int = 0) -> E:
    rng = d.rng
    d.budget -= 1
    if depth >= 3 or d.budget <= 0 or rng.random() < 0.25:
        return leaf_int(d)
    kind = rng.choice(("add", "sub", "sub", "mul", "floordiv", "mod", "floordiv", "mod", "neg", "neg", "abs", "minmax",
                       "where", "band", "bor", "bxor", "invert", "shift", "shiftvar", "pow", "powchain", "boolnum"))
    if kind in ("add", "sub", "mul"):
        a, b = draw_int(d, depth + 1), draw_int(d, depth + 1)
        return binop(d, a, {"add": "+", "sub": "-", "mul": "*"}[kind], b, MUL if kind == "mul" else ADD, INT)
    if kind in ("floordiv", "mod"):
        return binop(d, draw_int(d, depth + 1), "//" if kind == "floordiv" else "%", divisor(d, depth), MUL, INT)
    if kind == "neg":
        return unary(d, "-", draw_int(d, depth + 1), INT)
    if kind == "abs":
        return call("abs", [draw_int(d, depth + 1)], INT)
    if kind == "minmax":
        return call(rng.choice(("min", "max")), [draw_int(d, depth + 1) for _ in range(rng.choice((2, 2, 3)))], INT)
    if kind == "where":
        return call("where", [draw_bool(d, depth + 1), draw_int(d, depth + 1), draw_int(d, depth + 1)], INT)
    if kind in ("band", "bor", "bxor"):
        op, prec = {"band": ("&", BAND), "bor": ("|", BOR), "bxor": ("^", BXOR)}[kind]
        return binop(d, draw_int(d, depth + 1), op, draw_int(d, depth + 1), prec, INT)
    if kind == "invert":
        return unary(d, "~", draw_int(d, depth + 1), INT)
    if kind == "shift":
        return binop(d, draw_int(d, depth + 1), rng.choice(("<<", ">>")), E(str(rng.randint(0, 5)), ATOM, INT), SHIFT, INT)
    if kind == "shiftvar":
        amount = rng.choice(("j % 5 - 2", "h - 1", "i % 3", "2 - b"))
        return binop(d, draw_int(d, depth + 1), rng.choice(("<<", ">>")), E(amount, ADD, INT), SHIFT, INT)
    if kind == "pow":
        return binop(d, draw_int(d, depth + 1), "**", E(str(rng.choice((0, 1, 2, 3))), ATOM, INT), POW, INT)
    if kind == "powchain":  # right-associative, binds tighter than a unary minus on its left
        a = E(str(rng.choice((2, 3))), ATOM, INT)
        if rng.random() < 0.4:
            a = unary(d, "-", a, INT)
        b = binop(d, E(str(rng.choice((1, 2))), ATOM, INT), "**", E(str(rng.choice((0, 1, 2))), ATOM, INT), POW, INT)
        return binop(d, a, "**", b, POW, INT)
    # a boolean counts as 0 or 1
    c = draw_bool(d, depth + 1)
    return binop(d, c, rng.choice(("+", "-", "*")), draw_int(d, depth + 1), rng.choice((ADD,)), INT) \
        if rng.random() < 0.5 else binop(d, draw_int(d, depth + 1), "+", c, ADD, INT)


def draw_float(d: Draw, depth: int = 0, in_mask: bool = True) -> E:
    rng = d.rng
    d.budget -= 1
    if depth >= 3 or d.budget <= 0 or rng.random() < 0.3:
        r = rng.random()
        if r < 0.4:
            e = draw_int(d, depth + 1)
            return E(e.text, e.prec, FLOAT, e.flt)
        if r < 0.65:
            return E(d.param(FLOAT, FLOAT_PARAM_VALUES), ATOM, FLOAT, True)
        return E(repr(rng.choice((0.5, 0.1, 0.25, 1.5, 2.0, 0.37, 3.0, 0.3, 1e-3))), ATOM, FLOAT, True)
    kinds = ["add", "sub", "mul", "div", "divint", "where", "minmax", "abs", "neg", "floordiv", "mod", "pow2", "sqrt",
             "powparam"]
    if not in_mask:
        kinds += ["tanh"]
    kind = rng.choice(kinds)
    a = draw_float(d, depth + 1, in_mask)
    if kind in ("add", "sub", "mul"):
        return binop(d, a, {"add": "+", "sub": "-", "mul": "*"}[kind], draw_float(d, depth + 1, in_mask),
                     MUL if kind == "mul" else ADD, FLOAT)
    if kind == "div":
        return binop(d, a, "/", draw_float(d, depth + 1, in_mask), MUL, FLOAT)
    if kind == "divint":  # an int over an int: a float
        return binop(d, draw_int(d, depth + 1), "/", divisor(d, depth), MUL, FLOAT)
    if kind in ("floordiv", "mod"):
        b = E(rng.choice(("1.3", "0.7", "2.5", "3")), ATOM, FLOAT, True)
        if rng.random() < 0.3:
            b = unary(d, "-", b, FLOAT)
        return binop(d, a, "//" if kind == "floordiv" else "%", b, MUL, FLOAT)
    if kind == "where":
        b = draw_float(d, depth + 1, in_mask) if rng.random() < 0.6 else draw_int(d, depth + 1)
        return call("where", [draw_bool(d, depth + 1), a, b] if rng.random() < 0.5 else [draw_bool(d, depth + 1), b, a],
                    FLOAT, True)
    if kind == "minmax":
        b = draw_int(d, depth + 1) if rng.random() < 0.5 else draw_float(d, depth + 1, in_mask)
        return call(rng.choice(("min", "max")), [a, b] if rng.random() < 0.5 else [b, a], FLOAT, True)
    if kind == "abs":
        return call("abs", [a], FLOAT, True)
    if kind == "neg":
        return unary(d, "-", a, FLOAT)
    if kind == "pow2":
        return binop(d, a, "**", E("2", ATOM, INT), POW, FLOAT)
    if kind == "sqrt":
        return call("sqrt", [call("abs", [a], FLOAT)], FLOAT, True)
    if kind == "powparam":  # an int to an int param: a float power (torch.pow)
        base = draw_int(d, depth + 1)
        return binop(d, base, "**", E(d.param(INT, (0, 1, 2, 3)), ATOM, INT), POW, FLOAT)
    return call(kind, [a], FLOAT, True)


def draw_bool(d: Draw, depth: int = 0) -> E:
    rng = d.rng
    d.budget -= 1
    if depth >= 3 or d.budget <= 0 or rng.random() < 0.12:
        return rng.choice((E("causal", ATOM, BOOL), E("True", ATOM, BOOL), E("False", ATOM, BOOL),
                           E("j <= i", CMP, BOOL)))
    kind = rng.choice(("cmp", "cmp", "cmp", "cmp", "fcmp", "chain", "chain", "and", "or", "not", "band", "bor",
                       "bxor", "invert", "booleq", "where", "boolint"))
    if kind in ("cmp", "fcmp"):
        gen = draw_float if kind == "fcmp" else draw_int
        a, b = gen(d, depth + 1), gen(d, depth + 1)
        return binop(d, a, rng.choice(("<", "<=", ">", ">=", "==", "!=")), b, CMP, BOOL)
    if kind == "chain":
        parts = [draw_int(d, depth + 1) if rng.random() < 0.8 else draw_float(d, depth + 1) for _ in range(rng.choice((3, 3, 4)))]
        text = wrap(parts[0], BOR, rng)
        for p in parts[1:]:
            text += f" {rng.choice(('<', '<=', '==', '!=', '>', '>='))} {wrap(p, BOR, rng)}"
        return E(text, CMP, BOOL, any(p.flt for p in parts))
    if kind == "boolint":  # a boolean against a number
        c, n = draw_bool(d, depth + 1), draw_int(d, depth + 1)
        a, b = (c, n) if rng.random() < 0.5 else (n, c)
        return binop(d, a, rng.choice(("<", "==", ">=", "!=")), b, CMP, BOOL)
    if kind == "not":
        return unary(d, "not", draw_bool(d, depth + 1), BOOL)
    if kind == "invert":
        return unary(d, "~", draw_bool(d, depth + 1), BOOL)
    if kind == "where":
        return call("where", [draw_bool(d, depth + 1) for _ in range(3)], BOOL)
    a, b = draw_bool(d, depth + 1), draw_bool(d, depth + 1)
    if kind == "and":
        return E(f"{wrap(a, AND, rng)} and {wrap(b, NOT, rng)}", AND, BOOL, a.flt or b.flt)
    if kind == "or":
        return E(f"{wrap(a, OR, rng)} or {wrap(b, AND, rng)}", OR, BOOL, a.flt or b.flt)
    if kind == "booleq":
        return binop(d, a, rng.choice(("==", "!=")), b, CMP, BOOL)
    op, prec = {"band": ("&", BAND), "bor": ("|", BOR), "bxor": ("^", BXOR)}[kind]
    return binop(d, a, op, b, prec, BOOL)


# ---------------------------------------------------------------------------------------------
# a case
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    seed: int
    mask: Optional[str]
    bias: Optional[str]  # a float expression; the spec's bias is tanh of it (bounded scores)
    mod_mask: Optional[str]  # where(c, s, -inf) in [score].mod
    mask_flt: bool
    params: Tuple[Tuple[str, object], ...]
    overrides: Tuple[Tuple[str, object, str], ...]  # (name, value, form) passed at the call
    Nq: int
    Nk: int
    q_offset: int
    k_offset: int
    n_q: Optional[int]
    n_k: Optional[int]
    B: int
    Hq: int
    Hkv: int
    tile: Tuple[int, int]
    backward: bool
    # (c, a, b): [score].mod is where(c, s * a, s + b), c a condition that may read s, a and b free of it
    mod_score: Optional[Tuple[str, str, str]] = None

    @property
    def text(self) -> str:
        lines = ["head_dim = 16", 'dtypes = ["float32"]']
        if self.params:
            lines.append("[params]")
            lines += [f"{k} = {v!r}" for k, v in self.params]
        if self.mask is not None:
            lines += ["[mask]", f"where = {_toml_str(self.mask)}"]
        score = []
        if self.bias is not None:
            score.append(f"bias = {_toml_str(f'tanh({self.bias})')}")
        mod = "s" if self.mod_score is None else "where({}, s * ({}), s + ({}))".format(*self.mod_score)
        if self.mod_mask is not None:
            mod = f"where({self.mod_mask}, {mod}, -inf)"
        if mod != "s":
            score.append(f"mod = {_toml_str(mod)}")
        if score:
            lines += ["[score]"] + score
        return "\n".join(lines) + "\n"

    @property
    def values(self) -> Dict[str, object]:
        v = dict(self.params)
        v.update({k: x for k, x, _ in self.overrides})
        return v

    def call_params(self) -> Dict[str, object]:
        import numpy as np
        out = {}
        for k, x, form in self.overrides:
            if form == "tensor":
                out[k] = torch.tensor(x)
            elif form == "numpy":
                out[k] = np.int64(x) if isinstance(x, int) else np.float64(x)
            else:
                out[k] = x
        return out

    def describe(self) -> str:
        return (f"B={self.B} Hq={self.Hq} Hkv={self.Hkv} Nq={self.Nq} Nk={self.Nk} q_offset={self.q_offset} "
                f"k_offset={self.k_offset} n_q={self.n_q} n_k={self.n_k} tile={self.tile} overrides={self.overrides}"
                f"{' backward' if self.backward else ''}")


def draw_case(seed: int, backward: Optional[bool] = None) -> Case:
    rng = random.Random(seed)
    d = Draw(rng)
    mask = draw_bool(d) if rng.random() < 0.85 else None
    mask_flt = False
    if mask is not None:
        mask_flt = mask.flt
        mask = mask.text
    d.budget = 20
    bias = draw_float(d, in_mask=False).text if rng.random() < 0.35 else None
    mod_mask = None
    if rng.random() < 0.2:
        d.budget = 12
        m = draw_bool(d)
        mod_mask, mask_flt = m.text, mask_flt or m.flt
    mod_score = None
    if rng.random() < 0.3:
        d.budget = 12
        f = draw_float(d)
        cond = rng.choice(("s > {f}", "s * 2 < {f}", "abs(s) < {f}", "s > {f} and {c}", "not s <= {f} or {c}",
                           "{f} < s < {f} + 1"))
        cond = cond.replace("{f}", f.text if f.prec >= ADD + 1 else f"({f.text})")
        if "{c}" in cond:
            c = draw_bool(d)
            cond = cond.replace("{c}", c.text if c.prec > AND else f"({c.text})")
        d.budget = 10
        a, b = draw_float(d, in_mask=False), draw_float(d, in_mask=False)
        mod_score = (cond, f"1 + 0.5 * tanh({a.text})", f"tanh({b.text})")
    overrides = []
    for name, value in d.params.items():
        if rng.random() < 0.4:
            form = rng.choice(("int", "tensor", "numpy"))
            if name.startswith("d"):
                new = rng.choice(DIVISOR_VALUES)
            elif isinstance(value, float):
                new = rng.choice(FLOAT_PARAM_VALUES)
                if form == "int":
                    form = "float"
            else:
                new = rng.choice(INT_PARAM_VALUES)
            overrides.append((name, new, form))
    hq = rng.choice((1, 2, 4))
    hkv = rng.choice([x for x in (1, 2, 4) if hq % x == 0])
    nq, nk = rng.randint(1, 40), rng.randint(1, 40)
    q_offset = rng.choice((0, 0, rng.randint(1, 30), rng.choice((2**31 - 20, 2**32))))
    k_offset = rng.choice((0, 0, rng.randint(1, 30))) if q_offset < 2**31 else q_offset + rng.randint(-15, 15)
    n_q = q_offset + nq + rng.randint(0, 9) if rng.random() < 0.2 else None
    n_k = k_offset + nk + rng.randint(0, 9) if rng.random() < 0.2 else None
    tile = (rng.choice((16, 32)), rng.choice((16, 32)))
    backward = rng.random() < 0.25 if backward is None else backward
    return Case(seed, mask, bias, mod_mask, mask_flt, tuple(d.params.items()), tuple(overrides), nq, nk, q_offset,
                k_offset, n_q, n_k, rng.choice((1, 2)), hq, hkv, tile, backward, mod_score)


# the families the analysis gives closed forms or exact lists (tile_oracle.random_mask draws them with
# positive constants): here with params whose call values may be negative, 0, 1 or odd, offsets
STRUCTURED = (
    "i // C == j // C", "j >= i - i % C and j <= i", "(i - j) % C == 0", "j % C == C - 1", "abs(i - j) <= W",
    "i - j < W and j <= i", "j - n_k <= i - n_q", "j - n_k <= i - n_q + W", "i < W or j < W",
    "(i + A) // C == (j + B2) // C", "i // C - j // C <= 1 and j <= i", "0 <= i - j < W", "j <= i < W + j",
    "-W <= j - i <= W", "i // C >= j // C", "(i - j) // C == 0", "j // C * C <= i", "i - i % C <= j < i - i % C + C",
    "j < W or j <= i and i - j <= W", "j % C == 0 or abs(i - j) < W", "i % C == j % C", "-i // C == -j // C",
    "n_k - j <= W", "i >= n_q - W and j <= i", "(i >> 2) == (j >> 2)", "i >> S == j >> S", "i & -C == j & -C",
    "j <= i and i - j < W or j >= n_k - A",
)
STRUCT_VALUES = {"C": (1, 2, 3, 5, 7, 13, 16, -1, -3, -7, -16), "W": (0, 1, 3, 7, 13, 40, -1, -5, 2**31 - 1, -2**31),
                 "A": (0, 1, 5, -3, -17, 2**31), "B2": (0, 2, 9, -4), "S": (0, 1, 2, 3, 5, -1, -3)}


def draw_structured(seed: int, backward: Optional[bool] = None) -> Case:
    """A mask of one or two of the families above, joined by and / or, its params overridden per call."""
    rng = random.Random(seed)
    parts = [rng.choice(STRUCTURED) for _ in range(rng.choice((1, 1, 2)))]
    mask = parts[0] if len(parts) == 1 else f"({parts[0]}) {rng.choice(('and', 'or'))} ({parts[1]})"
    names = sorted({n for n in STRUCT_VALUES if any(f"{n} " in f" {t} ".replace("(", " ").replace(")", " ") or
                                                    f" {n}" in t or f"{n})" in t for t in parts)})
    names = [n for n in names if n in mask]
    params = {n: rng.choice(STRUCT_VALUES[n]) for n in names}
    overrides = tuple((n, rng.choice(STRUCT_VALUES[n]), rng.choice(("int", "tensor", "numpy")))
                      for n in names if rng.random() < 0.5)
    nq, nk = rng.randint(1, 70), rng.randint(1, 70)
    q_offset = rng.choice((0, 0, rng.randint(1, 50), 2**31 - rng.randint(1, 40)))
    k_offset = rng.choice((0, 0, rng.randint(1, 50))) if q_offset < 2**30 else q_offset + rng.randint(-30, 30)
    n_q = q_offset + nq + rng.randint(0, 9) if rng.random() < 0.25 else None
    n_k = k_offset + nk + rng.randint(0, 9) if rng.random() < 0.25 else None
    tile = (rng.choice((16, 32, 64)), rng.choice((16, 32)))
    backward = rng.random() < 0.25 if backward is None else backward
    hq = rng.choice((1, 2))
    return Case(seed, mask, None, None, False, tuple(params.items()), overrides, nq, nk, q_offset, k_offset, n_q, n_k,
                1, hq, 1, tile, backward)


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    seed: int
    stage: str
    detail: str
    case: Case

    def __str__(self) -> str:
        return (f"seed {self.seed}: {self.stage}: {self.detail}\n  call: {self.case.describe()}\n"
                + "".join(f"  | {line}\n" for line in self.case.text.splitlines()))


def _lengths(case: Case) -> Tuple[int, int]:
    return (case.n_q if case.n_q is not None else case.q_offset + case.Nq,
            case.n_k if case.n_k is not None else case.k_offset + case.Nk)


def oracle(case: Case, q_offset: Optional[int] = None, k_offset: Optional[int] = None, Nq=None, Nk=None,
           n_q=None, n_k=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(mask [B, Hq, Nq, Nk], bias [B, Hq, Nq, Nk] or None) by Python; raises Skip."""
    qo = case.q_offset if q_offset is None else q_offset
    ko = case.k_offset if k_offset is None else k_offset
    Nq = case.Nq if Nq is None else Nq
    Nk = case.Nk if Nk is None else Nk
    if n_q is None:
        n_q, n_k = _lengths(case) if q_offset is None else (qo + Nq, ko + Nk)
    rows, cols = list(range(qo, qo + Nq)), list(range(ko, ko + Nk))
    params = {k: C64(v) if isinstance(v, int) else v for k, v in case.values.items()}
    conds = [t for t in (case.mask, case.mod_mask) if t is not None]
    codes = [oracle_code(t) for t in conds]
    bias_code = oracle_code(case.bias) if case.bias is not None else None
    mask = torch.ones(case.B, case.Hq, Nq, Nk, dtype=torch.bool)
    bias = torch.zeros(case.B, case.Hq, Nq, Nk, dtype=torch.float64) if bias_code is not None else None
    for b in range(case.B):
        for h in range(case.Hq):
            env = dict(params, b=C64(b), h=C64(h), n_q=C64(n_q), n_k=C64(n_k))
            for code in codes:
                mask[b, h] &= oracle_grid(code, env, rows, cols, False)
            if bias_code is not None:
                bias[b, h] = torch.tanh(oracle_grid(bias_code, env, rows, cols, True))
    return mask, bias


def check_reference(case: Case, pattern, mask, bias) -> Optional[str]:
    pos = dict(q_offset=case.q_offset, k_offset=case.k_offset, n_q=case.n_q, n_k=case.n_k)
    got = pair_mask(pattern, q_rows=case.Nq, k_rows=case.Nk, batch=case.B, heads=case.Hq, params=case.call_params(),
                    **pos)
    if not torch.equal(got, mask):
        bad = (got != mask).nonzero()[0].tolist()
        return (f"mask differs from Python at {int((got != mask).sum())} pairs, first [b,h,r,c]={bad}: "
                f"reference {bool(got[tuple(bad)])}, Python {bool(mask[tuple(bad)])}")
    if bias is not None:
        env = index_env(pattern, batch=case.B, heads=case.Hq, q_rows=case.Nq, k_rows=case.Nk,
                        params=case.call_params(), **pos)
        got = evaluate(pattern.bias, env).double().expand(case.B, case.Hq, case.Nq, case.Nk)
        close = torch.isclose(got, bias, rtol=1e-9, atol=1e-9) | (torch.isnan(got) & torch.isnan(bias))
        close |= ~mask  # only allowed pairs matter
        if not close.all():
            bad = (~close).nonzero()[0].tolist()
            return (f"bias differs from Python at {int((~close).sum())} pairs, first [b,h,r,c]={bad}: "
                    f"reference {float(got[tuple(bad)])!r}, Python {float(bias[tuple(bad)])!r}")
    return None


def score_transform(case: Case, s: torch.Tensor) -> torch.Tensor:
    """``where(c, s * a, s + b)`` of ``case.mod_score`` on the scores ``s`` [B, Hq, Nq, Nk]: c by
    Python per pair on the float64 score, a and b by Python, the rest torch (differentiable)."""
    codes = [oracle_code(t) for t in case.mod_score]
    n_q, n_k = _lengths(case)
    rows = list(range(case.q_offset, case.q_offset + case.Nq))
    cols = list(range(case.k_offset, case.k_offset + case.Nk))
    params = {k: C64(v) if isinstance(v, int) else v for k, v in case.values.items()}
    cond = torch.empty(s.shape, dtype=torch.bool)
    a, b = (torch.empty(s.shape, dtype=torch.float64) for _ in range(2))
    for bb in range(case.B):
        for h in range(case.Hq):
            env = dict(params, b=C64(bb), h=C64(h), n_q=C64(n_q), n_k=C64(n_k))
            cond[bb, h] = oracle_grid(codes[0], env, rows, cols, False, scores=s[bb, h].detach())
            a[bb, h] = oracle_grid(codes[1], env, rows, cols, True)
            b[bb, h] = oracle_grid(codes[2], env, rows, cols, True)
    return torch.where(cond, s * a, s + b)


def dense(q, k, v, mask, bias, scale, transform=None):
    """A float64 softmax attention with the oracle's mask, bias and transform (rows without keys: o = 0)."""
    hq, hkv = q.shape[1], k.shape[1]
    kk = k.repeat_interleave(hq // hkv, dim=1)
    vv = v.repeat_interleave(hq // hkv, dim=1)
    s = scale * q @ kk.transpose(-1, -2)
    if bias is not None:
        s = s + bias
    if transform is not None:
        s = transform(s)
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return p @ vv, lse


def _rel(x, ref, floor: float = 1e-3) -> float:
    """Largest error relative to the largest entry (at least ``floor``); NaN where exactly one of the
    two is NaN."""
    if not ref.numel():
        return 0.0
    x = x.detach().double()
    if not torch.equal(torch.isnan(x), torch.isnan(ref)):
        return math.nan
    ok = ~torch.isnan(ref)
    return float((x[ok] - ref[ok]).abs().max() / ref[ok].abs().max().clamp_min(floor)) if ok.any() else 0.0


def check_kernels(case: Case, mask, bias) -> Optional[str]:
    built = build_spec(case.text)
    if isinstance(built, Exception):
        return f"build: {type(built).__name__}: {str(built)[:300]}"
    _, mod = built
    gen = torch.Generator().manual_seed(case.seed)
    q = torch.randn(case.B, case.Hq, case.Nq, 16, generator=gen, requires_grad=case.backward)
    k = torch.randn(case.B, case.Hkv, case.Nk, 16, generator=gen, requires_grad=case.backward)
    v = torch.randn(case.B, case.Hkv, case.Nk, 16, generator=gen, requires_grad=case.backward)
    pos = dict(q_offset=case.q_offset, k_offset=case.k_offset, n_q=case.n_q, n_k=case.n_k)
    tiles = (case.tile, (case.tile[1], case.tile[0]), case.tile)
    try:
        with _tile_config(tiles):
            o, lse = mod.attention(q, k, v, return_lse=True, **pos, **case.call_params())
    except Exception as e:  # noqa: BLE001
        return f"kernel raised {type(e).__name__}: {str(e)[:300]}"
    qd, kd, vd = (x.detach().double().requires_grad_(case.backward) for x in (q, k, v))
    transform = None if case.mod_score is None else (lambda x: score_transform(case, x))
    try:
        ref, ref_lse = dense(qd, kd, vd, mask, bias, 0.25, transform)
    except (Skip, ZeroDivisionError, OverflowError, ValueError):
        return None
    err = _rel(o, ref.detach())
    if not err <= 1e-4:
        return f"o: relative error {err:.3g} against the oracle's softmax"
    fin = torch.isfinite(ref_lse)
    if not torch.equal(fin, torch.isfinite(lse)):
        return "lse: rows without keys differ"
    if fin.any() and not float((lse.detach()[fin].double() - ref_lse.detach()[fin]).abs().max()) <= 1e-4:
        return "lse differs"
    if case.backward:
        g = torch.randn(o.shape, generator=gen, dtype=torch.float64)
        try:
            with _tile_config(tiles):
                o.backward(g.float())
        except Exception as e:  # noqa: BLE001
            return f"backward raised {type(e).__name__}: {str(e)[:300]}"
        ref.backward(g)
        for name, x, xd in (("dq", q, qd), ("dk", k, kd), ("dv", v, vd)):
            # relative to 1 at least: a row with one key has a true dq of 0 and float32 noise (delta)
            err = _rel(x.grad, xd.grad if xd.grad is not None else torch.zeros_like(xd), floor=1.0)
            if not err <= 1e-3:
                return f"{name}: relative error {err:.3g}"
    return None


def check_tiles(case: Case, pattern, mask) -> Optional[str]:
    """walk_grid at the call's offsets (batch row and head B-1, Hq-1) against brute force: sound, and
    exact for masks of integer arithmetic."""
    from attncc.analysis import analyze
    from attncc.analysis.graph import walk_grid
    from attncc.core import tiles
    from tile_oracle import tile_classes

    if pattern.mask is None or pattern.inputs:
        return None
    plan = analyze(pattern)
    b, h = case.B - 1, case.Hq - 1
    want = dict(zip(("forward", "dkdv"), tile_classes(mask[b, h], *case.tile)))
    want["dq"] = want["forward"]
    pos = dict(q_offset=case.q_offset, k_offset=case.k_offset, n_q=case.n_q, n_k=case.n_k)
    for walk in ("forward", "dq", "dkdv"):
        got = walk_grid(plan, walk, q_rows=case.Nq, k_rows=case.Nk, block_m=case.tile[0], block_n=case.tile[1],
                        b=b, h=h, params=case.values, **pos)
        w = want[walk]
        unsound = ((got == tiles.EMPTY) & (w != tiles.EMPTY)) | ((got == tiles.FULL) & (w != tiles.FULL))
        if unsound.any():
            return f"{walk}: {int(unsound.sum())} tiles skipped or run unmasked wrongly"
        if not case.mask_flt and not torch.equal(got, w):
            return f"{walk}: {int((got != w).sum())} tiles inexact"
    return None


def check_explain(case: Case, pattern) -> Optional[str]:
    """explain_data at positions from 0 (n = Nq + q_offset % 7 rows): counts against brute force."""
    from attncc.analysis import analyze
    from attncc.core import tiles
    from attncc.report import explain_data
    from tile_oracle import tile_classes

    if pattern.mask is None:
        return None
    n_q, n_k = case.Nq + case.q_offset % 7, case.Nk + case.k_offset % 7
    try:
        mask, _ = oracle(case, q_offset=0, k_offset=0, Nq=n_q, Nk=n_k)
    except Skip:
        return None
    plan = analyze(pattern)
    bm, bn = case.tile
    d = explain_data(plan, n_q=n_q, n_k=n_k, block_m=bm, block_n=bn, head_dim=16, batch=case.B, heads=case.Hq,
                     params=case.values)
    if d["allowed_pairs"] != int(mask.sum()):
        return f"explain allowed_pairs {d['allowed_pairs']}, brute force {int(mask.sum())}"
    for walk, idx in (("forward", 0), ("dkdv", 1)):
        full = nonempty = 0
        for b in range(case.B):
            for h in range(case.Hq):
                w = tile_classes(mask[b, h], bm, bn)[idx]
                full += int((w == tiles.FULL).sum())
                nonempty += int((w != tiles.EMPTY).sum())
        got = d["walks"][walk]
        if got["visited"] < nonempty or got["unmasked"] > full:
            return f"explain {walk}: visited {got['visited']} unmasked {got['unmasked']}, brute force {nonempty} {full} (unsound)"
        if not case.mask_flt and (got["visited"], got["unmasked"]) != (nonempty, full):
            return f"explain {walk}: visited {got['visited']} unmasked {got['unmasked']}, brute force {nonempty} {full}"
    return None


STATS: Counter = Counter()  # outcomes of check_seed: checked, refused, skipped


def check_seed(seed: int, kernels: bool = True, backward: Optional[bool] = None, structured: bool = False) -> Optional[Finding]:
    case = (draw_structured if structured else draw_case)(seed, backward)
    try:
        pattern = parse_spec(case.text, f"probe{seed}.toml")
    except SpecError as e:
        STATS["refused"] += 1
        return None if _expected_refusal(str(e)) else Finding(seed, "parse", f"SpecError: {e}", case)
    except Exception as e:  # noqa: BLE001
        return Finding(seed, "parse", f"{type(e).__name__}: {e}", case)
    try:
        mask, bias = oracle(case)
    except (Skip, ZeroDivisionError, OverflowError, ValueError):
        STATS["skipped"] += 1
        return None
    except TypeError as e:  # the spec accepted what Python's types refuse
        return Finding(seed, "oracle", f"TypeError: {e}", case)
    # a divisor of params that is 0 (the module refuses the call, as Python would raise)
    stages = [("reference", lambda: check_reference(case, pattern, mask, bias)),
              ("tiles", lambda: check_tiles(case, pattern, mask)),
              ("explain", lambda: check_explain(case, pattern))]
    if kernels:
        stages.append(("kernel", lambda: check_kernels(case, mask, bias)))
    STATS["checked"] += 1
    for stage, fn in stages:
        try:
            bad = fn()
        except Exception as e:  # noqa: BLE001
            bad = f"raised {type(e).__name__}: {str(e)[:400]}"
        if bad:
            return Finding(seed, stage, bad, case)
    return None


# the documented refusals the generator can draw: a constant divisor of 0 (``x / (x0 - x0)``), an
# int constant past int64 (``(2**53 + 1) ** 2``), a divisor not proven non-zero
REFUSALS = ("division by zero", "beyond int64", "divisor")


def _expected_refusal(msg: str) -> bool:
    return any(r in msg for r in REFUSALS)


def _print_refusal(seed: int) -> None:
    try:
        parse_spec(draw_case(seed).text, "r.toml")
    except SpecError as e:
        print(f"seed {seed}: {e}")


def main(argv=None) -> int:
    return drawn_spec_main(argv, draw_case, check_seed, __doc__.split("\n\n")[0], stats=STATS,
                           refusal=_print_refusal)

if __name__ == "__main__":
    sys.exit(main())
