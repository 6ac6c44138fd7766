"""RoPE far into a sequence: angles are float64 products reduced to [-pi, pi] before float32
sin / cos (codegen/helpers.py ``_rope``); in float32 they were off by ~0.06 rad at position 1e6
and by radians at 2**24. Forward and backward against attncc.reference, below WIDE."""
from __future__ import annotations

import pytest

from cases import module, pattern
from test_big_positions import _check, _qkv


@pytest.mark.parametrize("offset", [10**6, 2**24 - 40, 2**24 + 3])
def test_rope_far_into_a_sequence(offset):
    q, k, v = _qkv(40, 48, seed=offset % 101)
    _check(pattern("rope_causal"), module("rope_causal"), q, k, v, q_offset=offset + 8, k_offset=offset)


@pytest.mark.parametrize("q_offset, k_offset", [(10**6, 0), (123456789, 10**6), (2**24 + 3, 17)])
def test_rope_with_queries_and_keys_far_apart(q_offset, k_offset):
    """The float64 constants of the angle's reduction are float64 under the interpreter too: Triton's
    interpreter made a Python float beside a float64 tensor a float32 constant, and 2 pi off by 1.7e-7
    per turn moved o by 5e-3 at a gap of 1e6 and by ~1 at 1.2e8 (found by a probe; equal offsets
    cancel it)."""
    q, k, v = _qkv(40, 48, seed=q_offset % 97)
    _check(pattern("rope_causal"), module("rope_causal"), q, k, v, q_offset=q_offset, k_offset=k_offset)
