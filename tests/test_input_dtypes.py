"""16-bit float [inputs] (issue 15): every kernel reads them as float32 before any arithmetic.

A bfloat16 table in a query-only bias term used to be folded into the LSE in bfloat16 by the
backward's preprocessing (and tables along j were scaled in their own 16-bit type); here bf16 and
fp16 tables in bias terms over (b, h, i), (h, j), (b, i, j) and in a score mod, with gradients
where declared, against attncc.reference: forward, backward and decode.
"""
from __future__ import annotations

import pytest
import torch

import attncc
from cases import build_inline, rel_err


def _spec(name, dtype, inputs, bias=None, mod=None, mask="j <= i"):
    lines = [f'name = "{name}"', "[inputs]"]
    lines += [f'{n} = {{ dims = {dims}, dtype = "{dtype}"{", grad = true" if grad else ""} }}'
              for n, (dims, grad) in inputs.items()]
    lines += ["[mask]", f'where = "{mask}"', "[score]"]
    if bias:
        lines.append(f'bias = "{bias}"')
    if mod:
        lines.append(f'mod = "{mod}"')
    return "\n".join(lines) + "\n"


CASES = {
    # query-only (folded into the LSE by the forward, into lse2 by _bwd_preprocess)
    "row": dict(inputs={"rb": ('["b", "h", "n"]', True)}, bias="rb[b, h, i] * 3.0"),
    # key-only and per-pair terms (in the key loop)
    "col": dict(inputs={"cb": ('["h", "n"]', True)}, bias="cb[h, j] - 0.5 * cb[h, i]"),
    "pair": dict(inputs={"pb": ('["b", "n", "n"]', False)}, bias="pb[b, i, j] * 2.0"),
    # a mod (not split: softcap-free mods keep j-free terms in the LSE too)
    "mod": dict(inputs={"t": ('["h"]', True), "rb": ('["b", "h", "n"]', False)}, mod="s * t[h] + rb[b, h, i]"),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    texts = {f"{case}_{dt}": _spec(f"{case}_{dt}", dt, **spec) for case, spec in CASES.items() for dt in DTYPES}
    return build_inline(texts, tmp_path_factory.mktemp("input_dtypes"))


def _tables(p, B, H, N, dtype, gen):
    out = {}
    for d in p.inputs:
        shape = [{"b": B, "h": H, "n": N}.get(x, x) for x in d.dims]
        # values with bits below bfloat16's precision: a 16-bit product would round them away
        t = (torch.randn(*shape, generator=gen) * 2.0 + 0.75).to(dtype)
        out[d.name] = t.requires_grad_(d.grad)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_16bit_tables_forward_backward(built, case, dtype):
    p, mod = built[f"{case}_{dtype}"]
    B, H, N, D = 2, 2, 50, 16
    gen = torch.Generator().manual_seed(len(case))
    q, k, v = (torch.randn(B, H, N, D, generator=gen).requires_grad_() for _ in range(3))
    tables = _tables(p, B, H, N, DTYPES[dtype], gen)
    o, lse = mod.attention(q, k, v, return_lse=True, **tables)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_tables = {n: t.detach().double().requires_grad_(t.requires_grad) for n, t in tables.items()}
    ref, ref_lse = attncc.reference(p, *ref_in, return_lse=True, **ref_tables)
    assert rel_err(o.detach(), ref.detach()) < 1e-4
    assert torch.allclose(lse.detach().double(), ref_lse.detach(), atol=1e-3)
    g = torch.randn_like(o)
    learned = [t for t in tables.values() if t.requires_grad]
    ref_learned = [ref_tables[n] for n, t in tables.items() if t.requires_grad]
    got = torch.autograd.grad((o * g).sum(), [q, k, v] + learned)
    want = torch.autograd.grad((ref * g.double()).sum(), ref_in + ref_learned)
    for label, a, b in zip(["q", "k", "v"] + [f"d{n}" for n, t in tables.items() if t.requires_grad], got, want):
        # learned tables come back in their 16-bit dtype
        tol = 1e-4 if label in "qkv" else (2e-2 if dtype == "bfloat16" else 2e-3)
        # a query-only term's gradient is 0 (the softmax cancels it): relative to 1 there
        err = float((a.double() - b).norm() / max(float(b.norm()), 1.0))
        assert err < tol, (label, err)


@pytest.mark.parametrize("case", ["row", "col", "mod"])
def test_16bit_tables_in_decode(built, case):
    p, mod = built[f"{case}_bfloat16"]
    B, H, Nq, Nmax, D = 2, 2, 3, 40, 16
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, Nq, D, generator=gen)
    k, v = (torch.randn(B, H, Nmax, D, generator=gen) for _ in range(2))
    tables = {n: t.detach() for n, t in _tables(p, B, H, Nmax, torch.bfloat16, gen).items()}
    kv_len = torch.tensor([40, 29])
    o = mod.decode(q, k, v, kv_len=kv_len, **tables)
    for b in range(B):
        L = int(kv_len[b])
        row = {n: (t[b:b + 1] if p.input(n).dims[0] == "b" else t).double() for n, t in tables.items()}
        ref = attncc.reference(p, q[b:b + 1].double(), k[b:b + 1, :, :L].double(), v[b:b + 1, :, :L].double(),
                               q_offset=L - Nq, **row)
        assert rel_err(o[b:b + 1], ref) < 1e-4
