"""Probe 26: the decoding / serving path, probed as an attacker (tests/probe_decode26.py is the
seeded generator; every output against attncc.reference in float64 on the equivalent full attention).

Probed clean (seeded; counts are calls, each checked row by row): about 420 ``serve`` calls of the
22 shipped softmax specs with decode (45 of them under forced ATTNCC_DECODE_CONFIG / SPLITS):
contiguous caches, also flash_attn's [B, Nmax, Hkv, D] layout viewed as [B, Hkv, Nmax, D]; paged
caches of page sizes 16, 17, 24, 31, 32, 48, pages shuffled, a prefix page shared by every row, spare
pages, unused table columns of -1 or 10**6, int32 / int64 tables, transposed and strided tables;
kv_len 0, 1, page boundaries, the capacity, int32 / int64, strided; Nq 1 to 16 with rows before
position 0; head dims 4 to 40 and Dv != D; float32, float16, bfloat16; scale=. By hand: k and v as
views of one [P, S, 2, Hkv, D] tensor or of a head slice of a bigger cache with pages not leading in
memory, tables, kv_len and caches expanded with stride 0, GQA groups of 5 to 17 heads with Nq up to 16
(cut over programs) for ALiBi, T5 and learned slopes, autocast, inference_mode, torch.compile
(eager backend), dropout specs. About 800 ``fuzz`` cases (fuzz_specs' random specs with kv_len 0 and
below Nq, odd page sizes, forced split counts 1, 2, 3, 7). About 50 ``step`` runs of the three
linear specs (chunked prefix, then token by token, both token forms, GQA, half precision, the final
state against one whole call's), 15 of compiled cosformer (n=), relu, identity (normalize = false) and
16-feature performer specs, 150-token runs in float16 / bfloat16. Refusals: kv_len past the capacity
or negative (also past 2**40), bad tables (dtypes, shapes, devices, page numbers), empty batches,
tables and caches, every bad scale, unknown keywords, spec params / inputs named as decode's
keywords, float64, Nq 0 or 17, head dims 0, step's state (shapes, dtypes, None parts).

Defects found (fixed):
- ``step`` with a k or v of several tokens raised attention's NotImplementedError ("causal linear
  attention needs Nq == Nk ... decode with step()"), and a 5-D k "must have 4 dims [B, H, N, D]".
- ``step``'s other argument errors named ``<spec>.attention`` (mixed dtypes, float64, head counts,
  head dims), not the function called.
- decode of a contiguous cache with ``block_table=`` (the known refusal) said only "page size (k_cache
  dim 1) must be >= 16, got 2": it now says that block_table= takes paged caches.
"""
from __future__ import annotations

import pytest
import torch

import probe_decode26 as P
from cases import module
from test_decode import decode_module


def _token(B=2, Hq=4, Hkv=2, D=8, Dv=6, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(B, Hq, D, generator=gen).to(dtype), torch.randn(B, Hkv, D, generator=gen).to(dtype),
            torch.randn(B, Hkv, Dv, generator=gen).to(dtype))


@pytest.mark.parametrize("which", ["k", "v", "both", "k5d", "empty"])
def test_step_refuses_more_than_one_token_of_k_or_v(which):
    """It went on to attention's checks: NotImplementedError 'needs Nq == Nk ... decode with step()'."""
    q, k, v = _token()
    several = {"k": (k[:, :, None].expand(2, 2, 3, 8), v),
               "v": (k, v[:, :, None].expand(2, 2, 3, 6)),
               "both": (k[:, :, None].expand(2, 2, 3, 8), v[:, :, None].expand(2, 2, 3, 6)),
               "k5d": (k[:, :, None, None], v),
               "empty": (k[:, :, None][:, :, :0], v[:, :, None][:, :, :0])}[which]
    arg = "v" if which == "v" else "k"
    with pytest.raises(ValueError, match=rf"linear_elu\.step: {arg} must be \[B, Hkv, D{'v' * (arg == 'v')}\] or "
                                         rf"\[B, Hkv, 1, D{'v' * (arg == 'v')}\] \(one token\)"):
        module("linear_elu").step(q, *several)


@pytest.mark.parametrize("call, error, message", [
    (lambda m, q, k, v: m.step(q.half(), k, v), TypeError, "one dtype"),
    (lambda m, q, k, v: m.step(q.double(), k.double(), v.double()), TypeError, "bfloat16, float16 or float32"),
    (lambda m, q, k, v: m.step(q[:, :3], k, v), ValueError, "multiple of the key/value head count"),
    (lambda m, q, k, v: m.step(q[..., :0], k[..., :0], v), ValueError, "head dims"),
    (lambda m, q, k, v: m.step(q, k, v[:1]), ValueError, ""),
])
def test_step_errors_name_step(call, error, message):
    """They named linear_elu.attention, which the caller did not call."""
    with pytest.raises(error, match=rf"^linear_elu\.step: .*{message}"):
        call(module("linear_elu"), *_token())


def test_contiguous_cache_with_a_block_table_says_block_table_takes_pages():
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 32, 16), torch.randn(2, 2, 32, 16)
    table = torch.arange(4, dtype=torch.int32).view(2, 2)
    with pytest.raises(ValueError, match=r"page size .* must be >= 16, got 2: with block_table= the caches are paged "
                                         r"\[num_pages, page_size, Hkv, D\] \(a contiguous cache \[B, Hkv, Nmax, D\] "
                                         r"takes no block_table\)"):
        decode_module("causal").decode(q, k, v, kv_len=[20, 3], block_table=table)


# A few seeds of each generator (more with python tests/probe_decode26.py, or -m slow): the shipped
# specs over odd pages, shared pages and int64 / strided tables; random specs at kv_len 0 and below Nq
# with forced splits; linear step after a chunked prefix.
SEEDS = {"serve": (4, 5, 23, 34), "fuzz": (10, 12), "step": (4,)}
SLOW_SEEDS = {"serve": range(100, 130), "fuzz": range(1000, 1040), "step": range(100, 106)}


def _check(probe, seed):
    problems, desc = P.PROBES[probe](seed)
    assert not problems, (probe, seed, problems, desc)


@pytest.mark.parametrize("probe, seed", [(p, s) for p, seeds in SEEDS.items() for s in seeds])
def test_probe_seeds(probe, seed):
    _check(probe, seed)


@pytest.mark.slow
@pytest.mark.parametrize("probe, seed", [(p, s) for p, seeds in SLOW_SEEDS.items() for s in seeds])
def test_probe_seeds_slow(probe, seed):
    _check(probe, seed)
