"""Score code far into a sequence, and score code that must stay float32 or per pair (issue 15
leftovers). Forward and backward (and decode) against attncc.reference:

- integer sums before float arithmetic (analysis.integer.integer_sums): ALiBi's ``slope * (j - i)``
  and ``0.1 * (i - j)`` in a transform are computed from the distance, not from two rounded
  products of absolute positions, and are no longer split into a key term and a row term; a
  term linear in j (``0.1 * j``) is computed from the distance as well, ``0.1 * i`` going to
  the LSE (analysis.integer.recentered);
- a float64 table is float32 in score code (float64 scores reached ``p.to(bfloat16)``);
- a transform that is ``-inf`` everywhere, or on whole rows, removes their pairs (it used to be
  split off as a row constant and dropped from the key loop).
"""
from __future__ import annotations

import math

import pytest
import torch

import attncc
from cases import build_inline, rel_err
from test_big_positions import _check, _qkv

SPECS = {
    "alibi_far": '[mask]\nwhere = "causal"\n[score]\nbias = "alibi"\n',
    "mod_linear": '[score]\nmod = "s + 0.1 * (i - j)"\n',
    "bias_j": '[mask]\nwhere = "j <= i"\n[score]\nbias = "0.1 * j + 0.02 * h * j"\n',
    "mod_j": '[score]\nmod = "s + 0.37 * j"\n',
    "mod_tanh": '[mask]\nwhere = "j <= i"\n[score]\nmod = "s * 0.5 + tanh(0.01 * (i - j)) + 0.3 * (i - j) / (h + 1)"\n',
    "table_distance": '[inputs]\nx = { dims = ["h"], dtype = "float16" }\n[score]\nbias = "x[h] * (j - i)"\n',
    "f64_table": '[inputs]\nx = { dims = ["h"], dtype = "float64" }\n[score]\nmod = "s * x[h]"\n',
    "row_table": '[inputs]\nx = { dims = ["b", "n"], dtype = "float32" }\n[mask]\nwhere = "j <= i + 4"\n[score]\nbias = "x[b, i] + 0.5 * j"\n',
    "never": '[score]\nmod = "where(i < 0, s, -inf)"\n',
    "some_rows": '[score]\nmod = "s + where(i % 3 == 0, 0, -inf)"\n',
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_inline(SPECS, tmp_path_factory.mktemp("score_precision"))


@pytest.mark.parametrize("name", ["alibi_far", "mod_linear", "mod_tanh"])
def test_position_terms_far_into_a_sequence(built, name):
    p, mod = built[name]
    q, k, v = _qkv(40, 40, seed=len(name), Hq=4, Hkv=4)
    _check(p, mod, q, k, v, q_offset=2**20 + 8, k_offset=2**20)
    _check(p, mod, q, k, v, q_offset=2**30 + 8, k_offset=2**30)


@pytest.mark.parametrize("name", ["bias_j", "mod_j"])
def test_terms_linear_in_the_key_position_far_into_a_sequence(built, name):
    """o is exact far away; the LSE (float32) holds the row term 0.1 * i, ~1e5 there. The backward
    recovers P from that LSE less the row term, which costs ~1e5 * 2**-24 in P: checked nearer."""
    p, mod = built[name]
    q, k, v = _qkv(40, 40, seed=len(name), Hq=4, Hkv=4)
    kw = dict(q_offset=2**20 + 8, k_offset=2**20)
    o, lse = mod.attention(q, k, v, return_lse=True, **kw)
    ref, ref_lse = attncc.reference(p, q.double(), k.double(), v.double(), return_lse=True, **kw)
    assert rel_err(o, ref) < 1e-4, rel_err(o, ref)
    assert torch.allclose(lse.double(), ref_lse, rtol=1e-6, atol=1e-4)
    _check(p, mod, q, k, v, q_offset=1000, k_offset=1000)


def test_a_float16_table_times_a_distance_far_into_a_sequence(built):
    p, mod = built["table_distance"]
    q, k, v = _qkv(12, 20, seed=3)
    _check(p, mod, q, k, v, q_offset=2**24 + 8, k_offset=2**24, x=torch.tensor([0.3, -0.7], dtype=torch.float16))


def test_a_float64_table_with_bfloat16_qkv_forward_and_backward(built):
    p, mod = built["f64_table"]
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen).to(torch.bfloat16).requires_grad_() for _ in range(3))
    x = torch.tensor([0.8, -1.5], dtype=torch.float64)
    o = mod.attention(q, k, v, x=x)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attncc.reference(p, *ref_in, x=x)
    assert rel_err(o.detach(), ref.detach()) < 2e-2
    g = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad((o * g).sum(), (q, k, v)), torch.autograd.grad((ref * g.double()).sum(), ref_in)):
        assert rel_err(a, b) < 5e-2


@pytest.mark.parametrize("name", ["never", "some_rows"])
def test_transforms_that_remove_whole_rows(built, name):
    p, mod = built[name]
    q, k, v = _qkv(20, 24, seed=5)
    if name == "some_rows":
        _check(p, mod, q, k, v)
    else:  # the output is 0 whatever q, k, v hold: zero gradients (the reference's graph ignores them)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o, lse = mod.attention(*leaves, return_lse=True)
        assert (o == 0).all() and (lse == -float("inf")).all()
        assert all((g == 0).all() for g in torch.autograd.grad(o.sum(), leaves))
    gen = torch.Generator().manual_seed(6)
    qd = torch.randn(1, 2, 3, 16, generator=gen)
    o, lse = mod.decode(qd, k, v, kv_len=torch.tensor([24], dtype=torch.int32), return_lse=True)
    ref, ref_lse = attncc.reference(p, qd.double(), k.double(), v.double(), q_offset=21, return_lse=True)
    assert rel_err(o, ref) < 1e-4 if ref.abs().max() > 0 else (o == 0).all()
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))


def test_non_finite_row_terms(built):
    """A row term (constant along j: the key loop leaves it to the LSE) that is -inf removes its row's
    pairs (o = 0, lse = -inf), +inf or NaN makes the row NaN, as the scores holding it would."""
    p, mod = built["row_table"]
    q, k, v = _qkv(24, 24, seed=9)
    x = torch.randn(1, 24, generator=torch.Generator().manual_seed(9))
    x[0, 3], x[0, 10], x[0, 17] = -math.inf, math.inf, math.nan
    o, lse = mod.attention(q, k, v, x=x, return_lse=True)
    ref, ref_lse = attncc.reference(p, q.double(), k.double(), v.double(), x=x, return_lse=True)
    assert (o[:, :, 3] == 0).all() and (lse[:, :, 3] == -math.inf).all() and (ref[:, :, 3] == 0).all()
    for row in (10, 17):
        assert o[:, :, row].isnan().all() and ref[:, :, row].isnan().all()
    ok = torch.isfinite(ref_lse)[0, 0]
    assert rel_err(o[:, :, ok], ref[:, :, ok]) < 1e-4
    assert torch.equal(lse.isnan(), ref_lse.isnan()) and torch.equal(lse.isinf(), ref_lse.isinf())
    x_neg = x.clone()
    x_neg[0, 10] = x_neg[0, 17] = 0.5
    _check(p, mod, q, k, v, x=x_neg)  # with the backward: zero gradients from the removed row
    gen = torch.Generator().manual_seed(10)
    qd = torch.randn(1, 2, 4, 16, generator=gen)
    for kv_len in (4, 11, 18, 24):  # the last query rows: 3 / 10 / 17 among them
        o, lse = mod.decode(qd, k, v, kv_len=torch.tensor([kv_len], dtype=torch.int32), x=x, return_lse=True)
        ref, ref_lse = attncc.reference(p, qd.double(), k[:, :, :kv_len].double(), v[:, :, :kv_len].double(),
                                        q_offset=kv_len - 4, x=x, return_lse=True)
        # (a +inf row's LSE: inf in the reference, NaN after decode's merge of splits; non-finite either way)
        assert torch.equal(o.isnan(), ref.isnan()) and torch.equal(lse.isfinite(), ref_lse.isfinite()), kv_len
        assert torch.equal(lse == -math.inf, ref_lse == -math.inf), kv_len
        fin = ~ref.isnan()
        assert torch.allclose(o[fin].double(), ref[fin], atol=1e-5), kv_len
