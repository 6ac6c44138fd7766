"""Gradients through the returned LSE (contract v1, "The LSE is differentiable"): the kernels'
vector-Jacobian products of (o, lse) against float64 autograd of attncc.reference, and partial
attentions merged through their LSEs training exactly like one call."""
from __future__ import annotations

import math

import pytest
import torch

import attncc
from cases import SMALL_PARAMS, SOFTMAX, build_inline, module, pattern, rel_err, vjp_case

@pytest.mark.parametrize("name", SOFTMAX)
def test_every_spec_differentiates_o_and_lse(name):
    vjp_case(name, Nq=150 if name == "bigbird" else 37, Nk=150 if name == "bigbird" else 45, seed=1)


@pytest.mark.parametrize("name", ["causal", "t5_bias", "alibi_learned"])
def test_a_loss_of_the_lse_alone(name):
    """Only the LSE reaches the loss (dO is None): dv is 0, dq and dk come from dlse alone."""
    _, (dq, dk, dv, *_) = vjp_case(name, use_o=False, seed=2)
    assert (dv == 0).all() and dq.abs().sum() > 0


def test_rows_without_keys_take_no_gradient_from_the_lse():
    """Keys after every query (causal, k_offset = 50): every row is empty; a cotangent on its
    LSE (even NaN or inf, as a merge of two empty rows can give) has no score to reach."""
    for cot in (torch.randn(1, 4, 20), torch.full((1, 4, 20), math.nan), torch.full((1, 4, 20), math.inf)):
        lse, (dq, dk, dv) = vjp_case("causal", Nq=20, Nk=33, k_offset=50, lse_cotangent=cot, use_o=cot.isfinite().all())
        assert (lse == -math.inf).all()
        assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


def test_gradients_of_gqa_offsets_and_half_precision():
    vjp_case("sliding_window", Nq=21, Nk=61, q_offset=40, seed=3)
    vjp_case("cross_causal", Nq=30, Nk=50, n_q=40, seed=4)
    vjp_case("causal", Nq=40, dtype=torch.float16, seed=5)


ROW_TERM_SPECS = {
    # the row terms leave the key loop (they cancel in the softmax) and live in the LSE only
    "lse_row_bias": """
[inputs]
row_bias = { dims = ["b", "n"], dtype = "float32", grad = true }
col_bias = { dims = ["b", "n"], dtype = "float32", grad = true }
[mask]
where = "causal"
[score]
bias = "2.0 * row_bias[b, i] + col_bias[b, j]"
""",
    "lse_row_mod": """
[inputs]
head_gain = { dims = ["h"], dtype = "float32", grad = true }
row_bias = { dims = ["b", "n"], dtype = "float32", grad = true }
[mask]
where = "abs(i - j) <= 7"
[score]
mod = "s * head_gain[h] + tanh(row_bias[b, i]) + 0.5 * head_gain[h]"
""",
}


@pytest.fixture(scope="module")
def row_term_modules(tmp_path_factory):
    return build_inline(ROW_TERM_SPECS, tmp_path_factory.mktemp("lse_rows"))


@pytest.mark.parametrize("name", sorted(ROW_TERM_SPECS))
def test_row_terms_folded_into_the_lse_get_its_gradient(row_term_modules, name):
    """Query-only terms of the bias or the mod are added to the LSE, not to the scores: the
    gradients of their learned inputs come from dlse alone."""
    p, mod = row_term_modules[name]
    gen = torch.Generator().manual_seed(6)
    kw = {d.name: torch.rand(*[{"b": 2, "h": 4, "n": 45}.get(x, x) for x in d.dims], generator=gen) + 0.5
          for d in p.inputs}
    vjp_case(name, p=p, mod=mod, B=2, Nq=45, kw=kw, seed=7)
    vjp_case(name, p=p, mod=mod, B=2, Nq=45, kw=kw, seed=8, use_o=False)


def test_dropout_keeps_the_lse_gradient():
    """With dropout the LSE is the undropped one: its gradient adds dlse * p with p undropped."""
    name = "causal_dropout"
    p, mod = pattern(name), module(name)
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, h, 40, 16, generator=gen) for h in (4, 2, 2))
    g, gl = torch.randn(1, 4, 40, 16, generator=gen), torch.randn(1, 4, 40, generator=gen)
    keep = mod.dropout_keep_mask(q, k, v, seed=5, dropout_p=0.3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = mod.attention(*leaves, return_lse=True, seed=5, dropout_p=0.3)
    got = torch.autograd.grad([o, lse], leaves, [g, gl])
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    o_ref, lse_ref = attncc.reference(p, *ref_leaves, return_lse=True, keep_mask=keep, dropout_p=0.3)
    want = torch.autograd.grad([o_ref, lse_ref], ref_leaves, [g.double(), gl.double()])
    for x, r in zip(got, want):
        assert rel_err(x, r) < 1e-3


def test_varlen_lse_gradient():
    """Packed sequences: the LSE [1, H, total] has a gradient per row of each sequence, and rows
    outside every sequence (lse = -inf) take none."""
    name = "sliding_window"
    p, mod = pattern(name), module(name)
    gen = torch.Generator().manual_seed(10)
    lengths = [13, 30, 1]
    total = sum(lengths) + 4  # 4 rows past the last sequence
    cu = torch.tensor([0, 13, 43, 44], dtype=torch.int32)
    q, k, v = (torch.randn(1, h, total, 16, generator=gen) for h in (4, 2, 2))
    g, gl = torch.randn(1, 4, total, 16, generator=gen), torch.randn(1, 4, total, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = mod.attention(*leaves, return_lse=True, cu_seqlens_q=cu, cu_seqlens_k=cu, window=5)
    got = torch.autograd.grad([o, lse], leaves, [g, gl])
    assert (lse[..., 44:] == -math.inf).all() and (got[0][..., 44:, :] == 0).all()
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        ref_leaves = [t[:, :, a:b].double().requires_grad_() for t in (q, k, v)]
        o_ref, lse_ref = attncc.reference(p, *ref_leaves, return_lse=True, window=5)
        want = torch.autograd.grad([o_ref, lse_ref], ref_leaves, [g[:, :, a:b].double(), gl[:, :, a:b].double()])
        for x, r in zip(got, want):
            assert rel_err(x[:, :, a:b], r) < 1e-3, s


# ---------------------------------------------------------------------------
# merging partial attentions through their LSEs, in training
# ---------------------------------------------------------------------------

def merge(parts):
    """``(o, lse)`` of the union of disjoint key sets from each set's ``(o, lse)``: the stable
    log-sum-exp form (rows that no part reaches stay o = 0, lse = -inf)."""
    lses = torch.stack([lse for _, lse in parts])
    top = lses.max(0).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(lses - top)  # [parts, B, H, N]
    total = weights.sum(0)
    lse = top + torch.log(total)
    o = sum(w[..., None] * o for w, (o, _) in zip(weights, parts)) / torch.where(total > 0, total, 1.0)[..., None]
    return o, lse


@pytest.mark.parametrize("name", ["causal", "sliding_window", "alibi"])
def test_key_chunks_merged_train_like_one_call(name):
    """Two key chunks of one sequence (k_offset), merged through their LSEs: o, lse and every
    gradient equal those of one call over all keys. Before the LSE had a gradient, dq, dk and dv
    of the merge were 30-55% off."""
    mod = module(name)
    kw = SMALL_PARAMS.get(name, {})
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, h, 50, 16, generator=gen) for h in (4, 2, 2))
    g, gl = torch.randn(1, 4, 50, 16, generator=gen), torch.randn(1, 4, 50, generator=gen)

    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    o1, lse1 = mod.attention(*whole, return_lse=True, **kw)
    want = torch.autograd.grad([o1, lse1], whole, [g, gl])

    split = [t.clone().requires_grad_() for t in (q, k, v)]
    sq, sk, sv = split
    cut = 19
    parts = [mod.attention(sq, sk[:, :, :cut], sv[:, :, :cut], return_lse=True, n_k=50, **kw),
             mod.attention(sq, sk[:, :, cut:], sv[:, :, cut:], return_lse=True, k_offset=cut, **kw)]
    o2, lse2 = merge(parts)
    got = torch.autograd.grad([o2, lse2], split, [g, gl])
    assert rel_err(o2.detach(), o1.detach()) < 1e-5 and rel_err(lse2.detach(), lse1.detach()) < 1e-5
    for label, x, r in zip("qkv", got, want):
        assert rel_err(x, r) < 1e-4, (label, rel_err(x, r))


def test_the_merge_example_trains_like_one_call(tmp_path, monkeypatch):
    """examples/lse_merge.py: attention sinks + a sliding window as two merged calls train like one
    (it exits with an error when their gradients differ)."""
    import runpy

    from cases import ROOT

    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    example = runpy.run_path(str(ROOT / "examples" / "lse_merge.py"), run_name="lse_merge")
    example["main"](["--steps", "2", "--seq", "24"])
