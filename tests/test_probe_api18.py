"""Probe 18: the call API's forward and backward as FlashAttention / FlexAttention / Hugging Face
users call it (packed batches, GQA, views, partial requires_grad, LSE gradients, dropout,
torch.compile, the transformers integration), against attncc.reference; the defects found, each
with its regression test."""
from __future__ import annotations

import pytest
import torch

from cases import module, rel_err


def _packed(lens, Hq=2, Hkv=2, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    total = int(cu[-1])
    return [torch.randn(1, h, total, D, generator=gen) for h in (Hq, Hkv, Hkv)] + [cu]


@pytest.mark.parametrize("bad", ["max_seqlen", "past_the_end", "decreasing", "not_from_0"])
def test_cpu_cu_seqlens_are_checked_under_torch_compile(bad):
    """bind checks the values of CPU cu_seqlens in eager calls but cannot while torch.compile traces
    (a data-dependent guard); nothing checked them in the custom op either. Traced, a max_seqlen_q
    of 16 for a sequence of 40 gave rows 16..39 o = 0 (18% relative error, silently), and
    cu_seqlens ending at 70 of 58 packed rows wrote past o: "malloc(): invalid size", the process
    aborted. The custom op now makes the eager call's check as it runs."""
    causal = module("causal")
    q, k, v, cu = _packed([5, 40, 13])
    want = causal.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)
    fn = torch.compile(lambda q, k, v, cu, m: causal.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                                 max_seqlen_q=m, max_seqlen_k=m),
                       fullgraph=True, backend="eager")
    assert rel_err(fn(q, k, v, cu, 40), want) < 1e-6
    cases = {"max_seqlen": (cu, 16, "max_seqlen_q = 16 is less than the longest sequence"),
             "past_the_end": (torch.tensor([0, 5, 45, 70], dtype=torch.int32), 40, "ends at 70, past the 58 packed rows"),
             "decreasing": (torch.tensor([0, 5, 3, 58], dtype=torch.int32), 55, "non-decreasing"),
             "not_from_0": (torch.tensor([2, 5, 45, 58], dtype=torch.int32), 40, "must start at 0")}
    bad_cu, m, message = cases[bad]
    with pytest.raises(ValueError, match=message):
        fn(q, k, v, bad_cu, m)
