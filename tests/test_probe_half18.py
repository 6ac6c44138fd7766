"""Probe 18 (numerics in float16 and bfloat16, forward and backward): each test is a case that was
wrong, against attncc.reference in float64 on the same (rounded) half-precision inputs."""
from __future__ import annotations

import math

import pytest
import torch

import attncc
from attncc.spec import parse_spec
from cases import rel_err


def _compiled(text):
    return attncc.compile(text), parse_spec(text)


def _qkv(n, dtype, seed, H=2, D=16):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, n, D, generator=gen).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("declared", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("given", [torch.float64, torch.float32, torch.float16])
def test_an_infinite_entry_of_an_input_given_at_another_float_type(declared, given):
    """attncc.reference took an input's values at its declared type as ``t + (t.to(declared) - t)``
    (rounded values, the given tensor's gradient): ``-inf + (-inf - -inf)`` is NaN, so a padding
    bias of -inf given at another float type than declared (float64 for float32, float32 for
    float16: the usual case) made every output and gradient of the reference NaN where the kernels
    removed the pairs. Found by a probe (additive masks written as a bias table)."""
    text = f'[inputs]\npad = {{ dims = ["b", "n"], dtype = "{declared}" }}\n[score]\nbias = "pad[b, j]"\n'
    mod, p = _compiled(text)
    q, k, v = _qkv(40, torch.float16, 1)
    pad = torch.zeros(1, 40, dtype=given)
    pad[0, 25:] = -math.inf
    pad[0, 3] = -1e9 if given != torch.float16 else -6e4  # -inf at float16
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attncc.reference(p, *leaves, pad=pad, return_lse=True)
    assert torch.isfinite(ref).all() and torch.isfinite(ref_lse).all()
    want = attncc.reference(p, *leaves, pad=pad.to(getattr(torch, declared)))
    assert torch.equal(ref, want)
    o = mod.attention(q, k, v, pad=pad)
    assert rel_err(o, ref) < 2e-3
    do = torch.randn_like(ref)
    for g in torch.autograd.grad(ref, leaves, do):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("score", ["softcap = 1e6", 'mod = "1e5 * tanh(s * 1e-5)"', "softcap = 1e4"])
def test_tanh_of_a_small_argument_keeps_its_relative_precision(score, dtype):
    """The kernels' tanh (off the GPU's tanh.approx: float32 inputs, the interpreter) was
    1 - 2 / (e^(2x) + 1), whose error near 0 is absolute (~2^-24): a softcap of 1e6 (written as
    "effectively no cap") moved every score by ~0.06, o 3.5e-2 and the LSE 4e-3 off in float16
    (a plain float32 softmax: 2e-4 and 4e-8). Found by a probe (huge caps)."""
    text = f'[mask]\nwhere = "j <= i"\n[score]\n{score}\n'
    mod, p = _compiled(text)
    q, k, v = (t.requires_grad_() for t in _qkv(48, dtype, 2))
    o, lse = mod.attention(q, k, v, return_lse=True)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attncc.reference(p, *leaves, return_lse=True)
    tol = 1e-3 if dtype == torch.float16 else 1e-6
    assert rel_err(o, ref) < tol and rel_err(lse, ref_lse) < 1e-6, (rel_err(o, ref), rel_err(lse, ref_lse))
    do = torch.randn_like(ref)
    for g, want in zip(torch.autograd.grad(o, (q, k, v), do.to(dtype)), torch.autograd.grad(ref, leaves, do)):
        assert rel_err(g, want) < 2 * tol
