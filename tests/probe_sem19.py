"""Probe 19 (integer and float semantics of the spec language), the seeded generator behind
tests/test_probe_sem19.py. Unlike tests/probe_specs.py it draws

- params whose spec default and call value differ (another sign, 0 / 1, near 2**31, 2**53), the
  call's value passed as a Python int, numpy int, a 0-d or one-element tensor, a float param as a
  Python float, numpy float64 / float32, an int, a 0-d float64 tensor;
- float values that float32 does not hold (``5.00000001``, ``0.1``, ``2**24 + 0.5``), compared with
  bare positions, heads, int params and literals, in masks *and* in score conditions (``bias``,
  ``mod``: ``where(j < f, ...)``), where the doc promises float64 "as masks are";
- integer literals near 2**31, 2**53 and 2**62, offsets near 2**24, 2**31 and 2**53, Nq != Nk;

and checks each case three ways: the reference's mask and bias against plain Python (integers
exact, floats float64), the Plan's walks against brute force, the kernels (interpreter, forward
and some backward) against the reference.

    python tests/probe_sem19.py --cases 200 --start 0     # print failures
    python tests/probe_sem19.py --seed 5 --verbose
"""
from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import script_env  # noqa: E402,F401  (the interpreter, this checkout on the path: before the imports below)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import attncc  # noqa: E402
from attncc._reference import evaluate, index_env, pair_mask  # noqa: E402
from attncc.spec import SpecError, parse_spec  # noqa: E402
from cases import drawn_spec_main  # noqa: E402
from fuzz_specs import _rel, _tile_config, _toml_str, build_spec  # noqa: E402
from probe_specs import I64, PY_NAMESPACE, Ex  # noqa: E402

BOOL, INT, FLOAT = "bool", "int", "float"
STATS: Dict[str, int] = {}  # outcome -> count (main prints it)


def _count(what: str) -> None:
    STATS[what] = STATS.get(what, 0) + 1

INT_PARAM_VALUES = (0, 1, -1, 2, 3, -3, 7, -7, 41, 2**31 - 1, -2**31, 2**31 + 1, 2**40 + 3, 2**53 + 1)
DIVISOR_VALUES = (1, -1, 2, 3, -3, 7, -7, 41, 2**31 - 1, -2**31, 2**53 + 1)
# float values float32 does not hold (the kernels' float32 would round them onto an integer or elsewhere)
FLOAT_PARAM_VALUES = (5.00000001, 0.1, 1.0 / 3.0, 2.5, -2.5, 16777216.5, 3.0, -0.0, 7.9999999, 12.000001, 1e-30)
INT_LITERALS = (0, 1, 2, 3, -1, 7, 2**31 - 1, 2**31, -2**31, 2**53, 2**53 + 1, 2**62)
FLOAT_LITERALS = ("0.5", "2.5", "16777216.5", "0.1", "1e-3", "9007199254740993.0", "7.00000001")
OFFSETS = (0, 0, 0, 5, 2**24 - 7, 2**31 - 9, 2**53 - 9, 2**53 + 3)


def _typed_int(rng: random.Random, v: int):
    """``v`` as a call may pass an int: int, numpy int, a 0-d or one-element tensor."""
    kind = rng.choice(("int", "np64", "np32", "t0", "t1"))
    if kind == "np32" and -2**31 <= v < 2**31:
        return np.int32(v)
    if kind == "np64":
        return np.int64(v)
    if kind == "t0":
        return torch.tensor(v)
    if kind == "t1":
        return torch.tensor([v])
    return v


def _typed_float(rng: random.Random, v: float):
    kind = rng.choice(("float", "np64", "np32", "t0", "int"))
    if kind == "np64":
        return np.float64(v)
    if kind == "np32":
        return np.float32(v)
    if kind == "t0":
        return torch.tensor(v, dtype=torch.float64)
    if kind == "int" and float(v).is_integer():
        return int(v)
    return v


def _plain(v):
    """A typed call value as Python computes with it (numpy float32 at its float32 value)."""
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, np.generic):
        return v.item()
    return v


@dataclass
class Draw:
    rng: random.Random
    params: Dict[str, Tuple[str, object, object]]  # name -> (kind, spec value, call value as passed)
    score: bool = False  # drawing a score condition

    def param(self, kind: str, divisor: bool = False) -> str:
        rng = self.rng
        same = [n for n, (k, *_rest) in self.params.items() if k == kind and not divisor]
        if same and rng.random() < 0.4:
            return rng.choice(same)
        name = f"{'p' if kind == INT else 'f'}{len(self.params)}"
        if kind == INT:
            pool = DIVISOR_VALUES if divisor else INT_PARAM_VALUES
            spec_v = rng.choice(pool)
            call_v = spec_v if rng.random() < 0.3 else rng.choice(pool)
            self.params[name] = (INT, spec_v, _typed_int(rng, call_v))
        else:
            spec_v = rng.choice(FLOAT_PARAM_VALUES)
            call_v = spec_v if rng.random() < 0.3 else rng.choice(FLOAT_PARAM_VALUES)
            self.params[name] = (FLOAT, spec_v, _typed_float(rng, call_v))
        return name


def _lit(v: int) -> Ex:
    return Ex(str(v), str(v), INT) if v >= 0 else Ex(f"({v})", f"({v})", INT)


def draw_int(d: Draw, depth: int = 0) -> Ex:
    rng = d.rng
    if depth >= 2 or rng.random() < 0.35:
        r = rng.random()
        if r < 0.55:
            v = rng.choice(("i", "j", "i", "j", "b", "h", "n_q", "n_k"))
            return Ex(v, v, INT)
        if r < 0.8:
            p = d.param(INT)
            return Ex(p, p, INT)
        return _lit(rng.choice(INT_LITERALS))
    kind = rng.choice(("add", "sub", "floordiv", "mod", "floordiv", "mod", "abs", "minmax", "where", "mulsmall",
                       "bitand", "bitxor", "shift", "neg"))
    a = draw_int(d, depth + 1)
    pa = f"({a.py})"
    sa = f"({a.spec})"
    if kind in ("add", "sub"):
        b = draw_int(d, depth + 1)
        op = "+" if kind == "add" else "-"
        return Ex(f"{sa} {op} ({b.spec})", f"{pa} {op} ({b.py})", INT, a.has_float or b.has_float)
    if kind in ("floordiv", "mod"):
        if rng.random() < 0.5:
            den = _lit(rng.choice((2, 3, 7, -3, -7, 41, 2**31 - 1, -2**31, 2**53 + 1)))
        else:
            p = d.param(INT, divisor=True)
            den = Ex(p, p, INT)
        op = "//" if kind == "floordiv" else "%"
        return Ex(f"{sa} {op} ({den.spec})", f"{pa} {op} ({den.py})", INT, a.has_float)
    if kind == "abs":
        return Ex(f"abs({a.spec})", f"abs({a.py})", INT, a.has_float)
    if kind == "neg":
        return Ex(f"-{sa}", f"-{pa}", INT, a.has_float)
    if kind == "minmax":
        fn = rng.choice(("min", "max"))
        b = draw_int(d, depth + 1)
        return Ex(f"{fn}({a.spec}, {b.spec})", f"{fn}({a.py}, {b.py})", INT, a.has_float or b.has_float)
    if kind == "where":
        c = draw_bool(d, depth + 1)
        b = draw_int(d, depth + 1)
        return Ex(f"where({c.spec}, {a.spec}, {b.spec})", f"where({c.py}, {a.py}, {b.py})", INT,
                  a.has_float or b.has_float or c.has_float)
    if kind == "mulsmall":
        k = rng.choice((2, 3, -1, -5))
        return Ex(f"{sa} * {k}", f"{pa} * {k}", INT, a.has_float)
    if kind in ("bitand", "bitxor"):
        b = draw_int(d, depth + 1)
        op = "&" if kind == "bitand" else "^"
        return Ex(f"{sa} {op} ({b.spec})", f"{pa} {op} ({b.py})", INT, a.has_float or b.has_float)
    k = rng.randint(0, 5)
    op = rng.choice(("<<", ">>"))
    return Ex(f"{sa} {op} {k}", f"{pa} {op} {k}", INT, a.has_float)


def draw_float(d: Draw, depth: int = 0) -> Ex:
    rng = d.rng
    r = rng.random()
    if depth >= 2 or r < 0.5:
        r = rng.random()
        if r < 0.5:
            p = d.param(FLOAT)
            return Ex(p, p, FLOAT, True)
        if r < 0.75:
            t = rng.choice(FLOAT_LITERALS)
            return Ex(t, t, FLOAT, True)
        e = draw_int(d, depth + 1)
        return Ex(f"({e.spec}) * 1.0", f"float({e.py}) * 1.0", FLOAT, True)
    kind = rng.choice(("add", "sub", "mul", "div", "minmax", "abs"))
    a, b = draw_float(d, depth + 1), draw_float(d, depth + 1)
    if kind == "div":
        return Ex(f"({a.spec}) / (abs({b.spec}) + 0.5)", f"({a.py}) / (abs({b.py}) + 0.5)", FLOAT, True)
    if kind == "minmax":
        fn = rng.choice(("min", "max"))
        return Ex(f"{fn}({a.spec}, {b.spec})", f"{fn}({a.py}, {b.py})", FLOAT, True)
    if kind == "abs":
        return Ex(f"abs({a.spec})", f"abs({a.py})", FLOAT, True)
    op = {"add": "+", "sub": "-", "mul": "*"}[kind]
    return Ex(f"({a.spec}) {op} ({b.spec})", f"({a.py}) {op} ({b.py})", FLOAT, True)


def draw_bool(d: Draw, depth: int = 0) -> Ex:
    rng = d.rng
    kinds = ("cmp", "cmp", "fcmp", "fcmp", "barecmp", "chain", "and", "or", "not")
    kind = rng.choice(kinds if depth < 2 else ("cmp", "fcmp", "barecmp"))
    ops = ("<", "<=", ">", ">=", "==", "!=")
    if kind == "cmp":
        a, b = draw_int(d, depth + 1), draw_int(d, depth + 1)
        op = rng.choice(ops)
        return Ex(f"({a.spec}) {op} ({b.spec})", f"({a.py}) {op} ({b.py})", BOOL, a.has_float or b.has_float)
    if kind in ("fcmp", "barecmp"):
        # a bare position, head or int param against a float (param, literal, arithmetic): no arithmetic
        # on the int side, the comparison float32 would decide wrongly
        if kind == "barecmp":
            v = rng.choice(("i", "j", "h", "b", "n_q", "n_k", d.param(INT)))
            a = Ex(v, v, INT)
        else:
            a = draw_float(d, depth + 1)
        b = draw_float(d, depth + 1)
        op = rng.choice(ops)
        if rng.random() < 0.5:
            a, b = b, a
        # float(): the int side is converted to float64 before the comparison (docs/spec-language.md,
        # "Float arithmetic": "every integer converted to float64 after its own integer arithmetic"),
        # not compared exactly as Python compares an int with a float; past 2**53 the two differ
        # (``n_q == n_k * 1.0`` at n_q = n_k = 2**53 + 27 is true: seeds 742350, 742380)
        return Ex(f"({a.spec}) {op} ({b.spec})", f"float({a.py}) {op} float({b.py})", BOOL, True)
    if kind == "chain":
        a, b, c = draw_int(d, depth + 1), draw_float(d, depth + 1), draw_int(d, depth + 1)
        o1, o2 = rng.choice(("<", "<=")), rng.choice(("<", "<=", "!="))
        return Ex(f"({a.spec}) {o1} ({b.spec}) {o2} ({c.spec})", f"float({a.py}) {o1} ({b.py}) {o2} float({c.py})",
                  BOOL, True)
    a = draw_bool(d, depth + 1)
    if kind == "not":
        return Ex(f"not ({a.spec})", f"not ({a.py})", BOOL, a.has_float)
    b = draw_bool(d, depth + 1)
    # Python's precedence: not > and > or, written unparenthesized on purpose
    op = kind
    c = draw_bool(d, depth + 1) if rng.random() < 0.4 else None
    if c is None:
        return Ex(f"({a.spec}) {op} ({b.spec})", f"({a.py}) {op} ({b.py})", BOOL, a.has_float or b.has_float)
    op2 = rng.choice(("and", "or"))
    return Ex(f"({a.spec}) {op} not ({b.spec}) {op2} ({c.spec})", f"({a.py}) {op} not ({b.py}) {op2} ({c.py})", BOOL,
              True)


@dataclass(frozen=True)
class Case:
    seed: int
    mask: Optional[Ex]
    bias: Optional[Ex]
    mod_cond: Optional[Ex]  # mod = where(mod_cond, s, s * 0.5)  (or -inf)
    mod_inf: bool
    params: Tuple[Tuple[str, str, object, object], ...]  # (name, kind, spec value, call value as passed)
    Nq: int
    Nk: int
    q_offset: int
    k_offset: int
    B: int
    Hq: int
    tile: Tuple[int, int]
    backward: bool

    @property
    def text(self) -> str:
        lines = ["head_dim = 8", 'dtypes = ["float32"]']
        if self.params:
            lines.append("[params]")
            lines += [f"{n} = {v!r}" for n, _k, v, _c in self.params]
        if self.mask is not None:
            lines += ["[mask]", f"where = {_toml_str(self.mask.spec)}"]
        score = []
        if self.bias is not None:
            score.append(f"bias = {_toml_str(self.bias.spec)}")
        if self.mod_cond is not None:
            score.append(f"mod = {_toml_str(self.mod_text)}")
        if score:
            lines += ["[score]"] + score
        return "\n".join(lines) + "\n"

    @property
    def mod_text(self) -> str:
        return f"where({self.mod_cond.spec}, s, {'-inf' if self.mod_inf else 's * 0.5 - 1.0'})"

    @property
    def call_params(self) -> dict:
        return {n: c for n, _k, _v, c in self.params}

    @property
    def plain_params(self) -> dict:
        """The call's params as the language means them: ints, and floats at their float64 value
        (a numpy float32 at its float32 value)."""
        out = {}
        for n, k, _v, c in self.params:
            v = _plain(c)
            out[n] = I64.of(int(v)) if k == INT else float(v) + 0.0
        return out

    def describe(self) -> str:
        return (f"B={self.B} Hq={self.Hq} Nq={self.Nq} Nk={self.Nk} q_offset={self.q_offset} k_offset={self.k_offset} "
                f"tile={self.tile} backward={self.backward} call params="
                + ", ".join(f"{n}={c!r}" for n, _k, _v, c in self.params))


def draw_case(seed: int) -> Case:
    rng = random.Random(seed)
    d = Draw(rng, {})
    mask = draw_bool(d) if rng.random() < 0.7 else None
    d.score = True
    bias = None
    if rng.random() < 0.6:
        c = draw_bool(d)
        a, b = rng.choice((("1.5", "-0.5"), ("0.0", "2.0"), ("-1.0", "0.25")))
        bias = Ex(f"where({c.spec}, {a}, {b})", f"where({c.py}, {a}, {b})", FLOAT, True)
    mod_cond = draw_bool(d) if rng.random() < 0.4 else None
    params = tuple((n, k, v, c) for n, (k, v, c) in d.params.items())
    q_off, k_off = rng.choice(OFFSETS), rng.choice(OFFSETS)
    if rng.random() < 0.5:
        k_off = q_off + rng.choice((0, -3, 4)) if q_off >= 3 else q_off
    return Case(seed, mask, bias, mod_cond, rng.random() < 0.4, params, rng.randint(1, 40), rng.randint(1, 40), q_off,
                k_off, rng.choice((1, 2)), rng.choice((1, 2)), (rng.choice((16, 32)), rng.choice((16, 32))),
                rng.random() < 0.3)


def python_grid(case: Case, e: Ex, b: int, h: int) -> List[List[object]]:
    n_q, n_k = case.q_offset + case.Nq, case.k_offset + case.Nk
    code = compile(e.py, "<twin>", "eval")
    env = dict(PY_NAMESPACE, math=math, b=I64(b), h=I64(h), n_q=I64(n_q), n_k=I64(n_k), **case.plain_params)
    out = []
    for r in range(case.Nq):
        row = []
        for c in range(case.Nk):
            env["i"], env["j"] = I64(case.q_offset + r), I64(case.k_offset + c)
            row.append(eval(code, env))  # noqa: S307 - our own generated text
        out.append(row)
    return out


def _positions(case: Case) -> dict:
    return dict(q_offset=case.q_offset, k_offset=case.k_offset)


def check_twin(case: Case, pattern) -> Optional[str]:
    b, h = case.B - 1, case.Hq - 1
    if case.mask is not None or (case.mod_cond is not None and case.mod_inf):
        got = pair_mask(pattern, q_rows=case.Nq, k_rows=case.Nk, batch=case.B, heads=case.Hq, **_positions(case),
                        params=case.call_params)[b, h]
        m = python_grid(case, case.mask, b, h) if case.mask is not None else None
        c = python_grid(case, case.mod_cond, b, h) if case.mod_cond is not None and case.mod_inf else None
        want = torch.tensor([[bool(m[r][k] if m else True) and bool(c[r][k] if c else True) for k in range(case.Nk)]
                             for r in range(case.Nq)], dtype=torch.bool).view(case.Nq, case.Nk)
        if not torch.equal(got, want):
            bad = (got != want).nonzero()[0].tolist()
            return (f"mask differs from Python at {int((got != want).sum())} pairs, first (row {bad[0]}, col {bad[1]}):"
                    f" reference {bool(got[bad[0], bad[1]])}, Python {bool(want[bad[0], bad[1]])}")
    if case.bias is not None:
        env = index_env(pattern, batch=case.B, heads=case.Hq, q_rows=case.Nq, k_rows=case.Nk, **_positions(case),
                        params=case.call_params)
        got = evaluate(pattern.bias, env).double().expand(case.B, case.Hq, case.Nq, case.Nk)[b, h]
        want = torch.tensor(python_grid(case, case.bias, b, h), dtype=torch.float64).view(case.Nq, case.Nk)
        if not torch.equal(got, want):
            bad = (got != want).nonzero()[0].tolist()
            return (f"bias differs from Python at {int((got != want).sum())} pairs, first (row {bad[0]}, col {bad[1]}):"
                    f" reference {float(got[bad[0], bad[1]])!r}, Python {float(want[bad[0], bad[1]])!r}")
    return None


def check_tiles(case: Case, pattern) -> Optional[str]:
    from attncc.analysis import analyze
    from attncc.analysis.graph import walk_grid
    from attncc.core import tiles
    from tile_oracle import tile_classes

    if pattern.mask is None:
        return None
    plan = analyze(pattern)
    params = {n: _plain(c) for n, c in case.call_params.items()}
    for b in range(case.B):
        for h in range(case.Hq):
            truth = pair_mask(pattern, q_rows=case.Nq, k_rows=case.Nk, batch=case.B, heads=case.Hq, **_positions(case),
                              params=case.call_params)[b, h]
            want = dict(zip(("forward", "dkdv"), tile_classes(truth, *case.tile)))
            want["dq"] = want["forward"]
            for walk in ("forward", "dq", "dkdv"):
                got = walk_grid(plan, walk, q_rows=case.Nq, k_rows=case.Nk, block_m=case.tile[0],
                                block_n=case.tile[1], b=b, h=h, params=params, **_positions(case))
                w = want[walk]
                unsound = ((got == tiles.EMPTY) & (w != tiles.EMPTY)) | ((got == tiles.FULL) & (w != tiles.FULL))
                if unsound.any():
                    return f"{walk} b={b} h={h}: {int(unsound.sum())} tiles skipped or run unmasked wrongly"
    return None


def check_explain(case: Case, pattern) -> Optional[str]:
    """``attncc explain``'s numbers (attncc.report.explain_data, positions from 0) against brute force:
    the allowed pairs exactly, and each walk's tile counts against its grid (walk_grid, which
    check_tiles compares with brute force)."""
    from attncc.analysis import analyze
    from attncc.analysis.graph import walk_grid
    from attncc.core import tiles
    from attncc.report import explain_data

    if pattern.mask is None or case.q_offset or case.k_offset:
        return None
    plan = analyze(pattern)
    # a mask of float arithmetic: explain counts its tiles exactly, the kernels' classifier is
    # conservative at float boundaries (``abs(f1) >= 1e16 * f0`` at f0 = f1 = 0: FULL in explain,
    # PARTIAL in walk_grid): compare the tiles of integer masks only
    exact = not any(e is not None and e.has_float for e in (case.mask, case.mod_cond if case.mod_inf else None))
    params = {n: _plain(c) for n, c in case.call_params.items()}
    d = explain_data(plan, n_q=case.Nq, n_k=case.Nk, block_m=case.tile[0], block_n=case.tile[1], batch=case.B,
                     heads=case.Hq, params=params, head_dim=8)
    truth = pair_mask(pattern, q_rows=case.Nq, k_rows=case.Nk, batch=case.B, heads=case.Hq, params=case.call_params)
    if d["allowed_pairs"] != int(truth.sum()):
        return f"explain: allowed_pairs {d['allowed_pairs']}, brute force {int(truth.sum())}"
    for walk, key in (("forward", "forward"), ("dkdv", "dkdv")):
        counts = {"empty": 0, "full": 0, "partial": 0}
        for b in range(case.B):
            for h in range(case.Hq):
                g = walk_grid(plan, walk, q_rows=case.Nq, k_rows=case.Nk, block_m=case.tile[0], block_n=case.tile[1],
                              b=b, h=h, params=params)
                for name, cls in (("empty", tiles.EMPTY), ("full", tiles.FULL), ("partial", tiles.PARTIAL)):
                    counts[name] += int((g == cls).sum())
        got = d["walks"][key]["tiles"]
        if got != counts and exact:
            return f"explain: {walk} tiles {got}, walk_grid {counts}"
    return None


def check_kernels(case: Case) -> Optional[str]:
    built = build_spec(case.text)
    if isinstance(built, Exception):
        return f"build: {type(built).__name__}: {str(built)[:300]}"
    pattern, mod = built
    gen = torch.Generator().manual_seed(case.seed)
    shape_q, shape_k = (case.B, case.Hq, case.Nq, 8), (case.B, 1, case.Nk, 8)
    q, k, v = (torch.randn(s, generator=gen).requires_grad_(case.backward) for s in (shape_q, shape_k, shape_k))
    kw = dict(**_positions(case), **case.call_params)
    tiles = (case.tile, (case.tile[1], case.tile[0]), case.tile)
    qd, kd, vd = (x.detach().double().requires_grad_(case.backward) for x in (q, k, v))
    try:
        ref, ref_lse = attncc.reference(pattern, qd, kd, vd, return_lse=True, **kw)
    except ValueError as e:
        ref = e
    try:
        with _tile_config(tiles):
            o, lse = mod.attention(q, k, v, return_lse=True, **kw)
    except ValueError as e:
        if isinstance(ref, Exception):
            _count("kernel and reference refused")
            return None  # both refuse (an int past the range the language allows)
        return f"kernel raised {type(e).__name__}: {str(e)[:300]}"
    except Exception as e:  # noqa: BLE001
        return f"kernel raised {type(e).__name__}: {str(e)[:300]}"
    if isinstance(ref, Exception):
        return f"reference raised, the kernels did not: {ref}"
    err = _rel(o, ref)
    if err > 1e-4 or torch.isnan(o).any():
        return f"o: relative error {err:.3g}"
    fin = torch.isfinite(ref_lse)
    if not torch.equal(fin, torch.isfinite(lse)):
        return "lse: rows without keys differ"
    if fin.any():
        diff = float(((lse.detach()[fin].double() - ref_lse.detach()[fin]).abs()).max())
        if diff > 1e-4:
            return f"lse: error {diff:.3g}"
    _count("kernels compared" + (" with backward" if case.backward else ""))
    if case.backward:
        g = torch.randn(o.shape, generator=gen, dtype=torch.float64)
        with _tile_config(tiles):
            o.backward(g.float())
        ref.backward(g)
        for name, x, xd in (("dq", q, qd), ("dk", k, kd), ("dv", v, vd)):
            err = _rel(x.grad, torch.zeros_like(xd) if xd.grad is None else xd.grad)
            if err > 1e-3:
                return f"{name}: relative error {err:.3g}"
    return None


def check_seed(seed: int, kernels: bool = True) -> Optional[str]:
    case = draw_case(seed)
    try:
        pattern = parse_spec(case.text, f"sem{seed}.toml")
    except SpecError as e:
        if "divisor" in str(e) or "allows no pair" in str(e) or "int64" in str(e):
            _count("spec refused: " + str(e).split(": ", 2)[-1][:60])
            return None
        return f"seed {seed}: parse: {e}\n{case.text}"
    stages = [("twin", check_twin), ("tiles", check_tiles), ("explain", check_explain)]
    if kernels:
        stages.append(("kernels", lambda c, p: check_kernels(c)))
    _count("parsed")
    for stage, fn in stages:
        try:
            bad = fn(case, pattern)
        except ValueError as e:  # a call value the language refuses: refused by every stage alike
            if stage == "twin" and ("must be" in str(e) or "divisor" in str(e)):
                _count("call refused: " + str(e)[:60])
                return None
            bad = f"raised ValueError: {str(e)[:300]}"
        except Exception as e:  # noqa: BLE001
            bad = f"raised {type(e).__name__}: {str(e)[:300]}"
        if bad:
            _count("failed")
            return f"seed {seed}: {stage}: {bad}\n  {case.describe()}\n" + "".join(f"  | {x}\n" for x in case.text.splitlines())
    return None


def main(argv=None) -> int:
    return drawn_spec_main(argv, draw_case, check_seed, stats=STATS)

if __name__ == "__main__":
    sys.exit(main())
