"""Randomized differential testing in CI: fixed seeds of tests/fuzz_specs.py (random specs and
calls, generated kernels under the interpreter against the float64 reference), and checks that the
fuzzer cannot pass silently.

Longer local runs:

    ATTNCC_FUZZ=500 python -m pytest -q tests/test_fuzz.py -k long     # seeds 10000.. (ATTNCC_FUZZ_START)
    python tests/fuzz_specs.py --cases 500 --start 10000               # the same, failures shrunk
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import sympy
import torch

import attncc
import fuzz_specs as F
from attncc.spec import symbols as S

FORWARD_SEEDS = range(0, 80)
BACKWARD_SEEDS = range(5000, 5025)

# Seeds that fail on today's code because of a known bug, with the tag of that bug
# (fuzz_specs.BUG_TAGS: issue 15's, and those this fuzzer found, tests/test_fuzz_regressions.py).
# Such a seed must still fail, and carry that tag (an xfail); once the bug is fixed it passes and
# its test fails ("passes now"): delete the entry.
KNOWN_FAILING: dict = {}  # (label, seed) -> bug tag, while a bug found by a CI seed is open


def _check(label: str, seed: int, backward: bool) -> None:
    failure = F.check_case(seed, backward=backward)
    known = KNOWN_FAILING.get((label, seed))
    if known is None:
        assert failure is None, f"\n{failure}"
    elif failure is None:
        pytest.fail(f"{label} seed {seed} passes now: remove it from KNOWN_FAILING (was: {known})")
    else:
        assert known in failure.suspects, f"expected the known bug {known!r}, got:\n{failure}"
        pytest.xfail(f"known bug {known}: {F.BUG_TAGS[known]}")


@pytest.mark.parametrize("seed", FORWARD_SEEDS)
def test_forward(seed):
    _check("forward", seed, backward=False)


@pytest.mark.parametrize("seed", BACKWARD_SEEDS)
def test_backward(seed):
    _check("backward", seed, backward=True)


# ---------------------------------------------------------------------------------------------
# the long local mode
# ---------------------------------------------------------------------------------------------

_LONG = int(os.environ.get("ATTNCC_FUZZ", "0") or 0)
_LONG_START = int(os.environ.get("ATTNCC_FUZZ_START", "10000"))
_LONG_AVOID = frozenset(t for t in os.environ.get("ATTNCC_FUZZ_AVOID", "").split(",") if t)


@pytest.mark.parametrize("seed", range(_LONG_START, _LONG_START + _LONG) if _LONG else
                         [pytest.param(None, marks=pytest.mark.skip(reason="set ATTNCC_FUZZ=N to run N more seeds"))])
def test_long(seed):
    """A failure carrying a known bug's tag is an xfail; anything else fails, shrunk."""
    failure = F.check_case(seed, avoid=_LONG_AVOID)
    if failure is None:
        return
    if failure.suspects:
        pytest.xfail(f"probably known bug(s) {', '.join(failure.suspects)}:\n{failure}")
    pytest.fail(f"\n{F.minimize(failure, budget_s=60)}")


# ---------------------------------------------------------------------------------------------
# the fuzzer is not blind: planted bugs are reported
# ---------------------------------------------------------------------------------------------

def _passing_float32_seeds(count: int, backward: bool):
    seeds = []
    for seed in FORWARD_SEEDS if not backward else BACKWARD_SEEDS:
        if (("backward" if backward else "forward"), seed) in KNOWN_FAILING:
            continue
        draft, plan = F.draw_case(seed, backward)
        if (plan.dtype == "float32" and not plan.nan and plan.decode is None
                and not F.call_tags(draft, plan) & set(F.BUG_TAGS) and not _all_rows_empty(seed, backward)):
            seeds.append(seed)
        if len(seeds) == count:
            break
    return seeds


def _without_heaviest_pair(pattern, q, k, v, **kw):
    """The reference of ``pattern`` with one pair taken out of the mask: in the first query row
    that has keys, the key of the largest weight. A kernel that kept that pair (a tile
    misclassified, a bound off by one) differs from this by at least that weight."""
    positions = {x: kw.get(x) for x in ("q_offset", "k_offset", "n_q", "n_k")}
    rest = {x: y for x, y in kw.items() if x not in positions and x != "return_lse"}
    nk = k.shape[2]
    eye = torch.eye(nk, dtype=torch.float64).expand(k.shape[0], k.shape[1], nk, nk)
    weights = attncc.reference(pattern, q, k, eye, **positions, **rest)  # [B, Hq, Nq, Nk]: p itself
    rows = (weights[0, 0].sum(-1) > 0).nonzero()
    if not len(rows):
        return attncc.reference(pattern, q, k, v, **kw)
    r = int(rows[0])
    c = int(weights[0, 0, r].argmax())
    i0, j0 = (positions["q_offset"] or 0) + r, (positions["k_offset"] or 0) + c
    pair = sympy.And(sympy.Eq(S.i, i0), sympy.Eq(S.j, j0))
    mask = sympy.Not(pair) if pattern.mask is None else sympy.And(pattern.mask, sympy.Not(pair))
    return attncc.reference(dataclasses.replace(pattern, mask=mask), q, k, v, **kw)


def test_a_pair_missing_from_the_mask_is_reported():
    """Against a reference whose mask lacks one pair, every case with an allowed pair fails."""
    seeds = _passing_float32_seeds(10, backward=False)
    assert len(seeds) == 10
    for seed in seeds:
        failure = F.check_case(seed, backward=False, reference=_without_heaviest_pair)
        assert failure is not None and failure.kind == "mismatch", f"seed {seed}: a missing pair went unnoticed"


def _all_rows_empty(seed, backward) -> bool:
    draft, plan = F.draw_case(seed, backward)
    built = F.build_spec(draft.text)
    if isinstance(built, Exception):
        return True  # nothing to compare
    pattern, _ = built
    a = F.call_arguments(draft, plan)
    _, lse = attncc.reference(pattern, a.q.double(), a.k.double(), a.v.double(), return_lse=True,
                              **a.positions, **a.params, **a.inputs)
    return not torch.isfinite(lse).any()


def test_a_wrong_gradient_is_reported():
    """A reference whose output carries 1% more gradient (same values): every backward case fails."""
    def steeper(pattern, q, k, v, **kw):
        o, lse = attncc.reference(pattern, q, k, v, **kw)
        return o + 0.01 * (o - o.detach()), lse

    seeds = _passing_float32_seeds(4, backward=True)
    assert len(seeds) == 4
    for seed in seeds:
        failure = F.check_case(seed, backward=True, reference=steeper)
        assert failure is not None and failure.what in ("dq", "dk", "dv"), f"seed {seed}: {failure}"


def test_known_bug_tags_reach_the_failures():
    """Tags tie a failing case to a known bug; the generator can avoid each tag."""
    draft, plan = F.draw_case(3)
    assert F.Failure("mismatch", "o", 1.0, "", draft, plan).tags == F.call_tags(draft, plan)
    avoid = frozenset(F.BUG_TAGS)
    for seed in range(40):
        draft, plan = F.draw_case(seed, avoid=avoid)
        assert not F.call_tags(draft, plan) & avoid, seed


def test_generator_covers_the_language():
    """Over the CI seeds the generator draws every feature the fuzzer is meant to exercise."""
    texts, tags, plans = [], set(), []
    for seed in list(FORWARD_SEEDS) + list(BACKWARD_SEEDS):
        draft, plan = F.draw_case(seed, seed in BACKWARD_SEEDS)
        texts.append(draft.text)
        tags |= F.call_tags(draft, plan)
        plans.append(plan)
    corpus = "\n".join(texts)
    for needle in ("//", "%", " or ", " and ", "n_k", "alibi", "bucket(", "softcap", "mod = ", "[rope]",
                   "where(", "-inf", "grad = true", "[heads]", "_b", "_ptr"):
        assert needle in corpus, needle
    assert {"div_param", "leaf_collision", "pos_2_31", "int64", "noncontig_int"} <= tags, tags
    assert any(p.Nq != p.Nk for p in plans) and any(p.Hq > p.Hkv for p in plans)
    assert any(p.layouts != ("contiguous",) * 3 for p in plans) and any(p.overrides for p in plans)
    assert any(p.dtype != "float32" for p in plans) and any(p.q_offset >= 2**20 for p in plans)
