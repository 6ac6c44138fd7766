"""Every tensor a kernel reads is read at its own strides and integer width (issue 15).

Small int tensors (kv_len, block_table, cu_seqlens, [inputs]) arrive as non-contiguous views
(transposed, sliced with steps, expanded with stride 0) and as int64 holding values past 2**31;
each call must equal the reference on the values the caller passed, never on the storage
order or on values narrowed to int32.
"""
from __future__ import annotations

import math

import pytest
import torch

import attncc
import attncc.runtime.decode as rt_decode
from cases import module, pattern, rel_err
from test_decode import decode_module, make_cache

# Views of a [B, ...] int tensor with its values unchanged and its strides not the dense ones.


def strided(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "step":  # every other element of a wider buffer
        wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), -7, dtype=t.dtype)
        wide[..., ::2] = t
        out = wide[..., ::2]
    elif how == "transposed":  # column-major storage
        out = t.t().contiguous().t() if t.dim() == 2 else strided(t, "step")
    else:
        raise ValueError(how)
    assert torch.equal(out, t) and not out.is_contiguous()
    return out


def _grads(out, inputs, g):
    return torch.autograd.grad((out * g).sum(), inputs)


def check_attention(name, q, k, v, *, grad=True, kw=None, q_offset=0, k_offset=0, tol=1e-4):
    """The generated forward (and backward) against attncc.reference in float64."""
    kw = kw or {}
    mod, p = module(name), pattern(name)
    leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    o, lse = mod.attention(*leaves, return_lse=True, q_offset=q_offset, k_offset=k_offset, **kw)
    ref_in = [t.double().requires_grad_(grad) for t in (q, k, v)]
    ref, ref_lse = attncc.reference(p, *ref_in, return_lse=True, q_offset=q_offset, k_offset=k_offset, **kw)
    assert rel_err(o.detach(), ref.detach()) < tol, rel_err(o.detach(), ref.detach())
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert torch.allclose(lse[fin].double(), ref_lse[fin].detach(), atol=1e-4)
    if grad:
        g = torch.randn_like(o)
        for label, a, b in zip("qkv", _grads(o, leaves, g), _grads(ref, ref_in, g.double())):
            assert rel_err(a, b) < tol, (label, rel_err(a, b))
    return o


@pytest.mark.parametrize("rows", ["q", "kv"])
def test_one_row_tensors_with_odd_row_strides(rows):
    """A one-row q (or k and v) whose row stride is 21 floats, in an aligned buffer: torch calls
    it contiguous (a length-1 dim's stride is free), so ``tma_ready`` kept it, and the kernels'
    tensor descriptors took a row stride that is no multiple of 16 bytes (the interpreter
    stopped on "stride must be 16-byte aligned"; such a descriptor is invalid on the GPU too)."""
    gen = torch.Generator().manual_seed(3)

    def odd(t):  # the same values, rows 21 floats apart; clone keeps those strides (dense)
        wide = torch.zeros(*t.shape[:-1], 21)
        wide[..., :16] = t
        out = wide[..., :16].clone()
        assert out.stride()[-2] == 21 and out.is_contiguous() and out.data_ptr() % 16 == 0
        return out

    nq, nk = (1, 20) if rows == "q" else (17, 1)
    q, k, v = (torch.randn(1, 1, n, 16, generator=gen) for n in (nq, nk, nk))
    q, k, v = (odd(q), k, v) if rows == "q" else (q, odd(k), odd(v))
    # (one key: every softmax weight is 1 and dq, dk are 0, which a relative error cannot weigh)
    check_attention("causal", q, k, v, q_offset=19 if rows == "q" else 0, grad=rows == "q")
    if rows == "kv":
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        dv = torch.autograd.grad(module("causal").attention(*leaves).sum(), leaves)[2]
        assert torch.allclose(dv, torch.ones(1, 1, 1, 16) * 17)


# ---------------------------------------------------------------------------------------
# decode: kv_len and block_table at any stride and width
# ---------------------------------------------------------------------------------------

def _decode_case(seed=0, B=3, Hq=4, Hkv=2, Nq=2, Nmax=60, D=16, page=16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=gen)
    k = torch.randn(B, Hkv, Nmax, D, generator=gen)
    v = torch.randn(B, Hkv, Nmax, D, generator=gen)
    kv_len = torch.tensor([Nmax, 17, 33][:B], dtype=torch.int32)
    kc, vc, table = make_cache(k, v, kv_len, page, gen)
    return q, k, v, kv_len, kc, vc, table


def _decode_reference(q, k, v, kv_len):
    outs = []
    for b in range(q.shape[0]):
        L = int(kv_len[b])
        outs.append(attncc.reference(pattern("causal"), q[b:b + 1].double(), k[b:b + 1, :, :L].double(),
                                     v[b:b + 1, :, :L].double(), q_offset=L - q.shape[2]))
    return torch.cat(outs)


@pytest.mark.parametrize("how", ["step", "expanded", "int64-step"])
def test_decode_kv_len_views(how):
    q, k, v, kv_len, *_ = _decode_case()
    if how == "expanded":  # one length for every row, stride 0
        kv_len = torch.tensor(41, dtype=torch.int32).expand(q.shape[0])
    else:
        kv_len = strided(kv_len.long() if how.startswith("int64") else kv_len, "step")
    mod = decode_module("causal")
    ref = _decode_reference(q, k, v, kv_len)
    assert rel_err(mod.decode(q, k, v, kv_len=kv_len), ref) < 1e-5
    kc, vc, table = make_cache(k, v, kv_len.contiguous(), 16, torch.Generator().manual_seed(3))
    assert rel_err(mod.decode(q, kc, vc, kv_len=kv_len, block_table=table), ref) < 1e-5


@pytest.mark.parametrize("how", ["step", "transposed", "expanded", "int64", "int64-transposed"])
def test_decode_block_table_views(how):
    q, k, v, kv_len, kc, vc, table = _decode_case(seed=1)
    if how == "expanded":  # every row reads the pages of row 0 (stride 0 along b)
        table = table[:1].expand(q.shape[0], -1)
        k, v = k[:1].expand_as(k), v[:1].expand_as(v)
    else:
        if how.startswith("int64"):
            table = table.long()
        if how != "int64":
            table = strided(table, how.split("-")[-1])
    ref = _decode_reference(q, k, v, kv_len)
    o = decode_module("causal").decode(q, kc, vc, kv_len=kv_len, block_table=table)
    assert rel_err(o, ref) < 1e-5


def test_decode_int64_kv_len_is_clamped_not_wrapped(monkeypatch):
    """kv_len = 2**32 + 5 past the capacity: on the GPU (no host check) the kernel clamps it to the
    capacity; narrowed to int32 it read 5."""
    q, k, v, *_ = _decode_case(seed=2)
    mod = decode_module("causal")
    big = torch.tensor([2**32 + 5, 17, 2**33 + 33], dtype=torch.int64)
    with pytest.raises(ValueError, match=r"kv_len must be in 0\.\.60"):  # CPU lengths are checked
        mod.decode(q, k, v, kv_len=big)
    monkeypatch.setattr(rt_decode, "_check_values", lambda t: False)  # as on the GPU
    clamped = torch.tensor([60, 17, 60], dtype=torch.int32)
    assert torch.equal(mod.decode(q, k, v, kv_len=big), mod.decode(q, k, v, kv_len=clamped))


def test_decode_list_kv_len_past_int32(monkeypatch):
    q, k, v, *_ = _decode_case(seed=2)
    monkeypatch.setattr(rt_decode, "_check_values", lambda t: False)
    mod = decode_module("causal")
    assert torch.equal(mod.decode(q, k, v, kv_len=[2**31 + 1, 17, 33]), mod.decode(q, k, v, kv_len=[60, 17, 33]))


# ---------------------------------------------------------------------------------------
# varlen: cu_seqlens at any stride and width
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["step", "int64", "int64-step", "mixed"])
def test_varlen_cu_seqlens_views(how):
    lens_q, lens_k = [5, 1, 0, 40, 17], [9, 3, 2, 25, 6]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, sum(lens_q), 16, generator=gen)
    k, v = (torch.randn(1, 2, sum(lens_k), 16, generator=gen) for _ in range(2))
    if "int64" in how:
        cu_q, cu_k = cu_q.long(), cu_k.long()
    if how == "mixed":
        cu_q = cu_q.long()
    if "step" in how:
        cu_q, cu_k = strided(cu_q, "step"), strided(cu_k, "step")
    mod = module("cross_causal")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = mod.attention(*leaves, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=40, max_seqlen_k=25)
    g = torch.randn_like(o)
    grads = _grads(o, leaves, g)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for s in range(len(lens_q)):
        sq, sk = slice(cq[s], cq[s + 1]), slice(ck[s], ck[s + 1])
        if sq.stop == sq.start:
            continue
        ref_in = [t[:, :, sl].double().requires_grad_() for t, sl in ((q, sq), (k, sk), (v, sk))]
        ref = attncc.reference(pattern("cross_causal"), *ref_in)
        assert rel_err(o[:, :, sq].detach(), ref.detach()) < 1e-4, s
        ref_g = _grads(ref, ref_in, g[:, :, sq].double())
        for label, x, r in zip("qkv", grads, ref_g):
            part = x[:, :, sq] if label == "q" else x[:, :, sk]
            assert rel_err(part, r) < 1e-4, (s, label)


# ---------------------------------------------------------------------------------------
# [inputs]: any strides, integer widths kept
# ---------------------------------------------------------------------------------------

def _torch_lists(mod, monkeypatch):
    """Make a data-dependent module classify its tiles with the torch path, not its Triton kernel."""
    monkeypatch.setattr(mod, "_tile_lists", lambda call, bm, bn, transposed: attncc.runtime.blocks.classified_lists(
        mod._TK_PROGRAM, call, bm, bn, dynamic=True, transposed=transposed))


def _docs(B, N, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (B, N), generator=gen).sort(dim=1).values.to(torch.int32)


@pytest.mark.parametrize("lists", ["kernel", "torch"])
@pytest.mark.parametrize("how", ["step", "transposed", "expanded"])
def test_document_input_views(how, lists, monkeypatch):
    B, N = 2, 70
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, 2, N, 16, generator=gen) for _ in range(3))
    doc = _docs(B, N, 6)
    doc = doc[:1].expand(B, N) if how == "expanded" else strided(doc, how)
    if lists == "torch":
        _torch_lists(module("document"), monkeypatch)
    check_attention("document", q, k, v, kw={"doc": doc})


@pytest.mark.parametrize("lists", ["kernel", "torch"])
def test_int64_doc_ids_stay_apart(lists, monkeypatch):
    """Documents 0 and 2**32 (and 2**60, 2**60 + 1: past float64's exact integers, where the tile
    classifier rounds) are different documents; narrowed to int32 (or rounded) they merged."""
    B, N = 2, 64
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, 2, N, 16, generator=gen) for _ in range(3))
    doc = torch.zeros(B, N, dtype=torch.int64)
    doc[0, 20:] = 2**32
    doc[0, 45:] = 2**33 + 1
    doc[1, :] = 2**60
    doc[1, 30:] = 2**60 + 1  # the same float64 number as 2**60
    if lists == "torch":
        _torch_lists(module("document"), monkeypatch)
    check_attention("document", q, k, v, kw={"doc": doc})
    check_attention("document", q, k, v, kw={"doc": strided(doc, "transposed")}, grad=False)


@pytest.mark.parametrize("how", ["contiguous", "transposed", "step"])
def test_int64_doc_ids_in_decode(how):
    B, Nq, Nmax = 2, 3, 48
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(B, 2, Nq, 16, generator=gen)
    k, v = (torch.randn(B, 2, Nmax, 16, generator=gen) for _ in range(2))
    doc = torch.zeros(B, Nmax, dtype=torch.int64)
    doc[:, 30:] = 2**32  # narrowed: 0, one document with the first 30 keys
    doc[1, 44:] = 2**32 + 1
    kv_len = torch.tensor([48, 40], dtype=torch.int32)
    o = decode_module("document").decode(q, k, v, kv_len=kv_len, doc=doc if how == "contiguous" else strided(doc, how))
    for b in range(B):
        L = int(kv_len[b])
        ref = attncc.reference(pattern("document"), q[b:b + 1].double(), k[b:b + 1, :, :L].double(),
                               v[b:b + 1, :, :L].double(), q_offset=L - Nq, doc=doc[b:b + 1])
        assert rel_err(o[b:b + 1], ref) < 1e-5


@pytest.mark.parametrize("lists", ["kernel", "torch"])
def test_int64_kv_len_input_past_int32(lists, monkeypatch):
    """padding's kv_len input (int32 in the spec) holding 2**32 + 5: every key is valid (narrowed: 5)."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=gen) for _ in range(3))
    kv_len = torch.tensor([2**32 + 5, 7], dtype=torch.int64)
    if lists == "torch":
        _torch_lists(module("padding"), monkeypatch)
    check_attention("padding", q, k, v, kw={"kv_len": kv_len})
    check_attention("padding", q, k, v, kw={"kv_len": strided(kv_len, "step")}, grad=False)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8])
def test_narrower_int_inputs_are_widened(dtype):
    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=gen) for _ in range(3))
    check_attention("document", q, k, v, kw={"doc": _docs(2, 40, 11).to(dtype)}, grad=False)


@pytest.mark.parametrize("how", ["transposed", "expanded"])
def test_float_table_views_with_gradient(how):
    """A learned table (t5_bias: rel_bias [h, 32], grad = true) as a non-contiguous view: the forward
    reads it at its strides, and its gradient arrives through the view."""
    name = "t5_bias"
    p = pattern(name)
    decl = next(d for d in p.inputs if d.grad)
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 2, 50, 16, generator=gen) for _ in range(3))
    shape = [{"h": 2}.get(x, x) for x in decl.dims]
    base = torch.randn(*shape, generator=gen)
    if how == "transposed":
        table = base.t().contiguous().t().requires_grad_()
    else:
        base = base[:1].clone()
        table = base.requires_grad_()
    view = table if how == "transposed" else table.expand(*shape)
    assert not view.is_contiguous()
    o = module(name).attention(q, k, v, **{decl.name: view})
    ref_table = table.detach().double().requires_grad_()
    ref_view = ref_table if how == "transposed" else ref_table.expand(*shape)
    ref = attncc.reference(p, q.double(), k.double(), v.double(), **{decl.name: ref_view})
    assert rel_err(o.detach(), ref.detach()) < 1e-4
    g = torch.randn_like(o)
    (got,) = torch.autograd.grad((o * g).sum(), table)
    (want,) = torch.autograd.grad((ref * g.double()).sum(), ref_table)
    assert rel_err(got, want) < 1e-4
