"""Probe 20 of linear attention and of attncc.distributed (probe-lin20): seeded randomized
differential tests against attncc.reference and against a float64 oracle written from the docs
(docs/spec-language.md "Linear attention", docs/context-parallel.md).

Probed (all clean unless listed under "found"):
- linear, one call with the state (``return_state`` and ``initial_state``), ~330 seeded cases: every
  feature map, causal and not, normalize on and off, Nq in {1, 2, 3, 15..17, 31, 33, 47..49, 53},
  non-causal Nk != Nq (Nk = 0 and 1 too), q_offset != k_offset (non-causal), n_q/n_k past the
  call (cosFormer's M), GQA/MQA, k, v of batch 1 beside q of batch 2, [B, N, H, D] and permuted
  views, D and Dv of 1, 2, 3, 5, 17, 32, performer features 1, 7, 17, 33, float16 and bfloat16
  inputs, and o, S, z, dq, dk, dv, dS0, dz0 against a float64 oracle of the state form (a
  gradient's tolerance scaled by the oracle's own float32 conditioning: a row whose dq is ~0 in
  exact arithmetic, N = 1 or a D = 1 relu row, is judged against its rounding, not against 0);
- step() decoding after a prefill with the carried state, 40 cases: every causal map, GQA,
  k, v of batch 1, [B, H, D] and [B, H, 1, D] forms mixed per step, n= given or not, half dtypes;
- attncc.distributed, one process with several chunks (the chunk pairs and their merge), ~300
  cases: every shipped softmax spec, random chunk bounds (1-row chunks), GQA, batch-1 k and v,
  Dv != D, params moved off their defaults, return_lse with the LSE in the loss, dq, dk, dv;
- attncc.distributed on 3 gloo processes, 60 cases: random custom layouts (empty chunks, a rank
  owning several chunks out of order), ring / allgather / ulysses / auto, causal, window, documents,
  prefix-LM, chunked, ALiBi, sinks, padding, GQA 6/3 and 3/1, batch 2, bfloat16, LSE in the loss.

Found:
- attncc.reference, linear and causal: a NaN or inf in a key (or a NaN value) made EVERY row NaN,
  rows before it too (the causal mask multiplied the quadratic form, ``NaN * 0 = NaN``, and
  ``a @ v`` met a NaN ``v`` row with weight 0), and all of dq. The kernels, and the reference itself
  run as two calls carrying the state, leave the rows before it finite: the reference disagreed
  with itself. It now masks each pair's factors before they meet when an input is non-finite, as
  its softmax path does.
"""
from __future__ import annotations

import pytest
import torch

import attncc
from cases import module, pattern


def _bad_rows(t):
    return (~torch.isfinite(t)).any(-1).flatten(0, 1).any(0).nonzero().flatten().tolist()


@pytest.mark.parametrize("what", ["nan_key", "inf_key", "nan_value"])
def test_reference_linear_causal_keeps_rows_before_a_non_finite_key(what):
    """Was: every row NaN in o and dq (NaN * 0 from the causal mask); the kernels and two calls
    carrying the state keep rows 0..34 finite."""
    p = pattern("linear_elu")
    g = torch.Generator().manual_seed(0)
    n, bad = 40, 35
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for _ in range(3))
    (v if what == "nan_value" else k)[0, 1, bad, 0] = float("inf") if what == "inf_key" else float("nan")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = attncc.reference(p, *leaves)
    assert _bad_rows(o) == list(range(bad, n))
    # rows before the bad key equal the reference of the finite prefix alone
    prefix = attncc.reference(p, q[:, :, :bad], k[:, :, :bad], v[:, :, :bad])
    assert torch.allclose(o[:, :, :bad].detach(), prefix, rtol=1e-12, atol=1e-12)
    o.sum().backward()
    assert _bad_rows(leaves[0].grad) == list(range(bad, n))  # dq of the rows that attend to it
    # the kernel agrees on the rows after it, and on the finite ones; a NaN value may also reach the
    # rows of its own chunk (16 rows under the interpreter: 32..34), the tile allowance of the docs
    ko = module("linear_elu").attention(*(t.float() for t in (q, k, v)))
    assert _bad_rows(ko) == list(range(32 if what == "nan_value" else bad, n))
    assert torch.allclose(ko[:, :, :32].double(), prefix[:, :, :32], rtol=1e-4, atol=1e-5)
