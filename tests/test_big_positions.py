"""Positions past 2**31 - 1 (issue 15): offsets near 2**31 and 2**32 against attncc.reference.

The kernels switch to int64 position arithmetic (the WIDE constexpr) when a call's positions can
pass int32; before, ``q_offset + row`` wrapped and masks on absolute positions went wrong.
Inputs indexed by position cannot reach such positions in a test (2**31 entries), so the masks
here read positions only, or inputs indexed by b (padding's kv_len, holding int64 lengths).
"""
from __future__ import annotations

import pytest
import torch

import attncc
import attncc.runtime.call as rt_call
from cases import build_inline, module, pattern, rel_err
from test_runtime_tensors import _torch_lists, check_attention

EXTRA = {
    "blocks_of_7": 'name = "blocks_of_7"\n[mask]\nwhere = "i // 7 == j // 7"\n',
    "every_5th": 'name = "every_5th"\n[mask]\nwhere = "i % 5 == 0 or (j <= i and j % 3 != 1)"\n',
    "pos_bias": 'name = "pos_bias"\n[params]\nw = 13\n[mask]\nwhere = "j <= i"\n'
                '[score]\nbias = "((i - j) % w) * 0.25 - (i % 3) * 0.5"\n',
}

OFFSETS = [2**31 - 40, 2**32 - 24, 2**31 + 8]


@pytest.fixture(scope="module")
def extra(tmp_path_factory):
    return build_inline(EXTRA, tmp_path_factory.mktemp("big_positions"))


def _qkv(Nq, Nk, seed, B=1, Hq=2, Hkv=2, D=16):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Nq, D, generator=gen), torch.randn(B, Hkv, Nk, D, generator=gen),
            torch.randn(B, Hkv, Nk, D, generator=gen))


def _check(p, mod, q, k, v, **kw):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = mod.attention(*leaves, return_lse=True, **kw)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attncc.reference(p, *ref_in, return_lse=True, **kw)
    assert rel_err(o.detach(), ref.detach()) < 1e-4, rel_err(o.detach(), ref.detach())
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert torch.allclose(lse[fin].double(), ref_lse[fin].detach(), atol=1e-4)
    g = torch.randn_like(o)
    for label, a, b in zip("qkv", torch.autograd.grad((o * g).sum(), leaves),
                           torch.autograd.grad((ref * g.double()).sum(), ref_in)):
        assert rel_err(a, b) < 1e-4, (label, rel_err(a, b))


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("name", ["blocks_of_7", "every_5th", "pos_bias"])
def test_position_masks_past_int32(extra, name, offset):
    p, mod = extra[name]
    q, k, v = _qkv(70, 70, seed=offset % 97)
    _check(p, mod, q, k, v, q_offset=offset, k_offset=offset - 3)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("name", ["causal", "sliding_window", "rope_causal", "cross_causal", "chunked_local",
                                  "sink_window", "neighborhood_2d"])
def test_specs_past_int32(name, offset):
    """Closed-form walks (one and two segments, chunks) and exact block lists (the tile kernel) too."""
    q, k, v = _qkv(45, 60, seed=offset % 89)
    kw = {"sliding_window": {"window": 13}, "chunked_local": {"chunk": 24}, "sink_window": {"window": 13},
          "neighborhood_2d": {"width": 10, "radius": 1}}.get(name, {})
    # queries at the end of the keys: every query block sees some keys
    _check(pattern(name), module(name), q, k, v, q_offset=offset + 15, k_offset=offset, **kw)


def test_n_q_and_n_k_past_int32():
    """cross_causal's j - n_k <= i - n_q with n_q, n_k past 2**31 and offsets below it."""
    q, k, v = _qkv(40, 50, seed=3)
    _check(pattern("cross_causal"), module("cross_causal"), q, k, v, q_offset=100, k_offset=90,
           n_q=2**31 + 60, n_k=2**31 + 45)


@pytest.mark.parametrize("lists", ["kernel", "torch"])
def test_block_lists_past_int32(lists, monkeypatch):
    """padding (j < kv_len[b], block lists from the tile kernel or the torch path) with k_offset
    near 2**31 and int64 lengths that end inside the keys."""
    if lists == "torch":
        _torch_lists(module("padding"), monkeypatch)
    offset = 2**31 - 30
    q, k, v = _qkv(40, 70, seed=4, B=3)
    kv_len = torch.tensor([offset + 50, offset + 3, offset - 5], dtype=torch.int64)
    check_attention("padding", q, k, v, kw={"kv_len": kv_len}, q_offset=offset, k_offset=offset)


def test_dropout_past_int32():
    """The dropout counters at positions past 2**31 and 2**32: forward and backward against the
    reference given dropout_keep_mask (the same RNG)."""
    mod, p = module("causal_dropout"), pattern("causal_dropout")
    for offset in (2**31 - 20, 2**32 - 20):
        q, k, v = (t.requires_grad_() for t in _qkv(40, 40, seed=5))
        kw = dict(q_offset=offset, k_offset=offset, seed=11, dropout_p=0.3)
        o = mod.attention(q, k, v, **kw)
        keep = mod.dropout_keep_mask(q, k, v, **kw)
        assert 0.5 < keep.float().mean() < 0.9
        ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = attncc.reference(p, *ref_in, q_offset=offset, k_offset=offset, keep_mask=keep, dropout_p=0.3)
        assert rel_err(o.detach(), ref.detach()) < 1e-4
        g = torch.randn_like(o)
        for a, b in zip(torch.autograd.grad((o * g).sum(), (q, k, v)),
                        torch.autograd.grad((ref * g.double()).sum(), ref_in)):
            assert rel_err(a, b) < 1e-3


def test_wide_arithmetic_draws_the_same_numbers(monkeypatch):
    """Below 2**32 the WIDE path (int64 positions) gives what the int32 path gives: the same dropout
    mask, the same outputs. INT32_REACH = -1 forces WIDE on every call."""
    mod = module("causal_dropout")
    q, k, v = _qkv(40, 40, seed=6)
    kw = dict(q_offset=70, k_offset=70, seed=12, dropout_p=0.3)
    keep, o = mod.dropout_keep_mask(q, k, v, **kw), mod.attention(q, k, v, **kw)
    monkeypatch.setattr(rt_call, "INT32_REACH", -1)
    assert torch.equal(mod.dropout_keep_mask(q, k, v, **kw), keep)
    assert torch.allclose(mod.attention(q, k, v, **kw), o, atol=1e-6, rtol=0)
    check_attention("rope_causal", q, k, v, q_offset=5, k_offset=5)  # RoPE's float64 angles


def test_wide_is_chosen_by_the_call():
    assert not rt_call.wide_positions(2**31 - 5000)
    assert rt_call.wide_positions(2**31 - 100)
    assert rt_call.wide_positions(100, {"w": 2**31 - 10})
    assert not rt_call.wide_positions(100, {"w": 2**20})

    class Big:  # an input [2, 3] with row stride 2**31 (only its shape and strides are looked at)
        shape = (2, 3)

        def stride(self):
            return (2**31, 1)

        def numel(self):
            return 6

    assert rt_call.wide_positions(100, {}, [Big()])
    assert not rt_call.wide_positions(100, {}, [torch.zeros(1).expand(2**31 + 5)])  # stride 0


@pytest.mark.parametrize("causal", [True, False])
def test_linear_cosformer_positions_past_int32(tmp_path_factory, causal):
    """cosFormer's features depend on positions: chunks at 2**31 - 20 (forward and backward)."""
    from test_linear import linear_module

    p, mod = linear_module(tmp_path_factory, "cosformer", causal, True)
    offset = 2**31 - 20
    gen = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 2, 45, 16, generator=gen).requires_grad_() for _ in range(3))
    kw = dict(q_offset=offset, k_offset=offset, n_q=offset + 45, n_k=offset + 45)
    o = mod.attention(q, k, v, **kw)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attncc.reference(p, *ref_in, **kw)
    assert rel_err(o.detach(), ref.detach()) < 1e-4
    g = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad((o * g).sum(), (q, k, v)), torch.autograd.grad((ref * g.double()).sum(), ref_in)):
        assert rel_err(a, b) < 1e-3


def test_positions_and_params_past_2_62_are_refused():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="q_offset must be <= "):
        module("causal").attention(q, q, q, q_offset=2**62)
    with pytest.raises(ValueError, match="positions must stay below 2\\*\\*62"):
        module("causal").attention(q, q, q, k_offset=2**62 - 4)
    with pytest.raises(ValueError, match="window must be <= "):
        module("sliding_window").attention(q, q, q, window=2**63)
