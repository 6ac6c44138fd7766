"""Probe 25 of the Plan's contract (the tiles each walk visits are exactly the tiles with an allowed
pair, those it runs unmasked exactly the all-allowed ones) and of the kernels that walk them, on
what earlier probes (tile_oracle, test_probe_exact17, test_probe_tiles20) drew little of: masks that
read ``h`` and ``b`` (position bounds, guards and divisors of the head and batch row), ``n_q`` /
``n_k`` under ``//`` and ``%`` and as slopes (``j >= (i * n_k) // n_q - w``), guards of both in
unions of 1-3 clauses with columns (``j < n_k // d``) and global rows (``i >= n_q // d``); call
params overridden per call as ints, 0-d tensors and numpy ints, zero and negative (divisors -2,
-3; windows, rows and offsets below 0); offsets, explicit ``n_q`` / ``n_k``, Nq != Nk, Nq or Nk of
0; tiles from 1x1, 2x3, 3x7, 5x16 to 128x16 (analysis) and 16..64 forced per kernel through
``ATTNCC_CONFIG`` / ``_DKDV`` / ``_DQ`` (kernels), the residue and column splits forced on now and
then.

Checked against brute force (``attncc._reference.pair_mask`` on every pair of every batch row and
head): ``walk_grid`` of the three walks at every (b, h) of the call (B 1-3, H 1-4), the walks'
printed kernel lines run with Triton's integer semantics at b, h != 0 (test_probe_exact17's
``printed_walk_grid`` took b = h = 0), ``explain_data``'s visited / unmasked tiles of both walks
and allowed pairs summed over batch rows and heads; and the kernels (interpreter) against
``attncc.reference`` (float64): o, the LSE, dq, dk, dv of a loss of o and the LSE, GQA 1-2,
B 1-2, packed (cu_seqlens) calls of closed forms whose precondition reads n_q / n_k.

Probed clean (after the fix below; the seeded generators were throwaway scripts, the tests below
keep samples of each; ``ATTNCC_PROBE25_CASES`` / ``ATTNCC_PROBE25_KERNELS`` run more):
- analysis: 340 random unions (h / b / n_q / n_k atoms mixed with plain bands, chunks, strides; 82 %
  block lists, whose tiles are brute force per (b, h)), 300 band-heavy masks (86 % with a closed form
  in a walk; 2052 printed walks at b, h != 0) and 300 of test_probe_exact17's merged bands with
  guards of h, b and the lengths added (958 printed walks), each at 2 problems x every (b, h) and one
  explain problem; ``explain_data`` at lengths 150-500 and tiles 8x8..32x16 over batch rows and heads,
  360 (closed forms and numpy counts); ``attncc explain`` (text and --json, --batch, --heads,
  --param, odd tiles) on 150 of these specs: no error but --png's (matplotlib absent here);
- the interval classifier of masks with [inputs] (document ids, key lengths, a bool padding table,
  a per-head offset ``off[h]``) beside those atoms: 500 cases, 3168 (walk, b, h) grids, sound (no
  allowed pair skipped, no FULL tile with a refused pair; inexact in 432, as allowed);
- kernels (interpreter), against attncc.reference: 183 random calls of the unions and band-heavy
  masks (40 with offsets and n_q / n_k as 0-d tensors and numpy ints too), 40 of closed forms with
  guards of h and b (per-head walk steps) at GQA groups 2-3, 54 of residue / column splits (forced)
  beside n_q / n_k / h atoms, 40 of [inputs] masks beside them (GQA 1-3), 97 packed calls (1-4
  sequences of 0-45 rows, cu_seqlens_q != cu_seqlens_k) of closed forms whose precondition reads
  n_q / n_k, 120 decode calls (kv_len 0, 1, Nq, the cache; forced BLOCK_N and splits), 144 calls of
  global rows / columns at params -5..2**40 (the heavy-rows dispatch), 60 calls of
  ``(i * n_k) // n_q`` slopes at n_q, n_k up to 2**33 (the products pass 2**31): all clean;
- after the second fix: 200 masks of bounds holding bit operations, powers, abs, min / max and
  quotients of params (1163 printed walks, host check against the analysis' included) and 40 kernel
  calls of them, clean.

Seen, not changed: a packed sequence with no query rows (n_q = 0) makes the tile-list kernel and
the walks divide by n_q for rows that do not exist (numpy warns under the interpreter; the results
are right: those rows are never stored, and add nothing to dK / dV, lse2 = +inf there); with
float params ``walk_grid`` is not exact on float boundaries (documented: exact_tiles widens float
arithmetic; the kernels' lists take the mask in float64); an int param given as a 0-d numpy array
(``np.array(4)``) is refused with a TypeError where numpy scalars and one-element tensors are taken.

Found and fixed:
- A closed form's precondition that the analysis multiplied through by a length holds a power
  (``j >= (i * n_k) // n_q - 40 and j - n_k <= i - n_q``: ``... + n_q**2 - n_q*last_row ...``),
  which attncc.analysis.intexpr.compile_int refused ("not integer arithmetic: Pow in n_q**2"):
  ``attncc explain`` of such a spec failed with that message and ``walk_grid`` raised, while the
  kernels (whose host check prints the power as Python) ran. compile_int takes powers by a
  non-negative integer now. The first and third tests below failed before it.
- Likewise a precondition holding a param term past integer arithmetic (``(i - j) <= abs(w - d) and
  j <= i + (w & 3)``: ``w - d - (3 & w) <= 0``; ``j <= i + 2 ** w`` beside another bound;
  ``j <= (i + w) // (d + 1) and j >= (i * w) // 3``: ``(...)/(3*d + 3) <= 0``): "not integer
  arithmetic: BitAnd in (3 & w)" (Pow in 2**w, Pow in 1/(3*d + 3)) from ``attncc explain`` and
  ``walk_grid``. attncc.analysis.walks.precondition_holds evaluates such a precondition as a row
  guard (``_value``: every node of the language, float64 as the host's Python check). The second
  test below failed before it.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random

import sympy
import torch

from attncc._reference import pair_mask
from attncc.analysis import analyze
from attncc.analysis.graph import walk_grid
from attncc.explain import main_explain
from attncc.report import explain_data
from attncc.spec import parse_spec
from test_probe_exact17 import _fill, printed_walk_grid, random_overrides
from tile_oracle import Problem, mask_spec, tile_classes


def _walk_failures(pattern, plan, problem: Problem, params, batch: int = 1, heads: int = 1):
    """(walk, b, h) of every walk whose tiles differ from brute force at some batch row and head."""
    truth = pair_mask(pattern, **problem.positions, batch=batch, heads=heads, params=params)
    bad = []
    for b in range(batch):
        for h in range(heads):
            fwd, dkdv = tile_classes(truth[b, h], problem.block_m, problem.block_n)
            for walk, want in (("forward", fwd), ("dq", fwd), ("dkdv", dkdv)):
                got = walk_grid(plan, walk, **problem.positions, block_m=problem.block_m, block_n=problem.block_n,
                                params=params, b=b, h=h)
                if not torch.equal(got, want):
                    bad.append((walk, b, h))
    return bad


def _explain_counts(path, n_q: int, n_k: int, block: str, params) -> dict:
    argv = [str(path), "--n", str(n_q), "--nk", str(n_k), "--block", block, "--json"]
    argv += [a for k, v in params.items() for a in ("--param", f"{k}={v}")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main_explain(argv) == 0
    return json.loads(out.getvalue())


def _explain_mismatch(plan, *, n_q: int, n_k: int, block_m: int, block_n: int, params, batch: int = 1,
                      heads: int = 1):
    """(got, want) of ``explain_data``'s visited / unmasked tiles per walk and allowed pairs, summed
    over every batch row and head, against brute force; None when they agree."""
    truth = pair_mask(plan.pattern, q_rows=n_q, k_rows=n_k, batch=batch, heads=heads, params=params)
    d = explain_data(plan, n_q=n_q, n_k=n_k, block_m=block_m, block_n=block_n, batch=batch, heads=heads,
                     params=params)
    want = {"forward": [0, 0], "dkdv": [0, 0], "allowed": int(truth.sum())}
    for b in range(batch):
        for h in range(heads):
            for walk, classes in zip(("forward", "dkdv"), tile_classes(truth[b, h], block_m, block_n)):
                want[walk][0] += int((classes != 0).sum())
                want[walk][1] += int((classes == 2).sum())
    got = {walk: [d["walks"][walk]["visited"], d["walks"][walk]["unmasked"]] for walk in ("forward", "dkdv")}
    got["allowed"] = d["allowed_pairs"]
    return None if got == want else (got, want)


# ---------------------------------------------------------------------------------------------
# preconditions with a power of a length
# ---------------------------------------------------------------------------------------------

# a slope n_k / n_q (or n_q / n_k) and a bound whose difference with it the precondition multiplies
# through by the length (a power of it), and a third atom now and then
SLOPED = [("j >= (i * n_k) // n_q - {w}", "j - n_k <= i - n_q"),
          ("j <= (i * n_k) // n_q + {w}", "j >= n_k - (n_q - i) * 2"),
          ("j >= (i * n_q) // n_k - {w}", "j - n_k <= i - n_q"),
          ("j >= (i * n_q) // n_k - {w}", "j <= (i * n_k) // n_q + 4")]
BESIDE = ["j <= i + n_k // {d} - n_q // {d}", "j >= i - n_q // {d}", "j < n_k // {d}", "i >= n_q // {d}", "h % 2 == 0"]


def test_preconditions_with_powers_of_lengths_walk_and_explain(tmp_path):
    """Seeded masks of a slope ``n_k / n_q`` beside other bounds: the forward / dQ / dK/dV walks at
    every (b, h) and ``attncc explain --json`` (visited / unmasked tiles, allowed pairs) equal brute
    force. Before the fix: "not integer arithmetic: Pow in n_q**2" from both."""
    rng = random.Random(2501)
    powers = 0
    for n in range(16):
        atoms = [a.format(w=rng.choice([0, 1, 5, 40])) for a in rng.choice(SLOPED)]
        atoms += [rng.choice(BESIDE).format(d=rng.choice([2, 3, 5])) for _ in range(rng.choice([0, 0, 1]))]
        mask = " and ".join(f"({a})" for a in atoms)
        text = mask_spec(f"slope{n}", mask, {})
        pattern = parse_spec(text)
        plan = analyze(pattern)
        powers += any(w.precondition.atoms(sympy.Pow) for w in plan.walks)
        for _ in range(2):
            bm, bn = rng.choice([(16, 16), (16, 32), (32, 16), (3, 7), (64, 16)])
            q_rows, k_rows = rng.randint(1, 90), rng.randint(1, 90)
            q_offset, k_offset = rng.choice([0, 0, 5, 40]), rng.choice([0, 0, 7, 33])
            n_q = q_offset + q_rows + rng.choice([0, 0, 19])
            problem = Problem(q_rows, k_rows, q_offset, k_offset, n_q, None, bm, bn)
            assert not _walk_failures(pattern, plan, problem, {}, heads=2), (mask, problem)
        path = tmp_path / f"slope{n}.toml"
        path.write_text(text)
        n_q, n_k = rng.randint(1, 120), rng.randint(1, 120)
        d = _explain_counts(path, n_q, n_k, "16x32", {})
        fwd, dkdv = tile_classes(pair_mask(pattern, q_rows=n_q, k_rows=n_k)[0, 0], 16, 32)
        for walk, want in (("forward", fwd), ("dkdv", dkdv)):
            got = d["walks"][walk]
            assert (got["visited"], got["unmasked"]) == (int((want != 0).sum()), int((want == 2).sum())), (mask, walk)
    assert powers >= 10, powers


# ---------------------------------------------------------------------------------------------
# preconditions past integer arithmetic
# ---------------------------------------------------------------------------------------------

# int param terms whose closed forms keep them in the precondition: bit operations, powers of a
# param, and a quotient by d + 1 (a band of slope 1 / (d + 1) beside another)
PARAM_TERMS = ["(w & 3)", "(w | 1)", "(w >> 1)", "2 ** w", "w ** 2", "3 ** (w - 2)", "abs(w - d)", "(w // d)"]
PARAM_BOUNDS = ["j <= i + {t}", "i - j <= {t}", "j <= (i + {t}) // (d + 1)", "j >= (i * d) // 3 - {t}",
                "j < {t} + i // d", "j - n_k <= i - n_q + {t}", "j >= {t}"]


def test_preconditions_past_integer_arithmetic_walk_and_explain():
    """Seeded masks of bounds holding param terms that are no integer arithmetic of compile_int
    (``w & 3``, ``2 ** w``, ``(i + w) // (d + 1)`` beside another band: ``... / (3*d + 3) <= 0``),
    at call params from -5 to 12: the three walks and ``explain_data``'s counts equal brute force.
    Before the fix, ``walk_grid`` and ``attncc explain`` raised "not integer arithmetic: BitAnd in
    (3 & w)" (Pow in 2**w, Pow in 1/(d + 1)) where the kernels' host check ran."""
    from attncc.analysis.intexpr import Unsupported, compile_int

    rng = random.Random(2505)
    past = 0
    for n in range(14):
        atoms = [rng.choice(PARAM_BOUNDS).format(t=rng.choice(PARAM_TERMS)) for _ in range(rng.choice([2, 2, 3]))]
        params = {"w": rng.choice([-3, 0, 1, 3, 5, 9]), "d": rng.choice([1, 2, 3, 5])}
        mask = " and ".join(f"({a})" for a in atoms)
        plan = analyze(parse_spec(mask_spec(f"terms{n}", mask, params)))
        for w in plan.walks:
            try:
                compile_int(w.precondition)
            except Unsupported:
                past += 1
        for _ in range(2):
            problem = random_problem(rng)
            over = {"w": rng.choice([-5, -1, 0, 2, 4, 7, 12]), "d": rng.choice([1, 2, 4, 7])}
            assert not _walk_failures(plan.pattern, plan, problem, over, heads=1), (mask, over, problem)
        n_q, n_k = rng.randint(1, 150), rng.randint(1, 150)
        assert not _explain_mismatch(plan, n_q=n_q, n_k=n_k, block_m=16, block_n=32, params=params), mask
    assert past >= 5, past


# ---------------------------------------------------------------------------------------------
# the generator: bounds, guards and divisors of h, b, n_q, n_k
# ---------------------------------------------------------------------------------------------

N_ANALYSIS = int(os.environ.get("ATTNCC_PROBE25_CASES", "8"))  # cases per sweep (the probe ran 900)

LOWER = ["j >= i - n_q // {div}", "j // {div} >= (i + n_k - n_q) // {div} - {r}", "j - n_k >= i - n_q - {w}",
         "j >= n_k - (n_q - i) * {div}", "j >= (i * n_k) // n_q - {w}", "j >= i - i % {div} + {o}", "j >= i - {w}",
         "j >= n_k - {g}", "j >= i + n_k // {div} - n_q // {div} - {w}", "j >= {g}", "2 * j >= i - {w}"]
UPPER = ["j // {div} <= (i + n_k - n_q) // {div}", "j <= i + n_k // {div} - n_q // {div}", "j - n_k <= i - n_q",
         "i - j > n_q - n_k - {w}", "j <= (i * n_k) // n_q", "j < (i // {div} + 1) * {div}", "j <= i + {o}",
         "j < n_k // {div}", "j <= i", "j < {g} + i // {div}", "j <= (i + n_k) // 2"]
ROWS = ["i >= n_q // {div}", "i < n_q - {g}", "i < {g}", "i >= {g}", "i // {div} <= n_q // {div} - {r}"]
GUARDS = ["h % 2 == 0", "h < {g}", "b == 1", "(h + b) % 3 == 0", "n_k % {div} == 0", "n_q > {g}", "h >= 1", "h != b",
          "n_k - n_q >= {o}", "h * {w} < n_q"]
COLUMNS = ["j < {g}", "j >= n_k - {g}", "j < n_k // {div}", "j >= {g} and j < {g} + {w}"]
# bounds and divisors of h and b (no closed form: exact block lists per batch row and head)
HEADS = ["j <= i + h", "i - j < {w} * (h + 1)", "abs(i - j) <= h + {r}", "j < {g} + b * {w}",
         "i // (h + 1) == j // (h + 1)", "(i - j) % (h + 2) == 0", "j % (b + 2) == b + 1", "j <= i - b",
         "j // {div} <= i // {div} + h", "j % {div} == h % {div}",
         "(h == 0 and j <= i) or (h == 1 and i - j < {w}) or h >= 2"]
SHAPES = [(16, 16), (16, 32), (32, 16), (16, 64), (64, 16), (128, 16), (32, 64), (1, 1), (2, 3), (3, 7), (5, 16),
          (24, 40)]


def random_mask(rng: random.Random):
    """(mask, params): a band clause (bounds of the lengths, a row range, a guard of h, b or the
    lengths), with columns, global rows or a clause of :data:`HEADS` beside it now and then."""
    params: dict = {}
    fill = lambda t: _fill(t, rng, params)  # noqa: E731

    atoms = [fill(rng.choice(LOWER)) for _ in range(rng.choice([0, 1, 1, 2]))]
    atoms += [fill(rng.choice(UPPER)) for _ in range(rng.choice([0, 1, 1, 2]))]
    atoms += [fill(rng.choice(ROWS)) for _ in range(rng.random() < 0.3)]
    atoms += [fill(rng.choice(GUARDS)) for _ in range(rng.random() < 0.35)]
    clauses = [" and ".join(f"({a})" for a in atoms or [fill(rng.choice(UPPER))])]
    for extra, p in ((COLUMNS, 0.5), (ROWS, 0.3), (HEADS, 0.25)):
        if rng.random() < p:
            c = fill(rng.choice(extra))
            clauses.append(c if rng.random() < 0.7 else f"({c}) and ({fill(rng.choice(GUARDS))})")
    rng.shuffle(clauses)
    return " or ".join(f"({c})" for c in clauses), params


def random_problem(rng: random.Random) -> Problem:
    """Lengths 1, a tile, a tile +- 1, or random; offsets and explicit n_q / n_k now and then."""
    bm, bn = rng.choice(SHAPES)
    q_rows, k_rows = (min(rng.choice([1, 2, t, max(t - 1, 1), t + 1, 2 * t + 1, rng.randint(1, 100)]), 130)
                      for t in (bm, bn))
    q_offset, k_offset = rng.choice([0, 0, 0, 5, 16, 63, 200]), rng.choice([0, 0, 0, 3, 32, 129])
    n_q = q_offset + q_rows + rng.choice([0, 1, 37]) if rng.random() < 0.3 else None
    n_k = k_offset + k_rows + rng.choice([0, 1, 37]) if rng.random() < 0.3 else None
    return Problem(q_rows, k_rows, q_offset, k_offset, n_q, n_k, bm, bn)


def test_walks_and_printed_walks_per_head_and_batch_row():
    """Seeded masks of :func:`random_mask` at random problems and call params (divisors -3..37,
    windows, rows and offsets negative, 0 or past N): ``walk_grid`` of the three walks at every
    (b, h) of B 1-3, H 1-4, and the printed kernel lines of the closed forms there (b, h != 0),
    against brute force."""
    rng = random.Random(2502)
    failures, closed, printed = [], 0, 0
    for n in range(N_ANALYSIS):
        mask, params = random_mask(rng)
        pattern = parse_spec(mask_spec(f"bh{n}", mask, params))
        plan = analyze(pattern)
        closed += any(w.kind.value == "bands" for w in plan.walks)
        problem, over = random_problem(rng), random_overrides(rng, params)
        batch, heads = rng.choice([1, 2, 3]), rng.choice([1, 2, 3, 4])
        try:
            truth = pair_mask(pattern, **problem.positions, batch=batch, heads=heads, params=over)
        except ValueError:  # a divisor 0 at these params: the call refuses it too
            continue
        bad = _walk_failures(pattern, plan, problem, over, batch, heads)
        for b in range(batch):
            for h in range(heads):
                want = dict(zip(("forward", "dkdv"), tile_classes(truth[b, h], problem.block_m, problem.block_n)))
                for walk in want if min(problem.block_m, problem.block_n) >= 16 else ():
                    got = printed_walk_grid(plan, walk, problem, over, b=b, h=h)
                    printed += got is not None
                    if got is not None and not torch.equal(got, want[walk]):
                        bad.append(("printed " + walk, b, h))
        if bad:
            failures.append((mask, params, over, problem, batch, heads, bad[:3]))
    assert not failures, failures[:3]
    assert closed >= N_ANALYSIS // 2 and printed >= N_ANALYSIS, (closed, printed)


def test_explain_counts_over_batch_rows_and_heads():
    """``explain_data`` at batch rows 1-3 and heads 1-4: visited / unmasked tiles of both walks and
    allowed pairs, summed over every (b, h), against brute force; lengths to 500 at small tiles
    (where the numpy pair counts translate along the diagonal)."""
    rng = random.Random(2503)
    failures = []
    for n in range(N_ANALYSIS):
        mask, params = random_mask(rng)
        pattern = parse_spec(mask_spec(f"ex{n}", mask, params))
        bm, bn = rng.choice([(16, 16), (16, 32), (32, 16), (16, 48), (8, 8), (3, 7)])
        n_q, n_k = rng.randint(1, 500), rng.randint(1, 500)
        batch, heads = rng.choice([1, 2, 3]), rng.choice([1, 2, 4])
        over = random_overrides(rng, params)
        try:
            bad = _explain_mismatch(analyze(pattern), n_q=n_q, n_k=n_k, block_m=bm, block_n=bn, params=over,
                                    batch=batch, heads=heads)
        except ValueError:  # a divisor 0 at these params (the reference's error, as a call's)
            continue
        if bad:
            failures.append((mask, params, over, n_q, n_k, bm, bn, batch, heads, bad))
    assert not failures, failures[:3]


# ---------------------------------------------------------------------------------------------
# the kernels
# ---------------------------------------------------------------------------------------------

N_KERNELS = int(os.environ.get("ATTNCC_PROBE25_KERNELS", "4"))  # the probe ran 183 (and 80 decode calls)
KERNEL_TILES = [(16, 16), (16, 32), (32, 16), (64, 16), (16, 64)]


def _param_as(rng: random.Random, value: int):
    """A call param as an int, a 0-d tensor or a numpy int."""
    import numpy as np

    return rng.choice([value, torch.tensor(value), np.int64(value)])


def test_kernels_match_the_reference(monkeypatch):
    """Seeded masks of :func:`random_mask` through the kernels (interpreter) at forced tiles per
    kernel, GQA 1-2, B 1-2, offsets, explicit n_q / n_k, Nq or Nk of 0 or 1, call params as ints,
    0-d tensors and numpy ints, the residue / column splits forced now and then: o, the LSE and
    dq, dk, dv of a loss of o and the LSE against attncc.reference."""
    import attncc

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rng = random.Random(2504)
    ran = 0
    for n in range(N_KERNELS):
        mask, params = random_mask(rng)
        text = mask_spec(f"plan25k{n}", mask, params)
        pattern = parse_spec(text)
        hkv = rng.choice([1, 2])
        heads, batch = hkv * rng.choice([1, 2]), rng.choice([1, 2])
        nq, nk = (rng.choice([0, 1]) if rng.random() < 0.15 else rng.randint(2, 40) for _ in range(2))
        pos = dict(q_offset=rng.choice([0, 3, 17]), k_offset=rng.choice([0, 5]))
        pos.update({name: pos[f"{side}_offset"] + rows + rng.choice([0, 9]) for name, side, rows in
                    (("n_q", "q", nq), ("n_k", "k", nk)) if rng.random() < 0.3})
        over = random_overrides(rng, params)
        try:
            pair_mask(pattern, q_rows=nq, k_rows=nk, batch=batch, heads=heads, params=over, **pos)
        except ValueError:
            continue
        for var in ("ATTNCC_CONFIG", "ATTNCC_CONFIG_DKDV", "ATTNCC_CONFIG_DQ"):
            bm, bn = rng.choice(KERNEL_TILES)
            monkeypatch.setenv(var, f"BLOCK_M={bm},BLOCK_N={bn},num_warps=4,num_stages=1")
        split = rng.random() < 0.3
        monkeypatch.setenv("ATTNCC_RESIDUE_MIN_ROWS", "2" if split else "128")
        monkeypatch.setenv("ATTNCC_COLUMN_MIN_ROWS", "4" if split else "128")
        gen = torch.Generator().manual_seed(n)
        q = torch.randn(batch, heads, nq, 16, generator=gen).requires_grad_()
        k, v = (torch.randn(batch, hkv, nk, 16, generator=gen).requires_grad_() for _ in range(2))
        go, gl = torch.randn(batch, heads, nq, 16, generator=gen), torch.randn(batch, heads, nq, generator=gen)

        def loss(o, lse):
            return (o * go.to(o.dtype)).sum() + torch.where(torch.isfinite(lse), lse * gl.to(lse.dtype), 0).sum()

        o, lse = attncc.compile(text).attention(q, k, v, return_lse=True, **pos,
                                                **{name: _param_as(rng, x) for name, x in over.items()})
        grads = torch.autograd.grad(loss(o, lse), (q, k, v), allow_unused=True)
        ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref, ref_lse = attncc.reference(pattern, *ref_in, return_lse=True, **pos, **over)
        ref_grads = torch.autograd.grad(loss(ref, ref_lse), ref_in, allow_unused=True)
        assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse)), (mask, over, pos)
        for label, x, r in zip(("o", "lse", "dq", "dk", "dv"), (o, torch.where(torch.isfinite(lse), lse, 0)) + grads,
                               (ref, torch.where(torch.isfinite(ref_lse), ref_lse, 0)) + ref_grads):
            x, r = (torch.zeros(()) if t is None else t.detach().double() for t in (x, r))
            err = float((x - r).abs().max()) if x.numel() else 0.0
            assert err <= 1e-4 + 1e-3 * (float(r.abs().max()) if r.numel() else 0.0), (mask, over, pos, label, err)
        ran += 1
    assert ran >= N_KERNELS // 2, ran
