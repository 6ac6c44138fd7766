"""Probe 21 on an H100/H200: the Gluon forward's LSE in log2 units for the backward.

The Gluon sm90 forward returned only the natural LSE (``(m + log2(l)) * ln 2``, rounded in float32);
the backward after it (the ``tl`` one that ``ATTNCC_BACKEND=auto`` runs, or the Gluon one) took it back
to log2 units (times log2(e), rounded again) to recompute ``P = exp2(s - lse2)``. The round trip moves
lse2 by an ulp in about one row in seven; at scores of ~1e6 an ulp of lse2 is 0.125, so where the
scores themselves are exact those rows' recomputed weights come out 2**0.125 (9 %) off: the tl
forward's backward reads its own log2 LSE since session 20 (tests/test_probe_num20.py: float32
inputs), and now the Gluon forward writes it too (``lse_raw_out``), for
specs whose scores have no terms constant along j (the Gluon scores hold row terms, the tl backward's
log2 LSE leaves them out: those keep the natural LSE between them).

What the GPU showed (H100, session 21, bench/scratch/diag21.py: causal, B2 H4 N2048 D128 bf16, q and
k integers in [-lim, lim], scale 1, both backwards): the same errors with the log2 LSE and without
(lim 250: dv 2.0e-2 relative, dq 8.5x a near-zero reference; lim 60: dq 9.8e-2; lim 8: dq 7.4e-3), so
at bf16 / fp16 inputs and head dim 128 the float32 recomputation of the scores, not the LSE's round
trip, is what limits the gradients there; the change makes both forwards hand the backward the same
thing. This test checks that the Gluon forward's log2 LSE is the one each backward reads, and that the
gradients are the reference's, at scores with a realistic share of rows that are not one-hot (lim 8:
8 %).

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_gpu_probe21.py

"""
from __future__ import annotations

import math

import pytest
import torch

from gpu_env import GRAD_TOL, MARKS, ON_GPU, TOL, rel, release, skip_unless_enabled

skip_unless_enabled()  # before anything is built or loaded

import attncc  # noqa: E402
import attncc.runtime as rt  # noqa: E402
from attncc.runtime.gluon import launch  # noqa: E402
from cases import module, pattern  # noqa: E402

SM90 = ON_GPU and torch.cuda.get_device_capability() == (9, 0)
pytestmark = MARKS + [pytest.mark.skipif(not SM90, reason="the Gluon kernels need an sm90 GPU (H100, H200); "
                                         "Gluon has no interpreter")]
DEV = "cuda"


def run(name, dtype, *, params=None, seed=0, lim=8):
    """o (and its grad_fn), dq, dk, dv and the reference's of a call on integer q, k (module doc)."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    B, H, N, D = 2, 4, 2048, 128

    def ints(*shape):
        return torch.randint(-lim, lim + 1, shape, device=DEV, generator=gen).to(dtype)
    q, k = ints(B, H, N, D), ints(B, H, N, D)
    v = torch.randn(B, H, N, D, device=DEV, generator=gen).to(dtype)
    do = torch.randn(B, H, N, D, device=DEV, generator=gen).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = module(name).attention(*leaves, scale=1.0, **(params or {}))
    o.backward(do)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attncc.reference(pattern(name), *ref_leaves, scale=1.0, **(params or {}))
    ref.backward(do.double())
    assert rel(o, ref) < TOL
    return o, [t.grad for t in leaves], [t.grad for t in ref_leaves]


@pytest.mark.parametrize("gluon_bwd", [False, True], ids=["tl-backward", "gluon-backward"])
@pytest.mark.parametrize("name, params, dtype", [("causal", {}, torch.bfloat16),
                                                 ("sliding_window", {"window": 700}, torch.float16)])
def test_backward_reads_the_gluon_forwards_log2_lse(monkeypatch, name, params, dtype, gluon_bwd):
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    if not gluon_bwd:  # what auto runs: the Gluon forward, the tl backward
        monkeypatch.setattr(rt, "gluon_backward_selected", lambda call: False)
    ran, read, made = [], [], []
    forward, backward = rt.gluon_forward, launch.attention_backward
    monkeypatch.setattr(rt, "gluon_forward", lambda call, walk, *a, **kw:
                        ran.append(kw) or made.append(forward(call, walk, *a, **kw)) or made[-1])
    monkeypatch.setattr(launch, "attention_backward", lambda *a, **kw: read.append(kw["lse_raw"]) or backward(*a, **kw))
    o, got, want = run(name, dtype, params=params)
    assert ran and ran[0].get("raw") is True and o.grad_fn.has_raw
    if gluon_bwd:  # the log2 LSE, not the natural one (saved tensors are freed after the backward: compare values)
        lse = made[0][1].float()
        assert len(read) == 1 and read[0].numel() == lse.numel()
        torch.testing.assert_close(read[0].reshape(lse.shape), lse * math.log2(math.e), rtol=1e-5, atol=1e-4)
    for label, g, w in zip("qkv", got, want):
        assert not torch.isnan(g).any() and rel(g, w) < GRAD_TOL, (f"d{label}", rel(g, w))
    release()
