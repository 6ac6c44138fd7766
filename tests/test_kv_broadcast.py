"""k and v of batch 1 beside q of batch B > 1: broadcast over q's batch, as FlexAttention does
(its test_kv_batch_broadcast). The call equals the call with k, v repeated B times, and the
gradients of k, v are those summed over the batch; the reference broadcasts the same way."""
from __future__ import annotations

import random

import pytest
import torch

import attncc
from cases import SMALL_PARAMS, heads_for, inputs_for, module, pattern, rel_err

# softmax specs with masks, biases, inputs indexed by b (document, padding), and a linear one
NAMES = ["causal", "document", "alibi_learned", "padding", "sliding_window", "linear_elu"]  # (4 q heads, 2 kv: GQA)


@pytest.mark.parametrize("name", NAMES)
def test_broadcast_equals_repeated_kv(name):
    rng = random.Random(name)
    p, mod = pattern(name), module(name)
    Hq, Hkv = heads_for(p)
    B, Nq = rng.randint(2, 3), rng.choice([13, 37])
    Nk = Nq if p.kind == "linear" or name == "padding" else rng.choice([Nq, 29])
    gen = torch.Generator().manual_seed(len(name))
    q = torch.randn(B, Hq, Nq, 16, generator=gen, requires_grad=True)
    k = torch.randn(1, Hkv, Nk, 16, generator=gen, requires_grad=True)
    v = torch.randn(1, Hkv, Nk, 16, generator=gen, requires_grad=True)
    kw = dict(SMALL_PARAMS.get(name, {}), **inputs_for(p, B, Hq, max(Nq, Nk), gen))
    g = torch.randn(B, Hq, Nq, 16, generator=gen)

    o = mod.attention(q, k, v, **kw)
    grads = torch.autograd.grad((o * g).sum(), (q, k, v))
    kr, vr = (t.detach().repeat(B, 1, 1, 1).requires_grad_() for t in (k, v))
    o_rep = mod.attention(q, kr, vr, **kw)
    grads_rep = torch.autograd.grad((o_rep * g).sum(), (q, kr, vr))
    assert o.shape == (B, Hq, Nq, 16)
    torch.testing.assert_close(o, o_rep, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads_rep[0], rtol=1e-5, atol=1e-5)
    for got, rep in zip(grads[1:], grads_rep[1:]):
        assert got.shape == (1, Hkv, Nk, 16)
        torch.testing.assert_close(got, rep.sum(0, keepdim=True), rtol=1e-4, atol=1e-4)
    # the reference broadcasts the same way
    kw64 = {n: (t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for n, t in kw.items()}
    ref = attncc.reference(p, q.detach().double(), k.detach().double(), v.detach().double(), **kw64)
    assert rel_err(o.detach(), ref) < 1e-4


def test_broadcast_with_lse_offsets_and_strided_kv():
    mod, p = module("causal"), pattern("causal")
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 19, 16, generator=gen)
    kv = torch.randn(1, 2, 2, 25, 16, generator=gen)  # k and v as non-contiguous slices of one tensor
    k, v = kv[:, :, 0], kv[:, :, 1]
    o, lse = mod.attention(q, k, v, return_lse=True, q_offset=6, k_offset=0)
    ref, ref_lse = attncc.reference(p, q.double(), k.double(), v.double(), return_lse=True, q_offset=6)
    assert rel_err(o, ref) < 1e-4
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bq,bk,bv", [(2, 1, 2), (2, 2, 1), (1, 2, 2), (3, 2, 2)])
def test_other_batch_mismatches_are_refused(bq, bk, bv):
    mod = module("causal")
    q, k, v = torch.randn(bq, 2, 8, 16), torch.randn(bk, 2, 8, 16), torch.randn(bv, 2, 8, 16)
    with pytest.raises(ValueError, match="batch sizes differ"):
        mod.attention(q, k, v)
    with pytest.raises(ValueError, match="batch sizes differ"):
        attncc.reference(pattern("causal"), q, k, v)


def test_broadcast_under_torch_compile():
    """fullgraph: the expand is traced, the custom ops see stride-0 k, v, autograd sums their gradients."""
    mod = module("causal")
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 11, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 2, 11, 16, generator=gen, requires_grad=True) for _ in range(2))

    def loss(q, k, v):
        return mod.attention(q, k, v).square().sum()

    got = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_gluon_descriptors_get_real_strides():
    """The Gluon launches build TMA descriptors from the tensors' strides: a broadcast batch (stride
    0) is copied first; a tensor TMA can read as it is stays the same tensor."""
    from attncc.runtime.gluon.launch import _tma_ready

    k = torch.randn(1, 2, 8, 16)
    ready = _tma_ready(k.expand(3, 2, 8, 16))
    assert 0 not in ready.stride() and torch.equal(ready, k.expand(3, 2, 8, 16))
    assert _tma_ready(k) is k


def test_a_repeated_signature_broadcasts_too():
    """The second call of a signature skips bind's checks (its signature cache): it must broadcast
    the new k, v as the first did, and a nested q is still refused by name before any broadcast."""
    from attncc.runtime.call import BIND_STATS

    mod, p = module("sliding_window"), pattern("sliding_window")
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        q = torch.randn(2, 4, 23, 16, generator=gen)
        k, v = (torch.randn(1, 2, 23, 16, generator=gen) for _ in range(2))
        hits = BIND_STATS["hit"]
        o = mod.attention(q, k, v, window=5)
        assert rel_err(o, attncc.reference(p, q.double(), k.double(), v.double(), window=5)) < 1e-4
    assert BIND_STATS["hit"] == hits + 1  # the second call came from the cache
    nested = torch.nested.nested_tensor([torch.randn(4, 23, 16), torch.randn(4, 23, 16)])
    with pytest.raises(TypeError, match="q must be a dense"):
        mod.attention(nested, k, v)
