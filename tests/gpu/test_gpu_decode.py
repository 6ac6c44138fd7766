"""``decode`` on the GPU in bfloat16 (formerly the checks of bench/decode_bench.py): the cases
``python -m bench decode`` times (one token over 32K and 128K positions, contiguous and paged)
against SDPA in float32, and decode of other specs (paged, 4 query rows, ragged kv_len) against
their own ``attention`` of the last rows. tests/test_decode.py checks the same paths against the
float64 reference at interpreter sizes.

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_gpu_decode.py
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpu_env import DEV, LOW, MARKS, TOL, rel, release, size, skip_unless_enabled

skip_unless_enabled()  # before anything is built or loaded

from attncc._reference import rotary  # noqa: E402
from bench.common import paged_cache  # noqa: E402  (the benchmark's paged cases build theirs so)
from cases import module, pattern  # noqa: E402

pytestmark = MARKS
HQ, HKV, D = size(32, 8), size(8, 2), size(128, 32)
PAGE = size(64, 16)


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("B, L", [(8, size(32768, 128)), (1, size(131072, 256))])
def test_one_token_against_sdpa(B, L, layout):
    """The timed decode cases (bench/cases.py group decode), every row's cache full."""
    causal = module("causal")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, 1, D, generator=gen).to(DEV, LOW)
    k, v = (torch.randn(B, HKV, L, D, generator=gen).to(DEV, LOW) for _ in range(2))
    kv_len = torch.full((B,), L, dtype=torch.int32, device=DEV)
    if layout == "paged":
        kp, vp, table = paged_cache(k, v, PAGE, gen)
        o = causal.decode(q, kp, vp, kv_len=kv_len, block_table=table)
    else:
        o = causal.decode(q, k, v, kv_len=kv_len)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    assert rel(o, want) < TOL
    release()


SPECS = {"sliding_window": {"window": size(1024, 20)}, "alibi": {}, "softcap": {}, "rope_causal": {},
         "document": None}


@pytest.mark.parametrize("name", SPECS)
def test_paged_decode_is_attention_of_the_last_rows(name):
    """decode (paged, Nq = 4, kv_len ragged) == the module's attention of the last Nq rows."""
    mod, rope = module(name), pattern(name).rope
    gen = torch.Generator().manual_seed(1)
    B, Nq, L = 2, 4, size(4096, 64)
    q = torch.randn(B, HQ, Nq, D, generator=gen).to(DEV, LOW)
    k, v = (torch.randn(B, HKV, L, D, generator=gen).to(DEV, LOW) for _ in range(2))
    kw = SPECS[name]
    if kw is None:
        kw = {"doc": (torch.arange(L, device=DEV) // size(700, 11)).to(torch.int32).expand(B, L).contiguous()}
    kv_len = torch.tensor([L, size(2999, 47)], dtype=torch.int32, device=DEV)
    k_cache = k
    if rope is not None:  # the cache holds keys rotated at their positions; attention rotates its own
        k_cache = rotary(k.double(), torch.arange(L, device=DEV), rope.theta, rope.style, rope.rotary_dim or D).to(LOW)
    kp, vp, table = paged_cache(k_cache, v, PAGE, gen)
    o = mod.decode(q, kp, vp, kv_len=kv_len, block_table=table, **kw)
    for b in range(B):
        n = int(kv_len[b])
        kw_b = {key: t[b:b + 1] for key, t in kw.items()} if name == "document" else kw
        want = mod.attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], q_offset=n - Nq, **kw_b)
        assert rel(o[b:b + 1], want) < TOL, f"row {b}, kv_len {n}"
    release()
