"""Probe 16 (serving and packing APIs): decode regressions found by seeded probes."""
from __future__ import annotations

import math

import pytest
import torch

import attncc
from attncc.spec import parse_spec
from cases import rel_err

# Scores with a term constant along j (a float param, a multiple of the query position): the
# kernels leave it out of the key loop and add it to the LSE. Split-KV decode added it to each
# split's float32 LSE before the merge weighed the splits by those LSEs, so a large term rounded
# the weights apart (o off by 1e-2 at f = 100, i = 63 with 4 splits; one split was exact).
ROW_TERM_SPECS = {
    "probe16_row_const": '[params]\nf = 0.0\n[score]\nbias = "f"\n[mask]\nwhere = "causal"\n',
    "probe16_row_pos": '[params]\nf = 0.0\n[score]\nbias = "f * i"\n[mask]\nwhere = "causal"\n',
}


def _module(name):
    text = f'name = "{name}"\n' + ROW_TERM_SPECS[name]
    return parse_spec(text), attncc.compile(text)


@pytest.mark.parametrize("name", sorted(ROW_TERM_SPECS))
@pytest.mark.parametrize("splits", ["1", "4"])
def test_decode_splits_merge_without_the_row_terms(name, splits, monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ATTNCC_DECODE_SPLITS", splits)
    p, mod = _module(name)
    gen = torch.Generator().manual_seed(0)
    N, Nq = 64, 2
    q = torch.randn(2, 2, Nq, 32, generator=gen)
    k, v = torch.randn(2, 1, N, 32, generator=gen), torch.randn(2, 1, N, 32, generator=gen)
    for f in (100.0, 1e5):
        o, lse = mod.decode(q, k, v, kv_len=[N, 37], f=f, return_lse=True)
        for b, L in enumerate((N, 37)):
            ref, ref_lse = attncc.reference(p, q[b:b + 1].double(), k[b:b + 1, :, :L].double(),
                                            v[b:b + 1, :, :L].double(), q_offset=L - Nq, f=f, return_lse=True)
            assert rel_err(o[b:b + 1], ref) < 1e-5, (f, b, rel_err(o[b:b + 1], ref))
            assert torch.allclose(lse[b:b + 1].double(), ref_lse, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("value, o_expected", [(math.inf, math.nan), (-math.inf, 0.0), (math.nan, math.nan)])
def test_decode_splits_non_finite_row_terms(value, o_expected, monkeypatch, tmp_path):
    """A row term of -inf removes its row (o = 0, lse = -inf), +inf or NaN makes it NaN, with one
    split or several (as attention)."""
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    text = ('name = "probe16_row_input"\n[inputs]\nqb = { dims = ["b", "n"], dtype = "float32" }\n'
            '[score]\nbias = "qb[b, i] + 0.5"\n[mask]\nwhere = "causal"\n')
    mod = attncc.compile(text)
    gen = torch.Generator().manual_seed(1)
    N = 40
    q = torch.randn(1, 2, 4, 16, generator=gen)
    k, v = torch.randn(1, 2, N, 16, generator=gen), torch.randn(1, 2, N, 16, generator=gen)
    qb = torch.zeros(1, N)
    qb[0, N - 2] = value
    a, a_lse = mod.attention(q, k, v, q_offset=N - 4, qb=qb, return_lse=True)
    for splits in ("1", "3"):
        monkeypatch.setenv("ATTNCC_DECODE_SPLITS", splits)
        o, lse = mod.decode(q, k, v, kv_len=[N], qb=qb, return_lse=True)
        assert torch.allclose(o, a, atol=1e-5, equal_nan=True), splits
        assert torch.allclose(lse, a_lse, atol=1e-5, equal_nan=True), splits
        row = o[0, :, 2]
        assert (row.isnan().all() if math.isnan(o_expected) else (row == o_expected).all()), splits
