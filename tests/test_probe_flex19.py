"""Probe 19 (a second port of FlexAttention's own tests and the attention-gym catalogue): what
tests/test_probe_flex16.py, tests/test_probe_gym18.py and tests/catalogue.py had not ported, each
written as an attncc spec (in-process ``attncc.compile``) and checked three ways at small odd
sizes: against a dense float64 oracle written here from the Flex semantics (``s = q k^T * scale``,
``score_mod``, ``mask_mod`` -> ``-inf``, softmax; a row without an allowed key gives ``o = 0`` and
``lse = -inf``, as FlexAttention returns), against ``attncc.reference``, and the kernels; forward,
LSE and the gradients of q, k, v and of learned tables, from a loss on ``o`` and on the LSE.

Ported here:
- FlexAttention's TestLearnableBiases: ``bias[abs(q - kv)]``, ``bias[kv]`` (global tokens),
  ``bias[offset[q]]`` (indirect, a row term: its gradient comes from the LSE only),
  ``bias[q] + bias[kv]`` of one tensor (Flex refuses its backward; attncc must add both uses),
  ``score * sigmoid(gate[h])``, two distinct biases, a clamped local-window table, ``bias[h]``
  (test_head_bias_req_grad), ``bias[b, h, which, q]`` learned, ``bias[q][kv]`` learned, and a
  table trained with q, k, v frozen (test_relative_1d_bias_only_grad);
- test_lse_masked_output: a sliding-window-causal and a "global causal" (q - kv > W) call merged
  through their LSEs equal causal attention, gradients included (rows of the second call with no
  key have lse = -inf);
- test_fully_masked_out_rows_0_check: ``o.sum() + lse.sum()`` (= -inf) still gives zero, finite
  gradients on the masked rows;
- _test_block_mask_reuse_with_weird_mask (``kv < A | kv >= B``), test_doc_mask_clamped_repro
  (``doc[clamp(q)] == doc[clamp(kv)]`` past the end of the ids), test_block_mask_attributes'
  ``q + offset[b] * 128 >= kv`` with integer offsets, test_kv_batch_broadcast(_causal_mask) and
  test_non_equal_head_dims for the builtin score mods (K/V batch 1, GQA 4:1 and 4:2, Dv != D);
- masks that read the query head under GQA (K/V shared by heads with different masks) and the
  batch row under a K/V batch broadcast;
- attention-gym: generate_doc_mask_mod with inner masks other than causal on the logical
  positions (sliding window, prefix LM, noop), per batch row; the Flamingo vision cross-attention
  mask (``intervals[image_boundaries[kv]]``); tanh softcap around ALiBi with a causal mask;
- a seeded random composition of and_masks / or_masks / ~ over atoms (causal, windows, prefix,
  documents, per-batch lengths, head and batch conditions, key strides, chunks, bit tests,
  bottom-right) with random score mods (learned tables, softcap, ALiBi, score conditions),
  mask atoms sometimes written as a ``where(c, score, -inf)`` score mod instead, at random
  shapes (Nq != Nk, offsets, GQA, K/V batch 1, Dv != D).

Found (fixed): a Flex mod pasted as written (``torch.where(...)``, ``torch.exp2(...)``,
``(q_idx - kv_idx).abs()``, ``q_idx.clamp(lo, hi)``, ``torch.logical_and(a, b)``) was refused with
"only the language's functions can be called" and no word of what to write; the error now names
the language's spelling (``write min(max(x, lo), hi) for q_idx.clamp(...)``).

Probed clean: every case below, 200 seeds of the random composition in float32 and 30 in float16
(the test keeps 6), ``decode`` (contiguous and paged) of the learned-bias, head/batch-dependent,
softcap-ALiBi and document ports. Semantics that differ from eager torch on purpose (documented in
docs/spec-language.md §3.5 / §1, kept as tests here): a learned factor of a masked branch,
``where(c, score, -inf) * t[h]``, gets a finite gradient (a pair without weight passes none), where
torch's dense autograd gives NaN (0 * inf); a negative ``t[h]`` makes the masked scores +inf and
the row NaN (the kernels' LSE NaN, attncc.reference's +inf, as documented). Gaps (no wrong
answer): no local names (``interval = intervals[image_idx]``: write the chain
``intervals[image_boundaries[kv_idx], 0]``), no ``tanh.approx`` (the exact tanh is used), casts
(``.to(torch.float32)``) are dropped, Python's wrap-around of negative indices reads 0 instead.
"""
from __future__ import annotations

import math
import os
import random
import re

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import attncc
from attncc.module_cache import toml_text
from cases import flex_operands, flex_softmax

NEG = float("-inf")


class Env:
    """Broadcast int64 grids b [B,1,1,1], h [1,H,1,1], i [1,1,Nq,1], j [1,1,1,Nk] (global
    positions), n_q, n_k, and the params and inputs (floats as float64) as attributes."""


def flex_oracle(q, k, v, *, scale, score=None, mask=None, env=None, q_offset=0, k_offset=0, n_q=None, n_k=None,
                b_first=0):
    """(o, lse) in float64 with FlexAttention's semantics; k, v of batch 1 broadcast, GQA by
    repeating k/v heads; a row whose every score is -inf gives o = 0, lse = -inf."""
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    g = Hq // k.shape[1]
    kd = k.double().repeat_interleave(g, 1).expand(B, Hq, Nk, -1)
    vd = v.double().repeat_interleave(g, 1).expand(B, Hq, Nk, -1)
    E = Env()
    E.b = (b_first + torch.arange(B)).view(B, 1, 1, 1)
    E.h = torch.arange(Hq).view(1, Hq, 1, 1)
    E.i = (q_offset + torch.arange(Nq)).view(1, 1, Nq, 1)
    E.j = (k_offset + torch.arange(Nk)).view(1, 1, 1, Nk)
    E.n_q = q_offset + Nq if n_q is None else n_q
    E.n_k = k_offset + Nk if n_k is None else n_k
    E.H = Hq
    for key, val in (env or {}).items():
        setattr(E, key, val.double() if torch.is_tensor(val) and val.is_floating_point() else
                val.long() if torch.is_tensor(val) and val.dtype not in (torch.bool,) else val)
    s = (q.double() @ kd.transpose(-1, -2)) * scale
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        if score is not None:
            s = score(E, s)
        s = s.expand(B, Hq, Nq, Nk)
        if mask is not None:
            s = torch.where(mask(E).expand(B, Hq, Nq, Nk), s, torch.full_like(s, NEG))
    finally:
        torch.set_default_dtype(old)
    return flex_softmax(s, vd)


def _w(c, s):
    return torch.where(c, s, torch.full_like(s, NEG))


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(b).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


_COUNTER = [0]


def check(spec, score=None, mask=None, *, inputs=None, learned=(), params=None, B=2, Bkv=None, Hq=4, Hkv=2,
          Nq=29, Nk=37, D=8, Dv=None, q_offset=0, k_offset=0, n_q=None, n_k=None, grad_qkv=True, seed=0,
          tol=1e-4, grad_tol=5e-4, dtype=torch.float32):
    """Kernel vs the Flex oracle vs attncc.reference: o, lse, and the gradients of the loss
    <o, go> + <lse, gl> (finite rows) in q, k, v and the ``learned`` inputs. Returns the errors."""
    Dv = Dv or D
    q, k, v, go, gl = flex_operands(seed, B, Bkv or B, Hq, Hkv, Nq, Nk, D, Dv)
    q, k, v = (t.to(dtype).float() for t in (q, k, v))  # the oracle sees the rounded inputs
    inputs = inputs or {}
    params = params or {}
    _COUNTER[0] += 1
    full = {"head_dim": D, "dtypes": ["float32"], **spec}
    m = attncc.compile(full)
    pattern = attncc.parse_spec(toml_text(full))
    scale = spec.get("score", {}).get("scale", 1 / math.sqrt(D))
    pos = dict(q_offset=q_offset, k_offset=k_offset, n_q=n_q, n_k=n_k)

    def leaves(dt):
        qkv = [t.detach().clone().to(dt).requires_grad_(grad_qkv) for t in (q, k, v)]
        ins = {}
        for name, t in inputs.items():
            if t.is_floating_point():
                t = t.detach().clone().to(torch.float64 if dt == torch.float64 else torch.float32)
                t.requires_grad_(name in learned)
            ins[name] = t
        return qkv, ins

    def grads(o, lse, qkv, ins):
        fin = torch.isfinite(lse)
        loss = (o * go.to(o.dtype)).sum() + (torch.where(fin, lse, torch.zeros_like(lse)) * gl.to(lse.dtype)).sum()
        wrt = (qkv if grad_qkv else []) + [ins[n] for n in learned]
        return torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)

    qkv, ins = leaves(dtype)
    o, lse = m.attention(*qkv, return_lse=True, **pos, **params, **ins)
    got = grads(o, lse, qkv, ins)
    qkv, ins = leaves(torch.float64)
    ro, rl = flex_oracle(*qkv, scale=scale, score=score, mask=mask, env={**ins, **params}, **pos)
    want = grads(ro, rl, qkv, ins)
    qkv, ins = leaves(torch.float64)
    ao, al = attncc.reference(pattern, *qkv, return_lse=True, **{k_: v_ for k_, v_ in pos.items() if v_ is not None},
                              **params, **ins)
    ref = grads(ao, al, qkv, ins)
    names = (["dq", "dk", "dv"] if grad_qkv else []) + ["d" + n for n in learned]
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), fin), "rows without keys: kernel differs from the Flex oracle"
    assert torch.equal(torch.isfinite(al), fin), "rows without keys: attncc.reference differs from the Flex oracle"
    empty = torch.isneginf(rl)
    assert (o[empty] == 0).all() and torch.isneginf(lse[empty]).all(), "a row without keys is not o = 0, lse = -inf"
    assert torch.isnan(o[~fin & ~empty]).all(), "a row with a +inf or NaN score has a finite o"
    err = {"o": _rel(o[fin], ro[fin]), "ref_o": _rel(ao[fin], ro[fin])}
    if fin.any():
        err["lse"] = _rel(lse[fin], rl[fin])
        err["ref_lse"] = _rel(al[fin], rl[fin])
    for n, a, r, w in zip(names, got, ref, want):
        err[n] = _rel(a, w)
        err["ref_" + n] = _rel(r, w)
    bad = {n: e for n, e in err.items()
           if e > (tol if n in ("o", "lse") else 1e-9 if n.startswith("ref_") else grad_tol)}
    assert not bad, f"{bad} (all: {err})"
    return err


def check_decode(spec, score=None, mask=None, *, inputs=None, params=None, kv_len=(0, 5, 23, 40), Hq=4, Hkv=2,
                 Nq=3, Nmax=40, D=8, page_size=None, seed=0):
    """``decode`` against the Flex oracle on each batch row's prefix: row b's new queries are
    positions kv_len[b] - Nq ..., n_q = n_k = kv_len[b]; rows without keys o = 0, lse = -inf."""
    gen = torch.Generator().manual_seed(seed)
    B = len(kv_len)
    q = torch.randn(B, Hq, Nq, D, generator=gen)
    k = torch.randn(B, Hkv, Nmax, D, generator=gen)
    v = torch.randn(B, Hkv, Nmax, D, generator=gen)
    inputs, params = inputs or {}, params or {}
    m = attncc.compile({"head_dim": D, "dtypes": ["float32"], **spec})
    scale = spec.get("score", {}).get("scale", 1 / math.sqrt(D))
    lens = torch.tensor(kv_len, dtype=torch.int32)
    kw = {}
    kc, vc = k, v
    if page_size:
        pages = Nmax // page_size
        perm = torch.randperm(B * pages, generator=gen)
        table = perm.view(B, pages).to(torch.int32)
        kc = torch.empty(B * pages, page_size, Hkv, D)
        vc = torch.empty(B * pages, page_size, Hkv, D)
        for b in range(B):
            for p in range(pages):
                kc[table[b, p]] = k[b, :, p * page_size:(p + 1) * page_size].transpose(0, 1)
                vc[table[b, p]] = v[b, :, p * page_size:(p + 1) * page_size].transpose(0, 1)
        kw["block_table"] = table
    o, lse = m.decode(q, kc, vc, kv_len=lens, return_lse=True, **kw, **params, **inputs)
    for b, n in enumerate(kv_len):
        ro, rl = flex_oracle(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], scale=scale, score=score, mask=mask,
                             env={**inputs, **params}, q_offset=n - Nq, n_q=n, n_k=n, b_first=b)
        fin = torch.isfinite(rl)
        assert torch.equal(torch.isfinite(lse[b:b + 1]), fin), (b, lse[b], rl)
        assert (o[b:b + 1][~fin] == 0).all()
        if fin.any():
            assert _rel(o[b:b + 1][fin], ro[fin]) < 1e-4 and _rel(lse[b:b + 1][fin], rl[fin]) < 1e-4, b


def _inp(**decl):
    return {n: dict(zip(("dims", "dtype", "grad"), d)) for n, d in decl.items()}


def _docs(n, gen, B=None, max_len=9):
    rows = []
    for _ in range(B or 1):
        ids, d = [], 0
        while len(ids) < n:
            ids += [d] * int(torch.randint(1, max_len, (1,), generator=gen))
            d += 1
        rows.append(ids[:n])
    t = torch.tensor(rows, dtype=torch.int32)
    return t if B else t[0]


def _offsets(ids, K):
    """Start offset of each document id of ``ids`` ([n] or [B, n]), padded to K entries."""
    if ids.dim() == 2:
        return torch.stack([_offsets(r, K) for r in ids])
    counts = torch.bincount(ids.long())
    offs = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return torch.nn.functional.pad(offs, (0, K - len(offs))).to(torch.int32)


# --- FlexAttention's TestLearnableBiases ----------------------------------------------------

G = torch.Generator().manual_seed(19)
LEARNED = [
    ("relative_1d", {"inputs": _inp(bias=([80], "float32", True)), "score": {"mod": "score + bias[abs(q_idx - kv_idx)]"}},
     lambda E, s: s + E.bias[(E.i - E.j).abs()], {"bias": torch.randn(80, generator=G)}, ("bias",), {}),
    ("global_tokens", {"inputs": _inp(bias=(["n"], "float32", True)), "score": {"mod": "score + bias[kv_idx]"}},
     lambda E, s: s + E.bias[E.j], {"bias": torch.randn(45, generator=G)}, ("bias",), {}),
    ("indirect", {"inputs": _inp(bias=([40], "float32", True), offset=(["n"], "int32")),
                  "score": {"mod": "score + bias[offset[q_idx]]"}},
     lambda E, s: s + E.bias[E.offset[E.i]],
     {"bias": torch.randn(40, generator=G), "offset": torch.randint(0, 40, (45,), generator=G, dtype=torch.int32)},
     ("bias",), {}),
    ("symmetric", {"inputs": _inp(bias=(["n"], "float32", True)), "score": {"mod": "score + bias[q_idx] + bias[kv_idx]"}},
     lambda E, s: s + E.bias[E.i] + E.bias[E.j], {"bias": torch.randn(45, generator=G)}, ("bias",), {}),
    ("head_gate", {"inputs": _inp(gate=(["h"], "float32", True)), "score": {"mod": "score * sigmoid(gate[h])"}},
     lambda E, s: s * torch.sigmoid(E.gate[E.h]), {"gate": torch.randn(4, generator=G)}, ("gate",), {}),
    ("distinct", {"inputs": _inp(bias1=(["n"], "float32", True), bias2=(["n"], "float32", True)),
                  "score": {"mod": "score + bias1[q_idx] + bias2[kv_idx]"}},
     lambda E, s: s + E.bias1[E.i] + E.bias2[E.j],
     {"bias1": torch.randn(45, generator=G), "bias2": torch.randn(45, generator=G)}, ("bias1", "bias2"), {}),
    ("local_window", {"params": {"W": 5}, "inputs": _inp(bias=([11], "float32", True)),
                      "score": {"mod": "score + bias[min(max(q_idx - kv_idx + W, 0), 2 * W)]"}},
     lambda E, s: s + E.bias[(E.i - E.j + 5).clamp(0, 10)], {"bias": torch.randn(11, generator=G)}, ("bias",), {}),
    ("head_bias", {"inputs": _inp(bias=(["h"], "float32", True)), "score": {"mod": "score + bias[h]"}},
     lambda E, s: s + E.bias[E.h], {"bias": torch.randn(4, generator=G)}, ("bias",), {}),
    ("weird", {"inputs": _inp(bias=(["b", "h", 4, "n"], "float32", True), which=([], "int64")),
               "score": {"mod": "score + bias[b, h, which, q_idx]"}},
     lambda E, s: s + E.bias[E.b, E.h, E.which, E.i],
     {"bias": torch.randn(2, 4, 4, 45, generator=G), "which": torch.tensor(3)}, ("bias",), {}),
    ("index_multiple_2d", {"inputs": _inp(bias=(["n", "n"], "float32", True)), "score": {"mod": "score + bias[q_idx][kv_idx]"}},
     lambda E, s: s + E.bias[E.i, E.j], {"bias": torch.randn(45, 45, generator=G)}, ("bias",), {}),
]


@pytest.mark.parametrize("case", LEARNED, ids=lambda c: c[0])
def test_learnable_bias(case):
    name, spec, score, inputs, learned, params = case
    check(spec, score, inputs=inputs, learned=learned, params=params, q_offset=3, k_offset=1)


def test_learnable_bias_only_grad():
    """test_relative_1d_bias_only_grad: q, k, v frozen, only the table learns."""
    name, spec, score, inputs, learned, params = LEARNED[0]
    check(spec, score, inputs=inputs, learned=learned, grad_qkv=False, B=1, Hq=2, Hkv=1)


# --- FlexAttention's TestFlexAttention ------------------------------------------------------

def test_lse_masked_output_merge_equals_causal():
    """test_lse_masked_output: a sliding window (q - kv <= W) and its complement under causal
    (q - kv > W, no key on the first W + 1 rows: lse -inf) merged by their LSEs as the Flex test
    does equal causal attention; gradients through both calls and both LSEs."""
    W = 6
    local = attncc.compile({"head_dim": 8, "params": {"W": W}, "mask": {"where": "(q_idx >= kv_idx) & (q_idx - kv_idx <= W)"}})
    glob = attncc.compile({"head_dim": 8, "params": {"W": W}, "mask": {"where": "(q_idx >= kv_idx) & (q_idx - kv_idx > W)"}})
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 41, 8, generator=gen).requires_grad_() for _ in range(3))
    go = torch.randn(2, 2, 41, 8, generator=gen)
    xl, ll = local.attention(q, k, v, return_lse=True)
    xg, lg = glob.attention(q, k, v, return_lse=True)
    assert torch.isneginf(lg[:, :, : W + 1]).all() and (xg[:, :, : W + 1] == 0).all()
    top = torch.maximum(ll, lg)
    wl, wg = torch.exp(ll - top), torch.exp(lg - top)
    x = (xl * wl[..., None] + xg * wg[..., None]) / (wl + wg)[..., None]
    gq, gk, gv = torch.autograd.grad((x * go).sum(), (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, _ = flex_oracle(qd, kd, vd, scale=1 / math.sqrt(8), mask=lambda E: E.i >= E.j)
    want = torch.autograd.grad((ro * go.double()).sum(), (qd, kd, vd))
    assert _rel(x, ro) < 1e-5
    for a, w in zip((gq, gk, gv), want):
        assert _rel(a, w) < 1e-4


def test_fully_masked_rows_lse_sum_backward():
    """test_fully_masked_out_rows_0_check: with mask q < M the rows from M on are o = 0,
    lse = -inf, and ``(o.sum() + lse.sum()).backward()`` (a loss of -inf) leaves their dq at 0
    and every gradient finite."""
    M = 17
    m = attncc.compile({"head_dim": 8, "params": {"M": M}, "mask": {"where": "q_idx < M"}})
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 33, 8, generator=gen).requires_grad_() for _ in range(3))
    o, lse = m.attention(q, k, v, return_lse=True)
    assert (o[:, :, M:] == 0).all() and torch.isneginf(lse[:, :, M:]).all()
    (o.sum() + lse.sum()).backward()
    assert (q.grad[:, :, M:] == 0).all()
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = flex_oracle(qd, kd, vd, scale=1 / math.sqrt(8), mask=lambda E: E.i < M)
    (ro.sum() + torch.where(torch.isfinite(rl), rl, 0).sum()).backward()
    for a, w in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert _rel(a, w) < 1e-4


FLEX_MASKS = [
    # _test_block_mask_reuse_with_weird_mask, Nq != Nk
    ("weird_key_mask", {"params": {"A": 9, "Bnd": 30}, "mask": {"where": "(kv_idx < A) | (kv_idx >= Bnd)"}},
     None, lambda E: (E.j < 9) | (E.j >= 30), {}, dict(Nq=23, Nk=41)),
    # test_doc_mask_clamped_repro: ids shorter than the sequence, read at clamped positions
    ("doc_clamped", {"params": {"L": 40}, "inputs": _inp(doc_ids=([40], "int32")),
                     "mask": {"where": "doc_ids[min(max(q_idx, 0), L - 1)] == doc_ids[min(max(kv_idx, 0), L - 1)]"}},
     None, lambda E: E.doc_ids[E.i.clamp(0, 39)] == E.doc_ids[E.j.clamp(0, 39)],
     {"doc_ids": _docs(40, torch.Generator().manual_seed(3))}, dict(Nq=47, Nk=53)),
    # test_block_mask_attributes / test_block_mask_viz: (q + offset[b] * 128) >= kv, integer offsets
    ("batch_offset_causal", {"inputs": _inp(offset=(["b"], "int64")), "mask": {"where": "(q_idx + (offset[b] * 8)) >= kv_idx"}},
     None, lambda E: (E.i + E.offset[E.b] * 8) >= E.j, {"offset": torch.tensor([0, 2, 5])}, dict(B=3, Bkv=1, Nq=31, Nk=50)),
    # a mask that reads the query head, K/V shared by heads with different masks (GQA 6:2)
    ("head_dependent_gqa", {"mask": {"where": "kv_idx <= q_idx + h - 2"}}, None, lambda E: E.j <= E.i + E.h - 2, {},
     dict(Hq=6, Hkv=2, Nq=27, Nk=27)),
    # a mask that reads the batch row, K/V of batch 1 (broadcast): row b = 2 sees no key before q >= 8
    ("batch_dependent_kv_broadcast", {"mask": {"where": "kv_idx <= q_idx - 4 * b"}}, None, lambda E: E.j <= E.i - 4 * E.b, {},
     dict(B=3, Bkv=1, Nq=25, Nk=30)),
]


@pytest.mark.parametrize("case", FLEX_MASKS, ids=lambda c: c[0])
def test_flex_mask_port(case):
    name, spec, score, mask, inputs, shape = case
    check(spec, score, mask, inputs=inputs, **shape)


def _alibi8(E, s):
    return s + (E.j - E.i) * torch.exp2(-((E.h + 1) * 8.0 / 8))


BUILTIN_MODS = [  # test_score_mods, with the causal block mask, K/V batch 1, GQA, Dv != D
    ("times_two", "score * 2", lambda E, s: s * 2),
    ("squared", "score * score", lambda E, s: s * s),
    ("inverse_causal", "where(q_idx <= kv_idx, score, -inf)", lambda E, s: _w(E.i <= E.j, s)),
    ("rel_causal", "where(q_idx >= kv_idx, score + (q_idx - kv_idx), -inf)", lambda E, s: _w(E.i >= E.j, s + (E.i - E.j))),
    ("alibi8", "score + (kv_idx - q_idx) * exp2(-((h + 1) * 8.0 / 8))", _alibi8),
]


@pytest.mark.parametrize("case", BUILTIN_MODS, ids=lambda c: c[0])
def test_kv_batch_broadcast_causal_builtin_mods(case):
    """test_kv_batch_broadcast_causal_mask x test_non_equal_head_dims: Bq 3, Bkv 1, Hq 4 on Hkv 1
    (the alibi mod on 2), Q shorter than K/V (test_builtin_score_mods_different_seqlen)."""
    name, mod, fn = case
    check({"mask": {"where": "q_idx >= kv_idx"}, "score": {"mod": mod}}, fn, lambda E: E.i >= E.j,
          B=3, Bkv=1, Hq=4, Hkv=2 if name == "alibi8" else 1, Nq=19, Nk=38, D=8, Dv=4 if name != "squared" else 12)


# --- attention-gym --------------------------------------------------------------------------

def _doc_inputs(B, n, K, seed):
    ids = _docs(n, torch.Generator().manual_seed(seed), B=B, max_len=11)
    return {"doc": ids, "offs": _offsets(ids, K)}


DOC_WHERE = "doc[b, q_idx] == doc[b, kv_idx] and "
QL, KL = "(q_idx - offs[b, doc[b, q_idx]])", "(kv_idx - offs[b, doc[b, kv_idx]])"


def _ql(E):
    return E.i - E.offs[E.b, E.doc[E.b, E.i]]


def _kl(E):
    return E.j - E.offs[E.b, E.doc[E.b, E.j]]


def _same(E):
    return E.doc[E.b, E.i] == E.doc[E.b, E.j]


GYM = [
    # generate_doc_mask_mod(sliding window) on the logical positions of each document
    ("doc_sliding_window", {"params": {"W": 3}, "inputs": _inp(doc=(["b", "n"], "int32"), offs=(["b", 32], "int32")),
                            "mask": {"where": DOC_WHERE + f"{QL} >= {KL} and {QL} - {KL} <= W"}},
     None, lambda E: _same(E) & (_ql(E) >= _kl(E)) & (_ql(E) - _kl(E) <= 3), _doc_inputs(2, 45, 32, 4), {}),
    # generate_doc_mask_mod(prefix LM of 2 tokens)
    ("doc_prefix_lm", {"params": {"P": 2}, "inputs": _inp(doc=(["b", "n"], "int32"), offs=(["b", 32], "int32")),
                       "mask": {"where": DOC_WHERE + f"({KL} < P or {QL} >= {KL})"}},
     None, lambda E: _same(E) & ((_kl(E) < 2) | (_ql(E) >= _kl(E))), _doc_inputs(2, 45, 32, 5), {}),
    # generate_doc_mask_mod(noop_mask): bidirectional within each document
    ("doc_noop", {"inputs": _inp(doc=(["b", "n"], "int32")), "mask": {"where": "doc[b, q_idx] == doc[b, kv_idx]"}},
     None, _same, {"doc": _docs(45, torch.Generator().manual_seed(6), B=2)}, {}),
    # Flamingo vision cross attention: text rows see the images whose interval covers them
    ("flamingo_intervals", {"inputs": _inp(intervals=([4, 2], "int32"), image_boundaries=(["n"], "int32")),
                            "mask": {"where": "(q_idx >= intervals[image_boundaries[kv_idx], 0]) & "
                                              "(q_idx < intervals[image_boundaries[kv_idx], 1])"}},
     None, lambda E: (E.i >= E.intervals[E.image_boundaries[E.j], 0]) & (E.i < E.intervals[E.image_boundaries[E.j], 1]),
     {"intervals": torch.tensor([[0, 7], [1, 7], [7, 12], [15, 20]], dtype=torch.int32),
      "image_boundaries": torch.arange(24, dtype=torch.int32) // 6}, dict(Nq=23, Nk=24)),
    # tanh softcap around ALiBi, causal, GQA, Nq != Nk with an offset
    ("softcap_alibi_causal", {"params": {"cap": 2.5, "H": 4}, "mask": {"where": "q_idx >= kv_idx"},
                              "score": {"mod": "cap * tanh((score + (kv_idx - q_idx) * exp2(-((h + 1) * 8.0 / H))) / cap)",
                                        "scale": 1.3}},
     lambda E, s: 2.5 * torch.tanh((s + (E.j - E.i) * torch.exp2(-((E.h + 1) * 8.0 / 4))) / 2.5),
     lambda E: E.i >= E.j, {}, dict(q_offset=9)),
]


@pytest.mark.parametrize("case", GYM, ids=lambda c: c[0])
def test_gym_port(case):
    name, spec, score, mask, inputs, shape = case
    check(spec, score, mask, inputs=inputs, **shape)


def test_masked_branch_times_learned_factor():
    """``where(c, score, -inf) * t[h]``: o, lse as Flex; t's gradient from the weighted pairs only
    (torch's dense autograd gives NaN there: 0 * -inf on the masked pairs)."""
    check({"inputs": _inp(t=(["h"], "float32", True)), "score": {"mod": "where(q_idx >= kv_idx, score, -inf) * t[h]"}},
          lambda E, s: _w(E.i >= E.j, s * E.t[E.h]), inputs={"t": torch.tensor([0.5, 1.2, 0.3, 2.0])}, learned=("t",),
          q_offset=2)


@pytest.mark.parametrize("text, hint", [
    ("torch.where(q_idx >= kv_idx, score, -inf)", "write where(...) for torch.where(...)"),
    ("score + torch.exp2(-((h + 1) * 8.0 / 8))", "write exp2(...) for torch.exp2(...)"),
    ("score - (q_idx - kv_idx).abs()", "write abs(...) for (q_idx - kv_idx).abs(...)"),
    ("score + q_idx.clamp(2, 5)", "write min(max(x, lo), hi) for q_idx.clamp(...)"),
    ("where(torch.logical_and(q_idx >= kv_idx, kv_idx > 2), score, -inf)", "write a and b for torch.logical_and(...)"),
    ("score * torch.minimum(q_idx, kv_idx)", "write min(a, b) for torch.minimum(...)"),
])
def test_torch_spellings_name_the_language_spelling(text, hint):
    """A Flex score_mod pasted as written: the error says what to write instead."""
    with pytest.raises(ValueError, match=r"only the language's functions can be called.*" + re.escape(hint)):
        attncc.parse_spec(toml_text({"score": {"mod": text}}))


# --- seeded random compositions -------------------------------------------------------------

# (text, oracle, needs): mask atoms of the Flex mask_mods above; {W}, {P}... are params
ATOMS = [
    ("q_idx >= kv_idx", lambda E: E.i >= E.j, ()),
    ("q_idx - kv_idx <= W", lambda E: E.i - E.j <= E.W, ("W",)),
    ("abs(q_idx - kv_idx) <= W", lambda E: (E.i - E.j).abs() <= E.W, ("W",)),
    ("kv_idx < P", lambda E: E.j < E.P, ("P",)),
    ("q_idx < P", lambda E: E.i < E.P, ("P",)),
    ("abs(q_idx - kv_idx) % Dl == 0", lambda E: (E.i - E.j).abs() % E.Dl == 0, ("Dl",)),
    ("doc[b, q_idx] == doc[b, kv_idx]", lambda E: E.doc[E.b, E.i] == E.doc[E.b, E.j], ("doc",)),
    ("kv_idx < plen[b]", lambda E: E.j < E.plen[E.b], ("plen",)),
    ("h % 2 == 0", lambda E: E.h % 2 == 0, ()),
    ("b == 1", lambda E: E.b == 1, ()),
    ("kv_idx % 3 != 1", lambda E: E.j % 3 != 1, ()),
    ("q_idx // C == kv_idx // C", lambda E: torch.div(E.i, E.C, rounding_mode="floor") == torch.div(E.j, E.C, rounding_mode="floor"), ("C",)),
    ("(q_idx ^ kv_idx) & 4 == 0", lambda E: ((E.i ^ E.j) & 4) == 0, ()),
    ("kv_idx - n_k <= q_idx - n_q", lambda E: E.j - E.n_k <= E.i - E.n_q, ()),
    ("keep[b, kv_idx]", lambda E: E.keep[E.b, E.j], ("keep",)),
]
MODS = [
    ("score", lambda E, s: s, ()),
    ("score * 2", lambda E, s: s * 2, ()),
    ("score * score * 0.5", lambda E, s: s * s * 0.5, ()),
    ("score + (q_idx - kv_idx) * 0.1", lambda E, s: s + (E.i - E.j) * 0.1, ()),
    ("score + (kv_idx - q_idx) * exp2(-((h + 1) * 8.0 / 4))", lambda E, s: s + (E.j - E.i) * torch.exp2(-((E.h + 1) * 8.0 / 4)), ()),
    ("2.0 * tanh(score / 2.0)", lambda E, s: 2.0 * torch.tanh(s / 2.0), ()),
    ("score * sigmoid(gate[h])", lambda E, s: s * torch.sigmoid(E.gate[E.h]), ("gate",)),
    ("score + tab[kv_idx]", lambda E, s: s + E.tab[E.j], ("tab",)),
    ("score + tab[q_idx] * 3", lambda E, s: s + E.tab[E.i] * 3, ("tab",)),
    ("where(score > -0.5, score, -inf)", lambda E, s: _w(s > -0.5, s), ()),
    ("score + rel[b, h, q_idx, kv_idx]", lambda E, s: s + E.rel[E.b, E.h, E.i, E.j], ("rel",)),
]
LEARNABLE = {"gate", "tab", "rel"}


def _random_expr(rng, depth):
    if depth == 0 or rng.random() < 0.35:
        t, f, needs = ATOMS[rng.randrange(len(ATOMS))]
        if rng.random() < 0.15:
            return f"~({t})", (lambda E, f=f: ~f(E)), needs
        return f"({t})", f, needs
    a, b = _random_expr(rng, depth - 1), _random_expr(rng, depth - 1)
    if rng.random() < 0.5:
        return f"({a[0]} & {b[0]})", (lambda E, a=a, b=b: a[1](E) & b[1](E)), a[2] + b[2]
    return f"({a[0]} | {b[0]})", (lambda E, a=a, b=b: a[1](E) | b[1](E)), a[2] + b[2]


def random_case(seed):
    rng = random.Random(seed)
    text, fn, needs = _random_expr(rng, 2)
    mt, mf, mneeds = MODS[rng.randrange(len(MODS))]
    needs = set(needs) | set(mneeds)
    B = rng.choice([1, 2, 3])
    Hq, Hkv = rng.choice([(2, 1), (4, 2), (2, 2), (4, 1)])
    Nq, Nk = rng.randint(1, 40), rng.randint(1, 40)
    qo, ko = rng.choice([0, 0, rng.randint(0, 20)]), rng.choice([0, 0, rng.randint(0, 10)])
    n = max(qo + Nq, ko + Nk)
    params = {k_: v_ for k_, v_ in (("W", rng.randint(0, 12)), ("P", rng.randint(0, 25)), ("Dl", rng.randint(1, 4)),
                                   ("C", rng.randint(1, 9))) if k_ in needs}
    gen = torch.Generator().manual_seed(seed)
    inputs, decl = {}, {}
    if "doc" in needs:
        inputs["doc"], decl["doc"] = _docs(n, gen, B=B), (["b", "n"], "int32")
    if "plen" in needs:
        inputs["plen"], decl["plen"] = torch.randint(0, n + 1, (B,), generator=gen, dtype=torch.int32), (["b"], "int32")
    if "keep" in needs:
        inputs["keep"], decl["keep"] = torch.rand(B, n, generator=gen) > 0.3, (["b", "n"], "bool")
    if "gate" in needs:
        inputs["gate"], decl["gate"] = torch.randn(Hq, generator=gen), (["h"], "float32", True)
    if "tab" in needs:
        inputs["tab"], decl["tab"] = torch.randn(n, generator=gen), (["n"], "float32", True)
    if "rel" in needs:
        inputs["rel"], decl["rel"] = torch.randn(B, Hq, n, n, generator=gen), (["b", "h", "n", "n"], "float32", True)
    as_score = rng.random() < 0.3  # the mask written in the score mod, as a Flex score_mod would
    if as_score:
        spec = {"score": {"mod": f"where({text}, {mt}, -inf)"}}
        score, mask = (lambda E, s: _w(fn(E), mf(E, s))), None
    else:
        spec = {"mask": {"where": text}}
        if mt != "score":
            spec["score"] = {"mod": mt}
        score, mask = (mf if mt != "score" else None), fn
    if params:
        spec["params"] = {k_: 1 for k_ in params}  # the call passes the values
    if decl:
        spec["inputs"] = _inp(**decl)
    shape = dict(B=B, Bkv=rng.choice([None, 1]), Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, q_offset=qo, k_offset=ko,
                 D=rng.choice([8, 16]), Dv=rng.choice([None, 4]))
    return spec, score, mask, inputs, tuple(n_ for n_ in decl if n_ in LEARNABLE), params, shape


@pytest.mark.parametrize("seed", [7, 23, 51, 88, 130, 207])
def test_random_flex_composition(seed):
    spec, score, mask, inputs, learned, params, shape = random_case(seed)
    check(spec, score, mask, inputs=inputs, learned=learned, params=params, seed=seed, **shape)


if __name__ == "__main__":
    import sys
    import time
    lo, hi = (int(x) for x in sys.argv[1:3]) if len(sys.argv) > 2 else (0, 50)
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(sys.argv[3] if len(sys.argv) > 3 else "", torch.float32)
    tols = {torch.float32: {}, torch.float16: dict(tol=5e-3, grad_tol=2e-2), torch.bfloat16: dict(tol=3e-2, grad_tol=8e-2)}
    for s in range(lo, hi):
        spec, score, mask, inputs, learned, params, shape = random_case(s)
        t = time.time()
        try:
            err = check(spec, score, mask, inputs=inputs, learned=learned, params=params, seed=s, dtype=dt, **tols[dt], **shape)
            print("ok  ", s, f"{time.time() - t:.1f}s", flush=True)
        except Exception as exc:  # noqa: BLE001
            print("FAIL", s, spec, params, shape, type(exc).__name__, str(exc)[:400], flush=True)
