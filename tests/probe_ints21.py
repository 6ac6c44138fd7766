"""Probe 21 (integer arithmetic at the extremes), the seeded generator behind tests/test_probe_ints21.py.
Unlike tests/probe_sem19.py (params, float comparisons, offsets) and tests/probe_inputs20.py
(input layouts with small values) it draws integer expressions over

- integer inputs of every width (int8, int16, int32, int64, uint8, bool) holding their extreme values
  (-128, 255, -2**31, 2**62, ...), passed as views (a step, a storage offset, transposed), read at
  ``x[b, j]``, ``x[b, i]`` and at computed indices, and used in arithmetic (``-``, ``abs``, ``~``,
  ``* 64``, ``<< k``, ``>> k``, ``//``, ``%``, ``**``);
- ``//`` and ``%`` by negative literals and params, shifts by constants up to 62 and by int params
  from -2**31 to 2**40 (clamped to [-63, 63] as documented), ``| & ^ ~`` of negative values,
  ``**`` by a literal and by an int param (a float power), booleans in arithmetic;
- int params near the int32 and int64 limits (-2**31, 2**31 - 1, 2**31 + 1, 2**62 - 1), positions
  near 2**24, 2**31 - 5 and 2**40 (q_offset, k_offset), Nq != Nk, odd sizes;

in masks, biases and ``mod`` conditions, and checks each case three ways: the reference's mask and
bias against plain Python (tests/probe_specs.py's int64 twin: Python's integers wrapped to int64,
ints converted to float64 where they meet a float, as docs/spec-language.md §3.3 says), the kernels
(interpreter; forward o, LSE, and for a third of the seeds dq, dk, dv) against the reference, and
for cases at offset 0 ``decode`` against the reference.

    python tests/probe_ints21.py --cases 200 --start 0     # print failures
    python tests/probe_ints21.py --seed 5 --verbose
"""
from __future__ import annotations

import itertools
import math
import random
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import script_env  # noqa: E402,F401  (the interpreter, this checkout on the path: before the imports below)

import torch  # noqa: E402

import attncc  # noqa: E402
from attncc._reference import evaluate, index_env, pair_mask  # noqa: E402
from cases import run_seeds, seed_parser, seeds_of  # noqa: E402
from fuzz_specs import _rel, _tile_config, _toml_str, build_spec  # noqa: E402
from probe_specs import PY_NAMESPACE, Ex  # noqa: E402

BOOL, INT, FLOAT = "bool", "int", "float"
DTYPES = {"int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
          "uint8": torch.uint8, "bool": torch.bool}
EXTREMES = {"int8": (-128, 127, -1, 0, 1, 100, -100), "int16": (-2**15, 2**15 - 1, -1, 0, 3, -300),
            "int32": (-2**31, 2**31 - 1, -1, 0, 5, 2**30), "int64": (-2**40, 2**40 + 1, 2**53 + 1, -1, 0, 7, 2**31),
            "uint8": (0, 255, 128, 127, 1, 200), "bool": (0, 1)}
INT_PARAMS = (0, 1, -1, 3, -3, 7, -7, 2**31 - 1, -2**31, 2**31 + 1, 2**40 + 3)
SHIFT_PARAMS = (0, 1, 5, 31, 32, 33, 62, 63, 64, 100, -1, -5, -40, -64, -2**31, 2**40)
DIVISORS = (2, 3, -3, 7, -7, 64, -64, 2**31 - 1, -2**31, 2**31 + 1)
OFFSETS = (0, 0, 0, 3, 2**24 - 3, 2**31 - 5, 2**31 + 7, 2**40)


def _py_shift(x: int, n: int) -> int:
    """The language's shift by a variable amount: ``floor(x * 2**n)``, ``n`` taken in [-63, 63]."""
    n = max(-63, min(63, int(n)))
    x = int(x)
    return C64.of(x << n if n >= 0 else x >> -n)  # (C64 is defined below; called at evaluation)


def _py_pow(x, n):
    """``x ** n`` with an int param ``n``: a float power (torch.pow's values: 0 ** -1 is inf)."""
    x = float(x)
    if x == 0 and n < 0:
        return math.inf
    try:
        return x ** n
    except OverflowError:  # past float64: inf of the power's sign
        return -math.inf if x < 0 and n % 2 else math.inf


class C64(int):
    """An int of the language that raises OverflowError where a result leaves int64: a value past
    int64 is the spec's to avoid (docs/spec-language.md §3.3), so the pairs where one arises are
    not compared (the reference, the kernels and Python's integers each give their own)."""

    __slots__ = ()

    @staticmethod
    def of(v):
        if isinstance(v, int) and not isinstance(v, bool):
            if not -2**63 <= v < 2**63:
                raise OverflowError(v)
            return C64(v)
        return v


def _checked(name):
    op = getattr(int, name)
    return lambda self, *other: C64.of(op(self, *other))


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__floordiv__", "__rfloordiv__",
              "__mod__", "__rmod__", "__pow__", "__rpow__", "__lshift__", "__rlshift__", "__rshift__", "__rrshift__",
              "__and__", "__rand__", "__or__", "__ror__", "__xor__", "__rxor__", "__neg__", "__pos__", "__abs__",
              "__invert__"):
    setattr(C64, _name, _checked(_name))


class Table:
    """An input as the language reads it: an index outside the extent reads 0 (False); ints are
    ``box``'s: checked int64 (C64) or wrapping (I64)."""

    def __init__(self, t: torch.Tensor, box=C64):
        self.t, self.box = t, box

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(not 0 <= int(x) < n for x, n in zip(idx, self.t.shape)):
            return False if self.t.dtype == torch.bool else self.box(0)
        v = self.t[tuple(int(x) for x in idx)].item()
        return v if isinstance(v, bool) else self.box(v)


@dataclass
class Draw:
    rng: random.Random
    params: Dict[str, int]
    dtype: str
    reads: int = 0

    def param(self, values=INT_PARAMS) -> str:
        name = f"p{len(self.params)}"
        self.params[name] = self.rng.choice(values)
        return name


def _p(e: Ex) -> Tuple[str, str]:
    return f"({e.spec})", f"({e.py})"


def draw_int(d: Draw, depth: int = 0) -> Ex:
    rng = d.rng
    if depth >= 3 or rng.random() < 0.3:
        r = rng.random()
        if r < 0.45:
            v = rng.choice(("i", "j", "i", "j", "b", "h", "n_q", "n_k"))
            return Ex(v, v, INT)
        if r < 0.75:
            d.reads += 1
            idx = rng.choice(("j", "i", "j", "i", None))
            if idx is None:
                e = draw_int(d, 3)
                idx = Ex(f"{e.spec} % 37", f"{e.py} % 37", INT)
            else:
                idx = Ex(idx, idx, INT)
            read = Ex(f"x[b, {idx.spec}]", f"x[b, {idx.py}]", INT)
            # a bool input's entry is a boolean: as a number, 0 or 1 (`~` of it would be `not`)
            return Ex(f"({read.spec} * 1)", f"int({read.py})", INT) if d.dtype == "bool" else read
        if r < 0.9:
            p = d.param()
            return Ex(p, p, INT)
        v = rng.choice((0, 1, 3, 64, -1, -7, 2**31 - 1, -2**31, 2**40))
        return Ex(str(v), str(v), INT) if v >= 0 else Ex(f"({v})", f"({v})", INT)
    kind = rng.choice(("add", "sub", "mul64", "neg", "abs", "invert", "floordiv", "mod", "floordiv", "mod",
                       "and", "or", "xor", "shl", "shr", "shvar", "pow", "minmax", "where", "bool"))
    a = draw_int(d, depth + 1)
    sa, pa = _p(a)
    if kind in ("add", "sub", "and", "or", "xor"):
        b = draw_int(d, depth + 1)
        sb, pb = _p(b)
        op = {"add": "+", "sub": "-", "and": "&", "or": "|", "xor": "^"}[kind]
        return Ex(f"{sa} {op} {sb}", f"{pa} {op} {pb}", INT, a.has_float or b.has_float)
    if kind == "mul64":
        k = rng.choice((64, -3, 1000003, 2**20))
        return Ex(f"{sa} * {k}", f"{pa} * {k}", INT, a.has_float)
    if kind in ("neg", "invert"):
        op = "-" if kind == "neg" else "~"
        return Ex(f"{op}{sa}", f"{op}{pa}", INT, a.has_float)
    if kind == "abs":
        return Ex(f"abs({a.spec})", f"abs({a.py})", INT, a.has_float)
    if kind in ("floordiv", "mod"):
        op = "//" if kind == "floordiv" else "%"
        if rng.random() < 0.5:
            v = rng.choice(DIVISORS)
            den = Ex(str(v), str(v), INT) if v > 0 else Ex(f"({v})", f"({v})", INT)
        else:
            p = d.param(DIVISORS)
            den = Ex(p, p, INT)
        return Ex(f"{sa} {op} {den.spec}", f"{pa} {op} {den.py}", INT, a.has_float)
    if kind in ("shl", "shr"):
        k = rng.choice((0, 1, 7, 30, 31, 32, 40, 62))
        op = "<<" if kind == "shl" else ">>"
        return Ex(f"{sa} {op} {k}", f"{pa} {op} {k}", INT, a.has_float)
    if kind == "shvar":
        p = d.param(SHIFT_PARAMS)
        if rng.random() < 0.5:
            return Ex(f"{sa} << {p}", f"_shift({pa}, {p})", INT, a.has_float)
        return Ex(f"{sa} >> {p}", f"_shift({pa}, -{p})", INT, a.has_float)
    if kind == "pow":
        k = rng.choice((0, 1, 2, 3))
        return Ex(f"{sa} ** {k}", f"{pa} ** {k}", INT, a.has_float)
    if kind == "minmax":
        fn = rng.choice(("min", "max"))
        b = draw_int(d, depth + 1)
        return Ex(f"{fn}({a.spec}, {b.spec})", f"{fn}({a.py}, {b.py})", INT, a.has_float or b.has_float)
    if kind == "where":
        c = draw_bool(d, depth + 1)
        b = draw_int(d, depth + 1)
        return Ex(f"where({c.spec}, {a.spec}, {b.spec})", f"where({c.py}, {a.py}, {b.py})", INT,
                  a.has_float or b.has_float or c.has_float)
    c = draw_bool(d, depth + 1)  # a boolean in arithmetic: 0 or 1
    sc, pc = _p(c)
    op = rng.choice(("+", "-", "*", "<<", "-"))
    if op == "<<":
        return Ex(f"{sc} << 3", f"int({pc}) << 3", INT, c.has_float)
    return Ex(f"{sa} {op} {sc}", f"{pa} {op} int({pc})", INT, a.has_float or c.has_float)


def draw_float(d: Draw, depth: int) -> Ex:
    """Floats of int arithmetic: true division, a float power by an int param, a product with a float."""
    rng = d.rng
    a = draw_int(d, depth + 1)
    sa, pa = _p(a)
    kind = rng.choice(("div", "pow", "mul", "divp"))
    if kind == "div":
        k = rng.choice((3, -7, 0.5, 64))
        return Ex(f"{sa} / {k}", f"float({pa}) / {k}", FLOAT, True)
    if kind == "divp":
        b = draw_int(d, depth + 1)
        sb, pb = _p(b)
        return Ex(f"{sa} / (abs({sb}) + 1)", f"float({pa}) / float(abs({pb}) + 1)", FLOAT, True)
    if kind == "pow":
        p = d.param((2, 3, -1, 0, 1))
        return Ex(f"{sa} ** {p}", f"_pow({pa}, {p})", FLOAT, True)
    return Ex(f"{sa} * 0.75", f"float({pa}) * 0.75", FLOAT, True)


def draw_bool(d: Draw, depth: int = 0) -> Ex:
    rng = d.rng
    kind = rng.choice(("cmp", "cmp", "cmp", "fcmp", "and", "or", "not", "xor", "bread") if depth < 2 else
                      ("cmp", "fcmp", "bread"))
    ops = ("<", "<=", ">", ">=", "==", "!=")
    if kind == "cmp":
        a, b = draw_int(d, depth + 1), draw_int(d, depth + 1)
        op = rng.choice(ops)
        return Ex(f"({a.spec}) {op} ({b.spec})", f"({a.py}) {op} ({b.py})", BOOL, a.has_float or b.has_float)
    if kind == "fcmp":
        a, b = draw_float(d, depth + 1), draw_int(d, depth + 1)
        op = rng.choice(ops)
        return Ex(f"({a.spec}) {op} ({b.spec})", f"({a.py}) {op} float({b.py})", BOOL, True)
    if kind == "bread":  # a bool read of an int input: "the entry is non-zero" only for bool inputs
        e = draw_int(d, depth + 1)
        return Ex(f"({e.spec}) % 2 == 1", f"({e.py}) % 2 == 1", BOOL, e.has_float)
    a = draw_bool(d, depth + 1)
    if kind == "not":
        return Ex(f"not ({a.spec})", f"not ({a.py})", BOOL, a.has_float)
    b = draw_bool(d, depth + 1)
    if kind == "xor":
        return Ex(f"({a.spec}) ^ ({b.spec})", f"bool({a.py}) != bool({b.py})", BOOL, a.has_float or b.has_float)
    return Ex(f"({a.spec}) {kind} ({b.spec})", f"({a.py}) {kind} ({b.py})", BOOL, a.has_float or b.has_float)


@dataclass(frozen=True)
class Case:
    seed: int
    dtype: str
    layout: str
    mask: Optional[Ex]
    bias: Optional[Ex]
    mod: Optional[Ex]  # mod = where(cond, s, -inf)
    params: Tuple[Tuple[str, int, int], ...]  # (name, spec value, call value)
    Nq: int
    Nk: int
    q_offset: int
    k_offset: int
    B: int
    Hq: int
    tile: Tuple[int, int]
    backward: bool
    decode: bool

    @property
    def text(self) -> str:
        lines = ["head_dim = 8", 'dtypes = ["float32"]', "[inputs]",
                 f'x = {{ dims = ["b", 40], dtype = "{self.dtype}" }}']
        if self.params:
            lines.append("[params]")
            lines += [f"{n} = {v}" for n, v, _c in self.params]
        if self.mask is not None:
            lines += ["[mask]", f"where = {_toml_str(self.mask.spec)}"]
        score = []
        if self.bias is not None:
            score.append(f"bias = {_toml_str(self.bias.spec)}")
        if self.mod is not None:
            score.append(f"mod = {_toml_str(f'where({self.mod.spec}, s, -inf)')}")
        if score:
            lines += ["[score]"] + score
        return "\n".join(lines) + "\n"

    @property
    def call_params(self) -> Dict[str, int]:
        return {n: c for n, _v, c in self.params}

    def describe(self) -> str:
        return (f"B={self.B} Hq={self.Hq} Nq={self.Nq} Nk={self.Nk} q_offset={self.q_offset} "
                f"k_offset={self.k_offset} tile={self.tile} layout={self.layout} backward={self.backward} "
                f"decode={self.decode} params={self.call_params}\n" + self.text)

    @property
    def n_positions(self) -> int:
        return 40  # the input's "n" extent: reads past it (large offsets) are 0

    def input_tensor(self) -> torch.Tensor:
        """x [B, 40] of the dtype's extreme values, as the layout passes it (a view)."""
        gen = torch.Generator().manual_seed(self.seed)
        vals = EXTREMES[self.dtype]
        idx = torch.randint(0, len(vals), (self.B, self.n_positions), generator=gen)
        full = torch.tensor(vals, dtype=torch.int64)[idx].to(DTYPES[self.dtype])
        if self.layout == "step":
            big = torch.zeros(self.B, 2 * self.n_positions, dtype=full.dtype)
            big[:, ::2] = full
            return big[:, ::2]
        if self.layout == "offset":
            flat = torch.zeros(3 + full.numel(), dtype=full.dtype)
            flat[3:] = full.flatten()
            return flat[3:].view(self.B, self.n_positions)
        if self.layout == "transposed":
            return full.t().contiguous().t()
        return full


def draw_case(seed: int) -> Case:
    rng = random.Random(seed)
    dtype = rng.choice(tuple(DTYPES))
    d = Draw(rng, {}, dtype)
    mask = draw_bool(d) if rng.random() < 0.75 else None
    bias = None
    if rng.random() < 0.5:
        if rng.random() < 0.5:
            c = draw_bool(d)
            bias = Ex(f"where({c.spec}, 1.5, -0.5)", f"where({c.py}, 1.5, -0.5)", FLOAT, True)
        else:  # an int term of small range times a float
            e = draw_int(d)
            bias = Ex(f"(({e.spec}) % 5) * 0.25", f"float(({e.py}) % 5) * 0.25", FLOAT, True)
    mod = draw_bool(d) if rng.random() < 0.3 else None
    params = tuple((n, v, v if rng.random() < 0.5 else rng.choice(INT_PARAMS if v in INT_PARAMS else
                                                                      SHIFT_PARAMS if v in SHIFT_PARAMS else (v,)))
                   for n, v in d.params.items())
    # a divisor param keeps a non-zero call value: from its own pool
    params = tuple((n, v, c if c != 0 or v == 0 else v) for n, v, c in params)
    q_off, k_off = rng.choice(OFFSETS), rng.choice(OFFSETS)
    if rng.random() < 0.5:
        k_off = max(0, q_off + rng.choice((0, -3, 5)))
    decode = q_off == 0 and k_off == 0 and rng.random() < 0.4
    batch = rng.choice((1, 2))
    return Case(seed, dtype, rng.choice(("contiguous", "step", "offset", "transposed")), mask, bias, mod, params,
                rng.randint(1, 33), rng.randint(1, 40), q_off, k_off, 1 if decode else batch, rng.choice((1, 2)),
                (rng.choice((16, 32)), rng.choice((16, 32))), rng.random() < 0.35, decode)



PY = dict(PY_NAMESPACE, _shift=_py_shift, _pow=_py_pow, int=int, bool=bool, float=float, math=math)


def python_grid(case: Case, e: Ex, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``e`` on every pair of every batch row and head, by Python (float64), and where it is defined:
    Python raises nowhere, no integer leaves int64 (C64)."""
    code = compile(e.py, "<twin>", "eval")
    n_q, n_k = case.q_offset + case.Nq, case.k_offset + case.Nk
    env = dict(PY, n_q=C64(n_q), n_k=C64(n_k), x=Table(x), **{n: C64(c) for n, c in case.call_params.items()})
    out = torch.full((case.B, case.Hq, case.Nq, case.Nk), math.nan, dtype=torch.float64)
    defined = torch.zeros(out.shape, dtype=torch.bool)
    for b, h, r, c in itertools.product(range(case.B), range(case.Hq), range(case.Nq), range(case.Nk)):
        env.update(b=C64(b), h=C64(h), i=C64(case.q_offset + r), j=C64(case.k_offset + c))
        try:
            out[b, h, r, c] = float(eval(code, env))  # noqa: S307 - our own generated text
            defined[b, h, r, c] = True
        except (ZeroDivisionError, OverflowError):
            pass
    return out, defined


def _positions(case: Case) -> dict:
    return dict(q_offset=case.q_offset, k_offset=case.k_offset)


def check_twin(case: Case, pattern, x) -> List[str]:
    """The reference's mask (with the mod's condition) and bias against Python, on every pair."""
    out = []
    conds = [e for e in (case.mask, case.mod) if e is not None]
    if conds:
        got = pair_mask(pattern, q_rows=case.Nq, k_rows=case.Nk, batch=case.B, heads=case.Hq, **_positions(case),
                        params=case.call_params, inputs={"x": x}).expand(case.B, case.Hq, case.Nq, case.Nk)
        want, defined = torch.ones_like(got), torch.ones_like(got)
        for e in conds:
            values, ok = python_grid(case, e, x)
            want &= values != 0
            defined &= ok
        wrong = (got != want) & defined
        if wrong.any():
            bad = tuple(wrong.nonzero()[0].tolist())
            out.append(f"mask differs from Python at {int(wrong.sum())} pairs, first {bad}: reference "
                       f"{bool(got[bad])}, Python {bool(want[bad])}")
    if case.bias is not None:
        env = index_env(pattern, batch=case.B, heads=case.Hq, q_rows=case.Nq, k_rows=case.Nk, **_positions(case),
                        params=case.call_params, inputs={"x": x})
        got = evaluate(pattern.bias, env).double().expand(case.B, case.Hq, case.Nq, case.Nk)
        want, defined = python_grid(case, case.bias, x)
        wrong = (got != want) & defined
        if wrong.any():
            bad = tuple(wrong.nonzero()[0].tolist())
            out.append(f"bias differs from Python at {int(wrong.sum())} pairs, first {bad}: reference "
                       f"{float(got[bad])!r}, Python {float(want[bad])!r}")
    return out


def _compare(o, lse, ref, ref_lse, what="") -> List[str]:
    out = []
    fin = torch.isfinite(ref_lse)
    if not torch.equal(fin, torch.isfinite(lse)):
        out.append(f"{what}lse finite at {int(torch.isfinite(lse).sum())} rows, reference at {int(fin.sum())}")
        return out
    err = _rel(o, ref)
    if err > 1e-4:
        out.append(f"{what}o off by {err:.3g}")
    if fin.any():
        e = float((lse[fin].double() - ref_lse[fin]).abs().max())
        if e > 1e-3:
            out.append(f"{what}lse off by {e:.3g}")
    return out


def check_kernels(case: Case, pattern, mod, x) -> List[str]:
    gen = torch.Generator().manual_seed(case.seed)
    Hkv = 1
    q = torch.randn(case.B, case.Hq, case.Nq, 8, generator=gen)
    k, v = (torch.randn(case.B, Hkv, case.Nk, 8, generator=gen) for _ in range(2))
    leaves = [t.clone().requires_grad_(case.backward) for t in (q, k, v)]
    with _tile_config((case.tile,) * 3):
        o, lse = mod.attention(*leaves, x=x, return_lse=True, **_positions(case), **case.call_params)
    ref_in = [t.double().requires_grad_(case.backward) for t in (q, k, v)]
    ref, ref_lse = attncc.reference(pattern, *ref_in, x=x, return_lse=True, **_positions(case), **case.call_params)
    out = _compare(o.detach(), lse.detach(), ref.detach(), ref_lse.detach())
    if case.backward and not out:
        g = torch.randn(o.shape, generator=gen, dtype=torch.float64)
        with _tile_config((case.tile,) * 3):
            got = torch.autograd.grad(o, leaves, g.float(), allow_unused=True, materialize_grads=True)
        want = torch.autograd.grad(ref, ref_in, g, allow_unused=True, materialize_grads=True)
        for name, a, r in zip(("dq", "dk", "dv"), got, want):
            if _rel(a, r) > 1e-3:
                out.append(f"{name} off by {_rel(a, r):.3g}")
    if case.decode:
        out += check_decode(case, pattern, mod, x, gen)
    return out


def check_decode(case: Case, pattern, mod, x, gen) -> List[str]:
    """``decode`` of the last rows (at most 4) of each batch row against the reference of that row alone."""
    nq = min(case.Nq, 4, case.Nk)
    lens = [max(nq, case.Nk - 3 * b) for b in range(case.B)]  # within the cache, at least the new rows
    q = torch.randn(case.B, case.Hq, nq, 8, generator=gen)
    k, v = (torch.randn(case.B, 1, case.Nk, 8, generator=gen) for _ in range(2))
    o, lse = mod.decode(q, k, v, kv_len=torch.tensor(lens, dtype=torch.int32), x=x, return_lse=True,
                        **case.call_params)
    out = []
    for b, n in enumerate(lens):
        ref, ref_lse = attncc.reference(pattern, q[b:b + 1].double(), k[b:b + 1, :, :n].double(),
                                        v[b:b + 1, :, :n].double(), x=x[b:b + 1], q_offset=n - nq, return_lse=True,
                                        **case.call_params)
        out += _compare(o[b:b + 1], lse[b:b + 1], ref, ref_lse, f"decode row {b}: ")
    return out


def refused(error: Exception) -> bool:
    """A build refusal the contract allows: a constant past int64 after expansion, too many terms,
    a power too large to compute (the spec's own), a divisor that may be 0."""
    text = str(error)
    return any(w in text for w in ("beyond int64", "expands to", "too large to compute", "may be 0", "can be 0",
                                   "cannot be 0"))


def check_seed(seed: int, verbose: bool = False) -> Tuple[List[str], dict]:
    case = draw_case(seed)
    if verbose:
        print(case.describe())
    built = build_spec(case.text)
    if isinstance(built, Exception):
        return ([] if refused(built) else [f"build: {type(built).__name__}: {built}"]), {"refused": True}
    pattern, mod = built
    x = case.input_tensor()
    problems = check_twin(case, pattern, x)
    problems += check_kernels(case, pattern, mod, x)
    return problems, {}


def main(argv=None) -> int:
    ap = seed_parser(50, description=__doc__.split("\n\n")[0])
    a = ap.parse_args(argv)
    seeds = seeds_of(a)
    return run_seeds(seeds, lambda s: check_seed(s, a.verbose), a.verbose, lambda s: draw_case(s).describe())


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
