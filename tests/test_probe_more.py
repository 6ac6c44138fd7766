"""An outside tester's second probe (probe 10), on ground the earlier probes did not reach: packed
variable-length calls of random specs, linear attention carried over chunks and decoded by step(),
`attncc explain --json` at odd tile shapes, and the transformers integration with random padding.
Seeded random cases against attncc.reference (float64) or a brute-force oracle, and the defects the
probe found, each with its regression test.

Bigger sweeps of the same checks: ``python tests/test_probe_more.py varlen|linear|explain 0 200``.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import random
import sys
from dataclasses import replace

import pytest
import torch

import attncc
from cases import module, rel_err

# ---------------------------------------------------------------------------------------------
# step() has no backward: it says so instead of returning outputs that silently carry no gradient
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wants_grad", ["q", "k", "v", "state"])
def test_step_refuses_inputs_that_want_a_gradient(wants_grad):
    """step() ran its kernel under no_grad whatever its inputs: q.requires_grad gave an o with
    requires_grad False, so a model trained through step() silently got no gradient from it
    (decode() raises NotImplementedError for the same case)."""
    mod = module("linear_elu")
    q, k, v = (torch.randn(1, 2, 16) for _ in range(3))
    state = (torch.rand(1, 2, 16, 16), torch.rand(1, 2, 16))
    if wants_grad == "state":
        state = (state[0].requires_grad_(), state[1])
    else:
        {"q": q, "k": k, "v": v}[wants_grad].requires_grad_()
    with pytest.raises(NotImplementedError, match=r"linear_elu\.step is for inference and has no backward"):
        mod.step(q, k, v, state, position=3)
    with torch.no_grad():  # and runs without autograd
        o, (S, z) = mod.step(q, k, v, state, position=3)
    assert o.shape == (1, 2, 16) and S.shape == (1, 2, 16, 16)


def test_step_names_its_own_state_argument():
    """A bad state passed to step() was reported as attention()'s initial_state."""
    q = torch.randn(1, 2, 16)
    with pytest.raises(ValueError, match=r"linear_elu\.step: state S must have shape \[1, 2, 16, 16\]"):
        module("linear_elu").step(q, q, q, (torch.zeros(1, 2, 15, 16), torch.zeros(1, 2, 15)))
