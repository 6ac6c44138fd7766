"""The non-finite contract (contract v1, docs/spec-language.md "Non-finite values", issue 15).

NaN or inf planted in q, k, v at random places: the rows the reference makes non-finite are
non-finite in the kernels too (forward: o and lse; backward: dq, dk, dv), every row the kernels
leave finite equals the reference, and the kernels make no row non-finite beyond the rows that
share a visited tile with a planted value. The reference never hides a NaN. A scale the kernels
cannot compute with is refused.
"""
from __future__ import annotations

import math

import pytest
import torch

import attncc
from attncc._reference import pair_mask
from cases import inputs_for, module, pattern, rel_err
from test_decode import decode_module

BLOCK = 16  # every kernel's tiles in these tests (forced below): tile neighbourhoods are known
SPECS = ["causal", "sliding_window", "document", "alibi", "softcap"]  # affine, block lists, bias, cap
PARAMS = {"sliding_window": {"window": 13}}


@pytest.fixture(autouse=True)
def _tiles(monkeypatch):
    cfg = f"BLOCK_M={BLOCK},BLOCK_N={BLOCK},num_warps=4,num_stages=1"
    for kernel in ("", "_DKDV", "_DQ"):
        monkeypatch.setenv("ATTNCC_CONFIG" + kernel, cfg)


def _rows_bad(x):
    """[B, H, N] bool: rows holding a non-finite entry."""
    return ~torch.isfinite(x).all(-1) if x.dim() == 4 else ~torch.isfinite(x)


def _tile_reach(allowed: torch.Tensor, bad_q: torch.Tensor, bad_k: torch.Tensor):
    """Rows and keys a kernel may make non-finite: ``bad_q`` [B, H, Nq] rows and ``bad_k``
    [B, H, Nk] keys hold planted values; a tile (query block, key block) with an allowed pair is
    visited, and every pair of a visited tile that touches a planted row or key may turn NaN
    (0 * NaN in the tile's products). Returns (query rows [B, H, Nq], key rows [B, H, Nk])."""
    B, H, Nq, Nk = allowed.shape
    nqb, nkb = -(-Nq // BLOCK), -(-Nk // BLOCK)
    pad = torch.zeros(B, H, nqb * BLOCK, nkb * BLOCK, dtype=torch.bool)
    pad[..., :Nq, :Nk] = allowed
    visited = pad.view(B, H, nqb, BLOCK, nkb, BLOCK).any(5).any(3)  # [B, H, nqb, nkb]

    def blocks(rows, n, nb):
        out = torch.zeros(B, H, nb * BLOCK, dtype=torch.bool)
        out[..., :n] = rows
        return out.view(B, H, nb, BLOCK).any(-1)

    up = lambda x, n: x.repeat_interleave(BLOCK, -1)[..., :n]  # noqa: E731
    q_hit = blocks(bad_q, Nq, nqb)[..., :, None] & visited  # tiles touching a planted query row
    k_hit = blocks(bad_k, Nk, nkb)[..., None, :] & visited
    rows = up((k_hit | q_hit).any(-1), Nq) | bad_q
    keys = up((q_hit | k_hit).any(-2), Nk) | bad_k
    return rows, keys


def _plant(t, gen, count, values):
    """Put ``count`` values (NaN, inf, -inf) at random places of t (in place); returns the rows."""
    B, H, N, D = t.shape
    for _ in range(count):
        b, h, n, d = (int(torch.randint(0, s, (1,), generator=gen)) for s in (B, H, N, D))
        t[b, h, n, d] = values[int(torch.randint(0, len(values), (1,), generator=gen))]


def _check_rows(name, got, want, may):
    """Non-finite rows: the reference's are among the kernel's, the kernel's among ``may``;
    finite rows equal the reference."""
    bad_got, bad_want = _rows_bad(got), _rows_bad(want)
    assert not (bad_want & ~bad_got).any(), f"{name}: non-finite in the reference, finite in the kernel"
    assert not (bad_got & ~may).any(), f"{name}: non-finite rows outside the planted values' tiles"
    ok = ~bad_got & ~bad_want
    if got.dim() == 4:
        assert rel_err(got[ok], want[ok]) < 1e-4, (name, rel_err(got[ok], want[ok]))
    else:
        assert torch.allclose(got[ok].double(), want[ok], atol=1e-4), name
    return bad_got


# (spec, seed): the seed picks where the values are planted (q, k, v, k and v); by default each spec
# takes two of the four, each place two or three specs, every pair with -m slow
PLANTED = [pytest.param(name, seed, id=f"{name}-{seed}", marks=() if (n + seed) % 2 == 0 else pytest.mark.slow)
           for n, name in enumerate(SPECS) for seed in range(4)]


@pytest.mark.parametrize("name, seed", PLANTED)
def test_planted_values_forward_and_backward(name, seed):
    p, mod = pattern(name), module(name)
    gen = torch.Generator().manual_seed(100 * seed + len(name))
    B, Hq, Hkv, Nq, Nk, D = 2, 2, 1, 70, 70, 16
    q, k, v = (torch.randn(B, h, n, D, generator=gen) for h, n in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk)))
    values = [math.nan, math.inf, -math.inf]
    target = ("q", "k", "v", "kv")[seed]
    for t, label in ((q, "q"), (k, "k"), (v, "v")):
        if label in target:  # a NaN (it reaches some row whatever the pattern) and one of NaN, +-inf
            _plant(t, gen, 1, [math.nan])
            _plant(t, gen, 1, values)
    kw = dict(PARAMS.get(name, {}), **inputs_for(p, B, Hq, Nq, gen))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = mod.attention(*leaves, return_lse=True, **kw)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attncc.reference(p, *ref_in, return_lse=True, **kw)
    assert _rows_bad(ref).any(), "nothing planted reached a row"

    allowed = pair_mask(p, q_rows=Nq, k_rows=Nk, batch=B, heads=Hq, params=PARAMS.get(name),
                               inputs={n: x for n, x in kw.items() if isinstance(x, torch.Tensor)})
    bad_q = _rows_bad(q)
    bad_k = (_rows_bad(k) | _rows_bad(v)).repeat_interleave(Hq // Hkv, 1)
    rows, _ = _tile_reach(allowed, bad_q, bad_k)
    bad_o = _check_rows("o", o.detach(), ref.detach(), rows)
    _check_rows("lse", lse.detach(), ref_lse.detach(), rows)

    g = torch.randn_like(o)
    grads = torch.autograd.grad((o * g).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), ref_in)
    # backward: rows whose o (hence delta = rowsum(dO * O)) is non-finite spread to their tiles' keys
    rows_b, keys_b = _tile_reach(allowed, bad_q | bad_o, bad_k)
    keys_b = keys_b.view(B, Hkv, Hq // Hkv, Nk).any(2)
    for label, got, want, may in zip("qkv", grads, ref_grads, (rows_b, keys_b, keys_b)):
        _check_rows("d" + label, got, want.detach(), may)


def test_rows_far_from_a_nan_key_stay_exact():
    """Causal, a NaN key at position 60: rows before its key block never see it (finite and exact),
    rows from 60 on attend to it (NaN), in o, lse and every gradient."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 80, 16, generator=gen) for _ in range(3))
    k[0, 1, 60, 3] = math.nan
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = module("causal").attention(*leaves, return_lse=True)
    assert torch.isnan(o[0, 1, 60:]).all() and torch.isnan(lse[0, 1, 60:]).all()
    assert torch.isfinite(o[0, 0]).all() and torch.isfinite(o[0, 1, :48]).all()  # head 0 and key blocks < 3
    ref = attncc.reference(pattern("causal"), q.double(), k.double(), v.double())
    assert rel_err(o[0, 1, :48].detach(), ref[0, 1, :48]) < 1e-5
    dq, dk, dv = torch.autograd.grad(o.sum(), leaves)
    assert torch.isnan(dq[0, 1, 60:]).all() and torch.isfinite(dq[0, 1, :48]).all()
    # every key has a NaN row attending to it (row 79 sees them all); head 0 is untouched
    assert torch.isnan(dk[0, 1]).any(-1).all() and torch.isnan(dv[0, 1]).any(-1).all()
    assert torch.isfinite(dq[0, 0]).all() and torch.isfinite(dk[0, 0]).all() and torch.isfinite(dv[0, 0]).all()
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref_dq = torch.autograd.grad(attncc.reference(pattern("causal"), *ref_in).sum(), ref_in)[0]
    assert rel_err(dq[0, 1, :48], ref_dq[0, 1, :48]) < 1e-4 and rel_err(dq[0, 0], ref_dq[0, 0]) < 1e-4


# ---------------------------------------------------------------------------------------
# the reference
# ---------------------------------------------------------------------------------------

def test_reference_never_turns_nan_into_zeros():
    p = pattern("causal")
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 6, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    k[0, 0, 3, 0] = math.nan
    o, lse = attncc.reference(p, q, k, v, return_lse=True)
    assert torch.isnan(o[0, 0, 3:]).all() and torch.isnan(lse[0, 0, 3:]).all()  # rows that see key 3
    clean = attncc.reference(p, q[:, :, :3], k[:, :, :3], v[:, :, :3])
    assert torch.equal(o[0, 0, :3], clean[0, 0])  # rows that do not: exact
    v2 = v.clone()
    v2[0, 0, 5, 1] = math.nan  # only the last row sees it
    o2 = attncc.reference(p, q, k.nan_to_num(), v2)
    assert torch.isnan(o2[0, 0, 5]).all() == False and torch.isnan(o2[0, 0, 5, 1])  # noqa: E712
    assert torch.isfinite(o2[0, 0, :5]).all()
    q2, k2 = q.clone(), k.nan_to_num()
    q2[0, 0, 2, 2] = math.inf
    k2[0, 0, :3, 2] = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)  # scores +inf, -inf, +inf
    o3, lse3 = attncc.reference(p, q2, k2, v, return_lse=True)
    assert torch.isnan(o3[0, 0, 2]).all() and lse3[0, 0, 2] == math.inf
    k2[0, 0, :3, 2] = -1.0  # every score -inf: the row has no key left (as a mask would)
    o4, lse4 = attncc.reference(p, q2, k2, v, return_lse=True)
    assert (o4[0, 0, 2] == 0).all() and lse4[0, 0, 2] == -math.inf


def test_reference_rows_without_keys_stay_zero_with_nan_inputs():
    p = pattern("padding")
    q, k, v = (torch.randn(2, 1, 5, 4, dtype=torch.float64) for _ in range(3))
    q[0, 0, 1, 0] = math.nan
    o, lse = attncc.reference(p, q, k, v, return_lse=True, kv_len=torch.tensor([0, 5]))
    assert (o[0] == 0).all() and (lse[0] == -math.inf).all()
    assert torch.isfinite(o[1]).all()


# ---------------------------------------------------------------------------------------
# scales
# ---------------------------------------------------------------------------------------

BAD_SCALES = [math.nan, math.inf, -math.inf, 0.0, -0.5, 1e-50, 1e40, 10**400]


@pytest.mark.parametrize("scale", BAD_SCALES, ids=lambda x: str(x)[:8])
def test_unusable_scales_are_refused(scale):
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="scale"):
        module("causal").attention(q, q, q, scale=scale)
    with pytest.raises(ValueError, match="scale"):
        decode_module("causal").decode(q[:, :, :1], q, q, kv_len=[8], scale=scale)
    if isinstance(scale, float) and not (math.isfinite(scale) and scale > 0):
        with pytest.raises(ValueError, match="scale"):
            attncc.reference(pattern("causal"), q, q, q, scale=scale)


@pytest.mark.parametrize("scale", [True, "0.5", None])
def test_scale_type(scale):
    q = torch.randn(1, 2, 8, 16)
    if scale is None:
        module("causal").attention(q, q, q, scale=scale)
        return
    with pytest.raises(TypeError, match="scale must be a positive number"):
        module("causal").attention(q, q, q, scale=scale)


@pytest.mark.parametrize("scale", [1e-30, 1e30, 3])
def test_extreme_but_usable_scales(scale):
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen) * 1e-3 for _ in range(3))
    o = module("causal").attention(q, k, v, scale=scale)
    ref = attncc.reference(pattern("causal"), q.double(), k.double(), v.double(), scale=scale)
    assert torch.isfinite(o).all() and rel_err(o, ref) < 1e-4
