"""Packed variable-length batches (cu_seqlens): one packed call equals one call per sequence."""
from __future__ import annotations

import math

import pytest
import torch

import attncc
from cases import module, pattern, rel_err

# Lengths per sequence: length-1 and length-0 sequences, ragged block tails (BLOCK = 32 under the
# interpreter) and one sequence longer than a block.
LENS_Q = [5, 1, 0, 40, 17]
LENS_K_CROSS = [9, 3, 2, 25, 0]  # Nq != Nk per sequence (and a query sequence without keys)
PARAMS = {"sliding_window": {"window": 3}}


def _cu(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)


def _packed(lens_q, lens_k, heads, D=16, seed=0, grad=False):
    Hq, Hkv = heads
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, Hq, sum(lens_q), D, generator=gen)
    k = torch.randn(1, Hkv, sum(lens_k), D, generator=gen)
    v = torch.randn(1, Hkv, sum(lens_k), D, generator=gen)
    g = torch.randn(1, Hq, sum(lens_q), D, generator=gen)
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v, g


def _seqs(lens_q, lens_k):
    cq, ck = _cu(lens_q).tolist(), _cu(lens_k).tolist()
    return [(slice(cq[s], cq[s + 1]), slice(ck[s], ck[s + 1])) for s in range(len(lens_q))]


CASES = [("causal", None, (2, 2)), ("sliding_window", None, (2, 1)), ("cross_causal", LENS_K_CROSS, (2, 2)),
         ("alibi", None, (2, 2)), ("rope_causal", None, (2, 2)), ("dense", LENS_K_CROSS, (2, 1)),
         ("causal", LENS_K_CROSS, (4, 2))]


@pytest.mark.parametrize("name,lens_k,heads", CASES, ids=[f"{c[0]}-{'cross' if c[1] else 'self'}-{c[2][0]}x{c[2][1]}"
                                                          for c in CASES])
def test_packed_equals_per_sequence(name, lens_k, heads):
    lens_q = LENS_Q
    lens_k = lens_k or lens_q
    mod, p, kw = module(name), pattern(name), PARAMS.get(name, {})
    q, k, v, g = _packed(lens_q, lens_k, heads, grad=True)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    o, lse = mod.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True, **kw)
    assert o.shape == (1, heads[0], sum(lens_q), 16) and lse.shape == (1, heads[0], sum(lens_q))
    assert not torch.isnan(o).any()
    grads = torch.autograd.grad((o * g).sum(), (q, k, v))
    for label, x in zip("qkv", grads):
        assert torch.isfinite(x).all(), label
    # max_seqlen given (no sync) gives the same
    o2 = mod.attention(q.detach(), k.detach(), v.detach(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                       max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k) + 3, **kw)
    assert torch.equal(o2, o.detach())
    for sq, sk in _seqs(lens_q, lens_k):
        qs, ks, vs = (t.detach()[:, :, s].clone().requires_grad_() for t, s in ((q, sq), (k, sk), (v, sk)))
        o_s, lse_s = mod.attention(qs, ks, vs, return_lse=True, **kw)
        assert torch.allclose(o[:, :, sq], o_s, atol=1e-5, rtol=1e-5)
        assert torch.equal(torch.isinf(lse[:, :, sq]), torch.isinf(lse_s))
        fin = torch.isfinite(lse_s)
        assert torch.allclose(lse[:, :, sq][fin], lse_s[fin], atol=1e-5)
        if sq.stop > sq.start and sk.stop > sk.start:  # per-sequence gradients
            gs = torch.autograd.grad((o_s * g[:, :, sq]).sum(), (qs, ks, vs))
            for label, x, r in zip("qkv", grads, gs):
                part = x[:, :, sq] if label == "q" else x[:, :, sk]
                assert torch.allclose(part, r, atol=1e-5, rtol=1e-4), (label, (part - r).abs().max())
            ref_in = [t.detach().double().requires_grad_() for t in (qs, ks, vs)]
            ref = attncc.reference(p, *ref_in, **kw)
            assert rel_err(o[:, :, sq].detach(), ref.detach()) < 1e-4
            ref_g = torch.autograd.grad((ref * g[:, :, sq].double()).sum(), ref_in)
            for label, x, r in zip("qkv", grads, ref_g):
                part = x[:, :, sq] if label == "q" else x[:, :, sk]
                # relative to the gradient's norm, or absolute where it is ~0 (a length-1 causal row: dq = 0)
                assert float((part.double() - r).norm()) < 1e-3 * max(float(r.norm()), 1e-2), label
        else:  # an empty sequence: o = 0 (lse = -inf), no gradient
            assert (o[:, :, sq] == 0).all() and (lse[:, :, sq] == -math.inf).all()
            assert (grads[1][:, :, sk] == 0).all() and (grads[2][:, :, sk] == 0).all()
            assert (grads[0][:, :, sq] == 0).all()


def test_bottom_right_causal_uses_each_sequences_lengths():
    # cross_causal (j - n_k <= i - n_q): the last query row of every sequence sees all its keys
    q, k, v, _ = _packed([3, 4], [6, 2], (1, 1))
    o, lse = module("cross_causal").attention(q, k, v, cu_seqlens_q=_cu([3, 4]), cu_seqlens_k=_cu([6, 2]),
                                              return_lse=True)
    dense = module("dense").attention(q, k, v, cu_seqlens_q=_cu([3, 4]), cu_seqlens_k=_cu([6, 2]))
    assert torch.allclose(o[:, :, [2, 6]], dense[:, :, [2, 6]], atol=1e-6)
    assert torch.isinf(lse[0, 0, 3:5]).all() and torch.isfinite(lse[0, 0, 5:]).all()  # rows 0, 1 of seq 1 see no key


def test_rows_past_the_last_sequence_are_zero():
    q, k, v, _ = _packed([8], [8], (2, 2))
    o, lse = module("causal").attention(q, k, v, cu_seqlens_q=_cu([3, 2]), cu_seqlens_k=_cu([3, 2]), return_lse=True)
    assert (o[:, :, 5:] == 0).all() and (lse[:, :, 5:] == -math.inf).all()


def test_block_list_patterns_refuse_varlen():
    q, k, v, _ = _packed([4, 4], [4, 4], (2, 2))
    doc = torch.zeros(2, 8, dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="document mask"):
        module("document").attention(q, k, v, cu_seqlens_q=_cu([4, 4]), cu_seqlens_k=_cu([4, 4]), doc=doc)
    with pytest.raises(NotImplementedError, match="random_blocks"):  # its blocks depend on each n_k
        module("bigbird").attention(q, k, v, cu_seqlens_q=_cu([4, 4]), cu_seqlens_k=_cu([4, 4]))


def test_argument_checks():
    mod = module("causal")
    q, k, v, _ = _packed([4, 4], [4, 4], (2, 2))
    cu = _cu([4, 4])
    with pytest.raises(ValueError, match="both cu_seqlens_q and cu_seqlens_k"):
        mod.attention(q, k, v, cu_seqlens_q=cu)
    with pytest.raises(ValueError, match="both"):
        mod.attention(q, k, v, cu_seqlens_k=cu)
    with pytest.raises(TypeError, match="int32 or int64, got float32"):
        mod.attention(q, k, v, cu_seqlens_q=cu.float(), cu_seqlens_k=cu)
    with pytest.raises(ValueError, match="shape"):
        mod.attention(q, k, v, cu_seqlens_q=cu[None], cu_seqlens_k=cu)
    with pytest.raises(ValueError, match="sequences"):
        mod.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=_cu([4, 2, 2]))
    with pytest.raises(ValueError, match="non-decreasing"):
        mod.attention(q, k, v, cu_seqlens_q=torch.tensor([0, 5, 4], dtype=torch.int32), cu_seqlens_k=cu)
    with pytest.raises(ValueError, match="start at 0"):
        mod.attention(q, k, v, cu_seqlens_q=torch.tensor([1, 5, 8], dtype=torch.int32), cu_seqlens_k=cu)
    with pytest.raises(ValueError, match="past the 8 packed rows"):
        mod.attention(q, k, v, cu_seqlens_q=_cu([4, 5]), cu_seqlens_k=cu)
    with pytest.raises(ValueError, match="less than the longest"):
        mod.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=3)
    with pytest.raises(ValueError, match="packed as"):
        mod.attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                      cu_seqlens_q=cu, cu_seqlens_k=cu)
    for kw in (dict(q_offset=2), dict(k_offset=1), dict(n_q=8), dict(n_k=8)):
        with pytest.raises(ValueError, match="cannot be combined"):
            mod.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, **kw)
    with pytest.raises(ValueError, match="both"):
        mod.attention(q, k, v, max_seqlen_q=4)


SEQ_INPUT_SPEC = """
[inputs]
row_bias = { dims = ["b", "n"], dtype = "float32" }
slope = { dims = ["b"], dtype = "float32" }
[mask]
where = "j - n_k <= i - n_q"
[score]
bias = "row_bias[b, i] * 3.0 + 0.5 * row_bias[b, j] + slope[b] * (j - i)"
"""


def test_inputs_indexed_by_b_are_per_sequence(tmp_path):
    """``b`` is the sequence index: inputs with a "b" dim have S rows, "n" dims cover max_seqlen."""
    import importlib.util

    from attncc.codegen import build

    path = tmp_path / "varlen_seq_inputs.toml"
    path.write_text(SEQ_INPUT_SPEC)
    (written,) = build([path], tmp_path / "gen")
    spec = importlib.util.spec_from_file_location("_attncc_test_varlen_seq_inputs", written)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lens_q, lens_k = [6, 1, 0, 35], [4, 2, 3, 38]
    q, k, v, g = _packed(lens_q, lens_k, (2, 1), grad=True)
    gen = torch.Generator().manual_seed(5)
    row_bias = torch.rand(4, 38, generator=gen)
    slope = torch.rand(4, generator=gen)
    o = mod.attention(q, k, v, cu_seqlens_q=_cu(lens_q), cu_seqlens_k=_cu(lens_k), row_bias=row_bias, slope=slope)
    grads = torch.autograd.grad((o * g).sum(), (q, k, v))
    for s, (sq, sk) in enumerate(_seqs(lens_q, lens_k)):
        qs, ks, vs = (t.detach()[:, :, sl].clone().requires_grad_() for t, sl in ((q, sq), (k, sk), (v, sk)))
        o_s = mod.attention(qs, ks, vs, row_bias=row_bias[s:s + 1], slope=slope[s:s + 1])
        assert torch.allclose(o[:, :, sq], o_s, atol=1e-5, rtol=1e-5)
        if sq.stop > sq.start:
            gs = torch.autograd.grad((o_s * g[:, :, sq]).sum(), (qs, ks, vs))
            for label, x, r in zip("qkv", grads, gs):
                part = x[:, :, sq] if label == "q" else x[:, :, sk]
                assert torch.allclose(part, r, atol=1e-5, rtol=1e-4), label


@pytest.mark.parametrize("name, kw", [("strided", {"stride": 4}), ("neighborhood_2d", {"width": 5, "radius": 1}),
                                      ("sliding_window", {"window": 0})])
def test_exact_block_lists_per_sequence(name, kw):
    """Static patterns without a closed form (and calls breaking one's precondition: a window of 0)
    classify every sequence of a packed batch on its own, from position 0."""
    lens = [5, 1, 0, 40, 17]
    mod, p = module(name), pattern(name)
    q, k, v, g = _packed(lens, lens, (2, 1), grad=True)
    o = mod.attention(q, k, v, cu_seqlens_q=_cu(lens), cu_seqlens_k=_cu(lens), **kw)
    grads = torch.autograd.grad((o * g).sum(), (q, k, v))
    for sq, sk in _seqs(lens, lens):
        if sq.stop == sq.start:
            continue
        qs, ks, vs = (t.detach()[:, :, s].double().requires_grad_() for t, s in ((q, sq), (k, sk), (v, sk)))
        ref = attncc.reference(p, qs, ks, vs, **kw)
        assert rel_err(o[:, :, sq].detach(), ref.detach()) < 1e-5
        ref_grads = torch.autograd.grad((ref * g[:, :, sq].double()).sum(), (qs, ks, vs))
        for x, r, s in zip(grads, ref_grads, (sq, sk, sk)):
            assert float((x[:, :, s].double() - r).abs().max()) < 1e-4
