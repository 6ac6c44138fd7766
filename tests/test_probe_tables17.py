"""Probe 17: [inputs] tables and argument semantics, the generated modules against attncc.reference.

Found and fixed (each test names its case):
- an index outside a table (negative, past the end, a batch row or head past a fixed dim) read 0
  in the kernels and raised in the reference; it reads 0 in both now (docs/spec-language.md §2);
- the tile classifier broadcast a size-1 dim indexed by b or h where the kernels read 0 (tiles of
  b >= 1 skipped), and raised on a fixed dim shorter than the positions;
- the reference accepted float / bool tensors for int inputs (and ints for floats, floats for
  bools), and took float inputs at their own precision where the modules convert them to the
  declared type (a float64 0.1 in a float32 input: '> 0.1' differs);
- decode refused a divisor of n_k that is 0 at some length below the capacity but at no row's kv_len.
"""
from __future__ import annotations

import math

import pytest
import torch

import attncc

F64 = torch.float64


def qkv(B=1, Hq=2, Hkv=2, Nq=37, Nk=53, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Nq, D, generator=g), torch.randn(B, Hkv, Nk, D, generator=g),
            torch.randn(B, Hkv, Nk, D, generator=g))


def compile_both(text):
    return attncc.compile(text), attncc.parse_spec(text)


def assert_matches(m, p, q, k, v, tol=2e-5, **kw):
    o, lse = m.attention(q, k, v, return_lse=True, **kw)
    ro, rl = attncc.reference(p, q, k, v, return_lse=True, **kw)
    torch.testing.assert_close(o.double(), ro, rtol=0, atol=tol)
    torch.testing.assert_close(lse.double(), rl, rtol=0, atol=tol * 4)


# --- out-of-range indices read 0, in the kernels and the reference ------------------------------

OUT_OF_RANGE = {
    "negative_bias": ('[inputs]\ntbl = { dims = [64] }\n[score]\nbias = "tbl[i - j]"\n',
                      lambda g, B, H: dict(tbl=torch.randn(64, generator=g))),
    "negative_mask": ('[inputs]\ndoc = { dims = ["b", "n"], dtype = "int32" }\n[mask]\nwhere = "doc[b, j - 5] == doc[b, i]"\n',
                      lambda g, B, H: dict(doc=torch.randint(0, 3, (B, 70), generator=g).sort().values.int())),
    "guarded": ('[inputs]\ndoc = { dims = ["b", "n"], dtype = "int32" }\n[mask]\n'
                'where = "j >= 5 and doc[b, j - 5] == doc[b, i]"\n[score]\nbias = "where(i >= 3, 0.1 * doc[b, i - 3], -1.0)"\n',
                lambda g, B, H: dict(doc=torch.randint(0, 3, (B, 70), generator=g).int())),
    "past_end": ('[inputs]\ndoc = { dims = ["b", "n"], dtype = "int16" }\n[mask]\nwhere = "doc[b, j + 10] == doc[b, i] or j <= i"\n',
                 lambda g, B, H: dict(doc=torch.randint(-1, 2, (B, 70), generator=g).short())),
    "head_past_fixed_dim": ('[inputs]\nslope = { dims = [3] }\n[score]\nbias = "slope[h] * (j - i)"\n',
                            lambda g, B, H: dict(slope=torch.rand(3, generator=g))),
    # the tile classifier broadcast tbl[0] to every b (and raised on a short fixed position dim)
    "batch_past_size_1": ('[inputs]\ntbl = { dims = [1, "n"], dtype = "int32" }\n[mask]\nwhere = "tbl[b, j] == tbl[b, i]"\n',
                          lambda g, B, H: dict(tbl=(torch.arange(64) // 16 + 1).int()[None])),
    "positions_past_fixed_dim": ('[inputs]\ntbl = { dims = ["b", 40], dtype = "uint8" }\n[mask]\nwhere = "tbl[b, j] == tbl[b, i]"\n',
                                 lambda g, B, H: dict(tbl=(torch.arange(40) // 16 + 1).to(torch.uint8).expand(B, 40))),
    "bool_past_end": ('[inputs]\nok = { dims = [48], dtype = "bool" }\n[mask]\nwhere = "ok[j] or j == i"\n',
                      lambda g, B, H: dict(ok=torch.rand(48, generator=g) > 0.3)),
}


@pytest.mark.parametrize("case", sorted(OUT_OF_RANGE))
def test_out_of_range_reads_zero(case):
    text, make = OUT_OF_RANGE[case]
    m, p = compile_both(f'name = "p17_{case}"\n' + text)
    B, H = (3, 4) if case in ("batch_past_size_1", "head_past_fixed_dim") else (2, 2)
    g = torch.Generator().manual_seed(1)
    q, k, v = qkv(B=B, Hq=H, Hkv=H // 2, Nq=64, Nk=64)
    assert_matches(m, p, q, k, v, **make(g, B, H))


def test_out_of_range_reads_pass_no_gradient():
    """A grad = true table read outside its extent: no gradient there (the kernels mask the atomics),
    GQA and offsets included."""
    m, p = compile_both('name = "p17_grad_oob"\n[inputs]\ntbl = { dims = ["h", 40], grad = true }\n[mask]\n'
                        'where = "j <= i + 20"\n[score]\nbias = "tbl[h, i - j + 10]"\n')
    for Hq, Hkv, qo, ko in ((4, 2, 0, 0), (4, 1, 5, 0), (2, 2, 0, 7)):
        q, k, v = (x.requires_grad_() for x in qkv(Hq=Hq, Hkv=Hkv, seed=Hq + qo))
        tbl = torch.randn(Hq, 40, requires_grad=True)
        o = m.attention(q, k, v, tbl=tbl, q_offset=qo, k_offset=ko)
        do = torch.randn_like(o)
        got = torch.autograd.grad(o, (q, k, v, tbl), do)
        leaves = [x.detach().double().requires_grad_() for x in (q, k, v, tbl)]
        ref = attncc.reference(p, *leaves[:3], tbl=leaves[3], q_offset=qo, k_offset=ko)
        want = torch.autograd.grad(ref, leaves, do.double())
        torch.testing.assert_close(o.double(), ref, rtol=0, atol=1e-5)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-5)


def test_reference_reads_zero_without_wrapping():
    """x[-1] is 0, not the last entry (FlexAttention would wrap it)."""
    p = attncc.parse_spec('name = "p17_wrap"\n[inputs]\nx = { dims = [4] }\n[score]\nbias = "x[j - 1] * 1.0"\n')
    q, k, v = torch.zeros(1, 1, 1, 4, dtype=F64), torch.zeros(1, 1, 2, 4, dtype=F64), torch.eye(2, 4, dtype=F64)[None, None]
    o = attncc.reference(p, q, k, v, x=torch.tensor([0.0, 0.0, 0.0, 5.0]))
    # scores: j = 0 reads x[-1] -> 0, j = 1 reads x[0] = 0: equal weights (wrapping would give 5)
    torch.testing.assert_close(o[0, 0, 0, :2], torch.tensor([0.5, 0.5], dtype=F64))


# --- dtypes: the reference refuses and converts as the modules do -----------------------------

DTYPES_SPEC = ('name = "p17_dtypes"\n[inputs]\ndoc = { dims = ["b", "n"], dtype = "int32" }\n'
               'x = { dims = ["b", "n"], dtype = "float32" }\nf = { dims = ["n"], dtype = "bool" }\n'
               '[mask]\nwhere = "doc[b, i] == doc[b, j] and (x[b, j] > 0.1 or f[j])"\n')


@pytest.mark.parametrize("name,dtype", [("doc", torch.float32), ("doc", torch.bool), ("doc", torch.float64),
                                        ("x", torch.int32), ("x", torch.bool), ("f", torch.float32)])
def test_wrong_input_dtype_is_refused_by_both(name, dtype):
    m, p = compile_both(DTYPES_SPEC)
    q, k, v = qkv(Nq=8, Nk=8)
    inputs = dict(doc=torch.zeros(1, 8, dtype=torch.int32), x=torch.zeros(1, 8), f=torch.ones(8, dtype=torch.bool))
    inputs[name] = inputs[name].to(dtype)
    with pytest.raises(TypeError, match=f"input '?{name}'? must be"):
        m.attention(q, k, v, **inputs)
    with pytest.raises(TypeError, match=f"input '{name}' must be"):
        attncc.reference(p, q, k, v, **inputs)


@pytest.mark.parametrize("doc_dtype,f_dtype,x_dtype", [(torch.int64, torch.int32, torch.float64),
                                                       (torch.uint8, torch.uint8, torch.float16),
                                                       (torch.int8, torch.bool, torch.bfloat16)])
def test_accepted_dtypes_agree(doc_dtype, f_dtype, x_dtype):
    """Other integer widths, ints for a bool input (!= 0) and other float types are taken, and the
    reference converts floats to the declared type first: a float64 0.1 in a float32 input is
    float32's 0.1 > 0.1 in both (it was false in the reference, true in the kernels)."""
    m, p = compile_both(DTYPES_SPEC)
    q, k, v = qkv(Nq=37, Nk=53)
    g = torch.Generator().manual_seed(3)
    x = torch.full((1, 60), 0.1, dtype=torch.float64)
    x[0, ::3] = -1.0
    inputs = dict(doc=torch.randint(0, 3, (1, 60), generator=g).sort().values.to(doc_dtype),
                  x=x.to(x_dtype), f=(torch.arange(60) % 7 == 0).to(f_dtype) * (2 if f_dtype != torch.bool else 1))
    assert_matches(m, p, q, k, v, **inputs)


def test_float_table_rounded_to_its_declared_type():
    m, p = compile_both('name = "p17_bf16"\n[inputs]\nx = { dims = ["b", "n"], dtype = "bfloat16" }\n[score]\nbias = "x[b, j] * 10"\n')
    q, k, v = qkv()
    assert_matches(m, p, q, k, v, x=torch.randn(1, 60, generator=torch.Generator().manual_seed(2)))  # |do| was 1.6e-2


# --- decode: a divisor of n_k checked at the rows' lengths -------------------------------------

def test_decode_divisor_checked_at_each_kv_len():
    m, p = compile_both('name = "p17_decode_div"\n[mask]\nwhere = "j % (n_k - 3) != 1"\n')
    g = torch.Generator().manual_seed(0)
    q, kc, vc = torch.randn(3, 2, 1, 16, generator=g), torch.randn(3, 2, 64, 16, generator=g), torch.randn(3, 2, 64, 16, generator=g)
    lens = [10, 0, 30]
    o = m.decode(q, kc, vc, kv_len=torch.tensor(lens, dtype=torch.int32))  # was refused: n_k = 3 lies in 1..64
    for b, n in enumerate(lens):
        if n:
            ref = attncc.reference(p, q[b:b + 1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n], q_offset=n - 1)
            torch.testing.assert_close(o[b:b + 1].double(), ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"kv_len = 3\).*n_k - 3\) is 0"):
        m.decode(q, kc, vc, kv_len=[10, 3, 30])


# --- seeded differential sweep: int tables of each dtype in odd layouts, a table shared by mask
# --- and score with grad = true, GQA, offsets, params as numpy / tensor numbers ------------------

SHARED = '''name = "p17_shared_{dt}"
[params]
w = 7
c = 0.5
[inputs]
doc = {{ dims = ["b", "n"], dtype = "{dt}" }}
tb = {{ dims = ["h", 16], dtype = "float32", grad = true }}
[mask]
where = "doc[b, i] == doc[b, j] and i - j < w * 3 and tb[h, (i - j) % 16] > -5"
[score]
bias = "tb[h, (i - j) % 16] * c + doc[b, j] * 0.01"
'''


def _layout(t, kind):
    if kind == "strided":
        x = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        x[:, ::2] = t
        return x[:, ::2]
    if kind == "transposed":
        return t.t().contiguous().t()
    if kind == "offset":
        x = torch.zeros(t.numel() + 5, dtype=t.dtype)
        x[5:] = t.flatten()
        return x[5:].view(t.shape)
    if kind == "expanded":
        return t[:1].expand(t.shape)
    return t


@pytest.mark.parametrize("dt,seed", [("int8", 0), ("int16", 1), ("int32", 2), ("int64", 3), ("uint8", 4)])
def test_shared_table_sweep(dt, seed):
    import numpy as np

    m, p = compile_both(SHARED.format(dt=dt))
    g = torch.Generator().manual_seed(seed)
    B, Hkv, group, qo, ko = 2, 1 + seed % 2, 2, 3 * (seed % 2), 5 * (seed // 2 % 2)
    Hq, Nq, Nk = Hkv * group, 37, 53
    doc = torch.randint(0, 3, (B, max(qo + Nq, ko + Nk) + 3), generator=g).sort(-1).values - int(dt != "uint8")
    doc = _layout(doc.to(getattr(torch, dt)), ["plain", "strided", "transposed", "offset", "expanded"][seed])
    tb = torch.randn(Hq, 16, generator=g)
    w, c = [7, np.int64(7), torch.tensor(5), np.int32(5), 6][seed], [0.5, np.float32(0.25), torch.tensor(0.3), 2, 1.5][seed]
    q, k, v = (x.requires_grad_() for x in qkv(B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, seed=seed))
    tbk = tb.clone().requires_grad_()
    o, lse = m.attention(q, k, v, return_lse=True, doc=doc, tb=tbk, w=w, c=c, q_offset=qo, k_offset=ko)
    do = torch.randn(o.shape, generator=g)
    got = torch.autograd.grad((o * do).sum() + 0.1 * lse.sum(), (q, k, v, tbk))
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, tb)]
    ro, rl = attncc.reference(p, *leaves[:3], return_lse=True, doc=doc, tb=leaves[3], w=w, c=c, q_offset=qo, k_offset=ko)
    want = torch.autograd.grad((ro * do.double()).sum() + 0.1 * rl.sum(), leaves)
    for a, b in zip((o, lse, *got), (ro, rl, *want)):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-4)


def test_a_complex_table_is_refused_with_the_declared_dtype():
    """The modules and the reference share one dtype rule (attncc.core.semantics.input_dtype_accepted):
    a complex tensor for an int input was a TypeError from torch.iinfo in the modules."""
    m, p = compile_both('name = "p17_complex"\n[inputs]\ndoc = { dims = ["b", "n"], dtype = "int32" }\n'
                        '[mask]\nwhere = "doc[b, i] == doc[b, j]"\n')
    q, k, v = qkv()
    doc = torch.zeros(q.shape[0], 64, dtype=torch.complex64)
    with pytest.raises(TypeError, match="input doc must be int32, got complex64"):
        m.attention(q, k, v, doc=doc)
    with pytest.raises(TypeError, match="input 'doc' must be int32"):
        attncc.reference(p, q.double(), k.double(), v.double(), doc=doc)
