"""The fuzzer's third layer (tests/fuzz_specs.py --extend3): what it draws, a few of its seeds, and
the bugs it found (session 29)."""
from __future__ import annotations

import collections

import pytest

import fuzz_specs as F


def test_extend3_leaves_the_other_layers_alone():
    # seeds drawn without --extend3 are what they were: the layer's draws come from extend3_rng only
    for seed in range(30):
        draft, plan = F.draw_case(seed, extend=None, extend2=None)
        assert plan.environment == ()
        assert F.draw_case(seed, extend=None, extend2=None, extend3=False) == (draft, plan)


def test_extend3_draws_its_features():
    linear, softmax = collections.Counter(), collections.Counter()
    for seed in range(300):
        lp = F.draw_linear(seed)
        if lp is not None:
            linear[lp.fmap] += 1
            linear["mode " + lp.mode] += 1
            linear["causal" if lp.causal else "bidirectional"] += 1
            linear["no normalize"] += not lp.normalize
            linear["backward"] += lp.backward
            linear["Dv != D"] += lp.Dv != lp.D
            linear["GQA"] += lp.Hq != lp.Hkv
            linear["16-bit"] += lp.dtype != "float32"
            linear["offsets"] += lp.q_offset != lp.k_offset
            linear["layouts"] += lp.layouts != ("contiguous",) * 3
            linear["kv batch 1"] += lp.kv_batch1
            linear["call seed"] += lp.call_seed is not None
            continue
        draft, plan = F.draw_case(seed, extend=None, extend2=None, extend3=True)
        softmax["decode"] += plan.decode is not None
        softmax["decode env"] += bool(plan.environment)
        softmax["decode Nq > 8"] += plan.decode is not None and plan.Nq > 8
        softmax["Dv != D"] += plan.Dv != plan.D
        softmax["group >= 5"] += plan.Hq // plan.Hkv >= 5
        softmax["value_dim"] += draft.value_dim not in (None, 16)
    for name in (*F.FEATURE_MAPS, "mode whole", "mode state", "mode init", "mode chunks", "mode step", "causal",
                 "bidirectional", "no normalize", "backward", "Dv != D", "GQA", "16-bit", "offsets", "layouts",
                 "kv batch 1", "call seed"):
        assert linear[name] > 0, (name, linear)
    for name in ("decode", "decode env", "decode Nq > 8", "Dv != D", "group >= 5", "value_dim"):
        assert softmax[name] > 0, (name, softmax)


# A few seeds of the layer that run in seconds (python tests/fuzz_specs.py --extend3 --start 0).
EXTEND3_SEEDS = (1, 5, 0, 6)


@pytest.mark.parametrize("seed", EXTEND3_SEEDS)
def test_extend3_seed(seed):
    failure = F.check_case(seed, extend=None, extend2=None, extend3=True)
    assert failure is None, f"\n{failure}"
