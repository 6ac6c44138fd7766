"""Attention dropout (specs/causal_dropout.toml): the kernels' in-kernel RNG against the reference
given the exposed keep mask, under the Triton interpreter."""
from __future__ import annotations

import pytest
import torch

import attncc
from attncc.spec import SpecError, parse_spec
from cases import module, pattern, rel_err

NAME = "causal_dropout"


def qkv(B=1, Hq=4, Hkv=2, Nq=45, Nk=None, D=16, seed=0, grad=True):
    gen = torch.Generator().manual_seed(seed)
    Nk = Nq if Nk is None else Nk
    shapes = ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D))
    return [torch.randn(*s, generator=gen).requires_grad_(grad) for s in shapes]


@pytest.mark.parametrize("heads, Nq, Nk, q_offset, dropout_p",
                         [((4, 2), 45, 45, 0, None), ((2, 1), 21, 61, 40, 0.4), ((2, 2), 37, 37, 0, 0.9)])
def test_forward_and_gradients_match_the_reference_with_the_keep_mask(heads, Nq, Nk, q_offset, dropout_p):
    mod, p = module(NAME), pattern(NAME)
    q, k, v = qkv(Hq=heads[0], Hkv=heads[1], Nq=Nq, Nk=Nk, seed=1)
    g = torch.randn(1, heads[0], Nq, 16, generator=torch.Generator().manual_seed(2))
    kw = dict(q_offset=q_offset, seed=77, dropout_p=dropout_p)
    o = mod.attention(q, k, v, **kw)
    grads = torch.autograd.grad((o * g).sum(), (q, k, v))
    keep = mod.dropout_keep_mask(q, k, v, **kw)
    assert keep.shape == (1, heads[0], Nq, Nk) and keep.dtype == torch.bool
    assert 0 < keep.float().mean() < 1
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_kw = {} if dropout_p is None else {"dropout_p": dropout_p}
    ref = attncc.reference(p, *ref_in, q_offset=q_offset, keep_mask=keep, **ref_kw)
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), ref_in)
    assert rel_err(o.detach(), ref.detach()) < 1e-4
    for label, x, r in zip("qkv", grads, ref_grads):
        assert rel_err(x, r) < 1e-3, (label, rel_err(x, r))


def test_keep_rate_and_chunks_see_the_same_mask():
    mod = module(NAME)
    q, k, v = qkv(Hq=2, Hkv=2, Nq=96, grad=False)
    keep = mod.dropout_keep_mask(q, k, v, seed=5, dropout_p=0.3)
    assert abs(keep.float().mean().item() - 0.7) < 0.02  # 18432 pairs: 5 standard deviations
    chunk = mod.dropout_keep_mask(q[:, :, 50:], k, v, seed=5, dropout_p=0.3, q_offset=50)
    assert torch.equal(chunk, keep[:, :, 50:])



def test_keep_mask_takes_the_offsets_attention_takes():
    """dropout_keep_mask took one-element tensors as offsets (attention does) but passed them to its
    kernel as they came: a pointer, an error from inside Triton. It reads them as attention does, so the
    mask of a call with tensor offsets is the mask that call used."""
    import numpy as np

    mod, p = module(NAME), pattern(NAME)
    q, k, v = qkv(Hq=2, Hkv=1, Nq=9, Nk=21, grad=False)
    want = mod.dropout_keep_mask(q, k, v, seed=4, q_offset=12, k_offset=3)
    for qo, ko in ((torch.tensor(12), torch.tensor(3)), (np.int64(12), torch.tensor([3]))):
        keep = mod.dropout_keep_mask(q, k, v, seed=torch.tensor(4), q_offset=qo, k_offset=ko)
        assert torch.equal(keep, want)
        o = mod.attention(q, k, v, seed=4, q_offset=qo, k_offset=ko)
        ref = attncc.reference(p, q.double(), k.double(), v.double(), q_offset=12, k_offset=3, keep_mask=keep)
        assert rel_err(o, ref) < 1e-5
    with pytest.raises(TypeError, match="q_offset"):
        mod.dropout_keep_mask(q, k, v, seed=4, q_offset=torch.tensor(1.0))


def test_seeds_eval_and_zero_probability():
    mod = module(NAME)
    q, k, v = qkv(Hq=2, Hkv=1, Nq=33, grad=False)
    a = mod.attention(q, k, v, seed=1)
    assert torch.equal(a, mod.attention(q, k, v, seed=1))
    assert not torch.allclose(a, mod.attention(q, k, v, seed=2))
    plain = module("causal").attention(q, k, v)
    assert torch.equal(mod.attention(q, k, v, dropout_p=0.0), plain)
    assert torch.equal(mod.attention(q, k, v, training=False), plain)
    torch.manual_seed(3)
    b = mod.attention(q, k, v)  # the seed drawn from torch's generator
    torch.manual_seed(3)
    assert torch.equal(b, mod.attention(q, k, v))


def test_the_mask_does_not_depend_on_the_tiles(monkeypatch):
    mod = module(NAME)
    q, k, v = qkv(Nq=40, grad=False)
    a = mod.attention(q, k, v, seed=9)
    monkeypatch.setenv("ATTNCC_CONFIG", "BLOCK_M=16,BLOCK_N=16,num_warps=4,num_stages=1")
    b = mod.attention(q, k, v, seed=9)
    assert rel_err(a, b) < 1e-6


def test_bad_dropout_arguments():
    mod = module(NAME)
    q, k, v = qkv(grad=False)
    with pytest.raises(ValueError, match="dropout_p"):
        mod.attention(q, k, v, dropout_p=1.0)
    with pytest.raises(TypeError, match="seed"):
        mod.attention(q, k, v, seed=1.5)
    with pytest.raises(ValueError, match="seed"):
        mod.dropout_keep_mask(q, k, v, seed=None)
    with pytest.raises(TypeError, match="dropout_p"):
        module("causal").attention(q, k, v, dropout_p=0.1)  # a spec without dropout takes no such keyword
    with pytest.raises(SpecError, match="seed"):
        parse_spec('[params]\nseed = 3\n[score]\ndropout = 0.1\n')
