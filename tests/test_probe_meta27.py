"""Probe meta27 (session 27): metamorphic testing of the spec language. One attention pattern written
in several equivalent ways (comparisons rewritten, De Morgan, chained comparisons, ``//`` / ``%`` /
shifts / ``&`` with negative operands and params near 2**31, float spellings of integer
conditions, masks written in ``[mask]`` or through the mod's arithmetic, biases as ``[score].bias``
or ``s + g``, softcap as its tanh mod, ALiBi as its slopes, [inputs] against the closed forms they
were built from, offsets against shifted params) must give the same o, LSE and gradients, each
equal to ``attncc.reference``, which must equal a float64 computation written in the probe
(``tests/probe_meta27.py``, seeded; its docstring says what it draws).

Defect found (fixed): a ``//`` or ``%`` whose divisor is a shift or a bitwise operation of params
(``i // (1 << p) == j // (1 << p)``, ``i % (p | 1)``) was refused on every call, whatever the
params: "division by zero: the divisor of i // Shift(1, p) ... may be 0 with p = 5" (1 << 5 is 32).
The host bounds (attncc.codegen.bounds, runtime.intervals) had no rule for shifts and bitwise
operations, so such a divisor was unbounded, "maybe 0"; ``i // 2 ** p`` and ``i >> p`` (the same
mask) ran. Shifts and ``& | ^`` now have interval rules (exact for params), so only a divisor
that is 0 (``1 << -1``) is refused, and such arithmetic no longer makes every call WIDE.

Defect found (fixed): likewise a ``where`` divisor of params, which §3.3 recommends for keeping a
divisor nonzero (``i % where(w > 0, w, 1)``), was refused at every call whose ``w`` is 0 or
negative ("may be 0 with w = -5"), though the branch taken is 1: the bound of a ``where`` was the
hull of its branches. A ``where`` whose conditions read params and sizes only now takes the branch
those give (runtime.intervals.CallNumbers.cases); the reach still covers every branch.

Defects found (fixed), by the probe's where-divisor class at w = 0: (a) the [mask] spelling
``i // where(w <= 0, 1, w) == j`` raised ZeroDivisionError on the host (the closed-form check,
codegen's PythonPrinter, computed both branches of the where: ``0 ** -1``); its select is lazy now.
(b) The mod spelling ``where(i // where(w <= 0, 1, w) == j, s, -inf)``, which sympy writes out as
``w > 0 and j == i // w``, was refused ("the divisor of i // w is 0 with w = 0") where the [mask]
spelling runs: a divisor of params guarded by a conjunct beside it now counts as a per-pair one
does (§3.3), so ``w != 0 and i % w == 1`` runs at w = 0 too (session 23 had seen this refusal).

Unclear errors (fixed): the division-by-zero messages of the modules and of ``attncc.reference``
named the divisor in sympy's words (``Mod(i, Piecewise((w, w >= 0), (1, True)))``,
``floor(i/Shift(1, p))``); they spell it as the spec does now (``i % where(w >= 0, w, 1)``,
``i // (1 << p)``: attncc.spec.expr.spec_text prints ``%``, ``//`` and shifts).

Defect found (fixed): a divisor that varies per pair but is never 0 as written with a shift or
``|`` (``i // (1 << h)``, per-head block sizes; ``(i - j) % (h | 1)``) was refused at build ("the
divisor of i // Shift(1, h) may be 0"): sympy knew no sign of a shift nor the parity of ``x | 1``.
Shift now knows ``x << n`` is positive for x > 0, n >= 0 and BitOr that ``x | odd`` is odd, and
errors print a shift as the spec writes it (``1 << h``, not ``Shift(1, h)``).

Probed clean (CPU interpreter; tests/probe_meta27.py's docstring has the seeds): about 750 seeded
cases of 25 equivalence-class families, 3-5 spellings each (about 2600 spelling runs: reference
against the oracle, kernels against the reference, spellings against each other, forward and in
60 % of cases dq, dk, dv and learned tables' gradients), fp32 / fp16 / bf16, B 1-2, GQA 1-3x,
Nq, Nk in {1, 5, 7, 17, 19, 23, 33, 40}, offsets to 2**40, n_q / n_k passed, and each case's call
split along the queries and along the keys: comparisons rewritten and De Morgan'd, chained
comparisons, bands through abs / min / max, chunks and residues with // and % of either sign
(literal or param, w = 1, w > N, negative w, params near 2**31 and 2**33), bit tricks (^, >>, &
-C, & ~(C - 1)), shifts by params of either sign, float spellings of integer conditions and
non-integer thresholds, bool arithmetic, reductions against closed forms, bottom-right corners
through n_q / n_k, offsets against shifted params, biases as [score].bias / ``s + g`` / split
between the two, softcap against its tanh mod, ALiBi against its slopes (power-of-two and other
head counts) and a float64 slopes input, learned tables rearranged (gradients), score conditions
and their disjunctions with positions, masks written through the mod's arithmetic (``s + where(c,
0.0, -inf)``, ``min(s, where(c, inf, -inf))``, a where scaled after), the scale in the spec / call
/ mod, [inputs] (int8-int64, uint8, bool; transposed, strided, offset views) against the closed
forms they were built from.
"""
from __future__ import annotations

import random

import pytest
import torch

import attncc
from attncc.module_cache import toml_text
from attncc.spec.errors import SpecError
from cases import share, stream_parts
from probe_meta27 import run

SHIFT_DIVISORS = ["i // (1 << p) == j // (1 << p)", "(i - j) % (p | 1) == 0 and j <= i",
                  "i // ((1 << p) ^ 1) == j // ((1 << p) ^ 1)", "(j + 3) % (1 << (p & 7)) == 0 or j <= i"]


@pytest.mark.parametrize("where", share(SHIFT_DIVISORS, 0, 2))
def test_a_divisor_of_shifted_params_runs(where):
    """Was refused at every call ("the divisor ... may be 0 with p = 5"); now the kernels give the
    reference's o and LSE, at random params and offsets near 2**31, and a divisor of 0 is refused
    with its value."""
    spec = {"name": "m27_shiftdiv", "params": {"p": 2}, "mask": {"where": where}}
    module, pattern = attncc.compile(spec), attncc.parse_spec(toml_text(spec))
    rng = random.Random(where)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 21, 8, generator=gen) for _ in range(3))
    for _ in range(3):
        p = rng.choice([1, 2, 3, 5, 9])
        off = rng.choice([0, 7, 2 ** 31 - 12])
        kw = dict(p=p, q_offset=off, k_offset=off + rng.choice([0, -3, 4]))
        o, lse = module.attention(q, k, v, return_lse=True, **kw)
        o_ref, lse_ref = attncc.reference(pattern, q, k, v, return_lse=True, **kw)
        assert torch.allclose(o.double(), o_ref, atol=1e-5), (where, kw)
        assert torch.equal(torch.isfinite(lse), torch.isfinite(lse_ref))
    if "1 << p)" in where and "^" not in where:
        with pytest.raises(ValueError, match=r"division by zero: the divisor of .* is 0 with p = -1"):
            module.attention(q, k, v, p=-1)


# a where() divisor of params, the language's way to keep one nonzero (§3.3): (text, param values,
# the values where the divisor is 0)
WHERE_DIVISORS = [("i % where(w > 0, w, 1) == j % where(w > 0, w, 1)", [-5, 0, 3], []),
                  ("i // where(w == 0, 3, w) == j // where(w == 0, 3, w) or j <= i", [0, -2, 5], []),
                  ("(i - j) % where(w > 2 and w < 9, w, 2 * w + 1) == 0", [0, 4, 12, -3], []),
                  ("i % where(w >= 0, w, 1) == 0 or j == i", [-1, 3], [0])]


@pytest.mark.parametrize("case", share(WHERE_DIVISORS, 3, 4))
def test_a_where_divisor_of_params_runs(case):
    """Was refused where the branch taken is nonzero ("the divisor of i % Piecewise((w, w > 0), (1,
    True)) may be 0 with w = -5": the bound took every branch); now the call's params pick the
    branch, the kernels give the reference's o at random offsets, and a divisor of 0 is refused."""
    where, values, zero = case
    spec = {"name": "m27_wherediv", "params": {"w": 2}, "mask": {"where": where}}
    module, pattern = attncc.compile(spec), attncc.parse_spec(toml_text(spec))
    rng = random.Random(where)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 19, 8, generator=gen) for _ in range(3))
    for w in values:
        kw = dict(w=w, q_offset=rng.choice([0, 5, 2 ** 31 - 7]))
        o = module.attention(q, k, v, **kw)
        assert torch.allclose(o.double(), attncc.reference(pattern, q, k, v, **kw), atol=1e-5), (where, kw)
    for w in zero:  # refused, the divisor written as the spec writes it (was Mod(i, Piecewise((w, w >= 0), (1, True))))
        with pytest.raises(ValueError, match=rf"the divisor of i % where\(w >= 0, w, 1\) is 0 with w = {w}"):
            module.attention(q, k, v, w=w)
        with pytest.raises(ValueError, match=rf"the divisor of i % where\(w >= 0, w, 1\) is 0 with w = {w}"):
            attncc.reference(pattern, q, k, v, w=w)


@pytest.mark.parametrize("where", share(["i // (1 << h) == j // (1 << h)", "(i - j) % (h | 1) == 0 or j <= i",
                                         "j % (1 << (h + 1)) == 0 and j <= i"], 0, 3))
def test_a_per_head_shift_divisor_builds(where):
    """Was refused at build ("the divisor of i // Shift(1, h) may be 0"): ``1 << h`` (h >= 0) and
    ``h | 1`` are never 0. Now they build and give the reference's o, LSE and dq, dk, dv, at a
    random offset; ``1 << (h - 1)`` (0 at h = 0) stays refused, written as the spec writes it."""
    spec = {"name": "m27_headdiv", "mask": {"where": where}}
    module, pattern = attncc.compile(spec), attncc.parse_spec(toml_text(spec))
    gen = torch.Generator().manual_seed(len(where))
    q = torch.randn(1, 4, 18, 8, generator=gen)
    k, v = (torch.randn(1, 2, 22, 8, generator=gen) for _ in range(2))
    kw = dict(q_offset=random.Random(where).choice([0, 6, 2 ** 31 - 9]))
    got, want = ([x.clone().requires_grad_() for x in (q, k, v)] for _ in range(2))
    o, lse = module.attention(*got, return_lse=True, **kw)
    o_ref, lse_ref = attncc.reference(pattern, *want, return_lse=True, **kw)
    assert torch.allclose(o.double(), o_ref, atol=1e-5)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(lse_ref))
    o.sum().backward()
    o_ref.sum().backward()
    for a, b in zip(got, want):
        assert torch.allclose(a.grad, b.grad, atol=1e-4)
    with pytest.raises(SpecError, match=r"the divisor of i // \(1 << h - 1\) may be 0"):
        attncc.compile({"name": "m27_headdiv0", "mask": {"where": "i // (1 << (h - 1)) == j"}})


@pytest.mark.parametrize("spec", share([{"score": {"mod": "where(i // where(w <= 0, 1, w) == j, s, -inf)"}},
                                        {"mask": {"where": "i // where(w <= 0, 1, w) == j // where(not (w <= 0), w, 1)"}},
                                        {"mask": {"where": "w != 0 and i % w == 1 or j == i"}}], 0, 2))
def test_a_guarded_param_divisor_runs_at_zero(spec):
    """The spellings of a mask whose divisor of params is never taken at 0 (found by the probe's
    where-divisor class at w = 0): the mod's where(i // where(w <= 0, 1, w) == j, s, -inf), which
    sympy writes out as ``w > 0 and j == i // w``, was refused ("the divisor of i // w is 0 with
    w = 0") where its [mask] spelling ran; the [mask] spelling raised ZeroDivisionError on the host
    (the closed-form check computed both branches of the where: ``0 ** -1``). Now the guard counts
    for a divisor of params as for a per-pair one (§3.3), and the host's where is lazy: o, LSE as
    the reference's at random w of either sign and offsets."""
    spec = dict(spec, name="m27_guarded", params={"w": 2})
    module, pattern = attncc.compile(spec), attncc.parse_spec(toml_text(spec))
    rng = random.Random(str(spec))
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 15, 8, generator=gen) for _ in range(3))
    for w in [0] + rng.sample([-4, -1, 2, 3, 5], 2):
        kw = dict(w=w, q_offset=rng.choice([0, 9, 2 ** 31 - 6]))
        o, lse = module.attention(q, k, v, return_lse=True, **kw)
        o_ref, lse_ref = attncc.reference(pattern, q, k, v, return_lse=True, **kw)
        assert torch.allclose(o.double(), o_ref, atol=1e-5), (spec, kw)
        assert torch.equal(torch.isfinite(lse), torch.isfinite(lse_ref)), (spec, kw)


@pytest.mark.parametrize("seeds", stream_parts(60, 1))
def test_equivalent_spellings_agree(seeds):
    """Seeded equivalence classes of tests/probe_meta27.py: each spelling's reference against the
    probe's float64 oracle, its kernels against its reference, and the spellings' kernels against
    each other (o, LSE, gradients)."""
    for seed in seeds:
        problems, _ = run(seed)
        assert not problems, (seed, problems)
