"""Probe 18: the call API's forward and backward as FlashAttention / FlexAttention / Hugging Face
users call it (packed batches, GQA, views, partial requires_grad, LSE gradients, dropout,
torch.compile, the transformers integration), against attncc.reference; the defects found, each
with its regression test."""
from __future__ import annotations

import pytest
import torch

from cases import module, rel_err


def _packed(lens, Hq=2, Hkv=2, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    total = int(cu[-1])
    return [torch.randn(1, h, total, D, generator=gen) for h in (Hq, Hkv, Hkv)] + [cu]


@pytest.mark.parametrize("bad", ["max_seqlen", "past_the_end", "decreasing", "not_from_0"])
def test_cpu_cu_seqlens_are_checked_under_torch_compile(bad):
    """bind checks the values of CPU cu_seqlens in eager calls but cannot while torch.compile traces
    (a data-dependent guard); nothing checked them in the custom op either. Traced, a max_seqlen_q
    of 16 for a sequence of 40 gave rows 16..39 o = 0 (18% relative error, silently), and
    cu_seqlens ending at 70 of 58 packed rows wrote past o: "malloc(): invalid size", the process
    aborted. The custom op now makes the eager call's check as it runs."""
    causal = module("causal")
    q, k, v, cu = _packed([5, 40, 13])
    want = causal.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)
    fn = torch.compile(lambda q, k, v, cu, m: causal.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                                 max_seqlen_q=m, max_seqlen_k=m),
                       fullgraph=True, backend="eager")
    assert rel_err(fn(q, k, v, cu, 40), want) < 1e-6
    cases = {"max_seqlen": (cu, 16, "max_seqlen_q = 16 is less than the longest sequence"),
             "past_the_end": (torch.tensor([0, 5, 45, 70], dtype=torch.int32), 40, "ends at 70, past the 58 packed rows"),
             "decreasing": (torch.tensor([0, 5, 3, 58], dtype=torch.int32), 55, "non-decreasing"),
             "not_from_0": (torch.tensor([2, 5, 45, 58], dtype=torch.int32), 40, "must start at 0")}
    bad_cu, m, message = cases[bad]
    with pytest.raises(ValueError, match=message):
        fn(q, k, v, bad_cu, m)


# ---------------------------------------------------------------------------------------------
# Seeded random calls that the probe ran clean (hundreds of cases; a few per test here)
# ---------------------------------------------------------------------------------------------

import random  # noqa: E402

import attncc  # noqa: E402
from cases import SMALL_PARAMS, pattern  # noqa: E402

TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
GRAD_TOL = {torch.float32: 2e-3, torch.float16: 3e-2, torch.bfloat16: 1.5e-1}


def _view(x: torch.Tensor, how: str) -> torch.Tensor:
    """``x`` (a leaf) as the operand a model hands over: itself, BNHD-transposed, every other element
    of a wider buffer, at a storage offset; gradients reach ``x`` through the view."""
    if how == "bnhd":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "step":
        return torch.stack([x, torch.zeros_like(x)], -1).flatten(-2)[..., ::2]
    if how == "offset":
        return torch.cat([x.new_zeros(5), x.reshape(-1)])[5:].view(x.shape)
    return x


def _compare(got, want, dtype, what):
    """Kernel results (o, lse, gradients) against the float64 reference's."""
    (o, lse, grads), (ro, rl, rgrads) = got, want
    if ro.abs().sum() > 0:
        assert rel_err(o, ro) < TOL[dtype], (what, "o", rel_err(o, ro))
    else:
        assert not o.abs().max() if o.numel() else True
    finite = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), finite), what
    if finite.any():
        assert float((lse.double()[finite] - rl[finite]).abs().max()) < 50 * TOL[dtype], (what, "lse")
    largest = max([float(w.abs().max()) for w in rgrads if w.numel()] + [1.0])
    for i, (g, w) in enumerate(zip(grads, rgrads)):
        assert g.shape == w.shape and torch.isfinite(g).all(), (what, i)
        if float(w.abs().max()) > 1e-6:
            assert rel_err(g, w) < GRAD_TOL[dtype], (what, i, rel_err(g, w))
        else:  # 0 in float64: rounding noise only
            assert float(g.abs().max()) < GRAD_TOL[dtype] * largest, (what, i)


VARLEN_SPECS = ["causal", "cross_causal", "sliding_window", "alibi", "softcap", "rope_causal", "t5_bias", "gqa",
                "mqa", "prefix_lm", "sink_window", "chunked_local", "alibi_learned"]


@pytest.mark.parametrize("seed", range(6))
def test_random_packed_calls_forward_lse_and_gradients(seed):
    """Packed calls with cu_seqlens_q != cu_seqlens_k, empty sequences, rows past the last
    sequence, int32/int64/strided cu_seqlens, max_seqlen omitted, exact, larger or 2**40, GQA
    groups 1 to 4, Dv != D, q/k/v as views, gradients of a subset (and of learned tables) from o,
    o transposed and the LSE: each sequence against its own reference call."""
    rnd = random.Random(1800 + seed)
    name = VARLEN_SPECS[seed * 5 % len(VARLEN_SPECS)] if seed < 3 else rnd.choice(VARLEN_SPECS)
    p, mod = pattern(name), module(name)
    S = rnd.choice([2, 3, 4])
    lens_q = [rnd.choice([0, 1, 7, 33]) for _ in range(S)]
    lens_k = lens_q if rnd.random() < 0.3 else [rnd.choice([0, 2, 16, 45]) for _ in range(S)]
    Hkv = p.heads_kv or rnd.choice([1, 2])
    Hq = p.heads_q or Hkv * rnd.choice([1, 2, 3, 4])
    D = 16
    Dv = D if p.rope else rnd.choice([16, 8])
    dtype = rnd.choice([torch.float32, torch.float16, torch.bfloat16])
    gen = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(lens_q) + rnd.choice([0, 3]), sum(lens_k) + rnd.choice([0, 2])
    base = [torch.randn(1, h, n, d, generator=gen).to(dtype) for h, n, d in ((Hq, total_q, D), (Hkv, total_k, D), (Hkv, total_k, Dv))]
    cu_type = rnd.choice([torch.int32, torch.int64])
    cq, ck = ([0] + torch.tensor(lens).cumsum(0).tolist() for lens in (lens_q, lens_k))
    cu_q, cu_k = torch.tensor(cq, dtype=cu_type), torch.tensor(ck, dtype=cu_type)
    if rnd.random() < 0.3:
        cu_q, cu_k = cu_q.repeat_interleave(2)[::2], cu_k.repeat_interleave(2)[::2]
    kw = dict(SMALL_PARAMS.get(name, {}))
    kw.update(rnd.choice([{}, dict(max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k)),
                          dict(max_seqlen_q=max(lens_q) + 5, max_seqlen_k=2**40)]))
    tables = {d.name: torch.randn(*[{"h": Hq}.get(x, x) for x in d.dims], generator=gen) * 0.5 for d in p.inputs}
    layouts = [rnd.choice(["dense", "bnhd", "step", "offset"]) for _ in range(3)]
    wants = [rnd.random() < 0.7 for _ in range(3)] + [True] * len(tables)
    loss = rnd.choice(["o", "oT", "lse", "both"])
    go = torch.randn(1, Hq, total_q, Dv, generator=gen)
    gl = torch.randn(1, Hq, total_q, generator=gen)

    def objective(o, lse, cast):
        terms = {"o": (o * cast(go)).sum(), "oT": (o.transpose(1, 2) * cast(go).transpose(1, 2).contiguous()).sum(),
                 "lse": torch.where(torch.isfinite(lse), lse * cast(gl), 0).sum()}
        return terms["o"] + terms["lse"] if loss == "both" else terms[loss]

    def grads_of(value, leaves):
        wrt = [t for t, w in zip(leaves, wants) if w]
        if not value.requires_grad:
            return [torch.zeros_like(t) for t in wrt]
        return torch.autograd.grad(value, wrt, allow_unused=True, materialize_grads=True)

    leaves = [t.clone().requires_grad_(w) for t, w in zip(base + list(tables.values()), wants)]
    ops = [_view(t, how) for t, how in zip(leaves, layouts)]
    o, lse = mod.attention(*ops, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True, **kw,
                           **dict(zip(tables, leaves[3:])))
    got = (o.detach(), lse.detach(), grads_of(objective(o, lse, lambda t: t.to(dtype)), leaves))

    rleaves = [t.detach().double().requires_grad_(w) for t, w in zip(base + list(tables.values()), wants)]
    ro = torch.zeros(1, Hq, total_q, Dv, dtype=torch.float64)
    rl = torch.full((1, Hq, total_q), float("-inf"), dtype=torch.float64)
    ref_kw = {key: value for key, value in kw.items() if not key.startswith("max_seqlen")}
    for s in range(S):
        rows = torch.arange(cq[s], cq[s + 1])
        if not len(rows):
            continue
        keys = slice(ck[s], ck[s + 1])
        o_s, l_s = attncc.reference(p, rleaves[0][:, :, cq[s]:cq[s + 1]], rleaves[1][:, :, keys], rleaves[2][:, :, keys],
                                    return_lse=True, **ref_kw, **dict(zip(tables, rleaves[3:])))
        ro, rl = ro.index_copy(2, rows, o_s), rl.index_copy(2, rows, l_s)
    want = (ro.detach(), rl.detach(), grads_of(objective(ro, rl, torch.Tensor.double), rleaves))
    _compare(got, want, dtype, (name, lens_q, lens_k, Hq, Hkv, Dv, dtype, layouts, wants, loss, kw))


@pytest.mark.parametrize("seed", range(4))
def test_split_calls_of_views_and_broadcast_kv(seed, monkeypatch):
    """The residue-class split (dilated) and the summary-column split (strided), forced at small
    sizes, of q/k/v as views (BNHD, strided, storage offset, stride-0 heads), k/v of batch 1
    broadcast, GQA, offsets, half precision, gradients of a subset from o and the LSE."""
    monkeypatch.setenv("ATTNCC_RESIDUE_MIN_ROWS", "1")
    monkeypatch.setenv("ATTNCC_COLUMN_MIN_ROWS", "1")
    import attncc.runtime.residue as residue
    split = []
    monkeypatch.setattr(residue, "_sub_call", lambda *a, real=residue._sub_call: split.append(1) or real(*a))
    monkeypatch.setattr(residue, "column_parts",
                        lambda *a, real=residue.column_parts: (lambda parts: split.append(parts is not None) or parts)(real(*a)))
    rnd = random.Random(1850 + seed)
    name = ["dilated", "strided"][seed % 2]
    p, mod = pattern(name), module(name)
    kw = ({"window": rnd.randint(5, 40), "dilation": rnd.choice([2, 3])} if name == "dilated"
          else {"stride": rnd.choice([3, 5])})
    dtype = [torch.float32, torch.float16][seed // 2]
    B, Hkv = 2, rnd.choice([1, 2])
    Hq, Nq, Nk = Hkv * rnd.choice([1, 3]), rnd.randint(20, 60), rnd.randint(20, 60)
    kv_batch = rnd.choice([1, B])
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(*s, generator=gen).to(dtype) for s in ((B, Hq, Nq, 16), (kv_batch, Hkv, Nk, 16), (kv_batch, Hkv, Nk, 8))]
    layouts = [rnd.choice(["dense", "bnhd", "step", "offset"]) for _ in range(3)]
    wants = [rnd.random() < 0.7 for _ in range(3)]
    offsets = dict(q_offset=rnd.choice([0, 7]), k_offset=rnd.choice([0, 2]))
    go = torch.randn(B, Hq, Nq, 8, generator=gen)

    def run(fn, cast):
        leaves = [cast(t).requires_grad_(w) for t, w in zip(base, wants)]
        o, lse = fn(*[_view(t, how) for t, how in zip(leaves, layouts)], return_lse=True, **offsets, **kw)
        value = (o * cast(go)).sum() + torch.where(torch.isfinite(lse), lse, 0).sum()
        wrt = [t for t in leaves if t.requires_grad]
        grads = torch.autograd.grad(value, wrt, allow_unused=True, materialize_grads=True) if wrt else []
        return o.detach(), lse.detach(), grads

    got = run(mod.attention, lambda t: t.clone())
    want = run(lambda *a, **k: attncc.reference(p, *a, **k), torch.Tensor.double)
    assert any(split), "the call ran whole"
    _compare(got, want, dtype, (name, kw, dtype, Hq, Hkv, Nq, Nk, kv_batch, layouts, wants, offsets))
