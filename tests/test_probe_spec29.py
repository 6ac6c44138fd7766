"""Probe 29 (tests/probe_spec29.py): regressions of what it found, and a few of its seeds.

1. A comparison of the score whose numbers sit in more than one group as written:
   ``where((s + 1e30) - 1e30 >= 0, s, -inf)``. Score code takes the parser's grouping of float
   arithmetic off, and sympy then adds the numbers up: the kernels tested ``s >= 0`` and removed
   every pair of negative score, where the condition as written is ``0 >= 0`` (float32 and float64
   alike absorb ``s`` into ``1e30``) and holds for every pair, as ``attncc.reference`` computes
   (o 0.38 off, silently). Such a comparison is now computed in float64 as written, on the score
   (attncc.analysis.exact.merges_numbers), which agrees with the reference whatever the size of
   the numbers (``(s + 1e7) - 1e7 >= 0`` too, which float32 as written would round).
2. Per-pair divisors that cannot be 0, which ``parse_spec`` and ``attncc.reference`` took and
   ``attncc build`` refused ("the divisor ... may be 0"): the probe's seed 538,
   ``i // where(max(n_k, x[b, j]) > 0, max(n_k, x[b, j]), -3)``, which the parser (n_k positive)
   makes ``i // max(n_k, x[b, j])`` and the build's check (n_k only nonnegative) refused;
   ``i // (n_k + j)``; and a ``where`` whose condition is its value compared strictly with 0,
   ``where(j - 3 > 0, j - 3, -3)`` (docs §3.3: a where whose every value is nonzero where it is
   taken, as its conditions say). A per-pair divisor is computed at pairs, where n_q, n_k >= 1
   (attncc.spec.signs.nonzero(at_pairs=True)), and a strict comparison or ``!=`` of the value
   itself says it is nonzero (signs._says_nonzero).
"""
from __future__ import annotations

import math

import pytest
import torch

import attncc
from attncc import parse_spec

import probe_spec29


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return math.inf
    a, b = torch.where(torch.isfinite(a), a, 0.0), torch.where(torch.isfinite(b), b, 0.0)
    return float((a - b).norm() / max(float(b.norm()), 1e-3))


def _against_reference(text: str, backward: bool = True):
    mod, pat = attncc.compile(text), parse_spec(text)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, n, 8, generator=gen) for h, n in ((4, 13), (2, 17), (2, 17)))
    kq, kk, kv = (x.clone().requires_grad_(backward) for x in (q, k, v))
    o, lse = mod.attention(kq, kk, kv, return_lse=True)
    rq, rk, rv = (x.double().requires_grad_(backward) for x in (q, k, v))
    ro, rlse = attncc.reference(pat, rq, rk, rv, return_lse=True)
    errors = {"o": _rel(o, ro), "lse": _rel(lse, rlse)}
    if backward:
        g = torch.randn(o.shape, generator=gen, dtype=torch.float64)
        got = torch.autograd.grad((o.double() * g).sum(), [kq, kk, kv])
        want = torch.autograd.grad((ro * g).sum(), [rq, rk, rv])
        errors.update({n: _rel(a, b) for n, a, b in zip(("dq", "dk", "dv"), got, want)})
    return errors


@pytest.mark.parametrize("mod", [
    "where((s + 1e30) - 1e30 >= 0, s, -inf)",       # as written: true on every pair
    "where((s + 1e30) - 1e30 == 0, s, s * 2)",
    "where(((s * 2 + 1e30) - 1e30) * 0.5 > -1, s, -inf)",
    "where((s - 1e30) + 1e30 >= 0 and j <= i, s, -inf)",
    "where(1e30 - (1e30 - s) < 0, s, -inf)",         # as written: false on every pair
    "where((s + 1e7) - 1e7 >= 0, s, -inf)",         # float32 as written would round s to integers
])
def test_a_score_condition_keeps_its_numbers_apart(mod):
    errors = _against_reference(f"[score]\nmod = '{mod}'\n", backward="1e7" not in mod)
    assert all(err < 1e-4 for err in errors.values()), errors


def test_which_comparisons_are_computed_as_written():
    from attncc.analysis.exact import ExactCondition, exact_parts, merges_numbers
    text = "[score]\nmod = 'where((s + 1e30) - 1e30 >= 0 and (s + 0.5) * 2 > 1, s, -inf)'\n"
    cond = parse_spec(text).mod.args[0][1]
    parts = [exact_parts(c) for c in cond.args]
    assert sum(isinstance(p, ExactCondition) for p in parts) == 1  # (s + 0.5) * 2 > 1 stays float32
    assert not merges_numbers(parse_spec("[score]\nmod = 'where(s + 1e30 > 1e30, s, -inf)'\n").mod)


@pytest.mark.parametrize("seed", [0, 5, 13, 301, 312, 444])
def test_probe_seeds(seed):
    assert probe_spec29.check_seed(seed) is None


@pytest.mark.parametrize("mask", [
    "i // where(max(n_k, x[b, j]) > 0, max(n_k, x[b, j]), -3) == j // 9",   # probe seed 538
    "i // max(n_k, x[b, j]) == 0 or (i % max(n_k, x[b, j])) < j",
    "(i * 7) % (n_k + j) < 5",
    "i // where(j - 3 > 0, j - 3, -3) == 1 or j == 0",
    "i % where(x[b, j] + 1 > 0, x[b, j] + 1, -3) >= 1",
    "i % where(x[b, j] != 2, x[b, j] - 2, 5) == 0 or j == i",
])
def test_a_divisor_that_cannot_be_zero_builds(mask):
    text = f"[inputs]\nx = {{ dims = ['b', 'n'], dtype = 'int8' }}\n[mask]\nwhere = '{mask}'\n"
    mod, pat = attncc.compile(text), parse_spec(text)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, n, 8, generator=gen) for n in (21, 19, 19))
    x = torch.randint(-3, 40, (2, 21), generator=gen).to(torch.int8)
    o, lse = mod.attention(q, k, v, return_lse=True, x=x, k_offset=2)
    ro, rlse = attncc.reference(pat, q.double(), k.double(), v.double(), return_lse=True, x=x, k_offset=2)
    assert _rel(o, ro) < 1e-4 and _rel(lse, rlse) < 1e-4


@pytest.mark.parametrize("mask", [
    "i // (n_q + x[b, j]) == 0",                 # x may be -n_q
    "i // where(j - 3 >= 0, j - 3, -3) == 0",    # 0 at j = 3
    "i // where(j > 2, j - 3, -3) == 0",         # 0 at j = 3
])
def test_a_divisor_that_may_be_zero_is_still_refused(mask):
    from attncc.spec import SpecError
    text = f"[inputs]\nx = {{ dims = ['b', 'n'], dtype = 'int8' }}\n[mask]\nwhere = '{mask}'\n"
    with pytest.raises(SpecError, match="may be 0"):
        attncc.compile(text)
