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


# ---------------------------------------------------------------------------------------------
# transformers: generation with a static (compileable) cache
# ---------------------------------------------------------------------------------------------


def test_generation_with_a_static_cache_equals_sdpa(tmp_path, monkeypatch):
    """generate(cache_implementation="static") builds the masks once (create_masks_for_generate) and
    passes them to the model as its attention_mask; the model's mask code then asked the KeyMask for
    .ndim: AttributeError: 'KeyMask' object has no attribute 'ndim' (Gemma 2's per-layer dict of masks
    went through). The KeyMask is now taken again, its padding flags kept."""
    transformers = pytest.importorskip("transformers")
    from attncc.integrations import transformers as attncc_hf

    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    attncc_hf.register("attncc_probe10")
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=100, max_position_embeddings=64, pad_token_id=0,
                  bos_token_id=1, eos_token_id=99, initializer_range=0.2)
    config = transformers.MistralConfig(**common, sliding_window=5)  # llama failed the same way
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    ours = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="attncc_probe10")
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(2, 99, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    ids[mask == 0] = 0
    args = dict(attention_mask=mask, max_new_tokens=2, do_sample=False, cache_implementation="static")
    assert torch.equal(ours.generate(ids, **args), ref.generate(ids, **args))
