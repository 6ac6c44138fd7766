"""Probe 20: packed variable-length batches (cu_seqlens) and decode with a KV cache, as a
FlashAttention ``flash_attn_varlen_func`` / ``flash_attn_with_kvcache`` or FlexAttention
document-mask user calls them, against attncc.reference and a plain float64 oracle written here
from the documented semantics (softmax over the allowed keys; a row without keys: o = 0,
lse = -inf).

Probed:
- packed calls (seeded random, 17 specs: causal, cross_causal, windows, sinks, chunks, block
  diagonal, longformer, prefix LM, dilated, strided, ALiBi, softcap, RoPE, GQA, MQA, dense):
  cu_seqlens_q != cu_seqlens_k, sequences of length 0 and 1 first, last and consecutive, rows past
  cu_seqlens_q[-1] and keys past cu_seqlens_k[-1], int32 / int64 cu_seqlens, max_seqlen omitted,
  exact or larger, GQA groups 1, 2, 3, 8, Dv != D; o, LSE and the gradients of q, k, v from a loss
  on o and on the LSE; positions restart per sequence (windows, ALiBi, RoPE, chunks);
- learned tables indexed by position under packing (``rb[b, i]``, a row term whose gradient comes
  from the LSE only; ``cb[b, j]``; ``pos[h, i - j]``; ``rel[h, j - i + 32]`` with bottom-right
  causal alignment and a bias of ``n_k - n_q``): o, LSE and every gradient;
- dropout under packing: sequence s draws the mask of row s of the padded batch
  (dropout_keep_mask), forward and gradients against the reference with that mask;
- decode (seeded random, the same 17 specs): kv_len 0, 1, the full cache, shorter than Nq; Nq 1 to
  16; GQA groups 1, 3, 5, 6, 8 (programs cut inside a group); contiguous and paged caches (page
  sizes 16, 17, 24, 32, block tables int32 / int64 in a random page order); forced split counts
  1, 2, 3, 7; the cache past kv_len (and spare pages) filled with NaN, +inf, -inf or 1e30;
  windows and sinks; return_lse; each row against the oracle and against attention() on the same
  keys with q_offset = kv_len - Nq.
Counts: 290 random packed calls and 267 random decode calls of the shipped specs, 100 packed calls
with a poisoned sequence, 80 packed calls (with gradients) and 80 decode calls of random specs
(tests/test_probe_more.py's check_varlen / check_decode, seeds 7000-7079), RoPE gptj with a partial
rotary_dim under packing, int params past 2**31 under packing: all clean but for the defect below.

Found and fixed:
- A divisor made of n_q, n_k (``j % (n_k - 3)``, ``i // (n_q - 3)``) was checked in a packed call
  only at max_seqlen, not at each sequence's own lengths: a packed batch with a sequence of
  length 3 ran the kernels with a zero divisor and returned numbers for that sequence (o and the
  LSE wrong, silently), where attention() on the sequence alone refuses it with a ValueError.
  Packed calls now check the divisors over the lengths 1..max_seqlen, and where one may be 0
  there, at each sequence's own (n_q, n_k) when the cu_seqlens are read on the host (CPU, or
  max_seqlen omitted; CUDA cu_seqlens with both max_seqlen are refused with the range's error,
  as decode does for kv_len on the GPU, the error saying to omit max_seqlen_*).
- (test harness) tests/test_probe_more.py's check_varlen caught only ValueError for the documented
  refusal of masks that read [inputs], which is a NotImplementedError: its command-line runs
  (``python tests/test_probe_more.py varlen_bw START COUNT``) stopped at the first such spec.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import attncc
from attncc.spec import parse_spec
from cases import module, pattern

DIVISOR_SPECS = {
    "probe20_mod_nk": '[mask]\nwhere = "j <= i and j % (n_k - 3) == 0"\n',
    "probe20_div_nk": '[mask]\nwhere = "j <= i"\n[score]\nbias = "(j // (n_k - 3)) * 0.5"\n',
    "probe20_div_nq": '[mask]\nwhere = "j <= i"\n[score]\nbias = "(i // (n_q - 3)) * 0.5 + j * 0.1"\n',
}


def _compiled(name, body, monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    text = f'name = "{name}"\n' + body
    return parse_spec(text), attncc.compile(text)


def _cu(lens, dtype=torch.int32):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=dtype)


@pytest.mark.parametrize("name", sorted(DIVISOR_SPECS))
def test_packed_divisors_of_each_sequences_lengths(name, monkeypatch, tmp_path):
    """A sequence of 3 rows makes n_q - 3 / n_k - 3 zero: refused as attention() on it alone is
    (it ran with the zero divisor and returned wrong rows); lengths where no divisor is 0 run and
    equal the reference, sequence by sequence."""
    p, mod = _compiled(name, DIVISOR_SPECS[name], monkeypatch, tmp_path)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 17, 16, generator=gen) for _ in range(3))
    with pytest.raises(ValueError, match="division by zero"):
        mod.attention(q[:, :, :3], k[:, :, :3], v[:, :, :3])
    for kw in ({}, dict(max_seqlen_q=10, max_seqlen_k=10)):
        with pytest.raises(ValueError, match=r"division by zero.*(n_k|n_q) = 3"):
            mod.attention(q[:, :, :13], k[:, :, :13], v[:, :, :13], cu_seqlens_q=_cu([10, 3]),
                          cu_seqlens_k=_cu([10, 3]), **kw)
    lens = [10, 0, 5, 2]  # a sequence without rows computes nothing: its lengths need no divisor
    o, lse = mod.attention(q, k, v, cu_seqlens_q=_cu(lens), cu_seqlens_k=_cu(lens), return_lse=True)
    c = _cu(lens).tolist()
    for s, n in enumerate(lens):
        if n:
            r, r_lse = attncc.reference(p, *(t[:, :, c[s]:c[s + 1]].double() for t in (q, k, v)), return_lse=True)
            assert float((o[:, :, c[s]:c[s + 1]].double() - r).abs().max()) < 1e-5, s
            assert float((lse[:, :, c[s]:c[s + 1]].double() - r_lse).abs().max()) < 1e-5, s


# ---------------------------------------------------------------------------------------------
# the float64 oracle, from docs/spec-language.md §1, §3.4, [rope] and §5 / §6 (decode)
# ---------------------------------------------------------------------------------------------

PARAMS = {"sliding_window": {"window": 5}, "sink_window": {"sinks": 2, "window": 4}, "chunked_local": {"chunk": 6},
          "block_diagonal": {"chunk": 7}, "longformer": {"g": 3, "w": 4}, "prefix_lm": {"prefix": 5},
          "local_bidirectional": {"w": 3}, "dilated": {"window": 12, "dilation": 3}, "strided": {"stride": 4}}
NAMES = ["causal", "cross_causal", "sliding_window", "sink_window", "chunked_local", "block_diagonal", "longformer",
         "prefix_lm", "local_bidirectional", "dilated", "strided", "alibi", "softcap", "rope_causal", "dense", "mqa",
         "gqa"]


def _alibi_slopes(H):
    P = 1 << (H.bit_length() - 1)
    return [2 ** (-8 * (h + 1) / P) if h < P else 2 ** (-4 * (2 * (h - P) + 1) / P) for h in range(H)]


def _rope(x, pos, theta=10000.0):  # neox, the whole head dim
    half = x.shape[-1] // 2
    angle = pos.double()[:, None] * theta ** (-2 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    c, s = torch.cos(angle), torch.sin(angle)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _allowed(name, i, j, nq, nk, P):
    if name == "dense":
        return torch.ones_like(i + j, dtype=torch.bool)
    if name in ("causal", "gqa", "mqa", "alibi", "softcap", "rope_causal"):
        return j <= i
    return {"cross_causal": lambda: j - nk <= i - nq,
            "sliding_window": lambda: (j <= i) & (i - j < P.get("window", 0)),
            "sink_window": lambda: (j < P.get("sinks", 0)) | ((j <= i) & (i - j < P.get("window", 0))),
            "chunked_local": lambda: (j <= i) & (i // P.get("chunk", 1) == j // P.get("chunk", 1)),
            "block_diagonal": lambda: i // P.get("chunk", 1) == j // P.get("chunk", 1),
            "longformer": lambda: (i < P.get("g", 0)) | (j < P.get("g", 0)) | ((i - j).abs() <= P.get("w", 0)),
            "prefix_lm": lambda: (j < P.get("prefix", 0)) | (j <= i),
            "local_bidirectional": lambda: (i - j).abs() <= P.get("w", 0),
            "dilated": lambda: (j <= i) & (i - j < P.get("window", 0)) & ((i - j) % P.get("dilation", 1) == 0),
            "strided": lambda: (j <= i) & (((i - j) < P.get("stride", 1)) | (j % P.get("stride", 1) == P.get("stride", 1) - 1)),
            }[name]()


def oracle(name, q, k, v, q_pos, k_pos, nq, nk):
    """q [Hq, Nq, D], k [Hkv, Nk, D], v [Hkv, Nk, Dv] at positions q_pos, k_pos: (o, lse) in float64,
    differentiable; a row without an allowed key gives o = 0, lse = -inf."""
    P = PARAMS.get(name, {})
    Hq, Nq, D = q.shape
    q, k, v = q.double(), k.double(), v.double()
    if name == "rope_causal":
        q, k = _rope(q, q_pos), _rope(k, k_pos)
    group = Hq // k.shape[0]
    kk, vv = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    s = q @ kk.transpose(-1, -2) / math.sqrt(D)
    i, j = q_pos[:, None], k_pos[None, :]
    if name == "alibi":
        s = s + torch.tensor(_alibi_slopes(Hq), dtype=torch.float64)[:, None, None] * (j - i).double()
    if name == "softcap":
        s = 30.0 * torch.tanh(s / 30.0)
    allowed = _allowed(name, i, j, nq, nk, P).expand(Hq, Nq, k.shape[1])
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.where(allowed, torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None]), 0)
    return p @ vv, lse


def _max_err(x, ref) -> float:
    return float((x.detach().double() - ref.detach()).abs().max()) if ref.numel() else 0.0


# ---------------------------------------------------------------------------------------------
# packed batches: seeded random calls (290 seeds probed clean; a few kept)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 5, 13, 20, 41, 57])
def test_random_packed_calls_against_the_oracle(seed):
    """cu_seqlens_q != cu_seqlens_k, lengths 0 and 1 anywhere, rows and keys past the last
    sequence, int32 / int64, max_seqlen omitted or larger, GQA up to 1:8, Dv != D; o, LSE and
    the gradients of q, k, v from o and the LSE, each sequence at positions from 0."""
    rnd = random.Random(seed)
    name = NAMES[seed % len(NAMES)]
    p, mod = pattern(name), module(name)
    S = rnd.choice([1, 2, 3, 5])
    lq = [rnd.choice([0, 1, 2, rnd.randint(0, 40)]) for _ in range(S)]
    lk = list(lq) if rnd.random() < 0.4 else [rnd.choice([0, 1, rnd.randint(0, 40)]) for _ in range(S)]
    Hkv = p.heads_kv or rnd.choice([1, 2])
    Hq = p.heads_q or Hkv * rnd.choice([1, 2, 3, 8])
    Dv = 16 if name == "rope_causal" else rnd.choice([16, 8])
    tq, tk = sum(lq) + rnd.choice([0, 0, 3]), sum(lk) + rnd.choice([0, 0, 2])
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, Hq, tq, 16, generator=gen), torch.randn(1, Hkv, tk, 16, generator=gen)
    v, go = torch.randn(1, Hkv, tk, Dv, generator=gen), torch.randn(1, Hq, tq, Dv, generator=gen)
    gl = torch.randn(1, Hq, tq, generator=gen)
    dtype = rnd.choice([torch.int32, torch.int64])
    cq, ck = _cu(lq).tolist(), _cu(lk).tolist()
    kw = dict(PARAMS.get(name, {}))
    if rnd.random() < 0.5:
        kw.update(max_seqlen_q=max(lq) + rnd.choice([0, 3]), max_seqlen_k=max(lk) + rnd.choice([0, 100]))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = mod.attention(*leaves, cu_seqlens_q=_cu(lq, dtype), cu_seqlens_k=_cu(lk, dtype), return_lse=True, **kw)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ro = torch.zeros(1, Hq, tq, Dv, dtype=torch.float64)
    rl = torch.full((1, Hq, tq), -math.inf, dtype=torch.float64)
    for s in range(S):
        if lq[s]:
            o_s, l_s = oracle(name, ref_leaves[0][0, :, cq[s]:cq[s + 1]], ref_leaves[1][0, :, ck[s]:ck[s + 1]],
                              ref_leaves[2][0, :, ck[s]:ck[s + 1]], torch.arange(lq[s]), torch.arange(lk[s]), lq[s], lk[s])
            rows = torch.arange(cq[s], cq[s + 1])
            ro, rl = ro.index_copy(2, rows, o_s[None]), rl.index_copy(2, rows, l_s[None])
    desc = (name, lq, lk, Hq, Hkv, Dv, kw)
    assert _max_err(o, ro) < 1e-4, desc
    assert torch.equal(torch.isfinite(lse), torch.isfinite(rl)), desc
    fin = torch.isfinite(rl)
    assert _max_err(lse[fin], rl[fin]) < 1e-4, desc

    def loss(o, lse, cast):
        return (o * cast(go)).sum() + torch.where(torch.isfinite(lse), lse * cast(gl), 0).sum()

    def grads(value, wrt):
        if not value.requires_grad:
            return [torch.zeros_like(t) for t in wrt]
        return torch.autograd.grad(value, wrt, allow_unused=True, materialize_grads=True)

    got = grads(loss(o, lse, lambda t: t), leaves)
    want = grads(loss(ro, rl, torch.Tensor.double), ref_leaves)
    for label, x, r in zip("qkv", got, want):
        assert torch.isfinite(x).all() and _max_err(x, r) < 1e-3 * max(1.0, float(r.abs().max()) if r.numel() else 0), (label, desc)


@pytest.mark.parametrize("seed", [3, 8, 26])
def test_non_finite_values_stay_in_their_sequence(seed):
    """NaN / inf in every q, k, v row of one packed sequence and past the last one: the other
    sequences' o and gradients are exact (no tile shares an allowed pair across sequences). 100
    seeds probed clean."""
    rnd = random.Random(seed)
    name = NAMES[seed % len(NAMES)]
    p, mod = pattern(name), module(name)
    S = rnd.choice([2, 3, 4])
    lq = [rnd.choice([1, 2, rnd.randint(1, 40)]) for _ in range(S)]
    lk = list(lq) if rnd.random() < 0.5 else [rnd.choice([1, rnd.randint(1, 40)]) for _ in range(S)]
    Hkv = p.heads_kv or 1
    Hq = p.heads_q or Hkv * 2
    cq, ck = _cu(lq).tolist(), _cu(lk).tolist()
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, Hq, cq[-1] + 3, 16, generator=gen)
    k, v = (torch.randn(1, Hkv, ck[-1] + 3, 16, generator=gen) for _ in range(2))
    poison, value = rnd.randrange(S), rnd.choice([math.nan, math.inf])
    for t, c in ((q, cq), (k, ck), (v, ck)):
        t[:, :, c[poison]:c[poison + 1]] = value
        t[:, :, c[-1]:] = value
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = mod.attention(*leaves, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), **PARAMS.get(name, {}))
    go = torch.randn(o.shape, generator=gen)
    go[:, :, cq[poison]:cq[poison + 1]] = 0
    go[:, :, cq[-1]:] = 0
    gq, gk, gv = torch.autograd.grad((o * go).sum(), leaves)
    for s in range(S):
        if s == poison:
            continue
        sq, sk = slice(cq[s], cq[s + 1]), slice(ck[s], ck[s + 1])
        ins = [t[0, :, sl].double().requires_grad_() for t, sl in ((q, sq), (k, sk), (v, sk))]
        r, _ = oracle(name, *ins, torch.arange(lq[s]), torch.arange(lk[s]), lq[s], lk[s])
        rg = torch.autograd.grad((r * go[0, :, sq].double()).sum(), ins)
        assert _max_err(o[0, :, sq], r) < 1e-4, (name, s, lq, lk)
        for x, ref in zip((gq[0, :, sq], gk[0, :, sk], gv[0, :, sk]), rg):
            assert _max_err(x, ref) < 1e-3, (name, s, lq, lk)


# ---------------------------------------------------------------------------------------------
# decode: seeded random calls (267 seeds probed clean; a few kept)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2, 11, 16, 30, 47, 62])
def test_random_decode_calls_against_the_oracle(seed, monkeypatch):
    """kv_len of 0, 1, the capacity or below Nq; Nq up to 16; GQA groups 1 to 8 (a group cut over
    programs); contiguous or paged caches (pages of 16, 17, 24, 32 in a random order, int32 or int64
    tables); forced splits; the cache past kv_len and the spare pages NaN, inf, -inf or 1e30. Each
    row against the oracle at positions kv_len - Nq + t, and against attention() on the same keys."""
    rnd = random.Random(seed)
    name = NAMES[seed % len(NAMES)]
    p, mod = pattern(name), module(name)
    B, Nq = rnd.choice([1, 2, 3]), rnd.choice([1, 2, 3, 5, 11, 16])
    Hkv = p.heads_kv or rnd.choice([1, 2])
    Hq = p.heads_q or Hkv * rnd.choice([1, 3, 5, 6, 8])
    Dv = 16 if name == "rope_causal" else rnd.choice([16, 8])
    page = rnd.choice([0, 0, 16, 17, 24, 32])
    cap = rnd.randint(1, 80)
    if page:
        cap = -(-cap // page) * page
    lens = [rnd.choice([0, 1, cap, rnd.randint(0, min(Nq, cap)), rnd.randint(0, cap)]) for _ in range(B)]
    splits = rnd.choice([None, "1", "2", "3", "7"])
    if splits:
        monkeypatch.setenv("ATTNCC_DECODE_SPLITS", splits)
    else:
        monkeypatch.delenv("ATTNCC_DECODE_SPLITS", raising=False)
    garbage = rnd.choice([math.nan, math.inf, -math.inf, 1e30])
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, 16, generator=gen)
    k, v = torch.randn(B, Hkv, cap, 16, generator=gen), torch.randn(B, Hkv, cap, Dv, generator=gen)
    kc = _rope(k.double(), torch.arange(cap)).float() if name == "rope_causal" else k.clone()  # the cache holds rotated keys
    vc = v.clone()
    for b, n in enumerate(lens):
        kc[b, :, n:] = garbage
        vc[b, :, n:] = garbage
    kw = dict(PARAMS.get(name, {}))
    if page:
        per = cap // page
        n_pages = B * per + 2
        order = torch.randperm(n_pages, generator=gen)
        table = torch.zeros(B, per, dtype=rnd.choice([torch.int32, torch.int64]))
        kp, vp = torch.full((n_pages, page, Hkv, 16), garbage), torch.full((n_pages, page, Hkv, Dv), garbage)
        for b in range(B):
            for x in range(per):
                table[b, x] = int(order[b * per + x])
                kp[table[b, x]] = kc[b, :, x * page:(x + 1) * page].transpose(0, 1)
                vp[table[b, x]] = vc[b, :, x * page:(x + 1) * page].transpose(0, 1)
        o, lse = mod.decode(q, kp, vp, kv_len=torch.tensor(lens, dtype=torch.int32), block_table=table,
                            return_lse=True, **kw)
    else:
        o, lse = mod.decode(q, kc, vc, kv_len=lens, return_lse=True, **kw)
    desc = (name, B, Nq, Hq, Hkv, Dv, page, cap, lens, splits, garbage)
    for b, n in enumerate(lens):
        q_pos = torch.arange(n - Nq, n)
        r, rl = oracle(name, q[b], k[b, :, :n], v[b, :, :n], q_pos, torch.arange(n), n, n)
        r[:, q_pos < 0], rl[:, q_pos < 0] = 0, -math.inf  # rows at negative positions see no key
        assert _max_err(o[b], r) < 1e-4, (b, desc)
        fin = torch.isfinite(rl)
        assert torch.equal(torch.isfinite(lse[b]), fin) and _max_err(lse[b][fin], rl[fin]) < 1e-4, (b, desc)
        if n >= Nq:
            full = mod.attention(q[b:b + 1], k[b:b + 1, :, :n] if name == "rope_causal" else kc[b:b + 1, :, :n],
                                 vc[b:b + 1, :, :n], q_offset=n - Nq, **kw)
            assert _max_err(full[0], o[b].double()) < 1e-4, (b, desc)


# ---------------------------------------------------------------------------------------------
# learned tables indexed by position, and dropout, in packed batches
# ---------------------------------------------------------------------------------------------

TABLE_SPECS = {
    "probe20_tables": ('[inputs]\nrb = { dims = ["b", "n"], dtype = "float32", grad = true }\n'
                       'cb = { dims = ["b", "n"], dtype = "float32", grad = true }\n'
                       'pos = { dims = ["h", "n"], dtype = "float32", grad = true }\n[mask]\nwhere = "causal"\n'
                       '[score]\nbias = "rb[b, i] * 2.0 + cb[b, j] + pos[h, i - j]"\n'),
    "probe20_cross_table": ('[inputs]\nrel = { dims = ["h", 64], dtype = "float32", grad = true }\n'
                            '[mask]\nwhere = "j - n_k <= i - n_q"\n[score]\nbias = "rel[h, j - i + 32] + 0.1 * (n_k - n_q)"\n'),
}


@pytest.mark.parametrize("name", sorted(TABLE_SPECS))
@pytest.mark.parametrize("seed", [0, 5])
def test_packed_learned_tables(name, seed, monkeypatch, tmp_path):
    """Tables read at each sequence's own positions (a row term rb[b, i], whose gradient comes from
    the LSE only; cb[b, j]; pos[h, i - j]; rel[h, j - i + 32] with the bottom-right alignment and a
    bias of n_k - n_q): o, LSE and every gradient against one reference call per sequence."""
    p, mod = _compiled(name, TABLE_SPECS[name], monkeypatch, tmp_path)
    rnd = random.Random(seed)
    S = rnd.choice([3, 4])
    lq = [rnd.choice([0, 1, rnd.randint(0, 20)]) for _ in range(S)]
    lk = lq if name == "probe20_tables" else [rnd.choice([0, 1, rnd.randint(0, 20)]) for _ in range(S)]
    cq, ck = _cu(lq).tolist(), _cu(lk).tolist()
    gen = torch.Generator().manual_seed(seed)
    H, tq, tk = 2, cq[-1] + 2, ck[-1] + 1
    q = torch.randn(1, H, tq, 16, generator=gen)
    k, v = torch.randn(1, 1, tk, 16, generator=gen), torch.randn(1, 1, tk, 16, generator=gen)
    longest = max(max(lq), max(lk), 1)
    if name == "probe20_tables":
        tables = dict(rb=torch.randn(S, longest, generator=gen), cb=torch.randn(S, longest, generator=gen),
                      pos=torch.randn(H, longest, generator=gen))
    else:
        tables = dict(rel=torch.randn(H, 64, generator=gen))
    go, gl = torch.randn(1, H, tq, 16, generator=gen), torch.randn(1, H, tq, generator=gen)
    leaves = [t.clone().requires_grad_() for t in [q, k, v, *tables.values()]]
    o, lse = mod.attention(*leaves[:3], cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), return_lse=True,
                           **dict(zip(tables, leaves[3:])))

    def loss(o, lse, cast):
        return (o * cast(go)).sum() + torch.where(torch.isfinite(lse), lse * cast(gl), 0).sum()

    got = torch.autograd.grad(loss(o, lse, lambda t: t), leaves, allow_unused=True, materialize_grads=True)
    ref_leaves = [t.double().requires_grad_() for t in [q, k, v, *tables.values()]]
    ro = torch.zeros(1, H, tq, 16, dtype=torch.float64)
    rl = torch.full((1, H, tq), -math.inf, dtype=torch.float64)
    for s in range(S):
        if lq[s]:
            kw = dict(zip(tables, ref_leaves[3:]))
            if name == "probe20_tables":
                kw.update(rb=kw["rb"][s:s + 1], cb=kw["cb"][s:s + 1])
            r, r_lse = attncc.reference(p, ref_leaves[0][:, :, cq[s]:cq[s + 1]], ref_leaves[1][:, :, ck[s]:ck[s + 1]],
                                        ref_leaves[2][:, :, ck[s]:ck[s + 1]], return_lse=True, **kw)
            rows = torch.arange(cq[s], cq[s + 1])
            ro, rl = ro.index_copy(2, rows, r), rl.index_copy(2, rows, r_lse)
    value = loss(ro, rl, torch.Tensor.double)
    want = (torch.autograd.grad(value, ref_leaves, allow_unused=True, materialize_grads=True) if value.requires_grad
            else [torch.zeros_like(t) for t in ref_leaves])
    assert _max_err(o, ro) < 1e-5 and torch.equal(torch.isfinite(lse), torch.isfinite(rl))
    for label, x, r in zip(["q", "k", "v", *tables], got, want):
        assert _max_err(x, r) < 1e-4, (label, lq, lk)


def test_packed_dropout_draws_the_padded_batchs_mask():
    """Sequence s of a packed dropout call keeps the pairs of row s of the padded batch
    (dropout_keep_mask of it): forward and gradients equal the reference with that mask."""
    mod, p = module("causal_dropout"), pattern("causal_dropout")
    lq, lk = [5, 0, 9, 1], [5, 3, 12, 1]
    cq, ck = _cu(lq).tolist(), _cu(lk).tolist()
    gen = torch.Generator().manual_seed(0)
    H, S = 2, 4
    q = torch.randn(1, H, cq[-1], 16, generator=gen)
    k, v = torch.randn(1, 1, ck[-1], 16, generator=gen), torch.randn(1, 1, ck[-1], 16, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = mod.attention(*leaves, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), seed=7, dropout_p=0.3)
    go = torch.randn(o.shape, generator=gen)
    gq, gk, gv = torch.autograd.grad((o * go).sum(), leaves)
    padded = [torch.zeros(S, h, n, 16) for h, n in ((H, max(lq)), (1, max(lk)), (1, max(lk)))]
    for s in range(S):
        padded[0][s, :, :lq[s]] = q[0, :, cq[s]:cq[s + 1]]
        padded[1][s, :, :lk[s]] = k[0, :, ck[s]:ck[s + 1]]
        padded[2][s, :, :lk[s]] = v[0, :, ck[s]:ck[s + 1]]
    keep = mod.dropout_keep_mask(*padded, seed=7, dropout_p=0.3)
    for s in range(S):
        if not lq[s]:
            continue
        sq, sk = slice(cq[s], cq[s + 1]), slice(ck[s], ck[s + 1])
        ins = [t[:, :, sl].double().requires_grad_() for t, sl in ((q, sq), (k, sk), (v, sk))]
        r = attncc.reference(p, *ins, keep_mask=keep[s:s + 1, :, :lq[s], :lk[s]], dropout_p=0.3)
        rg = torch.autograd.grad((r * go[:, :, sq].double()).sum(), ins)
        assert _max_err(o[:, :, sq], r) < 1e-5
        for x, ref in zip((gq[:, :, sq], gk[:, :, sk], gv[:, :, sk]), rg):
            assert _max_err(x, ref) < 1e-5, s


def test_packed_divisors_unread_lengths_are_refused_with_the_way_out(monkeypatch, tmp_path):
    """Where the host does not read the cu_seqlens (CUDA, both max_seqlen given) a divisor that may
    be 0 at some length up to max_seqlen is refused, saying how to have each sequence checked; one
    that is never 0 there passes."""
    from attncc.runtime.call import check_packed_divisors

    _, mod = _compiled("probe20_mod_nk", DIVISOR_SPECS["probe20_mod_nk"], monkeypatch, tmp_path)
    cu = _cu([10, 5])
    kw = dict(positions=10, batch=2, heads=2, max_q=10, max_k=10, params={}, lengths_read=False)
    with pytest.raises(ValueError, match=r"may be 0 with n_k = 1\.\.10.*omit max_seqlen_\*"):
        check_packed_divisors(mod.SPEC, "probe20_mod_nk.attention", cu, cu, **kw)
    check_packed_divisors(mod.SPEC, "probe20_mod_nk.attention", cu, cu, **dict(kw, max_q=2, max_k=2))
    with pytest.raises(ValueError, match=r"division by zero: .* is 0 with") as caught:  # a param of 0: nothing to omit
        pv = _compiled("probe20_param_div", '[params]\nw = 2\n[mask]\nwhere = "j <= i and j % (n_k * w) == 1"\n',
                       monkeypatch, tmp_path)[1]
        check_packed_divisors(pv.SPEC, "probe20_param_div.attention", cu, cu, **dict(kw, params={"w": 0}))
    assert "omit" not in str(caught.value)
