"""Probe 29: an adversarial differential probe of the spec language and the call API.

Each seed draws one spec and one call, built to meet the corners the other generators leave alone
at once: integer params (under look-alike and colliding names: ``w``, ``W``, ``w_``, ``_w``,
sympy's and Triton's and the kernels' own names, builtins) used as divisors of either sign and
in ``//``, ``%``, shifts and bitwise operators beside ``b``, ``h``, ``n_q``, ``n_k``, literals and
int input reads (out of range too); param values at 0, -1, near 2**31, 2**40 and 2**62 (in the
spec and overridden per call, in Python, numpy and tensor forms); float literals of unusual forms
(``1e-30``, ``1e30``, ``-0.0``, ``0.1 + 0.2``, ``5e-324``) and float params; nested ``where`` /
``min`` / ``max`` / ``abs`` chains and booleans as numbers; offsets from 0 to past 2**32; and
score biases and transforms of the same pieces with conditions on the score. Calls have odd
lengths (1..70), B and H above 1, GQA, non-contiguous q, k, v and inputs.

For each seed, :func:`check_seed`:

1. parses the spec: a :class:`SpecError` is a refusal (counted by reason); any other exception
   is a finding, and so is a refusal of a spec :func:`draw` marks as one the contract allows
   (``must_build``), or an accepted spec it marks as one the contract forbids (``must_refuse``);
2. compares ``attncc.reference``'s mask with Python evaluating the same text per pair (the
   documented differences mapped as in tests/probe_spec23.py; input reads outside the table read
   0), unless a value leaves int64 (the spec's to avoid);
3. builds the module and calls it and the reference: both refuse alike, or o and the LSE (and dq,
   dk, dv for backward seeds) agree in float32 under the interpreter.

    python tests/probe_spec29.py --seeds 0-99            # print the failures
    python tests/probe_spec29.py --seeds 17 --verbose    # one case: spec, call, result
"""
from __future__ import annotations

import argparse
import math
import random
import re
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import script_env  # noqa: E402,F401  (the interpreter, this checkout on the path: before the imports below)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import attncc  # noqa: E402
from attncc._reference import pair_mask  # noqa: E402
from attncc.spec import SpecError, parse_spec  # noqa: E402
from fuzz_specs import build_spec  # noqa: E402
from probe_sem19 import _plain  # noqa: E402
from probe_spec23 import C64, NAMESPACE, Skip, oracle_code  # noqa: E402

# ---------------------------------------------------------------------------------------------
# names: what a spec may call its params and inputs, chosen to collide with what is around them
# ---------------------------------------------------------------------------------------------

NAME_POOL = (
    "w", "W", "w_", "_w", "W_", "w0", "ww", "x", "X", "y", "t", "z",
    # the kernels' and generated modules' own names and prefixes
    "acc", "m_i", "l_i", "offs_m", "offs_n", "pid", "qk", "lse", "o", "B", "H", "N", "D", "Nq", "Nk",
    "grid", "SPEC", "_rt", "call", "prm_w", "ptr_x", "stride0_x", "size0_x", "gptr_x", "t_x", "dot0",
    "row0", "col0", "live", "qk_scale", "kb", "start_n", "MASKED", "HEAD_DIM", "inputs_and_params",
    # Python, Triton, torch and sympy names
    "tl", "triton", "torch", "math", "np", "int", "float", "len", "self", "print", "type", "match", "_",
    "I", "E", "pi", "oo", "nan", "zoo", "S", "Q", "O", "floor", "ceiling", "Mod", "Max", "Min", "Piecewise",
    "sign", "gamma", "Abs", "re", "Eq", "And", "Or", "Not", "true", "false", "Symbol", "Integer", "Float",
    "Rational", "Dummy", "NaN", "Inf", "infinity", "i_", "j_", "n_q_", "q_idx_", "n_k2", "hk", "K", "V",
)
# the oracle's own helpers (probe_spec23.NAMESPACE) and the names the language refuses stay out
_AVOID = set(NAMESPACE) | {"i", "j", "b", "h", "s", "n_q", "n_k", "q_idx", "kv_idx", "score", "inf", "causal",
                          "alibi", "n_heads", "k_offset"}


def _names(rng: random.Random, count: int) -> List[str]:
    """``count`` distinct names, often variants of one another (case, underscores)."""
    out: List[str] = []
    while len(out) < count:
        if out and rng.random() < 0.35:
            base = rng.choice(out)
            cand = rng.choice([base.upper(), base.lower(), base + "_", "_" + base, base + "2", base.swapcase()])
        else:
            cand = rng.choice(NAME_POOL)
        if cand.isidentifier() and cand not in out and cand not in _AVOID and not cand.startswith("__"):
            out.append(cand)
    return out


# ---------------------------------------------------------------------------------------------
# the draw
# ---------------------------------------------------------------------------------------------

INT_VALUES = (0, 1, 2, 3, 5, 7, 13, -1, -2, -3, -7, 64, 1000, 2**31 - 1, -2**31, 2**31, 2**40 + 3, 2**62 - 1)
DIVISOR_VALUES = (1, 2, 3, 5, 7, 13, 41, -1, -2, -3, -5, -13, 2**31 - 1, -2**31, 2**40 + 1)
FLOAT_VALUES = (0.5, -0.25, 0.1, 1e-30, -1e-30, 1e30, 2.5, 0.0, -0.0, 1.0 / 3.0, 3.0e38, -7.0)
INT_LITERALS = ("0", "1", "2", "3", "5", "7", "13", "64", "1000", "0x1F", "0o17", "0b101", "1_000", "2**31",
                "2**31 - 1", "2**40")
FLOAT_LITERALS = ("0.5", "1e-30", "1e30", "-0.0", "0.0", "0.1", "(0.1 + 0.2)", "0.3", "2.5e-3", "1.0", "5e-324",
                  "1e-300", "1e300", ".25", "7.", "1E2")
INPUT_DTYPES = ("int32", "int64", "int16", "uint8", "int8", "int32", "bool", "float32", "float16", "bfloat16",
                "float64")


@dataclass
class Table:
    name: str
    dims: Tuple  # of "b", "h", "n" or an int
    dtype: str

    @property
    def kind(self) -> str:
        return "bool" if self.dtype == "bool" else "float" if "float" in self.dtype else "int"


@dataclass
class Case:
    seed: int
    text: str = ""
    mask: Optional[str] = None
    bias: Optional[str] = None
    mod: Optional[str] = None
    softcap: Optional[float] = None
    params: Dict[str, object] = field(default_factory=dict)
    tables: List[Table] = field(default_factory=list)
    # the call
    B: int = 1
    Hkv: int = 1
    group: int = 1
    Nq: int = 1
    Nk: int = 1
    D: int = 8
    q_offset: int = 0
    k_offset: int = 0
    n_q: Optional[int] = None
    n_k: Optional[int] = None
    overrides: Dict[str, object] = field(default_factory=dict)
    layout: str = "contiguous"
    backward: bool = False
    must: str = ""  # "build" (the contract allows it), "refuse" (it forbids it), "" (either may be right)

    def describe(self) -> str:
        return (f"seed {self.seed}: B={self.B} Hq={self.Hkv * self.group} Hkv={self.Hkv} Nq={self.Nq} Nk={self.Nk} "
                f"D={self.D} q_offset={self.q_offset} k_offset={self.k_offset} n_q={self.n_q} n_k={self.n_k} "
                f"layout={self.layout} overrides={self.overrides} backward={self.backward}")


class Gen:
    """Typed expressions, fully parenthesized, over the case's params and tables."""

    def __init__(self, rng: random.Random, case: Case, ints: List[str], divisors: List[str], floats: List[str],
                 counts: List[str]):
        self.rng, self.case = rng, case
        self.ints, self.divisors, self.floats, self.counts = ints, divisors, floats, counts
        self.loop: List[str] = []  # the loop variables in scope
        self.reductions = 0

    def tables(self, kind: str):
        return [t for t in self.case.tables if t.kind == kind]

    def reduction(self, depth: int, typ: str) -> str:
        """sum / any / all over range(K), K a literal or a count param, the loop variable in the term."""
        r = self.rng
        taken = set(self.case.params) | {t.name for t in self.case.tables} | set(self.loop)
        var = next(v for v in ("t", "u", "tt", "m", "r_", "k2") if v not in taken)
        count = r.choice(self.counts) if self.counts and r.random() < 0.6 else str(r.choice([0, 1, 2, 3, 5]))
        self.reductions += 1
        self.loop.append(var)
        try:
            if typ == "bool":
                fn = r.choice(["any", "all"])
                return f"{fn}({self.bool_expr(depth + 1)} for {var} in range({count}))"
            return f"sum({self.int_expr(depth + 1)} for {var} in range({count}))"
        finally:
            self.loop.pop()

    # -- ints ---------------------------------------------------------------------------------
    def int_leaf(self) -> str:
        r = self.rng
        c = r.random()
        if c < 0.35:
            if self.loop and r.random() < 0.5:
                return self.loop[-1]
            return r.choice(["i", "j", "i", "j", "b", "h", "n_q", "n_k", "q_idx", "kv_idx"])
        if c < 0.55 and self.ints:
            return r.choice(self.ints)
        if c < 0.7 and self.tables("int"):
            return self.read(self.tables("int"))
        if c < 0.8:
            return f"({r.choice(['i', 'j'])} {r.choice(['<', '<=', '>', '!='])} {r.choice(['i', 'j', 'h', '3'])})"
        lit = r.choice(INT_LITERALS)
        return f"({lit})" if not lit.isalnum() else lit

    def read(self, tables) -> str:
        t = self.rng.choice(tables)
        if not t.dims:
            return t.name
        idx = []
        for d in t.dims:
            if d == "b":
                idx.append(self.rng.choice(["b", "b", "b + 1", "h"]))
            elif d == "h":
                idx.append(self.rng.choice(["h", "h", "h // 2", "h - 1"]))
            elif d == "n":
                idx.append(self.rng.choice(["i", "j", "j", "i - j", "j - 3", "(i + j) // 2", "n_k - 1 - j"]))
            else:
                idx.append(self.rng.choice([f"j % {d}", f"(i - j) % {d}", "h", f"{d}", "i // 7"]
                                           + [f"{v} % {d}" for v in self.loop]))
        return f"{t.name}[{', '.join(idx)}]"

    def divisor(self, depth: int) -> str:
        r = self.rng
        c = r.random()
        if c < 0.4 and self.divisors:
            return r.choice(self.divisors)
        if c < 0.6:
            return r.choice(["1", "2", "3", "5", "7", "13", "(-1)", "(-3)", "(-7)", "64", "(2**31 - 1)"])
        if c < 0.7:
            return r.choice(["n_k", "n_q", "(h + 1)", "(b + 1)", "(n_k + 2)", "(-n_q)"])
        e = self.int_expr(depth + 1)
        return r.choice([f"(abs({e}) + 1)", f"max({e}, 1)", f"min({e}, -1)", f"where({e} > 0, {e}, -3)",
                         f"(1 << {r.randint(0, 5)})"])

    def int_expr(self, depth: int = 0) -> str:
        r = self.rng
        if depth >= 3 or r.random() < 0.3:
            return self.int_leaf()
        a = self.int_expr(depth + 1)
        c = r.random()
        if c < 0.25:
            return f"({a} {r.choice(['+', '-', '+', '-', '*'])} {self.int_expr(depth + 1)})"
        if c < 0.45:
            return f"({a} {r.choice(['//', '%'])} {self.divisor(depth)})"
        if c < 0.55:
            op = r.choice(["&", "|", "^"])
            return f"({a} {op} {self.int_expr(depth + 1)})"
        if c < 0.6:
            return f"({a} {r.choice(['<<', '>>'])} {r.randint(0, 6)})"
        if c < 0.63:
            return f"(~{a})"
        if c < 0.66:
            return f"(-{a})"
        if c < 0.72:
            return f"abs({a})"
        if c < 0.84:
            fn = r.choice(["min", "max"])
            args = [a] + [self.int_expr(depth + 1) for _ in range(r.choice([1, 1, 2]))]
            return f"{fn}({', '.join(args)})"
        if c < 0.92:
            return f"where({self.bool_expr(depth + 1)}, {a}, {self.int_expr(depth + 1)})"
        if c < 0.96 and self.reductions < 2:
            return self.reduction(depth, "int")
        return f"({a} ** 2)"

    # -- floats -------------------------------------------------------------------------------
    def float_expr(self, depth: int = 0) -> str:
        r = self.rng
        c = r.random()
        if depth >= 2 or c < 0.25:
            if self.tables("float") and r.random() < 0.3:
                return self.read(self.tables("float"))
            if self.floats and r.random() < 0.5:
                return r.choice(self.floats)
            return r.choice(FLOAT_LITERALS)
        if c < 0.45:
            return f"({self.int_expr(depth + 1)} * {r.choice(FLOAT_LITERALS + tuple(self.floats))})"
        if c < 0.55:
            return f"({self.int_expr(depth + 1)} / {r.choice(['7', '3', '2.5', '(-0.5)', '1e-30', '1e30'])})"
        if c < 0.7:
            return f"({self.float_expr(depth + 1)} {r.choice(['+', '-', '*'])} {self.float_expr(depth + 1)})"
        if c < 0.78:
            return f"({self.float_expr(depth + 1)} {r.choice(['//', '%'])} {r.choice(['0.3', '(-0.7)', '2.5', '1.1'])})"
        if c < 0.86:
            return f"{r.choice(['min', 'max'])}({self.float_expr(depth + 1)}, {self.int_expr(depth + 1)})"
        if c < 0.92:
            return f"sqrt(abs({self.float_expr(depth + 1)}))"
        return f"where({self.bool_expr(depth + 1)}, {self.float_expr(depth + 1)}, {self.int_expr(depth + 1)})"

    # -- booleans -----------------------------------------------------------------------------
    def pos(self, depth: int) -> str:
        """A position-like int: i, j, their difference, or a drawn expression."""
        r = self.rng
        return r.choice(["i", "j", "(i - j)", "(j - i)", "(i + j)", self.int_expr(depth + 1), self.int_expr(depth + 1)])

    def skeleton(self, depth: int) -> str:
        """The shapes real masks have, with drawn parts: blocks, residues, bands, clamps."""
        r = self.rng
        d, w = self.divisor(depth + 1), self.int_expr(depth + 1)
        a, b = self.pos(depth), self.pos(depth)
        lo, hi = self.int_expr(depth + 1), self.int_expr(depth + 1)
        return r.choice([
            f"({a} // {d} == {b} // {d})", f"({a} % {d} == {b} % {d})", f"({a} // {d} <= {b} // {d})",
            f"(abs({a} - {b}) <= {w})", f"(0 <= {a} - {b} < {w})", f"(min(max({a}, {lo}), {hi}) == {b})",
            f"(max(min({a}, {hi}), {lo}) >= {b} - {w})", f"(({a} ^ {b}) & {d} == 0)", f"({a} % {d} != {w})",
            f"(where({a} > {b}, {a} - {b}, {b} - {a}) % {d} <= {w})", f"(-{a} // {d} == -({b} // {d}))",
            f"({a} >> {r.randint(0, 4)} == {b} >> {r.randint(0, 4)})", f"({a} * 0.37 < {b} * {r.choice(FLOAT_LITERALS)})",
        ])

    def cmp(self, depth: int) -> str:
        r = self.rng
        ops = ["<", "<=", ">", ">=", "==", "!="]
        if r.random() < 0.45:
            return self.skeleton(depth)
        if r.random() < 0.2:
            return f"({self.float_expr(depth + 1)} {r.choice(ops)} {self.int_expr(depth + 1)})"
        if r.random() < 0.15:
            return (f"({self.int_expr(depth + 1)} {r.choice(['<', '<='])} {self.int_expr(depth + 1)} "
                    f"{r.choice(['<', '<='])} {self.int_expr(depth + 1)})")
        return f"({self.int_expr(depth + 1)} {r.choice(ops)} {self.int_expr(depth + 1)})"

    def bool_expr(self, depth: int = 0) -> str:
        r = self.rng
        if depth >= 2 or r.random() < 0.35:
            c = r.random()
            if c < 0.08:
                return r.choice(["causal", "True", "False"])
            if c < 0.18 and self.tables("bool"):
                return self.read(self.tables("bool"))
            if c < 0.26 and self.reductions < 2:
                return self.reduction(depth, "bool")
            return self.cmp(depth)
        a, b = self.bool_expr(depth + 1), self.bool_expr(depth + 1)
        c = r.random()
        if c < 0.35:
            return f"({a} and {b})"
        if c < 0.65:
            return f"({a} or {b})"
        if c < 0.75:
            return f"(not {a})"
        if c < 0.85:
            return f"(({a}) {r.choice(['^', '==', '!=', '&', '|'])} ({b}))"
        return f"(~({a}))"

    # -- scores -------------------------------------------------------------------------------
    def bias(self) -> str:
        r = self.rng
        c = r.random()
        if c < 0.4:
            return f"where({self.bool_expr(1)}, {r.choice(['0.5', '-0.75', '1', '-2'])}, {r.choice(['0', '0.25', '-1.5'])})"
        if c < 0.7:
            return f"tanh(0.1 * ({self.int_expr(1)}))"
        return f"0.5 * tanh({self.float_expr(1)})"

    def mod(self) -> str:
        r = self.rng
        cond = self.bool_expr(1)
        scond = f"(s {r.choice(['<', '>', '<=', '>='])} {r.choice(['0', '0.25', '-0.5', '0.01 * i', '0.1 * h'])})"
        c = r.random()
        if c < 0.25:
            return f"where({cond}, s, -inf)"
        if c < 0.4:
            return f"where({cond} {r.choice(['and', 'or'])} {scond}, s, -inf)"
        if c < 0.5:
            return f"where({cond}, -inf, s)"
        if c < 0.65:
            factor = r.choice(['0.5', '-1', '2', '1e-30'] + self.floats + [self.read(t) for t in [self.tables("float")] if t])
            return f"where({cond}, s, s * {factor})"
        if c < 0.75:
            return f"s + where({cond}, {r.choice(['1', '-0.5', '0.0'])}, {r.choice(['0', '-1e30', '2'])})"
        if c < 0.85:
            return f"{r.choice(['max', 'min'])}(s, {r.choice(['-1', '0.5', 'where(' + cond + ', -0.5, 0.5)'])})"
        return f"where({scond}, s, {r.choice(['-inf', 's - 1', '0'])})"


def _toml(v) -> str:
    if isinstance(v, float):
        if v == 0.0 and math.copysign(1.0, v) < 0:
            return "-0.0"
        return repr(v)
    return str(v)


def draw(seed: int) -> Case:
    rng = random.Random(seed * 7919 + 29)
    case = Case(seed)
    n_params, n_tables = rng.choice([0, 1, 2, 2, 3]), rng.choice([0, 0, 1, 1, 2])
    names = _names(rng, n_params + n_tables)
    ints, divisors, floats, counts = [], [], [], []
    for nm in names[:n_params]:
        kind = rng.random()
        if kind < 0.12:
            case.params[nm] = rng.choice([1, 2, 3, 4, 6])
            counts.append(nm)
        elif kind < 0.4:
            case.params[nm] = rng.choice(DIVISOR_VALUES)
            divisors.append(nm)
        elif kind < 0.75:
            case.params[nm] = rng.choice(INT_VALUES)
            ints.append(nm)
        else:
            case.params[nm] = rng.choice(FLOAT_VALUES)
            floats.append(nm)
    ints += divisors + counts
    for nm in names[n_params:]:
        dims = rng.choice([("b", "n"), ("n",), ("h", 8), ("b", "h", "n"), ("n", "b"), (5,), ("h",), ()])
        case.tables.append(Table(nm, dims, rng.choice(INPUT_DTYPES)))
    gen = Gen(rng, case, ints, divisors, floats, counts)
    what = rng.random()
    if what < 0.6 or not (what < 0.8):
        case.mask = gen.bool_expr()
    if what >= 0.5:
        if rng.random() < 0.6:
            case.bias = gen.bias()
        if rng.random() < 0.6:
            case.mod = gen.mod()
        if rng.random() < 0.15:
            case.softcap = rng.choice([0.5, 3.0, 30.0])
    # the call
    case.B, case.Hkv, case.group = rng.choice([1, 2, 3]), rng.choice([1, 2]), rng.choice([1, 2, 3])
    case.Nq, case.Nk = rng.randint(1, 70), rng.randint(1, 70)
    case.D = rng.choice([4, 8, 16, 24])
    if not case.tables or all("n" not in t.dims for t in case.tables):
        case.q_offset = rng.choice([0, 0, 0, 5, 63, 2**31 - 40, 2**32 + 7, 3 * 2**30])
        case.k_offset = rng.choice([0, 0, 0, 7, case.q_offset, max(0, case.q_offset - 30)])
    else:
        case.q_offset, case.k_offset = rng.choice([0, 0, 3]), rng.choice([0, 0, 4])
    if rng.random() < 0.2:
        case.n_q = case.q_offset + case.Nq + rng.choice([0, 1, 17])
    if rng.random() < 0.2:
        case.n_k = case.k_offset + case.Nk + rng.choice([0, 2, 100])
    for nm, v in case.params.items():
        if rng.random() < 0.3:
            pool = (DIVISOR_VALUES if nm in divisors else (-2, 0, 1, 2, 7) if nm in counts
                    else INT_VALUES if nm in ints else FLOAT_VALUES)
            val = rng.choice(pool + ((0,) if nm in divisors else ()))
            case.overrides[nm] = rng.choice([lambda x: x, np.int64 if isinstance(val, int) else np.float64,
                                             torch.tensor])(val)
    case.layout = rng.choice(["contiguous", "contiguous", "transposed", "sliced", "expanded"])
    case.backward = rng.random() < 0.3
    case.text = render(case)
    return case


def render(case: Case) -> str:
    out = [f'name = "p29_{case.seed}"']
    if case.params:
        out.append("[params]")
        out += [f"{k} = {_toml(v)}" for k, v in case.params.items()]
    if case.tables:
        out.append("[inputs]")
        for t in case.tables:
            dims = ", ".join(f'"{d}"' if isinstance(d, str) else str(d) for d in t.dims)
            out.append(f'{t.name} = {{ dims = [{dims}], dtype = "{t.dtype}" }}')
    if case.mask is not None:
        out += ["[mask]", f"where = '{case.mask}'"]
    if case.bias is not None or case.mod is not None or case.softcap is not None:
        out.append("[score]")
        if case.bias is not None:
            out.append(f"bias = '{case.bias}'")
        if case.mod is not None:
            out.append(f"mod = '{case.mod}'")
        if case.softcap is not None:
            out.append(f"softcap = {case.softcap}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------

def _laid_out(x: torch.Tensor, layout: str, gen: torch.Generator) -> torch.Tensor:
    """``x``'s values in another memory layout: transposed storage, a slice of a larger tensor,
    or (for a dim of size 1 made larger) an expanded view."""
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        big = torch.zeros([s * 2 + 1 for s in x.shape], dtype=x.dtype)
        view = big[tuple(slice(1, 1 + 2 * s, 2) for s in x.shape)]
        view.copy_(x)
        return view
    return x


def tensors(case: Case):
    gen = torch.Generator().manual_seed(case.seed)
    Hq = case.Hkv * case.group
    q = torch.randn(case.B, Hq, case.Nq, case.D, generator=gen)
    k = torch.randn(case.B, case.Hkv, case.Nk, case.D, generator=gen)
    v = torch.randn(case.B, case.Hkv, case.Nk, case.D, generator=gen)
    positions = max(case.q_offset + case.Nq, case.k_offset + case.Nk)
    inputs = {}
    for t in case.tables:
        shape = [case.B if d == "b" else Hq if d == "h" else positions if d == "n" else d for d in t.dims]
        lo, hi = (0, 6) if t.dtype == "uint8" else (0, 2) if t.dtype == "bool" else (-4, 6)
        if t.kind == "float":
            x = (torch.randn(shape, generator=gen) * 2).to(getattr(torch, t.dtype))
        else:
            x = torch.randint(lo, hi, shape, generator=gen).to(getattr(torch, t.dtype))
        if case.layout == "expanded" and t.dims and t.dims[0] == "b":
            x = x[:1].expand(*shape)
        inputs[t.name] = _laid_out(x, case.layout, gen)
    q, k, v = (_laid_out(x, case.layout, gen) for x in (q, k, v))
    return q, k, v, inputs


# ---------------------------------------------------------------------------------------------
# the oracle of the mask: Python on the same text
# ---------------------------------------------------------------------------------------------

class _Read:
    """An input read as the language defines it: an index outside the extent reads 0."""

    def __init__(self, t: torch.Tensor):
        self.kind = "bool" if t.dtype == torch.bool else "float" if t.is_floating_point() else "int"
        self.t = t.to(torch.int64) if self.kind == "int" else t.double() if self.kind == "float" else t

    def value(self, x):
        return C64(int(x)) if self.kind == "int" else float(x) if self.kind == "float" else bool(x)

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        for x, n in zip(idx, self.t.shape):
            if not 0 <= int(x) < n:
                return self.value(0)
        return self.value(self.t[tuple(int(x) for x in idx)])


def python_mask(case: Case, inputs, params) -> Optional[torch.Tensor]:
    """The mask by Python per pair, [B, Hq, Nq, Nk], or None where a value leaves int64 (Skip)."""
    code = oracle_code(case.mask)
    Hq = case.Hkv * case.group
    n_q = case.q_offset + case.Nq if case.n_q is None else case.n_q
    n_k = case.k_offset + case.Nk if case.n_k is None else case.n_k
    env = dict(NAMESPACE, n_q=C64(n_q), n_k=C64(n_k), causal=None)
    for nm, val in params.items():
        env[nm] = C64(val) if isinstance(val, int) else float(val) + 0.0  # -0.0 is 0.0 (docs §2)
    env.update({nm: _Read(t) if t.dim() else _Read(t).value(t) for nm, t in inputs.items()})
    out = torch.zeros(case.B, Hq, case.Nq, case.Nk, dtype=torch.bool)
    try:
        for b in range(case.B):
            for h in range(Hq):
                env["b"], env["h"] = C64(b), C64(h)
                for r in range(case.Nq):
                    env["i"] = C64(case.q_offset + r)
                    for c in range(case.Nk):
                        env["j"] = C64(case.k_offset + c)
                        out[b, h, r, c] = bool(eval(code, env))  # noqa: S307 - our own generated text
    except Skip:
        return None
    return out


# ---------------------------------------------------------------------------------------------
# the check
# ---------------------------------------------------------------------------------------------

INTERNAL = (KeyError, AttributeError, IndexError, AssertionError, NameError, RecursionError, ZeroDivisionError,
            UnboundLocalError, NotImplementedError)
STATS: Counter = Counter()


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-3) -> float:
    a, b = a.detach().double(), b.detach().double()
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb) or not torch.equal(torch.isnan(a), torch.isnan(b)):
        return math.inf
    if not torch.equal(torch.where(fb, 0.0, b).nan_to_num(0.0), torch.where(fa, 0.0, a).nan_to_num(0.0)):
        return math.inf  # infinities of another sign
    a, b = torch.where(fa, a, 0.0), torch.where(fb, b, 0.0)
    return float((a - b).norm() / max(float(b.norm()), floor * math.sqrt(max(b.numel(), 1))))


def _call_kwargs(case: Case) -> dict:
    kw = dict(q_offset=case.q_offset, k_offset=case.k_offset)
    if case.n_q is not None:
        kw["n_q"] = case.n_q
    if case.n_k is not None:
        kw["n_k"] = case.n_k
    kw.update(case.overrides)
    return kw


def check_seed(seed: int, kernels: bool = True, verbose: bool = False) -> Optional[str]:
    case = draw(seed)
    if verbose:
        print(case.describe())
        print(case.text)
    return check_case(case, kernels=kernels)


def check_case(case: Case, kernels: bool = True) -> Optional[str]:
    head = f"seed {case.seed}:\n{case.text}{case.describe()}\n"
    try:
        pattern = parse_spec(case.text)
    except SpecError as e:
        reason = re.sub(r"^.*?: \[[^\]]*\][^:]*: (column \d+: )?", "", str(e))
        STATS["refused: " + re.sub(r"[0-9]+", "N", reason)[:70]] += 1
        if case.must == "build":
            return head + f"refused a spec the contract allows: {e}"
        return None
    except Exception as e:  # noqa: BLE001 - an internal error on a spec is a finding
        return head + f"parse raised {type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
    if case.must == "refuse":
        return head + "accepted a spec the contract forbids"
    q, k, v, inputs = tensors(case)
    kw = _call_kwargs(case)
    params = dict(pattern.param_values)
    params.update({nm: _plain(val) for nm, val in case.overrides.items()})
    # the reference
    rq, rk, rv = (x.detach().double().requires_grad_(case.backward) for x in (q, k, v))
    try:
        ro, rlse = attncc.reference(pattern, rq, rk, rv, return_lse=True, **inputs, **kw)
        ref_error = None
    except (ValueError, TypeError) as e:
        ref_error = e
    except Exception as e:  # noqa: BLE001
        return head + f"reference raised {type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
    if ref_error is None and case.mask is not None and case.B * case.Hkv * case.group * case.Nq * case.Nk <= 40000:
        want = python_mask(case, inputs, params)
        if want is not None:
            Hq = case.Hkv * case.group
            # the mask alone: a transform's where(c, e, -inf) adds its conjuncts free of s to pattern.mask
            alone = parse_spec(render(Case(case.seed, params=case.params, tables=case.tables, mask=case.mask)))
            got = pair_mask(alone, q_rows=case.Nq, k_rows=case.Nk, q_offset=case.q_offset, k_offset=case.k_offset,
                            n_q=kw.get("n_q"), n_k=kw.get("n_k"), batch=case.B, heads=Hq, inputs=inputs,
                            params={nm: _plain(val) for nm, val in case.overrides.items()})
            if not torch.equal(want, got):
                where = (want != got).nonzero()[0].tolist()
                return head + (f"reference mask != Python at {(want != got).sum().item()} pairs, first [b, h, r, c] = "
                               f"{where}: Python {want[tuple(where)].item()}, reference {got[tuple(where)].item()}")
            STATS["mask checked against Python"] += 1
        else:
            STATS["mask past int64 (Python not compared)"] += 1
    if not kernels:
        return None
    built = build_spec(case.text)
    if isinstance(built, Exception):
        return head + f"build raised {type(built).__name__}: {built}"
    _, mod = built
    kq, kk, kv = (x.detach().clone().requires_grad_(case.backward) for x in (q, k, v))
    try:
        o, lse = mod.attention(kq, kk, kv, return_lse=True, **inputs, **kw)
    except (ValueError, TypeError) as e:
        if ref_error is None:
            return head + f"the kernels refused ({type(e).__name__}: {e}), the reference ran"
        if type(e) is not type(ref_error):
            return head + f"refused differently: kernels {type(e).__name__}: {e}; reference {type(ref_error).__name__}: {ref_error}"
        STATS["call refused by both"] += 1
        return None
    except Exception as e:  # noqa: BLE001
        return head + f"the kernels raised {type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
    if ref_error is not None:
        return head + f"the reference refused ({type(ref_error).__name__}: {ref_error}), the kernels ran"
    bad = [(nm, err) for nm, err in (("o", _rel(o, ro)), ("lse", _rel(lse, rlse))) if err > 2e-4]
    if not bad and case.backward:
        g = torch.randn(o.shape, generator=torch.Generator().manual_seed(case.seed + 1), dtype=torch.float64)
        fin = torch.isfinite(ro).all(-1, keepdim=True)
        try:
            got = torch.autograd.grad((torch.where(fin, o.double(), 0.0) * g).sum(), [kq, kk, kv])
        except Exception as e:  # noqa: BLE001
            return head + f"the backward raised {type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
        want = torch.autograd.grad((torch.where(fin, ro, 0.0) * g).sum(), [rq, rk, rv])
        bad += [(nm, err) for nm, a, b in zip(("dq", "dk", "dv"), got, want) if (err := _rel(a, b)) > 2e-3]
    STATS["kernels compared"] += 1
    if bad:
        return head + "mismatch: " + ", ".join(f"{nm} {err:.3g}" for nm, err in bad)
    return None


def _seeds(text: str) -> List[int]:
    out: List[int] = []
    for part in text.split(","):
        if "-" in part.strip()[1:]:
            a, b = part.split("-", 1)
            out += range(int(a), int(b) + 1)
        else:
            out.append(int(part))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0-19", help="a range 0-99, a list 3,5,8, or both")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--no-kernels", action="store_true")
    args = ap.parse_args(argv)
    start, failures = time.time(), 0
    seeds = _seeds(args.seeds)
    for seed in seeds:
        try:
            failure = check_seed(seed, kernels=not args.no_kernels, verbose=args.verbose)
        except Exception as e:  # noqa: BLE001 - the probe's own defect: report it, go on
            failure = f"seed {seed}: the probe raised {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
        if failure:
            failures += 1
            print("FAIL " + failure + "\n", flush=True)
        elif args.verbose:
            print(f"seed {seed}: ok", flush=True)
    for what, n in sorted(STATS.items()):
        print(f"  {n:5d} {what}")
    print(f"{failures} of {len(seeds)} seeds failed ({time.time() - start:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
