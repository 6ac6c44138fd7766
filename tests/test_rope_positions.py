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
