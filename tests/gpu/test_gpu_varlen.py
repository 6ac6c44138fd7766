"""Packed variable-length batches on the GPU in bfloat16 (formerly the checks of bench/rope_doc.py):
causal attention over cu_seqlens sequences (empty and one-token sequences included) and the
document mask on the same packed row, outputs and gradients, against the float64 reference of the
document mask. tests/test_varlen.py checks the same at interpreter sizes.

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_gpu_varlen.py
"""
from __future__ import annotations

import pytest
import torch

from gpu_env import DEV, LOW, MARKS, TOL, rel, release, size, skip_unless_enabled

skip_unless_enabled()  # before anything is built or loaded

import attncc  # noqa: E402
from cases import module, pattern  # noqa: E402

pytestmark = MARKS
LENS = size([300, 1, 0, 77, 640, 129, 1000, 5], [40, 1, 0, 70, 17])
H, D = size(8, 2), size(128, 32)


@pytest.mark.parametrize("form", ["varlen causal", "document mask"])
def test_packed_sequences(form):
    T = sum(LENS)
    gen = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, H, T, D, generator=gen).to(DEV, LOW) for _ in range(4))
    doc = torch.repeat_interleave(torch.arange(len(LENS)), torch.tensor(LENS)).to(torch.int32)[None].to(DEV)
    cu = torch.tensor([0] + torch.tensor(LENS).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attncc.reference(pattern("document"), *leaves, doc=doc)
    ref_grads = torch.autograd.grad(ref, leaves, do.double())
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    if form == "varlen causal":
        o = module("causal").attention(qg, kg, vg, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(LENS),
                                       max_seqlen_k=max(LENS))
    else:
        o = module("document").attention(qg, kg, vg, doc=doc)
    grads = torch.autograd.grad(o, (qg, kg, vg), do)
    assert all(torch.isfinite(t).all() for t in (o, *grads))
    assert rel(o, ref) < TOL
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert rel(got, want) < TOL, name
    release()
