"""Probe of linear attention (probe16-linear): float16 operands of the kernels' dots that overflow.

Found by seeded random loops against attncc.reference (float64): the generated kernels cast
float32 tiles to float16 for their dots, and a tile past 65504 became inf (then inf * 0 = NaN):
- forward, causal: the in-chunk quadratic form phi(q_i).phi(k_j) (elu+1 on entries ~1e3 gave NaN rows);
- backward, normalized: phi(q_i) / den_i where den_i is the eps of a row whose features meet no
  key (relu, seeded random q, k of N = 65): NaN in dk and dv while the reference's are finite.
"""
from __future__ import annotations

import pytest
import torch

import attncc
from test_linear import linear_module


def test_float16_forward_with_large_inputs_is_finite_and_right(tmp_path_factory):
    p, mod = linear_module(tmp_path_factory, "elu+1")
    g = torch.Generator().manual_seed(1)
    q, k = ((torch.randn(1, 1, 17, 16, generator=g) * 1e3).half() for _ in range(2))
    v = torch.randn(1, 1, 17, 16, generator=g).half()
    o = mod.attention(q, k, v)
    ref = attncc.reference(p, q.double(), k.double(), v.double())
    assert torch.isfinite(o).all()  # was NaN in 13 of 17 rows: phi(q).phi(k) ~ 1.6e7 cast to float16
    assert ((o.double() - ref).norm() / ref.norm()).item() < 5e-3


def test_float16_backward_where_a_relu_row_meets_no_key(tmp_path_factory):
    p, mod = linear_module(tmp_path_factory, "relu")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 65, 8, generator=g)
    k = torch.randn(2, 2, 65, 8, generator=g)
    v = torch.randn(2, 2, 65, 8, generator=g)
    # some rows' relu features meet no key's: den_i = eps, phi(q_i) / den_i ~ 1e6
    den = (torch.relu(q) @ torch.relu(k).repeat_interleave(3, 1).transpose(-1, -2)).tril().sum(-1)
    assert (den == 0).any()
    do = torch.randn(2, 6, 65, 8, generator=g)
    qh, kh, vh = (t.half().requires_grad_() for t in (q, k, v))
    mod.attention(qh, kh, vh).backward(do.half())
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    attncc.reference(p, qd, kd, vd).backward(do.double())
    for t, r in ((qh, qd), (kh, kd), (vh, vd)):
        assert torch.isfinite(t.grad).all()  # dk, dv had NaN
        assert ((t.grad.double() - r.grad).norm() / r.grad.norm()).item() < 2e-2


def test_step_errors_name_step_arguments_and_forms_mix(tmp_path_factory):
    # step(position=-1) said "attention: q_offset must be >= 0"; a q [B, Hq, D] beside k, v [B, Hkv, 1, D]
    # (each form documented) said "attention: k must have 4 dims, got shape (1, 2, 1, 1, 16)"
    p, mod = linear_module(tmp_path_factory, "elu+1")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 16, generator=g) for _ in range(3))
    with pytest.raises(ValueError, match=r"step: position must be >= 0, got -1"):
        mod.step(q, k, v, None, position=-1)
    with pytest.raises(TypeError, match=r"step: position must be an int, got bool"):
        mod.step(q, k, v, None, position=True)
    with pytest.raises(ValueError, match=r"step: n must be >= 4, got 2"):
        mod.step(q, k, v, None, position=3, n=2)
    o, state = mod.step(q, k.unsqueeze(2), v.unsqueeze(2), None)
    o3, state3 = mod.step(q, k, v, None)
    assert o.shape == (1, 2, 16) and torch.equal(o, o3) and torch.equal(state[0], state3[0])


def test_performer_seed_past_63_bits_is_refused_not_aliased():
    # torch.Generator keeps 63 bits: seed=2**63 drew seed 0's projection (same output, no error),
    # and seed=2**64 raised "Overflow when unpacking long long"
    from attncc.runtime.feature_maps import performer_projection
    from cases import module

    mod = module("performer")
    q = torch.randn(1, 1, 3, 16, generator=torch.Generator().manual_seed(3))
    for seed in (2**63, 2**63 + 5, 2**64):
        with pytest.raises(ValueError, match=r"attention: seed must be below 2\*\*63"):
            mod.attention(q, q, q, seed=seed)
    with pytest.raises(ValueError, match=r"step: seed must be below 2\*\*63"):
        mod.step(q[:, :, 0], q[:, :, 0], q[:, :, 0], None, seed=2**63)
    with pytest.raises(ValueError, match=r"0 <= seed < 2\*\*63"):
        performer_projection(8, 4, 2**63)
    with pytest.raises(ValueError, match=r"0 <= seed < 2\*\*63"):
        performer_projection(8, 4, -1)
    assert mod.attention(q, q, q, seed=2**63 - 1).isfinite().all()


def test_double_backward_raises_instead_of_dropping_the_penalty(tmp_path_factory):
    # a gradient penalty, o.sum() + |dq|^2 with create_graph=True, backpropagated o.sum() only: the
    # linear backward's gradients were constants (no graph), silently; softmax's raise (docs §8)
    p, mod = linear_module(tmp_path_factory, "elu+1")
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 1, 5, 16, generator=g).requires_grad_() for _ in range(3))
    o = mod.attention(q, k, v)
    dq, = torch.autograd.grad(o.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        (o.sum() + (dq**2).sum()).backward()
