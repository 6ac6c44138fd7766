"""Probe combo21: seeded random *combinations* of features that earlier probes drew mostly one at a
time (tests/probe_combo21.py is the generator; ``python tests/probe_combo21.py --cases N --start S``
runs more seeds), each case against attncc.reference (float64), forward and backward.

Probed: specs mixing RoPE (neox / gptj, rotary_dim partial or whole, theta 10000 / 500 / 10, head
dims 16, 17, 20, 24, 32), ALiBi, learned slopes ``sl[h] * (j - i)``, T5 buckets, learned row /
column / ``[n, n]`` pair tables, ``0.3 * dot(qr[b, h, i, :], kr[b, j, :])`` of two learned inputs,
terms of ``n_q`` / ``n_k``, an ``abs(i - j)`` param term, a score transform (a 0-d learned
temperature, a learned per-head scale, tanh, ``max(s, -1.0)`` plus a row table, score conditions
``where(s > 0.2, s, -inf)`` and ``where(s > hs[h], ...)``, a position mask written as
``where(..., -inf)``), softcap, a spec ``scale``, value_dim != head_dim (8, 13, 24), fixed
``[heads]``, and masks of 1-3 clauses (causal, bottom-right causal ``j - n_k <= i - n_q``,
windows, ``abs(i - j) <= w``, chunks, head clauses, a ``b`` clause, document ids and key lengths
from int inputs) under an optional prefix or global-token ``or``. Calls: ``attention`` (B 1-2,
GQA / MQA groups 1-3, Nq != Nk from 8 to 61, q_offset / k_offset up to 40, n_q / n_k passed, k and v
of batch 1 beside q of batch 2, param overrides, ``scale=``); packed calls (1-4 sequences of 0-30
rows, Nq != Nk per sequence, rows past cu_seqlens[-1], max_seqlen given or not; specs whose mask
reads an input refused them, as documented, with an error naming cu_seqlens); ``decode`` (B 1-3,
Nq 1-16, contiguous caches (also [B, N, H, D] views) and paged ones of 16 / 32 rows in a random
page order with NaN in unused slots, kv_len 0 .. the capacity and below Nq, forced split counts
1-3), all with return_lse. q, k, v contiguous, transposed (bnhd), every other element of the head
dim, every other row, batch / heads / rows expanded (stride 0), odd strides from storage offset
1; inputs contiguous, transposed, strided, expanded (learned ones too, their gradient summed by
autograd), passed as float64 / bfloat16 / float32 whatever their declared type; float32 / float16 /
bfloat16 forward and backward (dq, dk, dv and every learned input, from a loss on o and, in half
the cases, on the LSE); forced tile shapes 16 / 32. 1450 seeded cases (seeds 0-349, 400-549,
600-1549, the generator growing along the way): clean. The generator's own flags, fixed there: a
gradient 0 in exact arithmetic (every v or k row equal, a row with one key) in bfloat16, which is
the rounding of delta against the rounded o that docs/spec-language.md §1 describes, and a
bfloat16 leaf's rounded gradient (tolerances), and decode's reference with RoPE, which must start
from the keys the cache holds
(rotated, then rounded to float16: a score condition ``s > 0.2`` flips pairs at the threshold
otherwise; decode was exact against that, with every split count).

By hand, clean: empty calls (B = 0, Nq = 0, Nk = 0) forward, backward and in decode; refusals
(float64 or mixed dtypes, decode with grad, decode q_offset, decode Nq 17, pages of 8 rows, packed
with offsets, packed batch 2, odd head dim with whole-head RoPE, wrong input shape or dtype, kv_len
out of range, float, 2-D or a numpy array, cu_seqlens int16, max_seqlen below a sequence, an "n"
input shorter than max_seqlen) all clear; ``where(s > thr[h], s, -inf)`` and a bias reading int
inputs under packing run exact, ``where(doc[b, i] == doc[b, j], s, -inf)`` is refused; an input
named ``kv_len`` in decode with a head clause, n_q / n_k terms and RoPE; numpy / tensor params and
scale in decode; autocast (CPU, bfloat16) on a packed call with a learned table; positions past
2**31 with RoPE, ALiBi, learned slopes, n_k terms, softcap, bfloat16 backward; a residue-class
split (``(i - j) % m == 0``, 257-270 rows) and a column split (strided, 1030 rows) with softcap,
a mod, GQA, odd strides, expanded k / v, float16 / bfloat16 backward; o and the gradients
contiguous for non-contiguous q, k, v (torch.autograd.grad; a leaf's .grad follows autograd's
layout contract).

Found and fixed:
- A packed call with k, v of batch 1 beside q of batch 2 (a FlexAttention broadcast, which packing
  does not take) was refused with the wrong numbers: "got batch 2 (q) and 2 (k)" (the k the check
  saw was already broadcast to q's batch). It now names the batch passed: "2 (q) and 1 (k)".
"""
from __future__ import annotations

import pytest
import torch

import attncc
from probe_combo21 import run_case

SPEC = '[mask]\nwhere = "j <= i"\n[rope]\nstyle = "gptj"\n'


def test_packed_batch_error_names_the_batches_passed():
    """k, v of batch 1 beside q of batch 2 with cu_seqlens: the error names k's batch as passed (it
    said 2, the batch of the broadcast view the check saw)."""
    m = attncc.compile(SPEC)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, 2, 9, 16, generator=g) for b in (2, 1, 1))
    cu = torch.tensor([0, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"got batch 2 \(q\) and 1 \(k\)"):
        m.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)
    with pytest.raises(ValueError, match=r"got batch 2 \(q\) and 2 \(k\)"):  # both packed wrongly
        m.attention(q, q[:, :1], q[:, :1], cu_seqlens_q=cu, cu_seqlens_k=cu)


# clean seeds kept as regressions: 601 attention (bfloat16 backward, RoPE + ALiBi + learned tables,
# GQA), 610 packed (backward, softcap + ALiBi + learned tables, bnhd k), 616 decode (paged, RoPE +
# softcap), 764 decode (float16 paged cache of rotated keys, a score condition: the generator's
# reference from the cache's keys), 1239 attention (k, v of batch 1, softcap, learned tables, q
# rows expanded)
@pytest.mark.parametrize("seed", [601, 610, 616, 764, 1239])
def test_random_combinations(seed):
    problems, desc = run_case(seed)
    assert not problems, (problems, desc)
