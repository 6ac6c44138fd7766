"""Probe 28 (quirk): conjunctions the Triton interpreter refuses.

Triton 3.6's interpreter keeps a comparison's result in its operands' numpy type and ``x & y``'s in
``x``'s (casting wider data down to it): a float32 tile comparison ``&`` int64 data (a per-program
scalar comparison spread over the tile, ``(b + 1) >= 0``, or logic begun with one) became a float32
array, and the next ``&``, ``|``, ``^`` or ``~`` raised ``TypeError: ufunc 'bitwise_and' not
supported``. Measured on a kernel matrix of three operands (float32 / float16 tile comparisons,
int64 / int32 scalar ones, a scalar float comparison, ``tl.where(c, True, False)``, a loaded bool
mask, an int32 tile comparison): it raises exactly when the chain begins with a float tile
comparison and meets int64 data before another bitwise operation, or when a scalar float
comparison is spread over a tile (float data at once). ``tl.where(c, True, False)`` (int1), an
integer tile comparison or an int64 scalar one first: clean. Float64 comparisons hold int64 data.

The kernels already wrote scalar float comparisons as ``tl.where(c, True, False)`` and hoisted scalar
conditions of b / h the same way, and 263fa7a put the dQ kernel's ``(dg != 0.0)`` after the index
checks. Left: a score condition whose float32 comparison of the score (one with i or j) sorted
before logic holding a row's or column's condition of b or h, whose data is int64
(``row0 = (b < 1) & (offs_i < 5)``): ``where((s >= 0.01 * i and ((j < 7 and h < 1) or (i < 5 and
b < 1))) or s > 3, s, -inf)`` printed ``((s >= ...) & (row0[:, None] | ...)) | ...`` and every
forward raised (TypeError: ufunc 'bitwise_or' not supported). The printer now writes those float32
comparisons after the other operands of each ``&``, ``|``, ``^`` (TritonPrinter._narrow_last; the
same value on the GPU), and the string-level masks join through printer.conjunction (checks first).

Each case below: a seeded draw of that shape (score comparisons with i / j, row / column conditions
of b, h and inputs, under ``and`` / ``or``, ``!=`` (``^``) or ``not`` (``~``)) on a random call, o and
lse against attncc.reference in float64, dq / dk / dv for some.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import attncc
from attncc import parse_spec
from attncc.codegen.printer import conjunction

SCORE = ["s >= 0.01 * i", "s <= 0.05 * j - 0.4", "s * 2 >= i * 0.02 - 1", "s - 0.1 * j <= 0.3", "s < 0.5 * j"]
ROWS = ["i < {k} and b < 1", "z[b, i] < 0.8 and h < 1", "(i + h) % 3 != 0 and b >= 1", "i >= {k} or h >= 1"]
COLS = ["j < {k} and h < 1", "z[b, j] > 0.3 and b < 1", "(j + b) % 2 == 0 and h >= 1", "j >= {k} or b >= 1"]
OTHER = ["s > 3", "s < -2.5", "j == i"]


def draw(seed: int):
    """(spec text, call) of the shape above."""
    rng = random.Random(seed)
    k = rng.randint(2, 9)
    row, col = rng.choice(ROWS).format(k=k), rng.choice(COLS).format(k=k)
    inner = f"({row}) or ({col})" if rng.random() < 0.5 else f"({col}) or ({row})"
    score, other = rng.choice(SCORE), rng.choice(OTHER)
    cond = rng.choice([f"({score} and ({inner})) or {other}", f"({score}) != ({inner}) or {other}",
                       f"not ({score} and ({inner})) and j <= i + {k}"])
    text = (f'name = "quirk28_{seed}"\n[inputs]\nz = {{ dims = ["b", "n"], dtype = "float32" }}\n'
            f'[score]\nmod = "where({cond}, s, -inf)"\n')
    gen = torch.Generator().manual_seed(seed)
    B, Hkv = rng.choice((1, 2, 3)), rng.choice((1, 2))
    Hq = Hkv * rng.choice((1, 2))
    Nq, Nk, D = rng.randint(1, 33), rng.randint(1, 33), 8
    q_offset = rng.choice((0, rng.randint(0, 6)))
    call = dict(q=torch.randn(B, Hq, Nq, D, generator=gen), k=torch.randn(B, Hkv, Nk, D, generator=gen),
                v=torch.randn(B, Hkv, Nk, D, generator=gen), q_offset=q_offset,
                z=torch.rand(B, max(Nq + q_offset, Nk), generator=gen))
    return text, call


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    fin = torch.isfinite(b)
    if not torch.equal(fin, torch.isfinite(a)):
        return math.inf
    a, b = torch.where(fin, a, 0.0), torch.where(fin, b, 0.0)
    return float((a - b).norm() / max(float(b.norm()), 1e-3))


def check(seed: int, backward: bool) -> list:
    text, c = draw(seed)
    mod, pat = attncc.compile(text), parse_spec(text)
    q, k, v = (c[n].clone().requires_grad_(backward) for n in "qkv")
    o, lse = mod.attention(q, k, v, return_lse=True, q_offset=c["q_offset"], z=c["z"])
    rq, rk, rv = (c[n].double().requires_grad_(backward) for n in "qkv")
    ro, rlse = attncc.reference(pat, rq, rk, rv, return_lse=True, q_offset=c["q_offset"], z=c["z"])
    bad = [(label, err) for label, err in (("o", _rel(o, ro)), ("lse", _rel(lse, rlse))) if err > 1e-4]
    if backward:
        g = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        got = torch.autograd.grad((o.double() * g).sum(), [q, k, v])
        want = torch.autograd.grad((torch.where(torch.isfinite(ro), ro, 0.0) * g).sum(), [rq, rk, rv])
        bad += [(label, err) for label, a, b in zip(("dq", "dk", "dv"), got, want) if (err := _rel(a, b)) > 2e-3]
    return [(text.splitlines()[-1], bad)] if bad else []


def test_the_reported_spec_runs():
    """The spec that raised in every forward (TypeError: ufunc 'bitwise_or' not supported)."""
    text = ('name = "quirk28_t7"\n[score]\n'
            'mod = "where((s >= 0.01 * i and ((j < 7 and h < 1) or (i < 5 and b < 1))) or s > 3, s, -inf)"\n')
    mod, pat = attncc.compile(text), parse_spec(text)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 13, 8, generator=gen)
    k, v = torch.randn(2, 2, 11, 8, generator=gen), torch.randn(2, 2, 11, 8, generator=gen)
    o, lse = mod.attention(q, k, v, return_lse=True)
    ro, rlse = attncc.reference(pat, q.double(), k.double(), v.double(), return_lse=True)
    assert _rel(o, ro) < 1e-4 and _rel(lse, rlse) < 1e-4


@pytest.mark.parametrize("seed", range(6))
def test_score_condition_over_row_and_column_conditions(seed):
    assert check(seed, backward=seed < 2) == []


@pytest.mark.slow
@pytest.mark.parametrize("block", range(4))
def test_score_condition_over_row_and_column_conditions_more_seeds(block):
    fails = [f for seed in range(100 + 10 * block, 110 + 10 * block) for f in check(seed, backward=seed % 3 == 0)]
    assert fails == []


def test_conjunction_puts_the_checks_first():
    assert conjunction(["(x >= 0)", "(x < n)"], ["(g != 0.0)"]) == "(x >= 0) & (x < n) & (g != 0.0)"
    assert conjunction(["(x >= 0)"]) == "(x >= 0)"
