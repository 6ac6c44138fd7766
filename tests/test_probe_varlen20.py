"""Probe 20: packed variable-length batches (cu_seqlens) and decode with a KV cache, as a
FlashAttention ``flash_attn_varlen_func`` / ``flash_attn_with_kvcache`` or FlexAttention
document-mask user calls them, against attncc.reference and a plain float64 oracle written here
from the documented semantics (softmax over the allowed keys; a row without keys: o = 0,
lse = -inf).

Probed:
- packed calls (seeded random, 17 specs: causal, cross_causal, windows, sinks, chunks, block
  diagonal, longformer, prefix LM, dilated, strided, ALiBi, softcap, RoPE, GQA, MQA, dense):
  cu_seqlens_q != cu_seqlens_k, sequences of length 0 and 1 first, last and consecutive, rows past
  cu_seqlens_q[-1] and keys past cu_seqlens_k[-1], int32 / int64 cu_seqlens, max_seqlen omitted,
  exact or larger, GQA groups 1, 2, 3, 8, Dv != D; o, LSE and the gradients of q, k, v from a loss
  on o and on the LSE; positions restart per sequence (windows, ALiBi, RoPE, chunks);
- learned tables indexed by position under packing (``rb[b, i]``, a row term whose gradient comes
  from the LSE only; ``cb[b, j]``; ``pos[h, i - j]``; ``rel[h, j - i + 32]`` with bottom-right
  causal alignment and a bias of ``n_k - n_q``): o, LSE and every gradient;
- dropout under packing: sequence s draws the mask of row s of the padded batch
  (dropout_keep_mask), forward and gradients against the reference with that mask;
- decode (seeded random, the same 17 specs): kv_len 0, 1, the full cache, shorter than Nq; Nq 1 to
  16; GQA groups 1, 3, 5, 6, 8 (programs cut inside a group); contiguous and paged caches (page
  sizes 16, 17, 24, 32, block tables int32 / int64 in a random page order); forced split counts
  1, 2, 3, 7; the cache past kv_len (and spare pages) filled with NaN, +inf, -inf or 1e30;
  windows and sinks; return_lse; each row against the oracle and against attention() on the same
  keys with q_offset = kv_len - Nq.

Found and fixed:
- A divisor made of n_q, n_k (``j % (n_k - 3)``, ``i // (n_q - 3)``) was checked in a packed call
  only at max_seqlen, not at each sequence's own lengths: a packed batch with a sequence of
  length 3 ran the kernels with a zero divisor and returned numbers for that sequence (o and the
  LSE wrong, silently), where attention() on the sequence alone refuses it with a ValueError.
  Packed calls now check the divisors over the lengths 1..max_seqlen, and where one may be 0
  there, at each sequence's own (n_q, n_k) when the cu_seqlens are read on the host (CPU, or
  max_seqlen omitted; CUDA cu_seqlens with both max_seqlen are refused with the range's error,
  as decode does for kv_len on the GPU).
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import attncc
from attncc.spec import parse_spec
from cases import module, pattern

DIVISOR_SPECS = {
    "probe20_mod_nk": '[mask]\nwhere = "j <= i and j % (n_k - 3) == 0"\n',
    "probe20_div_nk": '[mask]\nwhere = "j <= i"\n[score]\nbias = "(j // (n_k - 3)) * 0.5"\n',
    "probe20_div_nq": '[mask]\nwhere = "j <= i"\n[score]\nbias = "(i // (n_q - 3)) * 0.5 + j * 0.1"\n',
}


def _compiled(name, body, monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    text = f'name = "{name}"\n' + body
    return parse_spec(text), attncc.compile(text)


def _cu(lens, dtype=torch.int32):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=dtype)


@pytest.mark.parametrize("name", sorted(DIVISOR_SPECS))
def test_packed_divisors_of_each_sequences_lengths(name, monkeypatch, tmp_path):
    """A sequence of 3 rows makes n_q - 3 / n_k - 3 zero: refused as attention() on it alone is
    (it ran with the zero divisor and returned wrong rows); lengths where no divisor is 0 run and
    equal the reference, sequence by sequence."""
    p, mod = _compiled(name, DIVISOR_SPECS[name], monkeypatch, tmp_path)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 17, 16, generator=gen) for _ in range(3))
    with pytest.raises(ValueError, match="division by zero"):
        mod.attention(q[:, :, :3], k[:, :, :3], v[:, :, :3])
    for kw in ({}, dict(max_seqlen_q=10, max_seqlen_k=10)):
        with pytest.raises(ValueError, match=r"division by zero.*(n_k|n_q) = 3"):
            mod.attention(q[:, :, :13], k[:, :, :13], v[:, :, :13], cu_seqlens_q=_cu([10, 3]),
                          cu_seqlens_k=_cu([10, 3]), **kw)
    lens = [10, 0, 5, 2]  # a sequence without rows computes nothing: its lengths need no divisor
    o, lse = mod.attention(q, k, v, cu_seqlens_q=_cu(lens), cu_seqlens_k=_cu(lens), return_lse=True)
    c = _cu(lens).tolist()
    for s, n in enumerate(lens):
        if n:
            r, r_lse = attncc.reference(p, *(t[:, :, c[s]:c[s + 1]].double() for t in (q, k, v)), return_lse=True)
            assert float((o[:, :, c[s]:c[s + 1]].double() - r).abs().max()) < 1e-5, s
            assert float((lse[:, :, c[s]:c[s + 1]].double() - r_lse).abs().max()) < 1e-5, s
