"""Probe 19 (float grouping): a float coefficient times integer arithmetic (sums and differences of
int params, positions, literals, floors, modulos) with large cancelling constants, in biases, score
transforms, learned-table gradients, decode, the Gluon score fragments and masks, against
attncc.reference and exact Python arithmetic; int params near 1e9, 2**31, 2**53 and 2**62.

Found and fixed (tests/test_probe_nan19.py's two strict xfails; docs/spec-language.md §3: "the
integer terms of a float sum are added up as integers before they meet a float"):

- ``(p0 - 1000000000) * 0.01 * j`` with p0 = 1000000003 (the spec keeps ``j*(0.01*(p0 -
  1000000000))``) was computed ``0.01 * tmp0 * prm_p0 - 10000000.0 * tmp0`` in float32 (tmp0 =
  j - i): the exact integer 3 distributed over the float factor, two products of 1e7 that cancel:
  o 2.6x off (``(p0 - 1000000000) * (j - i) * 0.1``: 1.34x). Any int param, in every kernel
  (forward, dK/dV, dQ, the row terms of the LSE, decode). Cause: score code takes the parser's
  grouping off (analysis.integer.ungrouped) and sympy distributes a number over a sum the moment
  the two meet (``Mul(0.01, p0 - 10**9)`` is ``0.01*p0 - 10000000.0``), ``sympy.expand`` in
  split_along_j distributes any factor, and recentered's ``c * a`` and the product rule of the
  learned tables' derivatives (``t0[h] * (p0 - C) * 0.01 * j``) did it again; integer_sums could
  not regroup the terms, whose float coefficients are no integer multiples of each other.
  Fix (attncc/analysis/integer.py): ``integer_operands`` / ``ungrouped`` keep an integer operand
  that holds a sum as one value, ``ToFloat(p0 - 1000000000)`` (computed in integers, converted
  once: the reference's order), wrapped before any product is built; ``expanded`` (split_along_j)
  leaves ToFloat and the score's float64 steps unexpanded; recentered keeps its slope ``a`` whole;
  the derivative of the learned tables works on the wrapped form (analysis/derivative.py); the
  split of bias and mod along j takes its float64 steps (analysis.exact) before the grouping is
  taken off, so those keep the grouping as written.

- Mask code (float64) of ``((j - i) // 3) / 7 >= 0.0``: analysis.separable writes ``(j - i) // 3``
  with residues, ``j // 3 + (-i) // 3 + carry``, an integer sum that the ``/ 7`` around it was
  distributed over (three float64 divisions, -5.6e-17 at j - i = 1): pair (13, 14) lost, in every
  kernel. separated() now rebuilds products with integer_factors (the sum stays one ToFloat).
- Calls split by residue class (``(i - j) % 3 == 0 and j * 0.1 <= 0.9``) or into summary columns
  run the pattern at ``j -> m*j + c`` (analysis.residue): xreplace distributed ``0.1 * j`` into
  ``0.1*m*j + 0.1*c`` in float64 (0.9000000000000001 at j = 9): key 9 dropped from every row;
  5 of 80 random float masks of split patterns lost pairs (at >= 128 rows per class by default).
  Fix: analysis.integer.substituted.
- Decode of ``abs(p0 - 2147483657 - j)`` (a WIDE call) crashed under the interpreter ("Scalar
  2147483657 is out of range for type int32"): the decode tile's key positions came from the
  loop index, a Python int there, int32 beside the literal (int64 on the GPU). templates/decode.py.j2.

Measured before -> after: random scores (forward, backward, table gradients; check_case) 13 of 60
failed before, 0 of 200 after; random decode 11 of 40 before (3 of them the crash), 0 of 60 after;
Gluon score hooks of random biases (emulated) 8 of 34 before, 0 of 34 after.

Probed clean (before and after): the reference against Python's exact arithmetic on 200 random
biases (test_reference_biases_are_pythons); 80 random boundary masks and score conditions
(``c * S * j op thr`` with thr Python's value at a pair, as [mask], as where(..., s, -inf) and as
where(..., s, s - 3)) but the separable one above; 30 data-dependent masks and biases over int64
inputs near 1e9, 2**31, 2**40, 2**53 (``(d[b, j] - C) * 0.01 * j``, the per-call classifier).

Found, not fixed: ``(p0 - 4611686018427387895 + (j - i)) * 3`` with p0 = 2**62 - 9 is refused
("is an integer constant beyond int64"): the parser checks the constants of the expanded form
(3 * -4611686018427387895), not of the expression as written, whose values are small.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import attncc
from attncc._reference import evaluate, pair_mask

F64 = torch.float64

# int param values near the edges the kernels care about (int32, float32 / float64 integers)
VALUES = (1000000003, 2**31 + 5, 2**31 - 3, 2**53 + 7, 2**62 - 9, -(2**31) + 4, 123456789)
COEFFS = ("0.01", "0.1", "0.37", "1.1", "0.003", "f0")
F0 = 0.3


def _int_sum(rng, params):
    """A random integer expression over the int params, i, j and literals whose value is small
    (|.| < ~100 on the test's positions) but whose terms are large and cancel."""
    name = rng.choice(sorted(params))
    v = params[name]
    c = v - rng.randrange(-6, 7)  # name - c: a small integer
    c_txt = f"{c}" if c >= 0 else f"({c})"
    base = rng.choice((f"({name} - {c_txt})", f"(j + {name} - {c_txt})", f"({name} - {c_txt} - i)",
                       f"({name} - {c_txt} + (j - i))"))
    other = [n for n in sorted(params) if n != name]
    form = rng.randrange(9)
    if form == 0 and other:  # two params: name - other + (other's value - name's value + d)
        o = other[0]
        d = params[o] - v + rng.randrange(-4, 5)
        return f"({name} - {o} + {d})" if d >= 0 else f"({name} - {o} - {-d})"
    if form == 1:
        return f"({base} * (j - i))"
    if form == 2:
        return f"({base} // {rng.choice((2, 3, 7))})"
    if form == 3:
        return f"({base} % {rng.choice((3, 5, 8))})"
    if form == 4:
        return f"max({base}, j - i)"
    if form == 5:
        return f"abs({base} - j)"
    if form == 6:  # nested
        k = 3 if abs(v) < 2**60 else 1  # 3 * (p0 - c) expands to constants past int64 (refused) near 2**62
        return f"(({base}) * {k} - ({_int_sum(rng, params)}))"
    if form == 7:  # a floor with a large cancelling constant inside: (j - 3c) // 3 + c is j // 3
        big = abs(c) % 2**60
        return f"((j - {3 * big}) // 3 + {big})"
    return base


def _bias(rng, params):
    s, c = _int_sum(rng, params), rng.choice(COEFFS)
    return rng.choice((f"{s} * {c} * j", f"{c} * {s} * (j - i)", f"{s} * (j - i) * {c}", f"{c} * ({s} + j)",
                       f"{s} * {c}", f"{s} / 7 * j", f"{c} * {s} * j + 0.1 * {_int_sum(rng, params)}",
                       f"{s} * {c} * i", f"0.01 * j * ({s})"))


def _mod(rng, params):
    s, c = _int_sum(rng, params), rng.choice(COEFFS)
    return rng.choice((f"s + {c} * {s} * j", f"s * (1.0 + 0.1 * {s})", f"s + tanh({c} * {s} * (j - i))",
                       f"where({c} * {s} * j > 0.5, s, s - 1.0)", f"s + {s} * {c}"))


def _spec(params, bias=None, mod=None, mask=None, table=False):
    text = "[params]\n" + "".join(f"{n} = {v}\n" for n, v in sorted(params.items())) + f"f0 = {F0}\n"
    if table:
        text += '[inputs]\nt0 = { dims = ["h"], dtype = "float32", grad = true }\n'
    if mask is not None:
        text += f'[mask]\nwhere = "{mask}"\n'
    if bias is not None or mod is not None:
        text += "[score]\n" + (f'bias = "{bias}"\n' if bias is not None else "") + (f'mod = "{mod}"\n' if mod else "")
    return text


def _python(expr, params, i, j, h=0):
    env = {**params, "f0": F0, "i": i, "j": j, "h": h, "abs": abs, "max": max, "min": min}
    return eval(expr, {"__builtins__": {}}, env)


def _random_params(rng):
    return {n: rng.choice(VALUES) for n in ("p0", "p1")[:rng.choice((1, 2))]}


def _size(parts, params):
    """The largest |bias| (or |mod - s|) over the positions the tests use, at t0 = s = 1."""
    text = parts.get("bias") or parts["mod"]
    env = {**params, "s": 1.0}
    text = text.replace("t0[h]", "1.0")
    return max(abs(float(eval(text, {"__builtins__": {}}, {**env, "f0": F0, "i": i, "j": j, "h": 0, "abs": abs,
                                                           "max": max, "min": min, "tanh": math.tanh,
                                                           "where": lambda c, a, b: a if c else b})))
               for i in range(0, 40, 3) for j in range(0, 40, 3))


def random_case(seed):
    """(params, spec parts) of a random score whose values stay moderate (|bias| <= 30: a softmax
    that is not one-hot, where float32 gradients mean something)."""
    rng = random.Random(seed)
    while True:
        params = _random_params(rng)
        kind = rng.choice(("bias", "bias", "mod", "table"))
        if kind == "bias":
            parts = dict(bias=_bias(rng, params))
        elif kind == "mod":
            parts = dict(mod=_mod(rng, params))
        else:
            parts = dict(bias=f"t0[h] * {_int_sum(rng, params)} * {rng.choice(COEFFS)} * j", table=True)
        if _size(parts, params) <= 30:
            return params, parts


# --- the reference is Python's exact arithmetic -------------------------------------------------

def test_reference_biases_are_pythons():
    """The reference computes the random expressions as Python does, value for value (200 cases)."""
    n = 12
    env0 = {"i": torch.arange(n).view(-1, 1), "j": torch.arange(n).view(1, -1), "b": 0, "h": 0, "n_q": n, "n_k": n,
            "n_heads": 1}
    for seed in range(200):
        rng = random.Random(1000 + seed)
        params = _random_params(rng)
        text = _bias(rng, params)
        p = attncc.parse_spec(_spec(params, bias=text))
        want = torch.tensor([[float(_python(text, params, a, b)) for b in range(n)] for a in range(n)], dtype=F64)
        got = evaluate(p.bias, {**env0, **params, "f0": F0}).to(F64).expand(n, n)
        assert torch.equal(got, want), (seed, text, (got - want).abs().max())


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


def check_case(params, parts, *, nq=23, nk=19, backward=True, seed=0, q_offset=0, k_offset=0):
    """Kernel forward (and backward, and the table's gradient) against the reference; the reference's
    scores against Python's (zero q, k: o is the softmax of the bias, v = identity)."""
    text = _spec(params, **parts)
    m, p = attncc.compile(text), attncc.parse_spec(text)
    g = torch.Generator().manual_seed(seed)
    B, H, D = 1, 2, 8
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (nq, nk, nk))
    kw = dict(q_offset=q_offset, k_offset=k_offset)
    tabs = {}
    if parts.get("table"):
        tabs = {"t0": torch.randn(H, generator=g)}
    xs = [x.clone().requires_grad_(backward) for x in (q, k, v)] + [t.clone().requires_grad_(backward) for t in tabs.values()]
    xd = [x.detach().double().requires_grad_(backward) for x in xs]
    o = m.attention(*xs[:3], **dict(zip(tabs, xs[3:])), **kw)
    ref = attncc.reference(p, *xd[:3], **dict(zip(tabs, xd[3:])), **kw)
    assert _rel(o, ref) < 1e-5, f"o: {_rel(o, ref):.3g} for {text}"
    if backward:
        do = torch.randn(o.shape, generator=g, dtype=F64)
        o.backward(do.float())
        ref.backward(do)
        for name, x, y in zip(("dq", "dk", "dv", "dt0"), xs, xd):
            e = _rel(x.grad, y.grad)
            assert e < 1e-4, f"{name}: {e:.3g} for {text}"
    return m, p


@pytest.mark.parametrize("seed", range(12))
def test_seeded_random_scores_against_the_reference(seed):
    """Forward, dQ / dK / dV and the learned table's gradient (12 seeds here, 4 of them wrong before;
    13 of 60 seeds failed before the fix, 0 of 200 after)."""
    params, parts = random_case(seed)
    check_case(params, parts, seed=seed, q_offset=seed % 3 * 5, k_offset=seed % 2 * 3)


@pytest.mark.parametrize("bias", [
    "(p0 - 1000000000) * 0.01 * j",  # the xfail of test_probe_nan19: 2.6x
    "(p0 - 1000000000) * (j - i) * 0.1",  # 1.34x
    "0.01 * j * (p0 - 1000000000)",
    "(p0 - 1000000000) * f0 * (j - i)",
    "(p0 - 1000000000) * 0.01 * i + 0.001 * (p0 - 999999990) * j",  # row terms and loop terms
])
def test_named_cases(bias):
    check_case({"p0": 1000000003}, dict(bias=bias))


def test_table_gradient_of_a_scaled_integer_difference():
    """The learned table's derivative (the product rule multiplied 0.01 by p0 - C: distributed)."""
    check_case({"p0": 2**53 + 7}, dict(bias="t0[h] * (p0 - 9007199254740990) * 0.01 * j", table=True))


def test_kernels_compute_the_integer_operand_once():
    """The generated score code converts the integer difference once (no distributed products)."""
    m = attncc.compile(_spec({"p0": 1000000003}, bias="(p0 - 1000000000) * 0.01 * j"))
    src = open(m.__file__).read()
    assert "10000000.0" not in src
    assert "tl.cast((prm_p0 - 1000000000), tl.float32)" in src


@pytest.mark.parametrize("seed", range(4))
def test_seeded_random_masks_on_boundaries(seed):
    """``c * S * j op threshold`` with the threshold Python's value at a pair: mask code (float64)
    decides each pair as Python does (4 seeds x 3 masks)."""
    rng = random.Random(500 + seed)
    params = _random_params(rng)
    n = 20
    masks = []
    for _ in range(3):
        s, c = _int_sum(rng, params), rng.choice(COEFFS)
        e = rng.choice((f"{c} * {s} * j", f"{s} * {c} * (j - i)", f"{s} / 7 * j", f"{c} * ({s} + j)"))
        thr = float(_python(e, params, rng.randrange(n), rng.randrange(n)))
        masks.append(f"{e} {rng.choice(('<', '<=', '>=', '>'))} {thr!r} or j == i")
    for mask in masks:
        text = _spec(params, mask=mask)
        p = attncc.parse_spec(text)
        want = torch.tensor([[bool(_python(mask.replace(" or ", " or "), params, a, b)) for b in range(n)]
                             for a in range(n)])
        assert torch.equal(pair_mask(p, q_rows=n, k_rows=n)[0, 0], want), mask
        m = attncc.compile(text)
        o = m.attention(torch.zeros(1, 1, n, 8), torch.zeros(1, 1, n, 8), torch.eye(n).view(1, 1, n, n))
        assert torch.equal(o[0, 0] > 0, want), (mask, (o[0, 0] > 0) ^ want)


@pytest.mark.parametrize("bias", ["(p0 - 1000000000) * 0.01 * j", "0.1 * (p0 - 1000000000) * (j - i)"])
def test_decode(bias):
    text = _spec({"p0": 1000000003}, bias=bias)
    m, p = attncc.compile(text), attncc.parse_spec(text)
    g = torch.Generator().manual_seed(0)
    n = 20
    q = torch.randn(2, 2, 1, 8, generator=g)
    k, v = (torch.randn(2, 2, n, 8, generator=g) for _ in range(2))
    lengths = torch.tensor([n, n - 7], dtype=torch.int32)
    o = m.decode(q, k, v, kv_len=lengths)
    for b, length in enumerate(lengths.tolist()):
        ref = attncc.reference(p, *(x[b:b + 1, :, :length if x is not q else 1].double() for x in (q, k, v)),
                               q_offset=length - 1)
        torch.testing.assert_close(o[b:b + 1].double(), ref, rtol=1e-5, atol=1e-6)


def test_gluon_score_fragment(tmp_path):
    """The Gluon forward's rendered score hook, emulated on the CPU."""
    pytest.importorskip("triton.experimental.gluon")
    from gluon_host import Fragments, load_fragments
    from test_gluon_rendered import check_emulation
    from attncc.codegen import render_gluon

    for n, bias in enumerate(["(p0 - 1000000000) * 0.01 * j", "(p0 - 1000000000) * (j - i) * 0.1"]):
        p = attncc.parse_spec(_spec({"p0": 1000000003}, bias=bias, mask="j <= i"))
        frag = Fragments(load_fragments(render_gluon(p), tmp_path, f"group19_{n}"))
        check_emulation(frag, p, p.param_values, Nq=40, Nk=40)


# --- masks: a separated floor division, and the residue / column splits' positions --------------

@pytest.mark.parametrize("where", [
    "((j - i) // 3) / 7 >= 0.0 or j == i",  # pair (13, 14) lost before: 4/7 - 5/7 + 1/7 < 0 in float64
    "((p0 - 1000000000 + (j - i)) // 3) / 7 * j >= 0.0 or j == i",
    "((i - j) // 5) * 0.1 >= -0.30000000000000004",
])
def test_separated_floor_division_in_float_mask_arithmetic(where):
    """Mask code writes ``(j - i) // 3`` with residues, ``j // 3 + (-i) // 3 + carry``
    (analysis.separable): an integer sum, which the product ``/ 7`` around it distributed over
    (three float64 divisions: -5.55e-17 where the reference has 0.0). The sum is now one integer
    operand (ToFloat) of the float arithmetic."""
    n = 20
    params = {"p0": 1000000003}
    text = _spec(params, mask=where)
    want = torch.tensor([[bool(_python(where, params, a, b)) for b in range(n)] for a in range(n)])
    assert torch.equal(pair_mask(attncc.parse_spec(text), q_rows=n, k_rows=n)[0, 0], want)
    o = attncc.compile(text).attention(torch.zeros(1, 1, n, 8), torch.zeros(1, 1, n, 8), torch.eye(n).view(1, 1, n, n))
    assert torch.equal(o[0, 0] > 0, want), ((o[0, 0] > 0) ^ want).nonzero().tolist()


SPLIT_CASES = [  # (mask, q_offset): each lost pairs before (residue split, column split)
    ("(i - j) % 3 == 0 and j * 0.1 <= 0.9", 0),  # key 9: 0.1*3*3 + 0.1*0 = 0.9000000000000001
    ("(i - j) % 2 == 0 and j * 0.7 <= 7.699999999999999", 0),
    ("(i - j) % 4 == 0 and j * 0.1 + i * 0.1 <= 6.6", 5),
    ("j * 0.3 >= 2.1 and j <= i and (i - j < 4 or j % 4 == 3)", 5),
    ("j * 0.7 + i * 0.1 > 20.199999999999996 and j <= i and (i - j < 5 or j % 5 == 4)", 0),
]


@pytest.mark.parametrize("where, q_offset", SPLIT_CASES)
def test_residue_and_column_splits_compute_float_masks_at_the_true_positions(where, q_offset, monkeypatch):
    """A call split by residue class (``(i - j) % m == 0``) or into summary columns runs kernels of
    the pattern with ``j -> m*j + c`` (analysis.residue): the substitution distributed ``0.1 * j``
    into ``0.1*m*j + 0.1*c`` in float64, which misrounds (``j * 0.1 <= 0.9`` dropped key 9 from
    every row; 5 of 80 random such masks lost pairs). It now keeps ``0.1 * ToFloat(m*j + c)``
    (analysis.integer.substituted). The splits run from 128 rows per class (1024 for the columns):
    lowered here so that tiny calls split."""
    from attncc.analysis.residue import split_of

    monkeypatch.setenv("ATTNCC_RESIDUE_MIN_ROWS", "4")
    monkeypatch.setenv("ATTNCC_COLUMN_MIN_ROWS", "4")
    n = 48
    text = f'[mask]\nwhere = "{where}"\n'
    assert split_of(attncc.parse_spec(text)) is not None
    o = attncc.compile(text).attention(torch.zeros(1, 1, n, 8), torch.zeros(1, 1, n, 8),
                                       torch.eye(n).view(1, 1, n, n), q_offset=q_offset)
    py = where.replace(" and ", ") and (")
    want = torch.tensor([[bool(eval(f"({py})", {"i": a + q_offset, "j": b})) for b in range(n)] for a in range(n)])
    assert torch.equal(o[0, 0] > 0, want), ((o[0, 0] > 0) ^ want).nonzero().tolist()[:6]


# --- decode: random scores, and a WIDE call's literal past int32 beside the key positions ---------

def _check_decode(text, seed=0, table=False):
    m, p = attncc.compile(text), attncc.parse_spec(text)
    g = torch.Generator().manual_seed(seed)
    n = 20
    q = torch.randn(2, 2, 1, 8, generator=g)
    k, v = (torch.randn(2, 2, n, 8, generator=g) for _ in range(2))
    tab = {"t0": torch.randn(2, generator=g)} if table else {}
    lengths = torch.tensor([n, n - 7], dtype=torch.int32)
    o = m.decode(q, k, v, kv_len=lengths, **tab)
    for b, length in enumerate(lengths.tolist()):
        ref = attncc.reference(p, *(x[b:b + 1, :, :length if x is not q else 1].double() for x in (q, k, v)),
                               q_offset=length - 1, **{a: x.double() for a, x in tab.items()})
        torch.testing.assert_close(o[b:b + 1].double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [4, 5, 15, 24, 32, 34])  # o wrong before (11 of 40 random seeds)
def test_seeded_random_decode(seed):
    params, parts = random_case(seed)
    _check_decode(_spec(params, **parts), seed=seed, table=bool(parts.get("table")))


@pytest.mark.parametrize("p0", [5, 2147483653])
def test_decode_literal_past_int32_beside_the_key_positions(p0):
    """``abs(p0 - 2147483657 - j)`` (a WIDE call) is printed ``2147483657 + offs_j + c0``; the
    decode tile's key positions came from the interpreter's loop index (a Python int) and were
    int32: InterpreterError "Scalar 2147483657 is out of range for type int32" (3 of 40 random
    decode cases). templates/decode.py.j2 makes them int64, as kb is on the GPU."""
    _check_decode(_spec({"p0": p0}, bias="abs(p0 - 2147483657 - j) * (j - i) * 0.01"))
