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
from cases import share

FORWARD_SEEDS = range(0, 80)
BACKWARD_SEEDS = range(5000, 5025)
# every other seed runs by default (CI's time; they draw every feature: test_generator_covers_the_language),
# every seed with -m slow
FORWARD_CI, BACKWARD_CI = FORWARD_SEEDS[::2], BACKWARD_SEEDS[::2]

# Seeds that fail on today's code because of a known bug, with the tag of that bug
# (fuzz_specs.BUG_TAGS: issue 15's, and those this fuzzer found, tests/test_fuzz_regressions.py).
# Such a seed must still fail, and carry that tag (an xfail); once the bug is fixed it passes and
# its test fails ("passes now"): delete the entry.
KNOWN_FAILING: dict = {}  # (label, seed) -> bug tag, while a bug found by a CI seed is open


def _check(label: str, seed: int, backward: bool, varlen: bool = False) -> None:
    # varlen=False: these seeds draw the cases they drew before packed calls existed
    failure = F.check_case(seed, backward=backward, varlen=varlen)
    known = KNOWN_FAILING.get((label, seed))
    if known is None:
        assert failure is None, f"\n{failure}"
    elif failure is None:
        pytest.fail(f"{label} seed {seed} passes now: remove it from KNOWN_FAILING (was: {known})")
    else:
        assert known in failure.suspects, f"expected the known bug {known!r}, got:\n{failure}"
        pytest.xfail(f"known bug {known}: {F.BUG_TAGS[known]}")


@pytest.mark.parametrize("seed", share(FORWARD_SEEDS, 0, 2))
def test_forward(seed):
    _check("forward", seed, backward=False)


@pytest.mark.parametrize("seed", share(BACKWARD_SEEDS, 0, 2))
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
        draft, plan = F.draw_case(seed, backward, varlen=False)
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
    positions = {x: kw[x] for x in ("q_offset", "k_offset", "n_q", "n_k") if x in kw}  # none in a packed call
    rest = {x: y for x, y in kw.items() if x not in positions and x != "return_lse"}
    nk = k.shape[2]
    eye = torch.eye(nk, dtype=torch.float64).expand(k.shape[0], k.shape[1], nk, nk)
    weights = attncc.reference(pattern, q, k, eye, **positions, **rest)  # [B, Hq, Nq, Nk]: p itself
    rows = (weights[0, 0].sum(-1) > 0).nonzero()
    if not len(rows):
        return attncc.reference(pattern, q, k, v, **kw)
    r = int(rows[0])
    c = int(weights[0, 0, r].argmax())
    i0, j0 = (positions.get("q_offset") or 0) + r, (positions.get("k_offset") or 0) + c
    pair = sympy.And(sympy.Eq(S.i, i0), sympy.Eq(S.j, j0))
    mask = sympy.Not(pair) if pattern.mask is None else sympy.And(pattern.mask, sympy.Not(pair))
    return attncc.reference(dataclasses.replace(pattern, mask=mask), q, k, v, **kw)


def _missing_pairs_reported(seeds, varlen: bool) -> None:
    for seed in seeds:
        failure = F.check_case(seed, backward=False, reference=_without_heaviest_pair, varlen=varlen)
        assert failure is not None and failure.kind == "mismatch", f"seed {seed}: a missing pair went unnoticed"


def test_a_pair_missing_from_the_mask_is_reported():
    """Against a reference whose mask lacks one pair, every case with an allowed pair fails."""
    seeds = _passing_float32_seeds(10, backward=False)
    assert len(seeds) == 10
    _missing_pairs_reported(seeds, varlen=False)


def _all_rows_empty(seed, backward) -> bool:
    draft, plan = F.draw_case(seed, backward, varlen=False)
    built = F.build_spec(draft.text)
    if isinstance(built, Exception):
        return True  # nothing to compare
    pattern, _ = built
    a = F.call_arguments(draft, plan)
    _, lse = attncc.reference(pattern, a.q.double(), a.k.double(), a.v.double(), return_lse=True,
                              **a.positions, **a.params, **a.inputs)
    return not torch.isfinite(lse).any()


def _steeper(pattern, q, k, v, **kw):
    """The reference with 1% more gradient in its output (the same values)."""
    o, lse = attncc.reference(pattern, q, k, v, **kw)
    return o + 0.01 * (o - o.detach()), lse


def _wrong_gradients_reported(seeds, varlen: bool) -> None:
    for seed in seeds:
        failure = F.check_case(seed, backward=True, reference=_steeper, varlen=varlen)
        assert failure is not None and failure.what in ("dq", "dk", "dv"), f"seed {seed}: {failure}"


def test_a_wrong_gradient_is_reported():
    """A reference whose output carries 1% more gradient (same values): every backward case fails."""
    seeds = _passing_float32_seeds(4, backward=True)
    assert len(seeds) == 4
    _wrong_gradients_reported(seeds, varlen=False)


def test_known_bug_tags_reach_the_failures():
    """Tags tie a failing case to a known bug; the generator can avoid each tag."""
    draft, plan = F.draw_case(3)
    assert F.Failure("mismatch", "o", 1.0, "", draft, plan).tags == F.call_tags(draft, plan)
    avoid = frozenset(F.BUG_TAGS)
    for seed in range(40):
        draft, plan = F.draw_case(seed, avoid=avoid, varlen=seed % 2 == 0)
        assert not F.call_tags(draft, plan) & avoid, seed


def test_generator_covers_the_language():
    """Over the seeds CI runs (those without -m slow) the generator draws every feature the fuzzer
    is meant to exercise."""
    texts, tags, plans = [], set(), []
    for seed in list(FORWARD_CI) + list(BACKWARD_CI):
        draft, plan = F.draw_case(seed, seed in BACKWARD_SEEDS, varlen=False)
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


# ---------------------------------------------------------------------------------------------
# packed variable-length calls (cu_seqlens)
# ---------------------------------------------------------------------------------------------

# Seeds drawn as packed calls (varlen=True): forward and backward, zero-length sequences, Nq != Nk
# per sequence, unused packed rows, max_seqlen passed (exact, larger, 2**31) or computed, int64 and
# strided cu_seqlens, float16/bfloat16; 3 and 10 draw specs whose masks read [inputs] (a refusal).
VARLEN_SEEDS = (0, 2, 3, 5, 8, 10, 18, 22, 24, 32)


@pytest.mark.parametrize("seed", VARLEN_SEEDS)
def test_varlen(seed):
    _check("varlen", seed, backward=None, varlen=True)


def test_varlen_seeds_cover_the_packed_layout():
    plans = [F.draw_case(seed, varlen=True) for seed in VARLEN_SEEDS]
    vps = [p.varlen for _, p in plans]
    assert all(vp is not None for vp in vps)
    assert any(0 in vp.lens_q for vp in vps) and any(0 in vp.lens_k for vp in vps)
    assert any(vp.lens_q != vp.lens_k for vp in vps) and any(len(vp.lens_q) == 4 for vp in vps)
    assert any(vp.pad_q for vp in vps) and any(vp.pad_k for vp in vps)
    assert any(vp.max_q is None for vp in vps) and any(vp.max_q is not None and vp.max_q > max(vp.lens_q) for vp in vps)
    assert any(vp.max_q == 2**31 or vp.max_k == 2**31 for vp in vps)
    assert {vp.cu_dtype for vp in vps} == {"int32", "int64"} and any(vp.cu_layout == "strided" for vp in vps)
    assert any(p.backward for _, p in plans) and any(p.dtype != "float32" for _, p in plans)
    assert any(not F.varlen_allowed(d) for d, _ in plans)  # refusals
    assert any(F.varlen_allowed(d) and p.backward and any(x.grad for x in d.used_inputs) for d, p in plans)


def test_existing_seeds_draw_what_they_drew_before_varlen():
    """varlen=False draws no packed call and leaves every other draw of the seed alone (the packed
    part comes from a Random of its own), so the CI seeds above test what they tested before."""
    for seed in range(40):
        d0, p0 = F.draw_case(seed, varlen=False)
        d1, p1 = F.draw_case(seed)
        assert p0.varlen is None
        assert d1 == d0 and (p1 == p0 or p1 == F.with_varlen(p0, p1.varlen)), seed


def _packed_seeds(count: int, backward: bool, two_sequences: bool = False):
    """Seeds whose packed float32 case runs (its spec takes cu_seqlens) with a pair allowed."""
    seeds = []
    for seed in range(200):
        draft, plan = F.draw_case(seed, backward, varlen=True)
        vp = plan.varlen
        if vp is None or plan.dtype != "float32" or not F.varlen_allowed(draft):
            continue
        if two_sequences and not (len(vp.lens_q) >= 2 and min(vp.lens_q[:2] + vp.lens_k[:2]) >= 1):
            continue
        built = F.build_spec(draft.text)
        if isinstance(built, Exception) or F.refuses_varlen(built[0]):
            continue
        a = F.call_arguments(draft, plan)
        _, lse = F.packed_reference(built[0], vp, a.q.double(), a.k.double(), a.v.double(), reference=attncc.reference,
                                    **a.params, **a.inputs)
        if torch.isfinite(lse).any():
            seeds.append(seed)
        if len(seeds) == count:
            break
    return seeds


def test_a_pair_missing_from_the_mask_is_reported_in_packed_calls():
    seeds = _packed_seeds(6, backward=False)
    assert len(seeds) == 6
    _missing_pairs_reported(seeds, varlen=True)


def test_a_wrong_gradient_is_reported_in_packed_calls():
    seeds = _packed_seeds(3, backward=True)
    assert len(seeds) == 3
    _wrong_gradients_reported(seeds, varlen=True)


def test_sequence_boundaries_are_checked(monkeypatch):
    """Kernels given the first boundary one row later than the checker's sequences (a row moved
    from sequence 1 to sequence 0): every such case fails."""
    seeds = _packed_seeds(4, backward=False, two_sequences=True)
    assert len(seeds) == 4
    packed = F._packed_keywords

    def shifted(vp):
        out = {k: v for k, v in packed(vp).items() if k.startswith("cu_")}  # max_seqlen: computed
        for k in out:
            out[k] = out[k].clone()
            out[k][1] += 1
        return out

    monkeypatch.setattr(F, "_packed_keywords", shifted)
    for seed in seeds:
        failure = F.check_case(seed, backward=False, varlen=True)
        assert failure is not None and failure.kind == "mismatch", f"seed {seed}: moved boundary went unnoticed"


def test_refusals_are_checked_both_ways(monkeypatch):
    """A refusal where the contract computes, and an answer where it refuses, are failures."""
    refusing = [s for s in VARLEN_SEEDS if not F.varlen_allowed(F.draw_case(s, varlen=True)[0])]
    taking = _packed_seeds(1, backward=False)
    assert refusing and taking
    monkeypatch.setattr(F, "refuses_varlen", lambda pattern: False)
    failure = F.check_case(refusing[0], varlen=True)
    assert failure is not None and failure.kind == "raise" and "cu_seqlens" in failure.detail, failure
    monkeypatch.setattr(F, "refuses_varlen", lambda pattern: True)
    failure = F.check_case(taking[0], backward=False, varlen=True)
    assert failure is not None and failure.kind == "accept", failure


# ---------------------------------------------------------------------------------------------
# extensions: the constructs the draws above never make (extend_draft, extend_call)
# ---------------------------------------------------------------------------------------------

# Seeds drawn with every extension on (extend=True), forward and backward as they draw it: the
# quickest by default (~2 s on 2 cores), all with -m slow (longer runs: python
# tests/fuzz_specs.py --start 27300 --extend yes).
EXTEND_SEEDS, EXTEND_CI = range(27300, 27316), (27313,)


@pytest.mark.parametrize("seed", [pytest.param(s, marks=() if s in EXTEND_CI else pytest.mark.slow) for s in EXTEND_SEEDS])
def test_extended(seed):
    failure = F.check_case(seed, extend=True)
    assert failure is None, f"\n{failure}"


def _contains(mask, part) -> bool:
    return mask == part or (isinstance(mask, F.Node) and any(_contains(k, part) for k in mask.kids))


def test_extensions_leave_the_old_draws_alone():
    """extend=False (draw_case's default) draws what the seeds drew before extensions existed; an
    extended case keeps every earlier draw and adds to it (a Random of its own, extend_rng)."""
    for seed in range(40):
        d0, p0 = F.draw_case(seed, varlen=False)
        d1, p1 = F.draw_case(seed, varlen=False, extend=True)
        assert d1.bias[:len(d0.bias)] == d0.bias and (d0.mask is None or _contains(d1.mask, d0.mask)), seed
        assert d0.mod is None or d1.mod == d0.mod, seed
        assert (d1.head_dims, d1.dtypes, d1.rope, d1.softcap, d1.scale) == (d0.head_dims, d0.dtypes, d0.rope, d0.softcap, d0.scale)
        # (head counts, lengths, head dims, offsets and layouts are the extensions' to change)
        assert (p1.seed, p1.B, p1.dtype, p1.backward, p1.tiles, p1.nan) == \
            (p0.seed, p0.B, p0.dtype, p0.backward, p0.tiles, p0.nan), seed
        assert p1.overrides[:len(p0.overrides)] == p0.overrides, seed


def test_extensions_cover_the_blind_spots():
    """Over 200 seeds the extensions draw every construct they are there for."""
    drawn = [F.draw_case(seed, extend=True) for seed in range(200)]
    corpus = "\n".join(d.text for d, _ in drawn)
    for needle in (" ^ ", " >> ", " << ", "~", " & 7", "any(", "all(", "sum(", "dot(", "erf(", "exp2(", "log2(",
                   "tan(", "score", "dims = []", '"n", "n"', "where(j <", "% where(", "max(", "/ 2 ==", "** 0.5",
                   "True", " - 1) ", "(-1) **", "-inf, 0.0)", "sqrt(2)", "<= n_q"):
        assert needle in corpus, needle
    plans = [p for _, p in drawn]
    forms = {f for p in plans for _, f in p.param_forms}
    assert forms == {"numpy", "tensor0", "tensor1"}, forms
    casts = {c for p in plans for _, c in p.input_casts}
    assert {"float64", "float16", "int8", "uint8", "int16"} <= casts, casts
    assert any(p.Nq == 0 for p in plans) and any(p.Nk == 0 for p in plans) and any(p.Nq == 1 for p in plans)
    assert {p.D for p in plans} - {16, 32} and any(p.magnitude > 1 for p in plans) and any(p.Hq > 4 for p in plans)
    assert set(F.EXTEND_QKV_LAYOUTS) <= {lay for p in plans for lay in p.layouts}
    assert any(p.decode is not None and min(p.decode.kv_lens) < p.Nq for p in plans)
    assert any(x.name == "scale" for d, _ in drawn for x in (*d.used_params, *d.used_inputs))
    values = [v for d, p in drawn for v in [x.default for x in d.used_params] + [v for _, v in p.overrides]]
    assert any(isinstance(v, int) and v >= 2**31 for v in values) and any(isinstance(v, int) and v <= -2**31 for v in values)
    grad_views = [(d, p) for d, p in drawn for name, lay in p.input_layouts
                  if lay == "broadcast" and any(x.name == name and x.grad for x in d.used_inputs)]
    assert grad_views


# ---------------------------------------------------------------------------------------------
# the second extension layer (extend2_draft, extend2_call; tests/test_probe_fuzz28.py checks what it draws)
# ---------------------------------------------------------------------------------------------

# Seeds drawn with both layers on now and then and the second always (python tests/fuzz_specs.py
# --start 40000 --extend2 yes): one by default, all with -m slow. 40003 found the bh_index bug.
EXTEND2_SEEDS, EXTEND2_CI = range(40000, 40016), (40003,)


@pytest.mark.parametrize("seed", [pytest.param(s, marks=() if s in EXTEND2_CI else pytest.mark.slow) for s in EXTEND2_SEEDS])
def test_extended2(seed):
    failure = F.check_case(seed, extend=None, extend2=True)
    assert failure is None, f"\n{failure}"
