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


# ------------------------------------------------------------------------------------------------
# The backward of a score with a large term constant along j (a row term): the forward keeps its LSE
# less the row terms for the backward (attncc.runtime.autograd.keep_raw_lse). From the returned LSE,
# which holds them in float32, the gradients were off by 1e-2 at 0.1 * i near i = 10**6 and by 50x
# at 2**29 (a probe of session 13), while o was exact.

ROW_TERMS = {
    "bias_j": ('bias = "0.1 * j"', {}, [10**6, 2**29]),
    "bias_i": ('bias = "0.1 * i + c"', {}, [2**29]),
    "constant": ('bias = "c"', {"c": 1e6}, [0]),
    "mod_i": ('mod = "s * 0.5 + 0.25 * i"', {}, [2**29]),
}


@pytest.mark.parametrize("name", sorted(ROW_TERMS))
@pytest.mark.parametrize("use_lse", [False, True])
def test_row_terms_keep_the_gradients_exact(name, use_lse):
    score, kw, offsets = ROW_TERMS[name]
    text = f'[params]\nc = 0.0\n[mask]\nwhere = "j <= i and i - j < 40"\n[score]\n{score}\n'
    mod, p = attncc.compile(text), attncc.parse_spec(text)
    for off in offsets:
        gen = torch.Generator().manual_seed(off % 1000)
        q, k, v = (torch.randn(1, 2, 70, 16, generator=gen).requires_grad_() for _ in range(3))
        o, lse = mod.attention(q, k, v, q_offset=off, k_offset=off, return_lse=True, **kw)
        ((o * o).sum() + (0.3 * lse.sum() if use_lse else 0)).backward()
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ro, rl = attncc.reference(p, *leaves, q_offset=off, k_offset=off, return_lse=True, **kw)
        ((ro * ro).sum() + (0.3 * rl.sum() if use_lse else 0)).backward()
        assert rel_err(o, ro) < 1e-5
        for label, mine, ref in zip("qkv", (q.grad, k.grad, v.grad), leaves):
            assert rel_err(mine, ref.grad) < 1e-4, (name, off, label)


def test_row_terms_of_packed_calls():
    """Packed rows: the raw LSE's rows outside every sequence stay -inf as the LSE's."""
    text = '[params]\nc = 0.0\n[mask]\nwhere = "j <= i"\n[score]\nbias = "c + 0.01 * h"\n'
    mod, p = attncc.compile(text), attncc.parse_spec(text)
    gen = torch.Generator().manual_seed(3)
    lens = [5, 0, 33, 12]
    cu = torch.tensor([0, 5, 5, 38, 50], dtype=torch.int32)
    q, k, v = (torch.randn(1, 2, 52, 16, generator=gen).requires_grad_() for _ in range(3))  # 2 rows unused
    o = mod.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, c=1e6)
    (o * o).sum().backward()
    start = 0
    for n in lens:
        rows = slice(start, start + n)
        start += n
        if not n:
            continue
        leaves = [t.detach()[:, :, rows].double().requires_grad_() for t in (q, k, v)]
        ro = attncc.reference(p, *leaves, c=1e6)
        (ro * ro).sum().backward()
        assert rel_err(o[:, :, rows], ro) < 1e-5
        for mine, ref in zip((q.grad, k.grad, v.grad), leaves):
            assert rel_err(mine[:, :, rows], ref.grad) < 1e-4
    assert torch.all(q.grad[:, :, 50:] == 0)


def test_a_changed_lse_is_not_the_kept_one():
    """The backward takes the kept raw LSE only for the very LSE its forward returned, unchanged
    (an LSE merged in place, as attncc.distributed merges, takes the row terms out of itself)."""
    from attncc.runtime import Call, keep_raw_lse, raw_lse, seal_raw_lse

    lse = torch.zeros(1, 2, 8)
    call = object.__new__(Call)  # the two fields these read
    call.__dict__.update(for_backward={}, varlen=False)
    raw = keep_raw_lse(call, lse)
    assert raw_lse(call, lse) is None  # not sealed: the forward did not finish
    seal_raw_lse(call)
    assert raw_lse(call, lse) is raw
    assert raw_lse(call, lse.clone()) is None and raw_lse(call, lse[:, :1]) is None
    lse.add_(1.0)
    assert raw_lse(call, lse) is None
    call.__dict__.update(for_backward=None)
    assert keep_raw_lse(call, lse) is None and raw_lse(call, lse) is None


def test_rows_without_keys_pass_no_gradient_whatever_their_row_term():
    """NaN and -inf row terms on rows that see no key: o = 0, LSE = -inf and no gradient, as the LSE
    has it (the raw LSE stored NaN there once, and every gradient of those tiles turned NaN)."""
    text = '[mask]\nwhere = "j <= i - 3"\n[score]\nmod = "s + log(i - 2)"\n'  # rows 0, 1: NaN; row 2: -inf
    mod, p = attncc.compile(text), attncc.parse_spec(text)
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=gen).requires_grad_() for _ in range(3))
    o, lse = mod.attention(q, k, v, return_lse=True)
    (o.sum() + torch.where(lse.isfinite(), lse, 0.0).sum()).backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro, rl = attncc.reference(p, *leaves, return_lse=True)
    (ro.sum() + torch.where(rl.isfinite(), rl, 0.0).sum()).backward()
    assert torch.all(lse[:, :, :3] == -math.inf) and torch.all(o[:, :, :3] == 0)
    for mine, ref in zip((q.grad, k.grad, v.grad), leaves):
        assert not mine.isnan().any() and rel_err(mine, ref.grad) < 1e-4


@pytest.mark.parametrize("how", ["checkpoint", "copying_hooks"])
def test_row_terms_under_recomputation_and_saved_tensor_hooks(how):
    """torch.utils.checkpoint (non-reentrant: the backward gets the recomputed LSE) and saved-tensor
    hooks that copy hand the backward other tensors than the forward returned: the raw LSE is saved
    with the LSE, so those get theirs (they took the row terms out of the LSE, 3e-3 off at 10**6)."""
    text = '[mask]\nwhere = "j <= i and i - j < 30"\n[score]\nbias = "0.1 * j"\n'
    mod, p = attncc.compile(text), attncc.parse_spec(text)
    gen = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 2, 50, 16, generator=gen).requires_grad_() for _ in range(3))
    f = lambda q, k, v: mod.attention(q, k, v, q_offset=10**6, k_offset=10**6)  # noqa: E731
    if how == "checkpoint":
        from torch.utils.checkpoint import checkpoint

        o = checkpoint(f, q, k, v, use_reentrant=False)
        (o * o).sum().backward()
    else:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            o = f(q, k, v)
        (o * o).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro = attncc.reference(p, *leaves, q_offset=10**6, k_offset=10**6)
    (ro * ro).sum().backward()
    for mine, ref in zip((q.grad, k.grad, v.grad), leaves):
        assert rel_err(mine, ref.grad) < 1e-5


@pytest.mark.parametrize("seed", range(6))
def test_powers_of_position_sums_stay_whole(seed):
    """A float power of a sum of positions is computed as the power, not written out: sympy's
    expansion of (i - j + 0.5) ** 7 is 0.0078125 + 0.109375 * (a polynomial) + (i**7 - j**7), whose
    terms cancelled in float32 to 0 where the power is 0.0078 (an inf bias: NaN rows). Random
    powers, offsets and shifts; forward, LSE and gradients against the reference."""
    import random

    from attncc.spec import parse_spec

    rng = random.Random(seed)
    n = 7 if seed == 0 else rng.randrange(4, 8)  # seed 0: the probe's case
    c = 0.5 if seed == 0 else rng.choice([0.5, -0.5, 0.25, 1.5])
    a, b = (1, 1) if seed == 0 else (rng.choice([1, 2, -1]), rng.choice([1, -1, 3]))
    text = (f'[score]\nbias = "(({a} * i + {b} * j + 1) ** {n}) / ((i - j + {c}) ** {n}) / 1e12 + (0.5 * i - j + {c}) ** 2 / 1000"\n')
    mod, p = attncc.compile(text), parse_spec(text)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, m, 16, generator=gen).requires_grad_() for m in (13, 29, 29))
    o, lse = mod.attention(q, k, v, return_lse=True)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attncc.reference(p, *leaves, return_lse=True)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all(), text
    assert rel_err(o.detach(), ref.detach()) < 1e-4, text
    assert float(((lse.detach().double() - ref_lse.detach()).abs() / ref_lse.detach().abs().clamp_min(1)).max()) < 1e-5, text
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), do)
    want = torch.autograd.grad(ref, leaves, do.double())
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-3, text
