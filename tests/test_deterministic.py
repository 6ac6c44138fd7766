"""Under torch.use_deterministic_algorithms(True) a backward whose result depends on the order of
float additions says so, as torch's own ops do: a RuntimeError, or a warning with warn_only=True.
attncc's tl backward writes dQ, dK and dV once per element (deterministic); the gradients of
learned [inputs] (grad = true) are summed across programs with fp32 atomics, and the Gluon fused
backward adds dQ partials by TMA reduce-adds: those two are not."""
from __future__ import annotations

import warnings

import pytest
import torch

from cases import module


@pytest.fixture
def deterministic():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield lambda warn_only=False: torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def leaves(seed=0, slopes_grad=True):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 19, 16, generator=gen, requires_grad=True) for _ in range(3))
    slopes = torch.rand(2, generator=gen).requires_grad_(slopes_grad)
    return q, k, v, slopes


def backward(q, k, v, slopes):
    module("alibi_learned").attention(q, k, v, slopes=slopes).sum().backward()


def test_learned_input_grads_raise_in_deterministic_mode(deterministic):
    deterministic()
    with pytest.raises(RuntimeError, match=r"alibi_learned.attention's backward does not have a deterministic "
                                           r"implementation \(the gradients of its \[inputs\] \(slopes\)"):
        backward(*leaves())


def test_warn_only_warns_and_gives_the_gradients(deterministic):
    args = leaves(1)
    backward(*args)
    want = [t.grad.clone() for t in args]
    for t in args:
        t.grad = None
    deterministic(warn_only=True)
    with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
        backward(*args)
    for t, w in zip(args, want):
        assert torch.allclose(t.grad, w, atol=1e-6)


def test_no_alert_where_the_backward_is_deterministic(deterministic):
    deterministic()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*deterministic")
        backward(*leaves(2, slopes_grad=False))  # no learned-input gradient: no atomics
        q, k, v, _ = leaves(3)
        module("causal").attention(q, k, v).sum().backward()
    assert q.grad.abs().max() > 0


def test_gluon_fused_backward_raises_in_deterministic_mode(deterministic, monkeypatch):
    from attncc import runtime as rt
    from attncc.runtime import backend

    q, k, v, _ = leaves(4)
    call = rt.bind(module("causal").SPEC, q.detach(), k.detach(), v.detach())
    o = torch.zeros_like(q)
    deterministic()
    monkeypatch.setenv("ATTNCC_GLUON_BWD", "fused")
    with pytest.raises(RuntimeError, match="ATTNCC_GLUON_BWD=fused does not have a deterministic implementation"):
        backend.gluon_backward(call, "causal", o, torch.zeros(1, 2, 19), o)
