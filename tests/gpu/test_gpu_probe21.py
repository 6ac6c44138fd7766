"""Probe 21 on an H100/H200: the Gluon forward's LSE in log2 units for the backward.

The Gluon sm90 forward returned only the natural LSE (``(m + log2(l)) * ln 2``, rounded in float32);
the backward after it (the ``tl`` one that ``ATTNCC_BACKEND=auto`` runs, or the Gluon one) took it back
to log2 units (times log2(e), rounded again) to recompute ``P = exp2(s - lse2)``. The round trip moves
lse2 by an ulp in about one row in seven; at scores of ~1e6 an ulp of lse2 is 0.125, so those rows'
recomputed weights came out 2**0.125 (9 %) off: the tl forward's backward reads its own log2 LSE since
session 20 (tests/test_probe_num20.py), and now the Gluon forward writes it too (``lse_raw_out``), for
specs whose scores have no terms constant along j (the Gluon scores hold row terms, the tl backward's
log2 LSE leaves them out: those keep the natural LSE between them).

The scores here are exact in float32 whatever the order of the sums: q and k integers in [-250, 250]
(exact in bf16 and fp16), head dim 128, scale 1, so ``q . k`` stays below 2**24 and each forward and
backward computes the same ``s * log2(e)``; the float64 reference is then what a correct kernel gives
up to the output's rounding. Each case also runs with the log2 LSE withheld (the old path) and checks
that it misses the tolerance: the test can fail.

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_gpu_probe21.py

Not run yet (written without a GPU).
"""
from __future__ import annotations

import pytest
import torch

from gpu_env import MARKS, ON_GPU, rel, release, skip_unless_enabled

skip_unless_enabled()  # before anything is built or loaded

import attncc  # noqa: E402
import attncc.runtime as rt  # noqa: E402
from attncc.runtime import backend  # noqa: E402
from cases import module, pattern  # noqa: E402

SM90 = ON_GPU and torch.cuda.get_device_capability() == (9, 0)
pytestmark = MARKS + [pytest.mark.skipif(not SM90, reason="the Gluon kernels need an sm90 GPU (H100, H200); "
                                         "Gluon has no interpreter")]
DEV = "cuda"
TOL = 1e-2  # ||dv - ref|| / ||ref||: bf16 rounding of dv is ~3e-3


def run(name, dtype, *, gluon_bwd, params=None, seed=0):
    """dq, dk, dv (and the reference's) of a call whose scores are exact large integers (module doc)."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    B, H, N, D = 2, 4, 2048, 128

    def ints(*shape):
        return torch.randint(-250, 251, shape, device=DEV, generator=gen).to(dtype)
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
    return [t.grad for t in leaves], [t.grad for t in ref_leaves]


@pytest.mark.parametrize("gluon_bwd", [False, True], ids=["tl-backward", "gluon-backward"])
@pytest.mark.parametrize("name, params, dtype", [("causal", {}, torch.bfloat16),
                                                 ("sliding_window", {"window": 700}, torch.float16)])
def test_backward_reads_the_gluon_forwards_log2_lse(monkeypatch, name, params, dtype, gluon_bwd):
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    if not gluon_bwd:  # what auto runs: the Gluon forward, the tl backward
        monkeypatch.setattr(rt, "gluon_backward_selected", lambda call: False)
    ran = []
    real = rt.gluon_forward
    monkeypatch.setattr(rt, "gluon_forward", lambda call, walk, *a, **kw: ran.append(kw) or real(call, walk, *a, **kw))
    got, want = run(name, dtype, gluon_bwd=gluon_bwd, params=params)
    assert ran and ran[0].get("raw") is True
    err = rel(got[2], want[2])
    assert err < TOL, ("dv", err)
    for g in got:
        assert not torch.isnan(g).any()
    release()
    # the old path: the forward's log2 LSE withheld, the backward takes the natural one back
    monkeypatch.setattr(backend, "keep_raw_lse", lambda call, lse: None)
    got, want = run(name, dtype, gluon_bwd=gluon_bwd, params=params)
    assert rel(got[2], want[2]) > 2 * max(err, TOL / 2), "the natural LSE's round trip should show at these scores"
    release()
