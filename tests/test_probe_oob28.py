"""Probe 28 (oob): reads of [inputs] outside their extent on every path that reads input values
(tests/probe_oob28.py is the seeded generator; its docstring lists what each case compares).

Probed, after 4dfff78 (b / h dims read at anything but b / h bounds-checked): ten specs reading
inputs at shifted, negative, per-head, per-batch and position-dependent indices outside their
extent (doc[b, i + 3], doc[b, j - 5], seg[b, (i * 7) % (n_q + 3)], kv_len[b + 1], kv_len[b - 1],
t[h + 1, j], u[h - 1, i // 2], f[j, b + 1], x[h + 1, j], y[b + 1, i - 2], r[h - 1, (i - j) % 7],
p[b - 1, h + 1, i, j], z[h + 2], tmp[b, i + 4], dot(qa[b, h + 1, i, :], ka[b, j - 2, :]),
w[b + 1, 1], w[b, 5], xn[j, h + 1], pn[i, j, h + 1]) and at bare b / h / i / j / constants on fixed
dims shorter than what they index (flag[j] of 12 entries, small[h] of 2, one[b] of 1, k3[3] of 2,
hb[h, b] of [3, 2], row[i] of 7 == col[j] of 10, dd[b, i] of 16 positions), which the host's tile
classifier and the tile-list kernel reduce per block; input values never 0 inside the extent, so a
read outside taken as anything but 0 changes the result. Each case: o, lse, dq, dk, dv and every
learned table's gradient against attncc.reference (float64), the reference against a hand oracle
padding every table with zeros (1e-9), decode() row by row (pages of the cache, kv_len from 0, the
pattern's own kv_len read at b + 1), the torch tile classifier at three tile shapes and
attncc.distributed's chunk classes against the dense pair mask (EMPTY never holds an allowed pair,
FULL never a removed one). Seeds 0-40 of each spec: clean but for the bug below.

Found and fixed: a learned table read per pair at a shifted b or h (p[b - 1, h + 1, i, j],
pn[i, j, h + 1]) crashed every backward under the Triton interpreter (TypeError: ufunc
'bitwise_and' not supported, from the dQ kernel's atomic add): the mask put the float test
(dg != 0.0) before the index checks 4dfff78 added, and the interpreter's "&" of a float
comparison's tensor and a per-program int64 comparison gives float data, which the next "&"
refuses. The index checks come first now (attncc/codegen/backward.py).
"""
from __future__ import annotations

import pytest

import probe_oob28 as P

# (spec, seeds) run in CI: each spec once, the learned tables (the regression) three times
CI = [("oob28_s6", (0, 1, 2)), ("oob28_s10", (0, 3, 5)), ("oob28_s1", (0,)), ("oob28_s2", (1,)), ("oob28_s3", (0,)),
      ("oob28_s4", (0,)), ("oob28_s5", (2,)), ("oob28_s7", (0,)), ("oob28_s8", (3,)), ("oob28_s9", (1,))]


@pytest.mark.parametrize("name,seed", [(n, s) for n, seeds in CI for s in seeds])
def test_reads_outside_the_extent(name, seed):
    assert P.check(P.SPECS[name], seed) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(P.SPECS))
@pytest.mark.parametrize("block", range(4))
def test_reads_outside_the_extent_more_seeds(name, block):
    fails = [(seed, f) for seed in range(10 * block, 10 * block + 10) for f in P.check(P.SPECS[name], seed)]
    assert fails == []
