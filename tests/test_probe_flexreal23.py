"""Probe flexreal23: attncc against PyTorch's real FlexAttention on CPU (torch 2.13, float64, its
dense backward enabled: tests/probe_flexreal22.py says how), on programs from FlexAttention's own
test file and attention-gym's catalogue that flexreal22 did not draw (tests/probe_flexreal23.py
lists its atoms): dilated and strided windows, global tokens (a range, a captured list through
``any``), natten 2D with clamped centres and with true-division coordinates, a PagedAttention-like
physical-to-logical page table, NJT offsets read through sequence ids, per-batch lengths and
bidirectional prefixes, ``//`` and ``%`` by captured divisors (per head, per batch, negative),
float positions, bit sets, booleans compared, dense bool masks, Euclidean disks; score mods times2,
``+ h``, ALiBi through ``exp2``, softcap by a captured scalar (0-d and a learned [1]), GELU through
``erf``, silu, trig with ``tan(b)``, a 0-d int captured, chained and "weird" indexing
(``bw[0][b, h][q_idx]``, a 0-d int index), padded-dense score conditions, learned tables through
captured ids, learned [Nq, Nk] and 2S relative tables, row and key terms, min / max clamps, a
learned divisor, float params overridden per call; GQA, k/v batch 1, Nq != Nk, Nq = 1, Dv != D,
float32 / bfloat16 / float16, o, the LSE and the gradients of q, k, v and learned captured tensors.

Probed: 472 generated programs through the kernels (forward, LSE, backward against the real Flex's
forward and backward in float64, and Flex's own forward at the call's dtype): 433 clean (the last
60, drawn by the final generator, all clean); 20 the where-divisor refusal and 1 the AccumBounds
crash below (fixed); 17 a Flex limitation (its backward fails on a learned tensor read by chained
subscripts, ``bcs[b][q_idx]``: "idx shape ... must match value shape"; the generator no longer
learns those, and three of them rerun clean); 1 a NaN in both (GELU of a ``-inf`` branch, ``-inf *
0``; no longer drawn). Also 690 single-atom programs (each of the generator's 69 atoms alone, 4 and
6 seeds) through ``attncc.reference`` against Flex in float64: the first 276 clean but the divisor
refusal, the 414 after the fixes all clean; 41 hand-written forms of integer arithmetic on
positions, heads and wheres (``//`` / ``%`` of wheres, min / max, negative divisors, shifts by a
where, ``**``, ``~``, ``//`` of products, score conditions against ``//``): clean but the nested
where divisor below; and the guarded divisors below.

Found (fixed):

* ``//`` by a ``where`` (``kv_idx // where(cs[b] > 0, cs[b], 1)``, ``j // where(h == 0, 49, 7)``)
  was computed in float: sympy writes ``j / where(c, d, 7)`` as ``j * Piecewise((1/d, c), (1/7,
  True))``, which neither ``integer_fraction`` (the kernels' ``FloorDiv``) nor ``quotient`` (the
  reference's) took for a quotient, so both computed ``floor(j * (1/49))``, which is 0 at ``j = 49``
  (``49 * (1/49)`` is ``0.9999999999999999``): o 14 % off FlexAttention's, kernels and reference
  agreeing. The divisor check did not see that ``//`` either. ``quotient`` now reads such a factor
  as the ``where`` divisor it is, nested wheres too (``attncc.spec.builtins.quotient``), and
  ``integer_fraction`` uses it.
* A ``where`` around a divisor (``j % where(d[b] == 0, 3, d[b])``, ``where(d[b] > 0, d[b], 1)``,
  ``where(d[b] < 0, d[b], -1)``), which §3.3 offers, was refused ("may be 0"): the build's check
  asked sympy's assumptions about the Piecewise, which do not use its conditions. It now proves
  each value nonzero under the conditions that select it (``attncc.spec.signs._proven_nonzero``).
* In a score's ``where`` (``where((kv_idx - q_idx) % where(cm[h] == 0, 3, cm[h]) == 0, score,
  -inf)``, a port of Flex's own ``torch.where``) sympy writes the condition out case by case,
  ``(cm[h] == 0 and ... % 3 == 0) or (cm[h] != 0 and ... % cm[h] == 0)``: the build refused it
  naming ``(-i + j) % cm[h]``, which the spec does not hold, and ``attncc.reference`` raised
  ZeroDivisionError. A conjunct that divides now counts where the conjuncts that do not divide
  hold, in the reference (``Evaluator.conjunction``) and in the build's check alike (so
  ``d[b] > 0 and j % d[b] == 0`` builds too, as Python's ``and`` never divides there).
* ``sin`` / ``cos`` / ``tan`` of a ``where`` with a ``-inf`` branch, compared in another ``where``
  (a trig score_mod after a score condition): sympy made ``cos(-oo)`` an AccumBounds and the code
  generator failed ("attncc cannot render AccumulationBounds"); a SpecError now says what to write
  (Flex compares the NaN; documented in §8).
* Messages print expressions in the language's spelling (``where(...)``, ``d[b]``, ``==``), not
  sympy's ``Piecewise((3, Eq(cm[h], 0)), ...)``: one printer (``attncc.spec.expr.spec_text``) for
  ``attncc explain`` and the divisor check.
"""
from __future__ import annotations

import os
import random

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import attncc  # noqa: E402
import probe_flexreal22 as P  # noqa: E402
from attncc.codegen.bounds import check_divisors  # noqa: E402
from attncc.module_cache import toml_text  # noqa: E402
from attncc.spec.errors import SpecError  # noqa: E402


def _reference_vs_flex(p: P.Program, seed=0):
    """Relative errors of ``attncc.reference`` (o, lse) against the real flex_attention, float64."""
    q, k, v, _, _ = P.operands(p, seed)
    values = {n: c.value for n, c in p.inputs.items()}
    with torch.no_grad():
        want = P.run_flex(p, q.double(), k.double(), v.double(),
                          {n: (t.double() if t.is_floating_point() else t) for n, t in values.items()})
    got = attncc.reference(attncc.parse_spec(toml_text(p.spec())), q.double(), k.double(), v.double(),
                           return_lse=True, **values, **p.call)
    return [P._rel(a, w) for a, w in zip(got, want)]


def _program(mask=None, mod=None, **kw):
    shape = dict(B=2, Bkv=1, Hq=3, Hkv=1, Nq=53, Nk=51, D=8, Dv=8, dtype=torch.float32)
    shape.update(kw)
    return P.Program(mask=mask, mod=mod, **shape)


def _where_divisor(r: random.Random) -> str:
    """A random ``where`` that is never 0, of constants, heads or a captured ``d[b]``."""
    c = r.choice(("h == 0", "h > 0", "b == 1", "d[b] > 0", "d[b] != 0", "d[b] >= 1"))
    guarded = "d[b]" if c.startswith("d[b]") else str(r.choice((-1, 1)) * r.randint(2, 60))
    other = r.choice((-1, 1)) * r.randint(2, 60)
    return f"where({c}, {guarded}, {other})" if r.random() < 0.5 else f"where(~({c}), {other}, {guarded})"


def test_floor_division_by_a_where_is_integer_division():
    """``//`` by a random ``where`` divisor (constants up to 60, a captured per-batch divisor, negative
    ones), in a mask and in a score: attncc.reference against the real FlexAttention. Failed before:
    ``floor(j * (1/d))`` in float64 (o up to 66 % off in 4 of these 6 random forms, and 116 % with a nested where)."""
    r = random.Random(2323)
    forms = []
    for _ in range(6):
        w = _where_divisor(r)
        forms.append(r.choice((f"kv_idx // {w} == q_idx // {w}", f"(q_idx - kv_idx) // {w} <= {r.randint(-1, 1)}",
                               f"score + (kv_idx // {w}) * 0.5")))
    forms.append("kv_idx // where(h == 0, 49, where(d[b] > 0, d[b], 98)) >= 1")  # nested
    for form in forms:
        p = _program(None if form.startswith("score") else form, form if form.startswith("score") else None)
        p.inputs["d"] = P.Captured({"dims": ["b"], "dtype": "int32"}, torch.tensor([49, 0], dtype=torch.int32))
        assert max(_reference_vs_flex(p)) < 1e-9, form


@pytest.mark.parametrize("mask, mod", [
    ("kv_idx // where(cm[h] > 0, cm[h], -2) == q_idx // where(cm[h] > 0, cm[h], -2)", None),
    (None, "where((kv_idx - q_idx) % where(cm[h] == 0, 3, cm[h]) == 0, score, -inf)"),
])
def test_where_divisors_in_the_kernels(mask, mod):
    """The kernels (forward, LSE, backward) and the reference on ``//`` and ``%`` by a captured
    per-head divisor guarded by a ``where`` (0, negative, 49), in a mask and in a score's where:
    Flex's values. Failed before: ``//`` in float (o 4 % off); the ``%`` refused at build ("the
    divisor ... may be 0"), in a score's where naming a divisor not written (``(-i + j) % cm[h]``:
    sympy writes the condition out case by case, ``(cm[h] == 0 and (j - i) % 3 == 0) or (cm[h] != 0
    and (j - i) % cm[h] == 0)``), and the reference raised ZeroDivisionError there."""
    p = _program(mask, mod, B=1)
    p.inputs["cm"] = P.Captured({"dims": ["h"], "dtype": "int32"}, torch.tensor([0, -4, 49], dtype=torch.int32))
    assert max(_reference_vs_flex(p)) < 1e-9
    assert P.compare(p) == []


@pytest.mark.parametrize("divisor, accepted", [
    ("where(d[b] == 0, 3, d[b])", True), ("where(d[b] != 0, d[b], 3)", True), ("where(d[b] > 0, d[b], 1)", True),
    ("where(d[b] < 0, d[b], 1)", True), ("where(~(d[b] == 0), d[b], -2)", True),
    ("where(d[b] == 0 or h > 1, 2, d[b])", True), ("where(d[b] > 0, 2 * d[b] + 1, -1)", True),
    ("where(d[b] >= 0, d[b], 1)", False), ("where(d[b] == 0, 0, d[b])", False),
    ("where(d[b] == 0 and h > 1, 2, d[b])", False), ("where(d[b] > 0, d[b] - 1, -1)", False),
])
def test_where_divisors_are_proven_nonzero_or_refused(divisor, accepted):
    """The build's divisor check (what ``attncc.compile`` runs) under a ``where``'s conditions: each value nonzero where it is taken
    is accepted (refused before, all of them); one that may be 0 there is still refused."""
    for expr in (f"j % {divisor} == 0", f"i // {divisor} == j // {divisor}"):
        spec = {"inputs": {"d": {"dims": ["b"], "dtype": "int32"}}, "mask": {"where": expr}}
        if accepted:
            check_divisors(attncc.parse_spec(toml_text(spec)))
        else:
            with pytest.raises(SpecError, match="may be 0|undefined"):
                check_divisors(attncc.parse_spec(toml_text(spec)))


@pytest.mark.parametrize("mask, accepted", [
    ("d[b] > 0 and j % d[b] == 0", True), ("d[b] != 0 and i // d[b] == j // d[b]", True),
    ("not (d[b] == 0) and j % d[b] == h", True),
    ("d[b] >= 0 and j % d[b] == 0", False), ("d[b] > 0 and j % (d[b] - 1) == 0", False),
    ("d[b] > 0 or j % d[b] == 0", False),
])
def test_divisors_guarded_by_a_conjunct(mask, accepted):
    """A conjunct that keeps a divisor nonzero (Python's ``and`` never divides where it is false)
    is accepted (refused before); one that allows 0 there, or an ``or``, is refused."""
    spec = {"inputs": {"d": {"dims": ["b"], "dtype": "int32"}}, "mask": {"where": mask}}
    if accepted:
        check_divisors(attncc.parse_spec(toml_text(spec)))
    else:
        with pytest.raises(SpecError, match="may be 0"):
            check_divisors(attncc.parse_spec(toml_text(spec)))


@pytest.mark.parametrize("mod", ["where(cos(where(s > 0, s, -inf)) > 0.5, s, 0.0)",
                                 "where(sin(cos(where(s > -1.0, s, -inf))) + tan(b) > 0.1, s, s * 0.5)"])
def test_periodic_function_of_an_infinite_branch_compared_is_refused(mod):
    """``cos`` of a ``where`` with a ``-inf`` branch, compared in another ``where`` (a generated trig
    score_mod after a score condition): sympy writes the comparison out case by case and makes
    ``cos(-oo)`` an AccumBounds, which Python's and torch's NaN is not; the build failed in the code
    generator (NotImplementedError "attncc cannot render AccumulationBounds"). A SpecError now names
    the expression and what to write (the function inside the where's finite branch)."""
    with pytest.raises(SpecError, match="sin, cos, tan of inf are NaN"):
        attncc.parse_spec(toml_text({"score": {"mod": mod}}))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [44, 65, 142])
def test_generated_programs_against_real_flex(seed):
    """A few of the generator's programs (``%`` by a where divisor in masks and a score's where, with
    windows, NJT offsets, bit tests), kernels with backward against the real FlexAttention."""
    import probe_flexreal23 as Q

    problems, desc = Q.check_seed(seed)
    assert problems == [], desc
