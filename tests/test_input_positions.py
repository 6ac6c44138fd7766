"""An input's "n" dim read only at the query positions (or only at the key positions) need cover
only those: a Flex bias ``bias[q_idx, kv_idx]`` of Nq x Nk rows, or a per-query flag, with Nq != Nk
(it had to cover max(Nq, Nk), which a FlexAttention port hits). Other indices still cover both."""
from __future__ import annotations

import pytest
import torch

import attncc
from attncc.spec import parse_spec

SPEC = """
[inputs]
rel = { dims = ["h", "n", "n"], dtype = "float32", grad = true }
keep = { dims = ["b", "n"], dtype = "bool" }
near = { dims = ["n"], dtype = "int32" }

[mask]
where = "keep[b, i] and near[j + 1] >= 0"

[score]
bias = "rel[h, i, j]"
"""


def test_axes_read_at_one_side():
    p = parse_spec(SPEC)
    assert p.position_axes("rel") == ("", "i", "j") and p.position_axes("keep") == ("", "i")
    assert p.position_axes("near") == ("",)  # j + 1: both sides' positions


@pytest.mark.parametrize("nq, nk, q_off, k_off", [(40, 45, 0, 0), (45, 40, 3, 0), (33, 50, 7, 2)])
def test_short_tables_match_the_reference(nq, nk, q_off, k_off):
    p = parse_spec(SPEC)
    mod = attncc.compile(SPEC)
    gen = torch.Generator().manual_seed(nq + nk)
    q = torch.randn(2, 2, nq, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, nk, 16, generator=gen, requires_grad=True) for _ in range(2))
    qe, ke = q_off + nq, k_off + nk
    rel = torch.randn(2, qe, ke, generator=gen, requires_grad=True)
    keep = torch.rand(2, qe, generator=gen) < 0.8
    near = torch.zeros(max(qe, ke) + 1, dtype=torch.int32)  # read at j + 1: covers both (and one more)
    kw = dict(rel=rel, keep=keep, near=near, q_offset=q_off, k_offset=k_off)
    o = mod.attention(q, k, v, **kw)
    ref = attncc.reference(p, q.double(), k.double(), v.double(), **kw)
    assert (o - ref).abs().max() < 1e-4
    g = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v, rel), g)
    want = torch.autograd.grad(ref, (q, k, v, rel), g.double())
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-4
    # one short: refused by both, naming the side
    for name, short in (("rel", rel[:, :, :-1]), ("keep", keep[:, :-1]), ("near", near[:-2])):
        bad = {**kw, name: short.detach() if short.is_floating_point() else short}
        with pytest.raises(ValueError, match=f"input {name} dim"):
            mod.attention(q, k, v, **bad)
        with pytest.raises(ValueError, match=f"input '{name}'"):
            attncc.reference(p, q.double(), k.double(), v.double(), **bad)
