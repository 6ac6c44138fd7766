"""Generated backward kernels (under the Triton interpreter) against autograd of attncc.reference."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import attncc
from attncc.analysis import analyze
from attncc.codegen import build
from attncc.runtime import bind, blocks, tiles
from cases import SMALL_PARAMS, SOFTMAX, share, turns, heads_for, inputs_for, module, pattern, rel_err, build_inline

GRAD_TOL = {torch.float32: 1e-3, torch.float16: 2e-2}


def grad_case(name, *, B=2, Nq=45, Nk=None, D=32, Dv=None, dtype=torch.float32, heads=None, q_offset=0, k_offset=0,
              n_q=None, n_k=None, seed=0, mod=None, p=None, kw=None, tol=None):
    """Gradients of (o * g).sum() w.r.t. q, k, v against float64 autograd of the reference."""
    p = p or pattern(name)
    mod = mod or module(name)
    Nk = Nq if Nk is None else Nk
    Hq, Hkv = heads or heads_for(p)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, Nk, Dv or D, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(B, Hq, Nq, Dv or D, generator=gen)
    n = max(q_offset + Nq, k_offset + Nk, n_q or 0, n_k or 0)
    if kw is None:
        kw = dict(SMALL_PARAMS.get(name, {}), **inputs_for(p, B, Hq, n, gen))
    pos = dict(q_offset=q_offset, k_offset=k_offset, n_q=n_q, n_k=n_k)
    o = mod.attention(q, k, v, **pos, **kw)
    grads = torch.autograd.grad((o * g.to(dtype)).sum(), (q, k, v))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attncc.reference(p, *ref_in, **pos, **kw)
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), ref_in)
    tol = tol or GRAD_TOL[dtype]
    assert rel_err(o.detach(), ref.detach()) < tol
    for label, x, r, t in zip("qkv", grads, ref_grads, (q, k, v)):
        assert x.shape == t.shape and x.dtype == t.dtype, label
        assert torch.isfinite(x).all(), f"d{label} has NaN/inf"
        assert rel_err(x, r) < tol, (label, rel_err(x, r))
    return o.detach(), grads, ref_grads


# ---------------------------------------------------------------------------
# every spec
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", share(SOFTMAX, 0, 2))
def test_spec_gradients_odd_length(name):
    grad_case(name, Nq=45 if name != "bigbird" else 150, B=1 if name in ("bigbird", "gqa") else 2)  # gqa: 32 heads


@pytest.mark.parametrize("name", share(SOFTMAX, 1, 2))
def test_spec_gradients_cross_attention(name):
    grad_case(name, B=1, Nq=37, Nk=70, D=16, seed=1)


@pytest.mark.parametrize("name, heads", turns(["sliding_window", "document", "rope_causal", "longformer", "t5_bias"],
                                              {"gqa": (4, 2), "mqa": (4, 1)}))
def test_gqa_mqa_gradients(name, heads):
    grad_case(name, B=1, Nq=40, D=16, heads=heads, seed=2)


CHUNKS = {"queries": dict(Nq=21, Nk=61, q_offset=40, seed=3), "keys": dict(Nq=50, Nk=33, k_offset=9, seed=4)}


@pytest.mark.parametrize("name, chunk", turns(["causal", "sliding_window", "document", "prefix_lm", "alibi",
                                               "rope_causal", "local_bidirectional"], CHUNKS))
def test_chunk_of_a_sequence(name, chunk):
    """q_offset / k_offset: a chunk of queries (or keys) at its global positions."""
    grad_case(name, B=1, D=16, **chunk)


# ---------------------------------------------------------------------------
# empty rows, degenerate calls
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["causal", "cross_causal", "sliding_window"])
def test_rows_without_keys_get_zero_gradient(name):
    # keys after every query: causal rows are empty; cross_causal with n_q = 40 empties the first 7 rows
    pos = dict(k_offset=50) if name != "cross_causal" else dict(n_q=40)
    o, (dq, dk, dv), _ = grad_case(name, B=1, Nq=20, Nk=33, D=16, seed=5, kw=SMALL_PARAMS.get(name, {}), **pos)
    empty = (o == 0).all(-1)
    assert empty.any()
    assert (dq[empty] == 0).all()
    if name != "cross_causal":  # every row empty: no key gets a gradient
        assert (dk == 0).all() and (dv == 0).all()


def test_padding_rows_of_length_zero():
    kw = {"kv_len": torch.tensor([0, 17], dtype=torch.int32)}
    o, (dq, dk, dv), _ = grad_case("padding", B=2, Nq=30, D=16, kw=kw)
    assert (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    assert (dk[1, :, 17:] == 0).all() and (dv[1, :, 17:] == 0).all()


def test_no_keys_at_all():
    q = torch.randn(1, 2, 5, 16, requires_grad=True)
    k = torch.randn(1, 2, 0, 16, requires_grad=True)
    v = torch.randn(1, 2, 0, 16, requires_grad=True)
    o = module("causal").attention(q, k, v)
    dq, dk, dv = torch.autograd.grad(o.sum(), (q, k, v))
    assert (dq == 0).all() and dk.shape == k.shape and dv.shape == v.shape


# ---------------------------------------------------------------------------
# shapes, dtypes, layouts
# ---------------------------------------------------------------------------

def test_half_precision_gradients():
    grad_case("causal", B=1, Nq=40, D=16, dtype=torch.float16, tol=2e-2)


def test_value_dim_and_padded_head_dim():
    grad_case("causal", B=1, Nq=33, D=24, Dv=16)
    grad_case("sliding_window", B=1, Nq=33, D=20, Dv=20, dtype=torch.float16, tol=2e-2)  # rows padded for TMA


def test_non_contiguous_inputs_and_grad_layouts():
    p = pattern("causal")
    gen = torch.Generator().manual_seed(7)
    qkv = torch.randn(2, 40, 3, 4, 16, generator=gen, requires_grad=True)
    q, k, v = (qkv[:, :, t].transpose(1, 2) for t in range(3))
    g = torch.randn(2, 4, 40, 16, generator=gen)
    o = module("causal").attention(q, k, v)
    (d,) = torch.autograd.grad((o * g).sum(), qkv)
    x = qkv.detach().double().requires_grad_()
    ref = attncc.reference(p, *(x[:, :, t].transpose(1, 2) for t in range(3)))
    (r,) = torch.autograd.grad((ref * g.double()).sum(), x)
    assert rel_err(d, r) < 1e-3


def test_return_lse_with_gradients():
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 30, 16, generator=gen, requires_grad=True) for _ in range(3))
    o, lse = module("sliding_window").attention(q, k, v, return_lse=True, window=5)
    assert o.requires_grad and lse.requires_grad  # contract v1: the LSE is differentiable (tests/test_lse_grad.py)
    o.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    with torch.no_grad():
        o2, lse2 = module("sliding_window").attention(q, k, v, return_lse=True, window=5)
    assert torch.equal(o.detach(), o2) and torch.equal(lse, lse2)


def test_only_some_inputs_require_grad():
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(1, 2, 30, 16, generator=gen)
    k = torch.randn(1, 2, 30, 16, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, 30, 16, generator=gen)
    module("causal").attention(q, k, v).sum().backward()
    assert k.grad is not None and q.grad is None and v.grad is None


# ---------------------------------------------------------------------------
# what is refused
# ---------------------------------------------------------------------------

def test_double_backward_raises():
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=gen, requires_grad=True) for _ in range(3))
    o = module("causal").attention(q, k, v)
    (dq,) = torch.autograd.grad(o.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dq.sum().backward()


# ---------------------------------------------------------------------------
# score transforms, rope variants: specs built here
# ---------------------------------------------------------------------------

EXTRA_SPECS = {
    "bwd_mod": """
[inputs]
head_scale = { dims = ["h"], dtype = "float32" }
[mask]
where = "causal"
[score]
bias = "alibi"
mod = "s * head_scale[h] + 0.1 * tanh(s) + where(i - j > 3, -0.05 * abs(s), 0.0)"
softcap = 20.0
""",
    "bwd_mod_rows": """
[params]
w = 9
[inputs]
row_bias = { dims = ["b", "n"], dtype = "float32" }
[mask]
where = "abs(i - j) <= w"
[score]
bias = "row_bias[b, i] + 0.5 * row_bias[b, j]"
mod = "max(s, -1.0) + sigmoid(s)"
""",
    "bwd_rope_gptj": """
head_dim = [16]
[mask]
where = "j - n_k <= i - n_q"
[rope]
theta = 500.0
style = "gptj"
rotary_dim = 8
""",
    "bwd_row_bias": """
[inputs]
row_bias = { dims = ["b", "n"], dtype = "float32" }
[mask]
where = "causal"
[score]
bias = "row_bias[b, i] * 3.0 + 0.5 * row_bias[b, j] - 0.01 * (i - j)"
""",
}


@pytest.fixture(scope="module")
def extra_modules(tmp_path_factory):
    return build_inline(EXTRA_SPECS, tmp_path_factory.mktemp("bwd_specs"))


@pytest.mark.parametrize("name", sorted(EXTRA_SPECS))
def test_score_transforms_and_rope_variants(extra_modules, name):
    p, mod = extra_modules[name]
    gen = torch.Generator().manual_seed(12)
    kw = {d.name: torch.rand(*[{"b": 2, "h": 4, "n": 80}.get(x, x) for x in d.dims], generator=gen) + 0.5
          for d in p.inputs}
    grad_case(name, p=p, mod=mod, B=2, Nq=45, Nk=45 if name != "bwd_rope_gptj" else 70, D=16, kw=kw)


# ---------------------------------------------------------------------------
# the block lists of the dK/dV kernel (its exactness: tests/test_exact_plans.py)
# ---------------------------------------------------------------------------


def test_forward_and_backward_share_one_classification(monkeypatch):
    """Data-dependent block lists: one launch of the tile-list kernel in the forward makes the
    backward's transposed lists too (no second classification, never the torch path)."""
    mod = module("document")
    launches = []
    real = mod._tile_lists
    monkeypatch.setattr(mod, "_tile_lists", lambda *a: launches.append(a[1:]) or real(*a))
    monkeypatch.setattr(blocks, "_classify", lambda *a, **k: pytest.fail("the torch path ran"))
    gen = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(1, h, 40, 16, generator=gen, requires_grad=True) for h in (4, 2, 2))
    doc = inputs_for(pattern("document"), 1, 4, 40, gen)["doc"]
    o = mod.attention(q, k, v, doc=doc)
    assert len(launches) == 1 and launches[0][-1] is True
    o.sum().backward()
    assert len(launches) == 1 and torch.isfinite(q.grad).all()


def test_transposed_lists_are_the_transpose():
    p = pattern("bigbird")
    call = bind(module("bigbird").SPEC, *(torch.zeros(1, 2, 150, 16) for _ in range(3)))
    fwd, bwd = blocks.block_lists_both(analyze(p).classifier, call, 32, 16, dynamic=False)
    nqb, nkb = math.ceil(150 / 32), math.ceil(150 / 16)
    for kb in range(nkb):
        for cls, (count, index) in ((tiles.FULL, (0, 1)), (tiles.PARTIAL, (2, 3))):
            seen = sorted(bwd[index][0, 0, kb, :bwd[count][0, 0, kb]].tolist())
            want = [qb for qb in range(nqb) if kb in fwd[index][0, 0, qb, :fwd[count][0, 0, qb]].tolist()]
            assert seen == want


def test_a_score_transform_without_derivative_builds_and_refuses_backward(tmp_path):
    path = tmp_path / "nondiff.toml"
    path.write_text('[mask]\nwhere = "causal"\n[score]\nmod = "s % (s + 4.0)"\n')
    (written,) = build([path], tmp_path / "gen")
    spec = importlib.util.spec_from_file_location("_attncc_test_nondiff", written)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    q, k, v = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    o = mod.attention(q, k, v)
    with pytest.raises(NotImplementedError, match="cannot differentiate"):
        o.sum().backward()


@pytest.mark.parametrize("name", ["causal", "sliding_window", "document", "bigbird", "longformer"])
def test_backward_kernels_with_their_own_tile_shapes(monkeypatch, name):
    """The dK/dV and dQ kernels each take their own tile config (on a GPU: narrow query tiles for
    dK/dV, narrow key tiles for dQ), different from the forward's: iteration bounds and block lists
    must follow each kernel's shape."""
    monkeypatch.setenv("ATTNCC_CONFIG", "BLOCK_M=32,BLOCK_N=32,num_warps=4,num_stages=1")
    monkeypatch.setenv("ATTNCC_CONFIG_DKDV", "BLOCK_M=16,BLOCK_N=32,num_warps=4,num_stages=1")
    monkeypatch.setenv("ATTNCC_CONFIG_DQ", "BLOCK_M=32,BLOCK_N=16,num_warps=4,num_stages=1")
    grad_case(name, Nq=150 if name == "bigbird" else 53, B=1)


@pytest.mark.parametrize("param", ["lo", "hi", "full_lo", "full_hi"])
def test_params_named_like_bound_variables(tmp_path, param):
    """A param named like a step of the key-range bounds keeps meaning the param in the forward,
    both backward kernels and decode."""
    text = f'[params]\n{param} = 5\n[mask]\nwhere = "j <= i and i - j < {param} and j - i > -{param} - 2"\n'
    p, mod = build_inline({f"bound_{param}": text}, tmp_path)[f"bound_{param}"]
    kw = {param: 9}
    grad_case(param, p=p, mod=mod, B=1, Nq=41, Nk=37, D=16, k_offset=3, kw=kw)
    gen = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(1, h, 40, 16, generator=gen) for h in (4, 2, 2))
    last = mod.decode(q[:, :, -2:], k, v, kv_len=torch.tensor([40], dtype=torch.int32), **kw)
    assert rel_err(last, attncc.reference(p, q, k, v, **kw)[:, :, -2:]) < 1e-4
