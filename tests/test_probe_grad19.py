"""Probe 19: [inputs] (learned bias tables, per-head scales, scalar temperatures, document ids,
per-batch lengths, key padding flags, additive float masks) in masks, biases and score transforms,
forward and every gradient (dq, dk, dv and each float input that requires grad) against
attncc.reference's float64 autograd (tests/probe_grad19.py is the seeded generator).

Probed: random specs mixing a mask (none, static, or reading an int / bool input, never true) with
bias and ``mod`` expressions reading 1-3 float inputs indexed by expressions of i, j, h, b (clamped
and abs distances, floor-divided buckets kept in range by min / max, ``bucket()``, ``(i + 2j) % 8``,
guarded shifted reads, fixed dims of size 1, [n, n] tables, 0-d temperatures, products of two
tables), inputs passed contiguous, transposed, every other element, expanded (stride 0) and at a
storage offset, in float16 / bfloat16 / float32 / float64 whatever the declared dtype, learned
inputs requiring grad or not, q / k / v partly requiring grad, GQA / MQA, Nq != Nk, odd sizes from
1, offsets, float32 / bfloat16 / float16 q, k, v, losses of o and of the LSE. 420 seeded cases
(seeds 0-39, 100-399, 400-479): clean but for the defect below (the other flags were tolerance: a
gradient that is 0 in exact arithmetic, a bfloat16 leaf's own gradient rounding). attncc.reference's own gradients were checked by
torch.autograd.gradcheck in float64 on 60 of the random specs (their float inputs declared
float64): clean. Non-finite values: an additive 0 / -inf float mask (HF style, learned or not,
whole batch rows -inf), -inf in a learned table's entry and in a row-constant term, ``log`` of a
table with zeros, ``w[h] * pad[b, j]`` with ``pad = -inf`` and ``w`` of either sign, ``+inf`` from
``where(..., inf, s)``: as docs/spec-language.md §1 says (``-inf`` removes the pair, a row without
keys gives o = 0, LSE -inf and zero, finite gradients; ``+inf`` / NaN reach their rows).

Found and fixed:
- A float input declared with another float type than the tensor passed (a float32 learned table
  declared ``bfloat16``: mixed-precision master weights) got its gradient rounded to the declared
  type: autograd differentiated the call's converted copy (``t.to(bfloat16)``), whose backward
  rounds the kernels' float32 gradient to bfloat16 before it reaches the float32 table. Gradients
  were 2e-3 off (relative; 2e-7 with the fix), and the gradient of a table shared by expansion
  summed those roundings (2.3x the size of a small true gradient in the fuzzer's seed 146), where
  the doc promises float32 accumulation and attncc.reference gives the full-precision gradient.
  Now autograd differentiates the tensor as passed (``Call.given_inputs``, ``Call.grad_sources``),
  eager and under torch.compile, with saved-tensor hooks too.

Found here, fixed in tests/test_probe_nan19.py: with a ``+inf`` / NaN score, the kernels' NaN also
reached the gradients of table entries that no weighted pair reads (``t[i, j]`` at ``j >= Nk``,
lanes past the last key of the NaN row's tile, masked pairs, pairs of score -inf).
"""
from __future__ import annotations

import math

import pytest
import torch

import attncc
from probe_grad19 import run_case

F64 = torch.float64

MIXED = '''[inputs]
tab = { dims = ["h", 9], dtype = "bfloat16", grad = true }
[mask]
where = "j <= i"
[score]
bias = "tab[h, min(i - j, 8)]"
'''


def _qkv(B=1, H=2, N=21, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g) for _ in range(4)], g


def _table_grad(fn, base, do):
    tab = base.clone().requires_grad_()
    (fn(tab) * do).sum().backward()
    return tab.grad


@pytest.mark.parametrize("how", ["eager", "expanded", "saved_hooks", "checkpoint", "float64", "compiled"])
def test_mixed_precision_table_gets_float32_gradient(how):
    """A float32 table declared bfloat16: the forward reads its bfloat16 values, its gradient is the
    kernels' float32 sum (was rounded to bfloat16: 2e-3 relative error; 2.3x for a shared table)."""
    m, p = attncc.compile(MIXED), attncc.parse_spec(MIXED)
    (q, k, v, do), g = _qkv()
    base = torch.randn(1 if how == "expanded" else 2, 9, generator=g)
    view = (lambda t: t.expand(2, 9)) if how == "expanded" else (lambda t: t)
    rt = base.double().requires_grad_()
    (attncc.reference(p, q.double(), k.double(), v.double(), tab=view(rt)) * do.double()).sum().backward()
    call = lambda t: m.attention(q, k, v, tab=view(t))  # noqa: E731
    if how == "saved_hooks":
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            got = _table_grad(call, base, do)
    elif how == "checkpoint":
        got = _table_grad(lambda t: torch.utils.checkpoint.checkpoint(call, t, use_reentrant=False), base, do)
    elif how == "float64":
        got = _table_grad(lambda t: call(t.double()), base, do)
    elif how == "compiled":
        got = _table_grad(torch.compile(call, backend="eager", fullgraph=True), base, do)
    else:
        got = _table_grad(call, base, do)
    assert got.dtype == torch.float32
    err = float((got.double() - rt.grad).norm() / rt.grad.norm())
    assert err < 1e-5, err


def test_mixed_precision_table_changed_in_place_raises():
    """The passed table is what autograd saves: changing it before the backward is autograd's error
    (docs/spec-language.md §6), as for a table of the declared type."""
    m = attncc.compile(MIXED)
    (q, k, v, _), g = _qkv()
    tab = torch.randn(2, 9, generator=g).requires_grad_()
    o = m.attention(q, k, v, tab=tab)
    with torch.no_grad():
        tab.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        o.sum().backward()


# --- non-finite scores from inputs ----------------------------------------------------------

def _both(text, tables, *, B=2, H=2, Nq=9, Nk=11, D=8, learned=(), seed=0):
    m, p = attncc.compile(text), attncc.parse_spec(text)
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(B, H, n, D, generator=g) for n in (Nq, Nk, Nk)]
    out = []
    for fn, cast in ((m.attention, lambda t: t.float()), (lambda *a, **kw: attncc.reference(p, *a, **kw), lambda t: t.double())):
        leaves = [cast(t).requires_grad_() for t in qkv]
        kw = {n: cast(t).requires_grad_(n in learned) if t.is_floating_point() else t for n, t in tables.items()}
        o, lse = fn(*leaves, return_lse=True, **kw)
        loss = o.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()
        grads = torch.autograd.grad(loss, leaves + [kw[n] for n in learned])
        out.append((o.detach().double(), lse.detach().double(), [x.double() for x in grads]))
    return out


def _assert_same(got, want, atol=2e-5):
    for x, r in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        assert torch.equal(torch.isfinite(x), torch.isfinite(r))
        assert torch.equal(x[~torch.isfinite(x)], r[~torch.isfinite(r)])
        fin = torch.isfinite(r)
        torch.testing.assert_close(x[fin], r[fin], rtol=0, atol=atol)


def test_learned_weight_times_minus_inf_padding():
    """``s + w[h] * pad[b, j]``, pad 0 / -inf, a whole batch row -inf: those rows o = 0, LSE -inf,
    every gradient finite (w's gets no 0 * inf from the removed pairs)."""
    g = torch.Generator().manual_seed(1)
    pad = torch.where(torch.rand(2, 11, generator=g) < 0.3, -math.inf, 0.0)
    pad[1] = -math.inf
    text = '[inputs]\nw = { dims = ["h"], grad = true }\npad = { dims = ["b", "n"], dtype = "bfloat16" }\n' \
           '[score]\nmod = "s * 0.9 + w[h] * pad[b, j]"\nsoftcap = 5.0\n'
    got, want = _both(text, dict(w=torch.tensor([0.5, 1.5]), pad=pad), learned=("w",))
    _assert_same(got, want)
    assert (got[0][1] == 0).all() and (got[1][1] == -math.inf).all()
    assert all(torch.isfinite(x).all() for x in got[2])


def test_log_of_table_with_zeros_and_row_term_minus_inf():
    """``log(t[b, j])`` with zeros (pairs removed; d log / dt = inf there must not reach t's
    gradient) and a learned row term ``r[b, i]`` of -inf (that row has no key)."""
    g = torch.Generator().manual_seed(2)
    t = torch.rand(2, 11, generator=g) + 0.1
    t[0, ::3] = 0.0
    r = torch.randn(2, 11, generator=g)
    r[1, 4] = -math.inf
    text = '[inputs]\nt = { dims = ["b", "n"], grad = true }\nr = { dims = ["b", "n"], grad = true }\n' \
           '[mask]\nwhere = "j <= i + 2"\n[score]\nbias = "log(t[b, j]) + 2.0 * r[b, i]"\n'
    got, want = _both(text, dict(t=t, r=r), learned=("t", "r"))
    _assert_same(got, want)
    assert all(torch.isfinite(x).all() for x in got[2])


# --- seeded random cases of the fuzzer that pass (regressions) ---------------------------------

@pytest.mark.parametrize("seed", [3, 10, 22, 146, 160])
def test_random_input_specs(seed):
    problems, desc = run_case(seed)
    assert not problems, (problems, desc)
