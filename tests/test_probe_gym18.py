"""Probe 18 (FlexAttention test mods and the attention-gym catalogue, ported as a user would):
each pattern is an attncc spec checked against a dense float64 oracle written here from the Flex
semantics (``scores = q k^T * scale``, ``score_mod``, ``mask_mod`` -> -inf, softmax; rows without
a key give o = 0, lse = -inf), never from ``attncc.reference``: forward, LSE and the gradients of
q, k, v and of learned tables, at odd sizes, Nq != Nk, GQA, K/V batch broadcast, Dv != D.

Found by this probe (each failed before its fix):
- the gradient of a ``min`` / ``max`` of 3+ arguments tested each argument against the result
  with a sympy ``Eq`` that a Piecewise made canonical: ``Eq(s - 1, m)`` became ``Eq(s, m + 1)``,
  which float32 makes false where ``s - 1`` is the max, so those pairs lost their gradient
  (``max(score - 1, 2 * score - 1, -100)``: dq off by 87 %, dk by 46 %);
- a ``max`` / ``min`` of two masked branches (``max(where(c1, s, -inf), where(c2, 2 * s, -inf))``,
  the union of two masked score mods) did not build: its kink, ``Heaviside(a - b)``, folded
  ``-inf - (-inf)`` into a NaN comparison (``TypeError: Invalid NaN comparison``).
"""
from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import attncc
from cases import flex_softmax

NEG = float("-inf")
TOL = {torch.float32: (2e-5, 2e-4), torch.float16: (1e-2, 3e-2), torch.bfloat16: (3e-2, 8e-2)}


def _w(c, s):
    return torch.where(c, s, torch.full_like(s, NEG))


def flex_dense(q, k, v, score_mod=None, mask_mod=None, scale=None):
    """(o, lse) in float64 with FlexAttention's semantics; k, v of batch 1 broadcast, GQA by
    repeating k/v heads; ``score_mod(s, b, h, i, j)`` / ``mask_mod(b, h, i, j)`` on int64 grids."""
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    g = Hq // k.shape[1]
    kd = k.double().repeat_interleave(g, 1).expand(B, Hq, Nk, -1)
    vd = v.double().repeat_interleave(g, 1).expand(B, Hq, Nk, -1)
    s = (q.double() @ kd.transpose(-1, -2)) * (1 / math.sqrt(D) if scale is None else scale)
    b, h = torch.arange(B).view(B, 1, 1, 1), torch.arange(Hq).view(1, Hq, 1, 1)
    i, j = torch.arange(Nq).view(1, 1, Nq, 1), torch.arange(Nk).view(1, 1, 1, Nk)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # an int grid times a Python float: float64
    try:
        if score_mod is not None:
            s = score_mod(s, b, h, i, j)
    finally:
        torch.set_default_dtype(old)
    s = s.expand(B, Hq, Nq, Nk)
    if mask_mod is not None:
        s = _w(mask_mod(b, h, i, j).expand(B, Hq, Nq, Nk), s)
    return flex_softmax(s, vd)


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(spec, score_mod=None, mask_mod=None, *, B=2, Bkv=None, Hq=4, Hkv=2, Nq=37, Nk=53, D=16, Dv=None,
          dtype=torch.float32, inputs=None, learned=(), scale=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(dtype)
    k = torch.randn(Bkv or B, Hkv, Nk, D, generator=gen).to(dtype)
    v = torch.randn(Bkv or B, Hkv, Nk, Dv or D, generator=gen).to(dtype)
    go = torch.randn(B, Hq, Nq, Dv or D, generator=gen)
    gl = torch.randn(B, Hq, Nq, generator=gen)
    inputs = inputs or {}
    m = attncc.compile({"head_dim": D, "dtypes": ["float32"], **spec})
    kw = {} if scale is None else {"scale": scale}

    def run(fn, dt):
        leaves = [t.detach().clone().to(dt).requires_grad_() for t in (q, k, v)]
        ins = {n: (t.detach().clone().to(dt if t.is_floating_point() else t.dtype).requires_grad_(n in learned)
                   if t.is_floating_point() else t) for n, t in inputs.items()}
        o, lse = fn(leaves, ins)
        loss = (o * go.to(o.dtype)).sum() + (torch.where(torch.isfinite(lse), lse, 0) * gl.to(lse.dtype)).sum()
        wrt = leaves + [ins[n] for n in learned]
        return o, lse, torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)

    o, lse, got = run(lambda t, ins: m.attention(*t, return_lse=True, **kw, **ins), torch.float32)
    o_r, lse_r, want = run(lambda t, ins: flex_dense(
        *t, (lambda s, b, h, i, j: score_mod(s, b, h, i, j, ins)) if score_mod else None,
        (lambda b, h, i, j: mask_mod(b, h, i, j, ins)) if mask_mod else None, scale), torch.float64)
    tol, grad_tol = TOL[dtype]
    finite = torch.isfinite(lse_r)
    assert torch.equal(torch.isfinite(lse), finite), "rows without keys differ"
    assert _rel(o, o_r) < tol, f"o {_rel(o, o_r):.1e}"
    assert _rel(lse[finite], lse_r[finite]) < tol, "lse"
    for name, a, r in zip(["dq", "dk", "dv"] + list(learned), got, want):
        assert _rel(a, r) < grad_tol, f"{name} {_rel(a, r):.1e}"


# --- found by this probe ----------------------------------------------------------------------

@pytest.mark.parametrize("mod, fn", [
    ("max(score - 1, 2 * score - 1, -100)",
     lambda s, b, h, i, j, E: torch.maximum(torch.maximum(s - 1, 2 * s - 1), torch.full_like(s, -100.0))),
    ("min(1 - score, 0.5 - 2 * score, 100)",
     lambda s, b, h, i, j, E: torch.minimum(torch.minimum(1 - s, 0.5 - 2 * s), torch.full_like(s, 100.0))),
])
def test_min_max_of_three_ties_as_computed(mod, fn):
    """Each argument is tested against the result as the kernel computes both (no rearranged
    ``s == m + 1``): every pair where ``s - 1`` is the max passes its gradient."""
    check({"score": {"mod": mod}}, fn, B=1, Hq=2, Hkv=1, Nq=29, Nk=29, D=4, scale=1.0)


@pytest.mark.parametrize("mod, fn, table", [
    ("max(where(q_idx >= kv_idx, score, -inf), where(kv_idx % 5 == 0, score * 2, -inf))",
     lambda s, b, h, i, j, E: torch.maximum(_w(i >= j, s), _w(j % 5 == 0, s * 2)), False),
    ("min(where(q_idx >= kv_idx, -score, inf), where(kv_idx % 5 == 0, score * 0.5, inf)) * -1",
     lambda s, b, h, i, j, E: -torch.minimum(torch.where(i >= j, -s, math.inf), torch.where(j % 5 == 0, s * 0.5, math.inf)),
     False),
    ("max(where(q_idx >= kv_idx, score, -inf), where(kv_idx % 5 == 0, score * t[h], -inf)) * 0.5",
     lambda s, b, h, i, j, E: 0.5 * torch.maximum(_w(i >= j, s), _w(j % 5 == 0, s * E["t"][h])), True),
])
def test_union_of_two_masked_scores_builds_and_trains(mod, fn, table):
    """``torch.maximum`` of two masked score mods (an or_masks of scores): pairs in neither are
    removed, in one take its score, in both the larger one's."""
    spec = {"score": {"mod": mod}}
    kw = {}
    if table:
        spec["inputs"] = {"t": {"dims": ["h"], "dtype": "float32", "grad": True}}
        kw = dict(inputs={"t": torch.tensor([0.7, -1.3])}, learned=("t",))
    check(spec, fn, B=1, Hq=2, Hkv=1, Nq=40, Nk=33, **kw)


# --- ports found clean, in combinations the catalogue does not run ----------------------------

def test_gym_sink_mask_gqa_kv_broadcast_narrow_values():
    """attention-gym's sink mask, (sliding window or sink) and causal; K/V batch 1, GQA, Dv < D."""
    check({"params": {"window_size": 9, "sink_size": 3},
           "mask": {"where": "((kv_idx < sink_size) | (q_idx - kv_idx <= window_size)) & (q_idx >= kv_idx)"}},
          None, lambda b, h, i, j, E: ((j < 3) | (i - j <= 9)) & (i >= j), Bkv=1, Dv=8, Nq=61, Nk=47)


def test_gym_dilated_bidirectional_fp16():
    check({"params": {"window_size": 20, "dilation": 4},
           "mask": {"where": "(abs(q_idx - kv_idx) <= window_size) & (abs(q_idx - kv_idx) % dilation == 0)"}},
          None, lambda b, h, i, j, E: ((i - j).abs() <= 20) & ((i - j).abs() % 4 == 0), dtype=torch.float16,
          Nq=70, Nk=65)


def test_flex_new_empty_mask_mod():
    """Flex's test_new_empty_mask_mod: a bool [B, 1, S, S] tensor read as the mask and added to
    the score (``h.new_zeros`` indexes its head dim 0)."""
    S = 45
    gen = torch.Generator().manual_seed(3)
    am = (torch.rand(2, 1, S, S, generator=gen) > 0.4) | torch.eye(S, dtype=torch.bool)
    check({"inputs": {"attn_mask": {"dims": ["b", 1, "n", "n"], "dtype": "bool"}},
           "mask": {"where": "attn_mask[b, 0, q_idx, kv_idx]"},
           "score": {"mod": "score + attn_mask[b, 0, q_idx, kv_idx]"}},
          lambda s, b, h, i, j, E: s + E["attn_mask"][b, 0, i, j].double(),
          lambda b, h, i, j, E: E["attn_mask"][b, 0, i, j], inputs={"attn_mask": am}, Nq=S, Nk=S, Hq=2, Hkv=1)


def test_flex_view_buffer_learned_head_offset_kv_broadcast():
    """Flex's test_load_from_view_buffer (``rel_h[b, h, q_idx, kv_idx // W]``) learned, times a
    learned per-head scale (test_head_offset), K/V batch 1, bfloat16."""
    gen = torch.Generator().manual_seed(4)
    check({"params": {"W": 5},
           "inputs": {"rel_h": {"dims": ["b", "h", "n", 11], "dtype": "float32", "grad": True},
                      "head_offset": {"dims": ["h"], "dtype": "float32", "grad": True}},
           "score": {"mod": "score * head_offset[h] + rel_h[b, h, q_idx, kv_idx // W]"}},
          lambda s, b, h, i, j, E: s * E["head_offset"][h] + E["rel_h"][b, h, i, j // 5],
          inputs={"rel_h": torch.randn(2, 4, 53, 11, generator=gen), "head_offset": torch.rand(4, generator=gen)},
          learned=("rel_h", "head_offset"), Bkv=1, dtype=torch.bfloat16)
