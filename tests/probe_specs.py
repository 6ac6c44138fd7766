"""An outside tester's probe of the spec language: seeded random *typed expressions* over every
operator and function the language documents, each drawn twice, as spec text and as a plain
Python expression with the language's meaning (booleans as 0 or 1, ``~`` of a boolean as
``not``, shifts by a variable amount as ``floor(x * 2**n)``), so that Python itself is the
oracle of ``attncc.reference``.

tests/fuzz_specs.py draws the masks people write (bands, chunks, documents); this draws the
corners of the language: nested ``where`` in masks and scores, ``//`` and ``%`` with negative
operands and divisors, ``min``/``max``/``abs`` of negative values, bitwise operators and shifts,
chained comparisons, booleans in arithmetic, integer powers, reductions, float ``//`` and ``%``,
int params of 0, 1, negative and large values, float params tiny and huge, comparisons of ints
with floats, positions made negative by arithmetic, masks that empty whole rows. For one seed,
:func:`check_seed` compares

1. the reference's mask and bias on every pair with the Python twin (exactly for masks and
   integers, to 1e-12 for floats);
2. the Plan's tiles (forward, dQ, dK/dV walks) with brute force at an odd tile shape: never an
   allowed pair skipped or a partial tile run unmasked, and exact for masks without floats;
3. the generated kernels (interpreter, small sizes) with the reference: o, lse, and, for
   backward seeds, dq, dk, dv.

    python tests/probe_specs.py --cases 300 --start 0        # print the failures
    python tests/probe_specs.py --seed 17 --verbose          # one case
    python tests/probe_specs.py --cases 2000 --no-kernels    # the reference and the Plan only
"""
from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import script_env  # noqa: E402,F401  (the interpreter, this checkout on the path: before the imports below)

import torch  # noqa: E402

import attncc  # noqa: E402
from attncc._reference import evaluate, index_env, pair_mask  # noqa: E402
from attncc.spec import SpecError, parse_spec  # noqa: E402
# the fuzzer's helpers: TOML quoting, builds cached per spec text, tile shapes forced, relative errors
from cases import drawn_spec_main  # noqa: E402
from fuzz_specs import _rel, _tile_config, _toml_str, build_spec  # noqa: E402

BOOL, INT, FLOAT = "bool", "int", "float"

# Param names that look like what the compiler itself names things: Python and Triton words,
# sympy's own names, generated temporaries, the analysis' symbols.
PARAM_NAMES = ("w", "last_row", "first_row", "x", "pi", "E", "I", "N", "S", "oo", "nan", "tl", "triton", "torch",
               "self", "call", "lambda_", "None_", "mask", "qk", "acc", "m_i", "offs_n", "lo", "hi", "kb", "row0",
               "mc0", "mrow0", "c0", "r0", "prm_w", "float", "int", "min_", "Max", "Min", "floor", "Mod",
               "Piecewise", "ceiling", "sign", "zoo", "rational", "Float", "Integer", "Symbol", "dummy", "grid")
INT_VALUES = (0, 1, -1, 2, 3, -3, 5, 7, -7, 13, 41, 64, 2**33 + 1)
DIVISORS = (1, 2, 3, 5, 7, 13, 41, -1, -2, -3, -7, -41)
FLOAT_VALUES = (0.0, -0.0, 0.5, -1.25, 0.1, 2.5, 1e-30, 1e30, -7.75, 1.0 / 3.0)


def _shift(x: int, n: int) -> int:
    """The language's shift by a variable amount: ``floor(x * 2**n)``, ``n`` taken in [-63, 63]."""
    n = max(-63, min(63, n))
    return x << n if n >= 0 else x >> -n


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class I64(int):
    """An int of the language as the kernels and the reference hold it: int64, whose + - * ** << //
    % abs ~ and bitwise operators wrap past int64 (two's complement; docs/spec-language.md,
    "Positions": a spec's to avoid, but defined). The twin's positions, sizes and int params are
    I64, so Python computes what the language means where a value passes int64 (seed 4941:
    ``0.01 * int ** 2`` with ``int = 2**33 + 1``). A float operand makes a float, unwrapped."""

    __slots__ = ()

    @staticmethod
    def of(v):
        if isinstance(v, int) and not isinstance(v, bool):
            return I64((v + 2**63) % 2**64 - 2**63)
        return v  # a float, or NotImplemented


def _wrapping(name):
    op = getattr(int, name)
    return lambda self, *other: I64.of(op(self, *other))


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__floordiv__", "__rfloordiv__",
              "__mod__", "__rmod__", "__pow__", "__rpow__", "__lshift__", "__rlshift__", "__rshift__", "__rrshift__",
              "__and__", "__rand__", "__or__", "__ror__", "__xor__", "__rxor__", "__neg__", "__pos__", "__abs__",
              "__invert__"):
    setattr(I64, _name, _wrapping(_name))


PY_NAMESPACE = {
    "where": lambda c, a, b: a if c else b, "abs": abs, "min": min, "max": max, "sqrt": math.sqrt,
    "exp": math.exp, "exp2": lambda x: 2.0 ** x, "log": math.log, "log2": math.log2, "tanh": math.tanh,
    "sigmoid": _sigmoid, "sin": math.sin, "cos": math.cos, "tan": math.tan, "erf": math.erf, "_shift": _shift,
    "sum": sum, "any": any, "all": all, "range": range, "float": float,
}


@dataclass(frozen=True)
class Ex:
    """One expression in the two spellings: ``spec`` (the language) and ``py`` (Python, same meaning)."""

    spec: str
    py: str
    typ: str
    has_float: bool = False  # a float operation somewhere (masks: the Plan may be conservative)


@dataclass
class Draw:
    """The random state of one spec: params declared so far."""

    rng: random.Random
    params: Dict[str, object] = field(default_factory=dict)
    loop_vars: List[str] = field(default_factory=list)
    in_compare: int = 0  # inside a comparison: no transcendental functions (last-bit differences)
    budget: int = 40  # nodes left
    floats: bool = True  # float comparisons in conditions (False: integer masks, exact tiles)

    def param(self, kind: str) -> Optional[str]:
        rng = self.rng
        same = [n for n, v in self.params.items() if isinstance(v, int) == (kind == INT)]
        if same and rng.random() < 0.5:
            return rng.choice(same)
        free = [n for n in PARAM_NAMES if n not in self.params]
        if not free:
            return None
        name = rng.choice(free)
        self.params[name] = rng.choice(INT_VALUES) if kind == INT else rng.choice(FLOAT_VALUES)
        return name


def _paren(e: Ex) -> Tuple[str, str]:
    return f"({e.spec})", f"({e.py})"


def _bin(a: Ex, op: str, b: Ex, typ: str, py_op: Optional[str] = None) -> Ex:
    (sa, pa), (sb, pb) = _paren(a), _paren(b)
    return Ex(f"{sa} {op} {sb}", f"{pa} {py_op or op} {pb}", typ, a.has_float or b.has_float or typ == FLOAT)


def draw_int(d: Draw, depth: int = 0) -> Ex:
    rng = d.rng
    d.budget -= 1
    if depth >= 3 or d.budget <= 0 or rng.random() < 0.3:
        r = rng.random()
        if r < 0.55:
            v = rng.choice(("i", "j", "i", "j", "b", "h", "n_q", "n_k", "q_idx", "kv_idx") + tuple(d.loop_vars))
            py = {"q_idx": "i", "kv_idx": "j"}.get(v, v)
            return Ex(v, py, INT)
        if r < 0.75:
            p = d.param(INT)
            if p is not None:
                return Ex(p, p, INT)
        v = rng.choice((0, 1, 2, 3, 5, 7, 16, 41, 100, -1, -5, -64))
        return Ex(str(v), str(v), INT) if v >= 0 else Ex(f"({v})", f"({v})", INT)
    kind = rng.choice(("add", "sub", "mul", "floordiv", "mod", "floordiv", "mod", "neg", "abs", "minmax", "where",
                       "bitand", "bitor", "bitxor", "invert", "shift_const", "shift_var", "pow", "bool", "sum",
                       "negfloordiv"))
    a = draw_int(d, depth + 1)
    if kind in ("add", "sub", "mul"):
        b = draw_int(d, depth + 1)
        return _bin(a, {"add": "+", "sub": "-", "mul": "*"}[kind], b, INT)
    if kind in ("floordiv", "mod", "negfloordiv"):
        den = _divisor(d, depth + 1)
        op = "//" if kind != "mod" else "%"
        e = _bin(a, op, den, INT)
        return Ex(f"-({e.spec})", f"-({e.py})", INT) if kind == "negfloordiv" else e
    if kind == "neg":
        sa, pa = _paren(a)
        return Ex(f"-{sa}", f"-{pa}", INT)
    if kind == "abs":
        return Ex(f"abs({a.spec})", f"abs({a.py})", INT)
    if kind == "minmax":
        fn = rng.choice(("min", "max"))
        args = [a] + [draw_int(d, depth + 1) for _ in range(rng.choice((1, 1, 2)))]
        return Ex(f"{fn}({', '.join(x.spec for x in args)})", f"{fn}({', '.join(x.py for x in args)})", INT)
    if kind == "where":
        c = draw_bool(d, depth + 1)
        b = draw_int(d, depth + 1)
        return Ex(f"where({c.spec}, {a.spec}, {b.spec})", f"where({c.py}, {a.py}, {b.py})", INT, c.has_float)
    if kind in ("bitand", "bitor", "bitxor"):
        b = draw_int(d, depth + 1)
        return _bin(a, {"bitand": "&", "bitor": "|", "bitxor": "^"}[kind], b, INT)
    if kind == "invert":
        sa, pa = _paren(a)
        return Ex(f"~{sa}", f"~{pa}", INT)
    if kind == "shift_const":
        k = rng.randint(0, 6)
        return _bin(a, rng.choice(("<<", ">>")), Ex(str(k), str(k), INT), INT)
    if kind == "shift_var":  # a small amount of either sign: (j % 5) - 2
        amount = f"(j % 5 - 2)"
        sa, pa = _paren(a)
        if rng.random() < 0.5:
            return Ex(f"{sa} << {amount}", f"_shift({pa}, {amount})", INT)
        return Ex(f"{sa} >> {amount}", f"_shift({pa}, -{amount})", INT)
    if kind == "pow":
        k = rng.choice((0, 1, 2, 3))
        sa, pa = _paren(a)
        return Ex(f"{sa} ** {k}", f"{pa} ** {k}", INT)
    if kind == "bool":  # a boolean counts as 0 or 1
        return _bool_times(draw_bool(d, depth + 1), a, rng.choice((1, 2, -3)))
    # sum over a small range
    if len(d.loop_vars) >= 2:
        return a
    var = rng.choice([t for t in ("t", "u", "tt") if t not in d.loop_vars])
    count = rng.choice((0, 1, 3, 4))
    d.loop_vars.append(var)
    try:
        body = draw_int(d, depth + 1)
    finally:
        d.loop_vars.pop()
    return Ex(f"sum({body.spec} for {var} in range({count}))", f"sum({body.py} for {var} in range({count}))", INT,
              body.has_float)


def _bool_times(c: Ex, a: Ex, k: int) -> Ex:
    sc, pc = _paren(c)
    sa, pa = _paren(a)
    return Ex(f"{sc} * {k} + {sa}", f"{pc} * {k} + {pa}", INT, c.has_float or a.has_float)


def _divisor(d: Draw, depth: int) -> Ex:
    """A divisor that is never 0: a literal of either sign, an int param holding a non-zero value,
    or an expression that cannot be 0."""
    rng = d.rng
    r = rng.random()
    if r < 0.45:
        v = rng.choice(DIVISORS)
        return Ex(str(v), str(v), INT) if v > 0 else Ex(f"({v})", f"({v})", INT)
    if r < 0.65:
        free = [n for n in PARAM_NAMES if n not in d.params]
        if free:
            name = rng.choice(free)
            d.params[name] = rng.choice(DIVISORS)
            return Ex(name, name, INT)
    e = draw_int(d, depth + 1)
    return rng.choice((Ex(f"(abs({e.spec}) + 1)", f"(abs({e.py}) + 1)", INT, e.has_float),
                       Ex(f"max({e.spec}, 1)", f"max({e.py}, 1)", INT, e.has_float),
                       Ex(f"-(abs({e.spec}) + 2)", f"-(abs({e.py}) + 2)", INT, e.has_float)))


def draw_float(d: Draw, depth: int = 0) -> Ex:
    rng = d.rng
    d.budget -= 1
    if depth >= 3 or d.budget <= 0 or rng.random() < 0.3:
        r = rng.random()
        if r < 0.4:
            e = draw_int(d, depth + 1)  # an int where a float goes
            return Ex(e.spec, e.py, FLOAT, e.has_float)
        if r < 0.65:
            p = d.param(FLOAT)
            if p is not None:
                return Ex(p, p, FLOAT, True)
        v = rng.choice((0.5, 0.1, 0.25, 1.5, 2.0, 0.37, 1e-3, 3.0, -0.75, 0.3))
        text = repr(v)
        return Ex(text if v >= 0 else f"({text})", text if v >= 0 else f"({text})", FLOAT, True)
    kinds = ["add", "sub", "mul", "div", "where", "minmax", "abs", "neg", "floordiv", "mod", "pow2", "sqrt"]
    if not d.in_compare:
        kinds += ["tanh", "sin", "cos", "sigmoid", "erf", "log", "exp", "exp2", "log2", "powf"]
    kind = rng.choice(kinds)
    a = draw_float(d, depth + 1)
    sa, pa = _paren(a)
    if kind in ("add", "sub", "mul"):
        return _bin(a, {"add": "+", "sub": "-", "mul": "*"}[kind], draw_float(d, depth + 1), FLOAT)
    if kind == "div":  # a denominator that is never 0
        b = draw_float(d, depth + 1)
        return Ex(f"{sa} / (abs({b.spec}) + 0.5)", f"{pa} / (abs({b.py}) + 0.5)", FLOAT, True)
    if kind in ("floordiv", "mod"):
        b = rng.choice(("1.3", "0.7", "(-2.5)", "3"))
        return Ex(f"{sa} {'//' if kind == 'floordiv' else '%'} {b}", f"{pa} {'//' if kind == 'floordiv' else '%'} {b}",
                  FLOAT, True)
    if kind == "where":
        c = draw_bool(d, depth + 1)
        b = draw_float(d, depth + 1)
        return Ex(f"where({c.spec}, {a.spec}, {b.spec})", f"where({c.py}, {a.py}, {b.py})", FLOAT, True)
    if kind == "minmax":
        fn = rng.choice(("min", "max"))
        b = draw_float(d, depth + 1)
        return Ex(f"{fn}({a.spec}, {b.spec})", f"{fn}({a.py}, {b.py})", FLOAT, True)
    if kind == "abs":
        return Ex(f"abs({a.spec})", f"abs({a.py})", FLOAT, True)
    if kind == "neg":
        return Ex(f"-{sa}", f"-{pa}", FLOAT, True)
    if kind == "pow2":
        return Ex(f"{sa} ** 2", f"{pa} ** 2", FLOAT, True)
    if kind == "sqrt":
        return Ex(f"sqrt(abs({a.spec}))", f"sqrt(abs({a.py}))", FLOAT, True)
    if kind == "log":
        return Ex(f"log(abs({a.spec}) + 1)", f"log(abs({a.py}) + 1)", FLOAT, True)
    if kind == "log2":
        return Ex(f"log2(abs({a.spec}) + 0.5)", f"log2(abs({a.py}) + 0.5)", FLOAT, True)
    if kind in ("exp", "exp2"):  # bounded arguments: no overflow
        return Ex(f"{kind}(tanh({a.spec}))", f"{kind}(tanh({a.py}))", FLOAT, True)
    if kind == "powf":
        return Ex(f"(abs({a.spec}) + 1) ** 0.5", f"(abs({a.py}) + 1) ** 0.5", FLOAT, True)
    return Ex(f"{kind}({a.spec})", f"{kind}({a.py})", FLOAT, True)


def draw_bool(d: Draw, depth: int = 0) -> Ex:
    rng = d.rng
    d.budget -= 1
    if depth >= 3 or d.budget <= 0 or rng.random() < 0.15:
        return rng.choice((Ex("causal", "(j <= i)", BOOL), Ex("True", "True", BOOL), Ex("False", "False", BOOL),
                           Ex("j <= i", "j <= i", BOOL)))
    kinds = ("cmp", "cmp", "cmp", "cmp", "chain", "and", "or", "not", "bitand", "bitor", "xor", "invert",
             "booleq", "where", "anyall", "fcmp", "boolcmp")
    kind = rng.choice(kinds if d.floats else tuple(k for k in kinds if k != "fcmp"))  # a seed draws as it did
    if kind in ("cmp", "fcmp"):
        d.in_compare += 1
        try:
            gen = draw_float if kind == "fcmp" else draw_int
            a, b = gen(d, depth + 1), gen(d, depth + 1)
        finally:
            d.in_compare -= 1
        return _bin(a, rng.choice(("<", "<=", ">", ">=", "==", "!=")), b, BOOL)
    if kind == "chain":
        d.in_compare += 1
        try:
            a, b, c = (draw_int(d, depth + 1) for _ in range(3))
        finally:
            d.in_compare -= 1
        o1, o2 = rng.choice(("<", "<=", "==", ">")), rng.choice(("<", "<=", "!=", ">="))
        text = f"{_paren(a)[0]} {o1} {_paren(b)[0]} {o2} {_paren(c)[0]}"
        return Ex(text, f"{_paren(a)[1]} {o1} {_paren(b)[1]} {o2} {_paren(c)[1]}", BOOL, a.has_float or b.has_float or c.has_float)
    if kind == "boolcmp":  # booleans ordered as 0 or 1
        a, b = draw_bool(d, depth + 1), draw_bool(d, depth + 1)
        return _bin(a, rng.choice(("<", ">=")), b, BOOL)
    a = draw_bool(d, depth + 1)
    if kind == "not":
        return Ex(f"not {_paren(a)[0]}", f"not {_paren(a)[1]}", BOOL, a.has_float)
    if kind == "invert":
        return Ex(f"~{_paren(a)[0]}", f"(not {_paren(a)[1]})", BOOL, a.has_float)
    if kind == "where":
        b, c = draw_bool(d, depth + 1), draw_bool(d, depth + 1)
        return Ex(f"where({a.spec}, {b.spec}, {c.spec})", f"where({a.py}, {b.py}, {c.py})", BOOL,
                  a.has_float or b.has_float or c.has_float)
    if kind == "anyall":
        if len(d.loop_vars) >= 2:
            return a
        var = rng.choice([t for t in ("t", "u", "tt") if t not in d.loop_vars])
        d.loop_vars.append(var)
        try:
            body = draw_bool(d, depth + 1)
        finally:
            d.loop_vars.pop()
        fn, count = rng.choice(("any", "all")), rng.choice((0, 2, 3))
        return Ex(f"{fn}({body.spec} for {var} in range({count}))", f"{fn}({body.py} for {var} in range({count}))",
                  BOOL, body.has_float)
    b = draw_bool(d, depth + 1)
    op = {"and": "and", "or": "or", "bitand": "&", "bitor": "|", "xor": "^", "booleq": rng.choice(("==", "!="))}[kind]
    return _bin(a, op, b, BOOL)


# ---------------------------------------------------------------------------------------------
# a spec and a call
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    seed: int
    mask: Optional[Ex]
    bias: Optional[Ex]
    mod: Optional[str]  # in s; no Python twin (the kernels are compared with the reference)
    params: Tuple[Tuple[str, object], ...]
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

    @property
    def text(self) -> str:
        lines = ["head_dim = 16", 'dtypes = ["float32"]']
        if self.params:
            lines.append("[params]")
            lines += [f"{k} = {v!r}" for k, v in self.params]
        if self.mask is not None:
            lines += ["[mask]", f"where = {_toml_str(self.mask.spec)}"]
        score = []
        if self.bias is not None:
            score.append(f"bias = {_toml_str(self.bias.spec)}")
        if self.mod is not None:
            score.append(f"mod = {_toml_str(self.mod)}")
        if score:
            lines += ["[score]"] + score
        return "\n".join(lines) + "\n"

    def describe(self) -> str:
        return (f"B={self.B} Hq={self.Hq} Hkv={self.Hkv} Nq={self.Nq} Nk={self.Nk} q_offset={self.q_offset} "
                f"k_offset={self.k_offset} n_q={self.n_q} n_k={self.n_k} tile={self.tile[0]}x{self.tile[1]}"
                f"{' backward' if self.backward else ''}")


def _mod(d: Draw) -> str:
    rng = d.rng
    t = rng.choice(("s", "s * 0.5", "tanh(s) * 3.0", "s + {f}", "max(s, {f})", "s * where({c}, 1.5, -0.5)",
                    "where(s > {f}, s, s * 0.25)", "-abs(s - {f})", "s - ({i}) % 3", "sigmoid(s) * ({f})"))
    fill = lambda tt: tt.replace("{f}", draw_float(d, 2).spec).replace("{c}", draw_bool(d, 2).spec)  # noqa: E731
    t = fill(t).replace("{i}", draw_int(d, 2).spec)
    r = rng.random()
    if r < 0.35:
        return t
    c = draw_bool(d, 1).spec
    if r < 0.7:
        return f"where({c}, {t}, -inf)"
    if r < 0.85:
        return f"where({c}, -inf, {t})"
    return f"where({c}, where(s > {rng.choice(('-0.5', '0.0', '0.3'))}, {t}, -inf), -inf)"


def draw_case(seed: int, backward: Optional[bool] = None, kernels: bool = True) -> Case:
    rng = random.Random(seed)
    d = Draw(rng)
    mask = draw_bool(d) if rng.random() < 0.9 else None
    d.budget = 25
    bias = (draw_float(d) if rng.random() < 0.6 else draw_int(d)) if rng.random() < 0.4 else None
    d.budget = 15
    mod = _mod(d) if rng.random() < 0.3 else None
    if bias is not None and bias.typ == INT:
        bias = Ex(f"0.01 * ({bias.spec})", f"0.01 * ({bias.py})", FLOAT, True)  # integers of any size: keep scores small
    elif bias is not None:
        bias = Ex(f"tanh({bias.spec})", f"math.tanh({bias.py})", FLOAT, True)
    hq = rng.choice((1, 2, 3))
    hkv = rng.choice([x for x in (1, 2, 3) if hq % x == 0])
    nq, nk = rng.randint(1, 60), rng.randint(1, 60)
    q_offset = rng.choice((0, 0, rng.randint(1, 40)))
    k_offset = rng.choice((0, 0, rng.randint(1, 40)))
    n_q = q_offset + nq + rng.randint(0, 20) if rng.random() < 0.2 else None
    n_k = k_offset + nk + rng.randint(0, 20) if rng.random() < 0.2 else None
    tile = (rng.choice((16, 32)), rng.choice((16, 32)))
    backward = rng.random() < 0.3 if backward is None else backward
    return Case(seed, mask, bias, mod, tuple(d.params.items()), nq, nk, q_offset, k_offset, n_q, n_k,
                rng.choice((1, 2)), hq, hkv, tile, backward)


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    seed: int
    stage: str  # "parse", "twin", "tiles", "build", "kernel"
    detail: str
    case: Case

    def __str__(self) -> str:
        return (f"seed {self.seed}: {self.stage}: {self.detail}\n  call: {self.case.describe()}\n"
                + "".join(f"  | {line}\n" for line in self.case.text.splitlines()))


def python_grid(case: Case, e: Ex, b: int, h: int) -> List[List[object]]:
    """``e`` evaluated by Python on every pair of the call (batch row b, head h)."""
    n_q = case.n_q if case.n_q is not None else case.q_offset + case.Nq
    n_k = case.n_k if case.n_k is not None else case.k_offset + case.Nk
    code = compile(e.py, "<twin>", "eval")
    params = {k: I64.of(v) if isinstance(v, int) else v for k, v in case.params}
    env = dict(PY_NAMESPACE, math=math, b=I64(b), h=I64(h), n_q=I64(n_q), n_k=I64(n_k), **params)
    out = []
    for r in range(case.Nq):
        row = []
        for c in range(case.Nk):
            env["i"], env["j"] = I64(case.q_offset + r), I64(case.k_offset + c)
            row.append(eval(code, env))  # noqa: S307 - our own generated text
        out.append(row)
    return out


def _positions(case: Case) -> dict:
    return dict(q_offset=case.q_offset, k_offset=case.k_offset, n_q=case.n_q, n_k=case.n_k)


def check_twin(case: Case, pattern) -> Optional[str]:
    """The reference's mask and bias against Python, on every pair of batch row 1 / head 2 (or 0)."""
    b, h = case.B - 1, case.Hq - 1
    if case.mask is not None and case.mod is None:  # a mod's where(c, e, -inf) joins the mask
        got = pair_mask(pattern, q_rows=case.Nq, k_rows=case.Nk, batch=case.B, heads=case.Hq, **_positions(case))[b, h]
        want = torch.tensor([[bool(x) for x in row] for row in python_grid(case, case.mask, b, h)], dtype=torch.bool)
        if not torch.equal(got, want):
            bad = (got != want).nonzero()[0].tolist()
            return (f"mask differs from Python at {int((got != want).sum())} pairs, first (row {bad[0]}, col {bad[1]}): "
                    f"reference {bool(got[bad[0], bad[1]])}, Python {bool(want[bad[0], bad[1]])}")
    if case.bias is not None:
        env = index_env(pattern, batch=case.B, heads=case.Hq, q_rows=case.Nq, k_rows=case.Nk, **_positions(case))
        got = evaluate(pattern.bias, env).double().expand(case.B, case.Hq, case.Nq, case.Nk)[b, h]
        want = torch.tensor(python_grid(case, case.bias, b, h), dtype=torch.float64)
        close = torch.isclose(got, want, rtol=1e-12, atol=1e-12) | (torch.isnan(got) & torch.isnan(want))
        if not close.all():
            bad = (~close).nonzero()[0].tolist()
            return (f"bias differs from Python at {int((~close).sum())} pairs, first (row {bad[0]}, col {bad[1]}): "
                    f"reference {float(got[bad[0], bad[1]])!r}, Python {float(want[bad[0], bad[1]])!r}")
    return None


def check_tiles(case: Case, pattern, exact: bool = True) -> Optional[str]:
    """The Plan's walks against brute force at the case's tile shape (batch row and head of the twin);
    ``exact``: also no PARTIAL tile that brute force finds EMPTY or FULL (masks without floats)."""
    from attncc.analysis import analyze
    from attncc.analysis.graph import walk_grid
    from attncc.core import tiles
    from tile_oracle import tile_classes

    if pattern.mask is None:
        return None
    plan = analyze(pattern)
    b, h = case.B - 1, case.Hq - 1
    truth = pair_mask(pattern, q_rows=case.Nq, k_rows=case.Nk, batch=case.B, heads=case.Hq, **_positions(case))[b, h]
    want = dict(zip(("forward", "dkdv"), tile_classes(truth, *case.tile)))
    want["dq"] = want["forward"]
    has_float = (case.mask is not None and case.mask.has_float) or (case.mod is not None and "." in case.mod)
    for walk in ("forward", "dq", "dkdv"):
        got = walk_grid(plan, walk, q_rows=case.Nq, k_rows=case.Nk, block_m=case.tile[0], block_n=case.tile[1],
                        b=b, h=h, **_positions(case))
        w = want[walk]
        unsound = ((got == tiles.EMPTY) & (w != tiles.EMPTY)) | ((got == tiles.FULL) & (w != tiles.FULL))
        if unsound.any():
            return f"{walk}: {int(unsound.sum())} tiles skipped or run unmasked wrongly"
        if exact and not has_float and not torch.equal(got, w):
            return f"{walk}: {int((got != w).sum())} tiles inexact (PARTIAL where brute force says EMPTY or FULL)"
    return None


def check_kernels(case: Case) -> Optional[str]:
    built = build_spec(case.text)
    if isinstance(built, Exception):
        return f"build: {type(built).__name__}: {str(built)[:300]}"
    pattern, mod = built
    gen = torch.Generator().manual_seed(case.seed)
    q = torch.randn(case.B, case.Hq, case.Nq, 16, generator=gen, requires_grad=case.backward)
    k = torch.randn(case.B, case.Hkv, case.Nk, 16, generator=gen, requires_grad=case.backward)
    v = torch.randn(case.B, case.Hkv, case.Nk, 16, generator=gen, requires_grad=case.backward)
    pos = _positions(case)
    tiles = (case.tile, (case.tile[1], case.tile[0]), case.tile)
    try:
        with _tile_config(tiles):
            o, lse = mod.attention(q, k, v, return_lse=True, **pos)
    except Exception as e:  # noqa: BLE001
        return f"kernel raised {type(e).__name__}: {str(e)[:300]}"
    qd, kd, vd = (x.detach().double().requires_grad_(case.backward) for x in (q, k, v))
    ref, ref_lse = attncc.reference(pattern, qd, kd, vd, return_lse=True, **pos)
    if not torch.isfinite(ref).all():
        return None  # a non-finite reference (a huge param): nothing exact to compare
    err = _rel(o, ref)
    if err > 1e-4 or torch.isnan(o).any():
        return f"o: relative error {err:.3g}"
    fin = torch.isfinite(ref_lse)
    # relative past 100: a score of magnitude 1e5 (sigmoid(s) * a huge param) is only that precise in
    # float32, and so is its LSE (seeds 100246, 100643)
    diff = (lse.detach()[fin].double() - ref_lse.detach()[fin]).abs() / ref_lse.detach()[fin].abs().clamp_min(100.0)
    lse_err = float(diff.max()) if fin.any() else 0.0
    if not torch.equal(fin, torch.isfinite(lse)) or lse_err > 1e-5:
        return f"lse differs (finite pattern, or error {lse_err:.3g})"
    if case.backward:
        g = torch.randn(o.shape, generator=gen, dtype=torch.float64)
        try:
            with _tile_config(tiles):
                o.backward(g.float())
        except Exception as e:  # noqa: BLE001
            return f"backward raised {type(e).__name__}: {str(e)[:300]}"
        ref.backward(g)
        for name, x, xd in (("dq", q, qd), ("dk", k, kd), ("dv", v, vd)):
            # a reference that never reads q or k (mod = "s * 0") leaves their .grad None: zero
            err = _rel(x.grad, torch.zeros_like(xd) if xd.grad is None else xd.grad)
            if err > 1e-3:
                return f"{name}: relative error {err:.3g}"
    return None


def check_seed(seed: int, kernels: bool = True, backward: Optional[bool] = None, exact: bool = True) -> Optional[Finding]:
    case = draw_case(seed, backward)
    try:
        pattern = parse_spec(case.text, f"probe{seed}.toml")
    except SpecError as e:
        if "divisor" in str(e) or "allows no pair" in str(e):
            return None  # a refusal the contract documents (a divisor it cannot prove non-zero)
        return Finding(seed, "parse", f"SpecError: {e}", case)
    except Exception as e:  # noqa: BLE001
        return Finding(seed, "parse", f"{type(e).__name__}: {e}", case)
    stages = [("twin", check_twin)] + ([("kernel", lambda c, p: check_kernels(c))] if kernels else [])
    for stage, fn in stages + [("tiles", lambda c, p: check_tiles(c, p, exact))]:
        try:
            bad = fn(case, pattern)
        except Exception as e:  # noqa: BLE001 - a crash of a stage is a finding
            bad = f"raised {type(e).__name__}: {str(e)[:300]}"
        if bad:
            return Finding(seed, stage, bad, case)
    return None


def main(argv=None) -> int:
    return drawn_spec_main(argv, draw_case, check_seed, __doc__.split("\n\n")[0])

if __name__ == "__main__":
    sys.exit(main())
