"""Probe fuzz20: the existing seeded generators run on seeds never run before, every failure
triaged (counts in the report of branch fuzz20):

- tests/fuzz_specs.py, seeds 731000..731852 (853 cases: forward, backward, packed calls): clean.
- tests/probe_sem19.py, seeds 742000..742717 (718 cases, kernels included): two failures of its
  Python twin (below), one known refusal; after the twin's fix 742718..743320 (603): clean.
- tests/probe_grad19.py, seeds 753000..753242 (243 cases): two failures, a tolerance (below);
  after its fix 753243..753477 (235): clean.
- tests/probe_inputs20.py, seeds 764000..764021 of each of its 6 specs (132 calls): clean.
- tests/probe_specs.py, seeds 775000..775393 (394 cases, kernels included): clean.

Found, a tolerance of probe_grad19 (not attncc): a table gradient that is zero in exact
arithmetic (``bias = -0.7 * t1[h, ...] + -0.7 * t2[b, h, i]``, loss without the LSE: a per-row
term cancels in the softmax) came out at norm 3.4e-3 / 1.3e-3 with float16 q, k, v against a
floor of 1e-2 (rel err 0.34, 0.13; seeds 753048, 753201). That value is exactly
``sum_i dO_i . (o_exact_i - o_i)`` (norms 1.5890e-3 vs 1.5894e-3, cosine 0.9999999 on the reduced
``bias = "t[b, h]"``): the kernels' delta is rowsum(dO * o) of the float16 o they return, as
FlashAttention's is. probe_grad19 now allows that rounding's total on table gradients.

Found, a generator issue (not attncc): probe_sem19's twin compared a bare position or int with
a float exactly, as Python does (``int == float`` is exact), where docs/spec-language.md ("Float
arithmetic") says every integer is converted to float64 after its own integer arithmetic. Past
2**53 the two differ: ``bias = where(... or (n_q == n_k * 1.0), 1.5, -0.5)`` at q_offset =
2**53 - 9, Nq = 36, k_offset = 2**53 - 12, Nk = 39 (n_q = n_k = 2**53 + 27, and float64(n_q) is
n_k * 1.0: the reference's 1.5 is the doc's; seed 742350) and ``j < max(i * 1.0, f0) != ...``
(seed 742380). The twin now writes float() around the int side of such comparisons; the
reference and the kernels agree with the doc (the tests below).

Seen, known, not fixed (main's 9df4d8b made its error clear): a float comparison of two
differences, ``where((f1 - b * 1.0) == (f0 - n_q * 1.0), 1.5, -0.5)``, is refused ("sympy could
not settle a comparison ... write the comparison as one side minus the other against 0";
probe_sem19 seed 742473).
"""
from __future__ import annotations

import pytest
import torch

import attncc
from fuzz_specs import _rel, build_spec
from probe_sem19 import check_seed

BIG = 2 ** 53


def _mask_of(pattern, nq, nk, **kw):
    """The reference's mask: weights with v = the identity (0 exactly where a pair is out)."""
    q = torch.randn(1, 1, nq, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    k = torch.randn(1, 1, nk, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eye = torch.eye(nk, dtype=torch.float64).view(1, 1, nk, nk)
    return attncc.reference(pattern, q, k, eye, **kw)[0, 0] > 0


@pytest.mark.parametrize("q_offset,k_offset", [(BIG - 5, BIG - 5), (BIG + 1, BIG - 3), (BIG - 9, BIG - 12)])
def test_bare_int_against_float_is_float64_past_2_53(q_offset, k_offset):
    """``j < i * 1.0``: j converted to float64 before it meets the float, as the doc says (exact
    Python would allow the diagonal where float64(i) rounds up: i = 2**53 + 3)."""
    nq = nk = 16
    text = '[mask]\nwhere = "j < i * 1.0"\n'
    pattern, mod = build_spec(text)
    got = _mask_of(pattern, nq, nk, q_offset=q_offset, k_offset=k_offset)
    i = torch.arange(q_offset, q_offset + nq, dtype=torch.int64).view(-1, 1)
    j = torch.arange(k_offset, k_offset + nk, dtype=torch.int64).view(1, -1)
    want = j.double() < i.double() * 1.0
    assert torch.equal(got, want)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, n, 8, generator=g) for n in (nq, nk, nk))
    o = mod.attention(q, k, v, q_offset=q_offset, k_offset=k_offset)
    ref = attncc.reference(pattern, q.double(), k.double(), v.double(), q_offset=q_offset, k_offset=k_offset)
    assert _rel(o, ref) < 1e-5


def test_n_q_against_float_n_k_past_2_53():
    """seed 742350 reduced: n_q == n_k * 1.0 where n_q = n_k = 2**53 + 27 (odd): true."""
    pattern, mod = build_spec('[score]\nbias = "where(n_q == n_k * 1.0, 1.5, -0.5)"\n')
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, n, 8, generator=g) for n in (6, 9, 9))
    kw = dict(q_offset=BIG + 21, k_offset=BIG + 18)
    o = mod.attention(q, k, v, **kw)
    ref = attncc.reference(pattern, q.double(), k.double(), v.double(), **kw)
    plain = attncc.reference(build_spec('[score]\nbias = "1.5"\n')[0], q.double(), k.double(), v.double(), **kw)
    assert torch.allclose(ref, plain)  # the same bias on every pair: softmax sees 1.5 everywhere
    assert _rel(o, ref) < 1e-5


# probe_sem19: 742350 and 742380 failed (the twin), the others are clean new seeds kept as regressions
@pytest.mark.parametrize("seed", [742350, 742380])
def test_sem19_seeds(seed):
    assert check_seed(seed) is None


# probe_grad19: 753048 and 753201 failed (a zero table gradient against o's float16 rounding:
# a tolerance of the generator), 753000 and 753100 are clean new seeds
@pytest.mark.parametrize("seed", [753048, 753201, 753000, 753100])
def test_grad19_seeds(seed):
    from probe_grad19 import run_case
    problems, _ = run_case(seed, False)
    assert not problems, problems


# tests/fuzz_specs.py: clean new seeds (853 ran clean), a few kept as regressions
@pytest.mark.parametrize("seed", [731000, 731417, 731852])
def test_fuzz_specs_seeds(seed):
    import fuzz_specs as F
    failure = F.check_case(seed)
    assert failure is None, f"\n{failure}"
