"""Probe 17: RoPE, dropout, learned tables, ALiBi / softcap with the LSE, and the tune cache.

Seeded differential checks against attncc.reference at small odd sizes (B = 2, Nq = 37, Nk = 53),
and regressions of what the probe found wrong."""
from __future__ import annotations

import json
import math

import pytest
import torch

import attncc
from attncc.runtime import KernelConfig, bind, pick_config, tuning
from attncc.runtime.launch import default_config
from attncc.spec import parse_spec
from cases import module, rel_err

# ---------------------------------------------------------------------------------------------
# The tune cache: a record that passes the schema but that no tuner run could have stored
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tune_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "tune"))
    monkeypatch.delenv("ATTNCC_TUNE", raising=False)
    monkeypatch.delenv("ATTNCC_CONFIG", raising=False)
    tuning._LOADED.clear()
    yield tmp_path / "tune"
    tuning._LOADED.clear()


def _call(D=128, dtype=torch.bfloat16, N=300):
    q = torch.randn(1, 4, N, D, dtype=dtype)
    k = torch.randn(1, 2, N, D, dtype=dtype)
    return bind(module("causal").SPEC, q, k, k.clone())


def _write(call, configs):
    """A cache file with one record per kernel ("" the forward, "dq", "dkdv"): config dicts."""
    entries = {}
    for kernel, cfg in configs.items():
        key = tuning.key_for(call, kernel)
        entries[key.entry] = {"config": cfg, "ms": 1.0, "key": {f: getattr(key, f) for f in tuning.KEY_FIELDS}}
    path = tuning.cache_dir() / key.file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "gpu": key.gpu, "triton": key.triton, "entries": entries}))
    tuning._LOADED.clear()
    return path


def _cfg(bm, bn, warps, stages):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


# Each was run from the cache on an H100 (bf16 / fp32, N = 300): every one stalled the call for over
# two minutes in Triton's compiler (accumulators of 1024 registers a thread) or in a retry per
# pipeline stage of a config that needs 1 MB of shared memory.
HOSTILE = [(128, torch.bfloat16, _cfg(256, 256, 1, 8)), (256, torch.float32, _cfg(256, 256, 8, 1)),
           (128, torch.bfloat16, _cfg(16, 256, 2, 8)), (256, torch.float32, _cfg(128, 128, 4, 3))]


@pytest.mark.parametrize("D, dtype, cfg", HOSTILE)
def test_a_cached_config_the_call_cannot_run_is_ignored(tune_cache, monkeypatch, caplog, D, dtype, cfg):
    """The schema check let these through (block sizes among 16..256, warps 1..32, stages 1..8), and
    pick_config ran them as they were: on an H100 each such call hung in the compiler. They are
    ignored with a warning naming the entry; the built-in config runs."""
    call = _call(D, dtype)
    _write(call, {"": cfg, "dq": cfg, "dkdv": cfg})
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # pick_config as on a GPU
    assert tuning.lookup(tuning.key_for(call, "")) is not None  # the record passes the schema check
    # (a dK/dV tile of 256 keys x 128 dims on 1 warp, say, is refused whichever kernel reads it)
    assert tuning.cached_config(call, "") is None
    assert pick_config(call) == default_config(call)
    assert "ignoring tune cache entry" in caplog.text and "built-in config" in caplog.text


def test_a_usable_cached_config_is_still_used(tune_cache, monkeypatch):
    call = _call(128, torch.bfloat16)
    _write(call, {"": _cfg(64, 32, 8, 3), "dkdv": _cfg(32, 128, 8, 2)})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert pick_config(call) == KernelConfig(64, 32, 8, 3)
    assert tuning.cached_config(call, "dkdv") == KernelConfig(32, 128, 8, 2)


@pytest.mark.parametrize("kernel", ["", "dkdv", "dq"])
@pytest.mark.parametrize("D, dtype", [(16, torch.float32), (64, torch.bfloat16), (128, torch.float16),
                                      (256, torch.bfloat16), (256, torch.float32), (96, torch.float32)])
def test_every_config_the_tuner_may_store_passes(kernel, D, dtype):
    """The check rejects nothing the tuner could have written: its candidates (exhaustive too, which
    always hold the built-in config) on an H100's shared memory."""
    call = _call(D, dtype, N=4096)
    configs = tuning.candidates(call, kernel, 232448, exhaustive=True) + tuning.candidates(call, kernel, 232448)
    assert default_config(call, kernel) in configs
    for cfg in configs:
        assert tuning.config_problem(call, kernel, cfg) is None, (cfg, tuning.config_problem(call, kernel, cfg))


def test_tune_replaces_an_unusable_entry(tune_cache, monkeypatch):
    """tune() returned any cached record as it was (force=False), so `attncc tune` kept a hostile
    entry for good; it tunes that key again and stores the winner over it."""
    call = _call(64, torch.bfloat16)
    _write(call, {"": _cfg(256, 256, 1, 8)})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    best = tuning.tune(call, "", lambda c: None, timer=lambda fn: 1.0, quick_timer=lambda fn: 1.0)
    assert tuning.config_problem(call, "", best) is None
    assert tuning.cached_config(call, "") == best


# ---------------------------------------------------------------------------------------------
# dropout_keep_mask takes the calls attention takes, no others
# ---------------------------------------------------------------------------------------------

DROPOUT_SPEC = 'name = "probe17_dropout"\nhead_dim = 16\n[mask]\nwhere = "causal"\n[score]\ndropout = 0.3\n'


@pytest.mark.parametrize("shapes, match", [
    (((1, 2, 5, 16), (1, 2, 6, 16), (1, 2, 7, 16)), "k has 6 positions but v has 7"),
    (((2, 2, 5, 16), (3, 2, 5, 16), (3, 2, 5, 16)), "batch sizes differ"),
    (((1, 2, 5, 16), (1, 2, 5, 16), (1, 1, 5, 16)), "k has 2 heads but v has 1"),
])
def test_keep_mask_refuses_what_attention_refuses(shapes, match):
    """dropout_keep_mask checked heads and head dims only: k and v of different lengths (or
    batches) gave a mask, of a call attention refuses, without a word."""
    mod = attncc.compile(DROPOUT_SPEC)
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        mod.attention(q, k, v, seed=1)
    with pytest.raises(ValueError, match=match):
        mod.dropout_keep_mask(q, k, v, seed=1)
    with pytest.raises(ValueError, match="below 2\\*\\*62"):
        mod.dropout_keep_mask(torch.zeros(1, 2, 5, 16), torch.zeros(1, 2, 5, 16), torch.zeros(1, 2, 5, 16), seed=1,
                              q_offset=2**62 - 3)
