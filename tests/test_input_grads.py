"""Gradients of [inputs] declared grad = true (learned tables, slopes, temperatures) against float64
autograd of attncc.reference, under the Triton interpreter."""
from __future__ import annotations


import pytest
import torch

import attncc
from cases import module, pattern, rel_err, build_inline

EXTRA_SPECS = {
    # a learned temperature inside the transform, a capped score, a masked-out band
    "grad_mod": """
[inputs]
head_scale = { dims = ["h"], dtype = "float32", grad = true }
[mask]
where = "causal"
[score]
mod = "where(i - j < 30, s * head_scale[h] + 0.1 * tanh(s * head_scale[h]), -inf)"
softcap = 20.0
""",
    # per-position tables (reduced over a tile's keys, its queries, pair by pair) and a bias in the mod
    "grad_rows": """
[inputs]
row = { dims = ["b", "n"], dtype = "float32", grad = true }
dist = { dims = ["n"], dtype = "float32", grad = true }
gate = { dims = ["h"], dtype = "float32", grad = true }
[mask]
where = "abs(i - j) <= 20"
[score]
bias = "row[b, i] * 3.0 + 0.5 * row[b, j] + dist[abs(i - j)]"
mod = "s + gate[h] * sigmoid(s)"
""",
}


@pytest.fixture(scope="module")
def extra(tmp_path_factory):
    return build_inline(EXTRA_SPECS, tmp_path_factory.mktemp("grad_specs"))


def input_grad_case(p, mod, *, B=1, Nq=45, Nk=None, D=16, heads=(4, 2), q_offset=0, seed=0, qkv_grad=True):
    """(o * g).sum() differentiated w.r.t. q, k, v and every grad input, against the reference."""
    Nk = Nq if Nk is None else Nk
    Hq, Hkv = heads
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=gen)
    k = torch.randn(B, Hkv, Nk, D, generator=gen)
    v = torch.randn(B, Hkv, Nk, D, generator=gen)
    n = max(q_offset + Nq, Nk)
    tables = {d.name: (0.5 * torch.randn(*[{"b": B, "h": Hq, "n": n}.get(x, x) for x in d.dims], generator=gen)
                       + (1.0 if d.name == "head_scale" else 0.0)) for d in p.inputs}
    g = torch.randn(B, Hq, Nq, D, generator=gen)
    leaves = ([q, k, v] if qkv_grad else []) + list(tables.values())
    for t in leaves:
        t.requires_grad_()
    o = mod.attention(q, k, v, q_offset=q_offset, **tables)
    grads = torch.autograd.grad((o * g).sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_map = dict(zip([id(t) for t in leaves], ref_leaves))
    args = [ref_map.get(id(t), t.double()) for t in (q, k, v)]
    ref_tables = {name: ref_map[id(t)] for name, t in tables.items()}
    ref = attncc.reference(p, *args, q_offset=q_offset, **ref_tables)
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), ref_leaves)
    assert rel_err(o.detach(), ref.detach()) < 1e-4
    labels = (["q", "k", "v"] if qkv_grad else []) + list(tables)
    for label, x, r, t in zip(labels, grads, ref_grads, leaves):
        assert x.shape == t.shape and x.dtype == t.dtype, label
        assert r.abs().max() > 0, label  # the case exercises this gradient
        assert rel_err(x, r) < 1e-3, (label, rel_err(x, r))
    return grads


@pytest.mark.parametrize("name, heads", [("t5_bias", (2, 1)), ("alibi_learned", (4, 4)), ("alibi_learned", (4, 1))])
def test_shipped_learned_tables(name, heads):
    input_grad_case(pattern(name), module(name), heads=heads, Nq=37 if heads[1] == 4 else 33)


def test_cross_attention_chunk_and_tables_alone():
    input_grad_case(pattern("t5_bias"), module("t5_bias"), Nq=21, Nk=61, q_offset=40, heads=(2, 2), seed=1)
    input_grad_case(pattern("alibi_learned"), module("alibi_learned"), Nq=33, seed=2, qkv_grad=False)


@pytest.mark.parametrize("name", sorted(EXTRA_SPECS))
def test_inputs_in_transforms_and_per_position_tables(extra, name):
    p, mod = extra[name]
    input_grad_case(p, mod, B=2, Nq=37, heads=(2, 1), seed=3)


def test_inputs_without_requires_grad_get_none():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen, requires_grad=True) for _ in range(3))
    table = torch.randn(2, 32, generator=gen)
    module("t5_bias").attention(q, k, v, rel_bias=table).sum().backward()
    assert table.grad is None and q.grad is not None


def test_double_backward_through_a_learned_table_raises():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen) for _ in range(3))
    slopes = torch.rand(2, generator=gen, requires_grad=True)
    o = module("alibi_learned").attention(q, k, v, slopes=slopes)
    (d,) = torch.autograd.grad(o.pow(2).sum(), slopes, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        d.sum().backward()


@pytest.mark.parametrize("Nq, Nk", [(5, 0), (0, 7)])
def test_a_call_without_pairs_gives_learned_tables_a_zero_gradient(Nq, Nk):
    """No query or no key at all: the table's gradient is zero (as the reference's), not missing."""
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, Nq, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 2, Nk, 16, generator=gen, requires_grad=True) for _ in range(2))
    table = torch.randn(2, 32, generator=gen, requires_grad=True)
    module("t5_bias").attention(q, k, v, rel_bias=table).sum().backward()
    assert table.grad is not None and table.grad.shape == table.shape and (table.grad == 0).all()
    assert (q.grad == 0).all() and (k.grad == 0).all() and (v.grad == 0).all()


def test_an_input_without_grad_true_that_requires_grad_is_refused(tmp_path):
    """Its gradient would be dropped without a word: a ValueError names the input and the way out
    (declare grad = true, or detach); no_grad, a detached tensor and a grad = true input run."""
    text = '[inputs]\nt = { dims = ["h"], dtype = "float32" }\n[score]\nbias = "t[h] * (j - i)"\n'
    p, mod = build_inline({"plain_table": text}, tmp_path)["plain_table"]
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=gen, requires_grad=True) for _ in range(3))
    t = torch.rand(2, generator=gen, requires_grad=True)
    with pytest.raises(ValueError, match=r"input t requires grad, but \[inputs\].t is declared without grad = true.*t.detach\(\)"):
        mod.attention(q, k, v, t=t)
    with pytest.raises(ValueError, match="input t requires grad"):
        mod.attention(q.detach(), k.detach(), v.detach(), t=t)  # the only tensor that asks for a gradient
    o = mod.attention(q, k, v, t=t.detach())
    ref = attncc.reference(p, q.double(), k.double(), v.double(), t=t.detach().double())
    assert rel_err(o, ref) < 1e-4
    with torch.no_grad():
        assert rel_err(mod.attention(q, k, v, t=t), ref) < 1e-4
    with pytest.raises(NotImplementedError, match="detach q, the caches and the inputs"):
        mod.decode(q[:, :, :1].detach(), k.detach(), v.detach(), kv_len=torch.tensor([9]), t=t)
