"""The kernels' dispatch of longest programs first (templates/walks.j2 ``dispatch``): the blocks of
rows that see every key (global rows; in dK/dV, global columns and sinks) run first for every
(b, h). The order must be a bijection of the grid whatever the heavy count (none, one block, some,
all, rows before the call's first position): a block run twice or never is a wrong answer."""
from __future__ import annotations

import pytest
import sympy
import torch

import attncc
from attncc.analysis.plan import analyze
from cases import pattern, rel_err

LONGFORMER = '[params]\ng = 5\nw = 7\n[mask]\nwhere = "i < g or j < g or abs(i - j) <= w"\n'
GUARDED = '[params]\ng = 5\nc = 1\n[mask]\nwhere = "(c > 0 and i < 2 * g) or j <= i"\n'
SINKS = '[params]\nsinks = 3\nwindow = 9\n[mask]\nwhere = "j < sinks or (j <= i and i - j < window)"\n'


def test_heavy_rows_of_the_plans():
    g, sinks, c = sympy.symbols("g sinks c", integer=True)
    lf = analyze(attncc.parse_spec(LONGFORMER))
    assert lf.forward.heavy_rows == g - 1 and lf.transposed.heavy_rows == g - 1
    sw = analyze(attncc.parse_spec(SINKS))
    assert sw.forward.heavy_rows is None and sw.transposed.heavy_rows == sinks - 1
    assert analyze(attncc.parse_spec(GUARDED)).forward.heavy_rows.has(c)
    causal = analyze(pattern("causal"))
    assert causal.forward.heavy_rows is None and causal.transposed.heavy_rows is None
    # not the same in every program, or not an int: no heavy rows (the dispatch must be uniform)
    for where, params in [("i < n_q // 2 or j <= i", ""), ("i < g or j <= i", "g = 3.0"), ("i < h + 2 or j <= i", "")]:
        plan = analyze(attncc.parse_spec(f'[params]\n{params}\n[mask]\nwhere = "{where}"\n'))
        assert plan.forward.heavy_rows is None, where


CASES = [  # (spec, Nq, Nk, offset, params): heavy blocks none, one, some, all, before the first row
    (LONGFORMER, 70, 70, 0, {}), (LONGFORMER, 45, 90, 0, {"g": 40}), (LONGFORMER, 90, 33, 3, {"g": 0}),
    (LONGFORMER, 70, 70, 40, {}), (LONGFORMER, 70, 70, 0, {"g": 200}), (LONGFORMER, 70, 70, 2**31 + 5, {"g": 2**31 + 40}),
    (GUARDED, 70, 70, 0, {}), (GUARDED, 66, 70, 0, {"c": 0}), (SINKS, 70, 70, 0, {}), (SINKS, 45, 90, 7, {"sinks": 30}),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_every_block_runs_once(case):
    text, nq, nk, off, kw = CASES[case]
    mod, p = attncc.compile(text), attncc.parse_spec(text)
    gen = torch.Generator().manual_seed(case)
    q = torch.randn(2, 3, nq, 16, generator=gen).requires_grad_()
    k, v = (torch.randn(2, 3, nk, 16, generator=gen).requires_grad_() for _ in range(2))
    o = mod.attention(q, k, v, q_offset=off, k_offset=off, **kw)
    do = torch.randn(o.shape, generator=gen)
    grads = torch.autograd.grad(o, (q, k, v), do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attncc.reference(p, *leaves, q_offset=off, k_offset=off, **kw)
    want = torch.autograd.grad(ref, leaves, do.double())
    assert rel_err(o, ref) < 1e-5
    for label, got, w in zip("qkv", grads, want):
        assert rel_err(got, w) < 1e-5, label


def test_explain_says_which_blocks_run_first():
    from attncc.report import explain_data

    d = explain_data(analyze(attncc.parse_spec(SINKS)), n_q=256, n_k=256)
    assert d["walks"]["forward"]["first"] is None and d["walks"]["dkdv"]["first"] == "x <= sinks - 1"
