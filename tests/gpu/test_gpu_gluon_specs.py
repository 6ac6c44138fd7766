"""The generated modules with their forward (and, for the built-in walks, backward) on the Gluon sm90
kernels (ATTNCC_BACKEND=gluon, attncc.runtime.backend; docs/gluon.md "Wiring"), on an H100/H200: every
shipped spec whose Plan is a built-in walk (dense, causal, gqa, mqa) and every one with rendered
fragments (sliding window, sink + window, prefix-LM, chunked local, block diagonal, local
bidirectional, Longformer, bottom-right causal, ALiBi, softcap: generated/<name>_gluon.py), bf16 and
fp16, forward (O and the natural-log LSE) at real sizes against the float64 reference and against the
same module's tl forward, with offsets, odd lengths and rows that see no key, and forward + backward
against the reference's gradients (the LSE's included) and the module's tl kernels
(ATTNCC_BACKEND=triton): the Gluon backward at head dims 64 and 128 (built-in walks, and the rendered
fragments of the closed-form specs: query-block walks, the mask solved for the query, the score's
derivative; split and, with ATTNCC_GLUON_BWD=fused / ws, the fused and the warp-specialized fused
kernels), the tl backward on the Gluon
forward's output at 256 and for the rendered specs without a query-block walk; the rendered walks over
block lists (strided, dilated, 2D neighborhood, BigBird, document ids, padding lengths), the scores and
masks that read [inputs] (learned ALiBi slopes, T5 tables), their inputs strided and broadcast, and
RoPE (section "block lists and [inputs]"; their backward is the tl one). Every call is checked to have gone
through ``gluon_forward`` / ``gluon_backward``. Gluon has no interpreter: skipped elsewhere, and in the
CPU check of the GPU tests (tests/test_gluon_wiring.py, tests/test_gluon_rendered.py and
tests/test_gluon_bwd.py check the wiring, the fragments and the backward's tile loop on the CPU).

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_gpu_gluon_specs.py

Not run yet (written 2026-12-05 without a GPU; the rendered backward's tests, split and fused, too):
the first GPU session to run it decides whether ATTNCC_BACKEND=auto may select the Gluon forward and
backward (attncc.runtime.gluon.AUTO_SELECTS_GLUON, AUTO_SELECTS_GLUON_BACKWARD). Start with test_rendered_tiny and test_rendered_backward_tiny: small
launches of every rendered spec, before the real sizes.
"""
from __future__ import annotations

import math

import pytest
import torch

from gpu_env import GRAD_TOL, MARKS, ON_GPU, TOL, rel, release, skip_unless_enabled

skip_unless_enabled()  # before anything is built or loaded
if not (ON_GPU and torch.cuda.get_device_capability() == (9, 0)):
    pytest.skip("the Gluon kernels need an sm90 GPU (wgmma, TMA); Gluon has no interpreter", allow_module_level=True)

import attncc  # noqa: E402
import attncc.runtime as rt  # noqa: E402
from cases import module, pattern  # noqa: E402

pytestmark = MARKS
DEV = "cuda"
ELIGIBLE = ("dense", "causal", "gqa", "mqa")
# rendered fragments (tests/test_gluon_rendered.py RENDERED), with params that put the patterns'
# edges inside many tiles at the sizes below (their defaults are for 16K sequences)
RENDERED = {"alibi": {}, "block_diagonal": {"chunk": 700}, "chunked_local": {"chunk": 1000},
            "cross_causal": {}, "local_bidirectional": {"w": 300}, "longformer": {"g": 100, "w": 300},
            "prefix_lm": {"prefix": 777}, "sink_window": {"sinks": 4, "window": 1000},
            "sliding_window": {"window": 1000}, "softcap": {}}


@pytest.fixture
def gluon(monkeypatch):
    """ATTNCC_BACKEND=gluon, and a count of the calls that went through the Gluon forward."""
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    calls = []
    real = rt.gluon_forward

    def counted(call, walk, *args, **kw):  # (a block-list walk's modules pass their lists)
        calls.append(walk)
        return real(call, walk, *args, **kw)
    monkeypatch.setattr(rt, "gluon_forward", counted)  # generated modules call _rt.gluon_forward
    return calls


@pytest.fixture
def gluon_bwd(monkeypatch, gluon):
    """ATTNCC_BACKEND=gluon (as ``gluon``), and a count of the calls that went through the Gluon backward."""
    calls = []
    real = rt.gluon_backward

    def counted(call, walk, *args, **kw):  # (raw=True: a score without row terms)
        calls.append(walk)
        return real(call, walk, *args, **kw)
    monkeypatch.setattr(rt, "gluon_backward", counted)  # generated modules call _rt.gluon_backward
    return calls


def heads(name, Hq=16, Hkv=None):
    p = pattern(name)
    hq = p.heads_q or Hq
    return hq, p.heads_kv or Hkv or hq


def qkv(B, Hq, Hkv, Nq, Nk, D, dtype, seed=0, grad=False):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    return [torch.randn(*s, device=DEV, dtype=dtype, generator=gen).requires_grad_(grad)
            for s in ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D))]


def check_forward(name, q, k, v, lse_tol=5e-3, **kw):
    """O and the LSE against the float64 reference (the LSE within ``lse_tol``), and against the
    module's tl forward (``kw``: offsets, lengths, params and inputs)."""
    mod = module(name)
    o, lse = mod.attention(q, k, v, return_lse=True, **kw)
    ref, ref_lse = attncc.reference(pattern(name), q.double(), k.double(), v.double(), return_lse=True, **kw)
    seen = torch.isfinite(ref_lse)
    assert o.dtype == q.dtype and o.shape == ref.shape and lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isfinite(lse), seen), "rows without keys: lse = -inf exactly there"
    assert torch.all(o[~seen] == 0)
    if seen.any():
        assert rel(o[seen], ref[seen]) < TOL
        assert float((lse.double()[seen] - ref_lse[seen]).abs().max()) < lse_tol
    with pytest.MonkeyPatch.context() as m:
        m.setenv("ATTNCC_BACKEND", "triton")
        o_tl, lse_tl = mod.attention(q, k, v, return_lse=True, **kw)
    if seen.any():
        assert rel(o[seen], o_tl[seen]) < TOL
        assert float((lse[seen] - lse_tl[seen]).abs().max()) < 5e-3
    release()


# name, B, N, D, dtype; heads from the spec where it fixes them (gqa 32/8, mqa Hkv = 1), else 16
FORWARD = [(name, 2, 4096, 128, dtype) for name in ELIGIBLE for dtype in (torch.bfloat16, torch.float16)]
FORWARD += [("causal", 2, 4096, 64, torch.bfloat16), ("causal", 2, 4096, 256, torch.bfloat16),
            ("dense", 2, 4096, 64, torch.float16), ("dense", 1, 2048, 256, torch.float16),
            ("causal", 1, 1333, 128, torch.bfloat16)]  # ragged: no multiple of any block


@pytest.mark.parametrize("name, B, N, D, dtype", FORWARD, ids=[f"{n}-B{b}-N{s}-D{d}-{str(t)[6:]}"
                                                              for n, b, s, d, t in FORWARD])
def test_forward(gluon, name, B, N, D, dtype):
    Hq, Hkv = heads(name)
    check_forward(name, *qkv(B, Hq, Hkv, N, N, D, dtype))
    assert gluon == [pattern_walk(name)], gluon  # the tl forward of check_forward did not count


def pattern_walk(name):
    return module(name).SPEC.gluon


@pytest.mark.parametrize("name, Nq, Nk, q_offset, k_offset, dtype", [
    ("gqa", 1000, 4000, 3000, 0, torch.bfloat16),   # a query chunk of a longer sequence, GQA 32/8
    ("causal", 300, 512, 0, 1000, torch.float16),   # keys all after the queries: no row sees a key
    ("causal", 777, 1500, 900, 100, torch.bfloat16),  # both offsets, ragged, some rows without keys
    ("mqa", 512, 2048, 1536, 0, torch.float16),
    ("dense", 700, 1900, 50, 3000, torch.bfloat16),  # offsets change nothing for dense
])
def test_offsets(gluon, name, Nq, Nk, q_offset, k_offset, dtype):
    Hq, Hkv = heads(name, Hq=8, Hkv=4)
    check_forward(name, *qkv(1, Hq, Hkv, Nq, Nk, 128, dtype, seed=3), q_offset=q_offset, k_offset=k_offset)
    assert gluon and set(gluon) == {pattern_walk(name)}


BACKWARD = [(name, dtype, 1024, 128) for name in ELIGIBLE for dtype in (torch.bfloat16, torch.float16)]
BACKWARD += [("causal", torch.bfloat16, 1024, 64), ("dense", torch.float16, 2048, 64),
             ("causal", torch.bfloat16, 1024, 256),  # the tl backward: the Gluon one has no head dim 256
             ("causal", torch.bfloat16, 1333, 128), ("dense", torch.float16, 777, 64)]  # ragged


def grads_of(mod, q, k, v, do, dlse, **kw):
    o, lse = mod.attention(q, k, v, return_lse=True, **kw)
    return torch.autograd.grad((o, lse), (q, k, v), (do, dlse))


def check_backward(name, q, k, v, gluon_bwd, seed=6, **kw):
    """dq, dk, dv (with a dLSE) against the float64 reference's and against the module's tl kernels'
    (ATTNCC_BACKEND=triton, same inputs); rows that see no key get zero dq."""
    mod = module(name)
    gen = torch.Generator(device=DEV).manual_seed(seed)
    shape = (q.shape[0], q.shape[1], q.shape[2])
    do = torch.randn(*shape, v.shape[-1], device=DEV, generator=gen).to(q.dtype)
    dlse = torch.randn(*shape, device=DEV, generator=gen)
    grads = grads_of(mod, q, k, v, do, dlse, **kw)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro, rl = attncc.reference(pattern(name), *leaves, return_lse=True, **kw)
    seen = torch.isfinite(rl)
    want = torch.autograd.grad((ro, torch.where(seen, rl, 0.0)), leaves, (do.double(), dlse.double()),
                               allow_unused=True)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("ATTNCC_BACKEND", "triton")
        tl_grads = grads_of(mod, q, k, v, do, dlse, **kw)
    for label, got, ref, tl in zip("qkv", grads, want, tl_grads):
        assert got.dtype == q.dtype and got.shape == ref.shape
        assert not torch.isnan(got).any(), f"d{label} has NaN"
        if float(ref.norm()) == 0:  # every row without keys
            assert torch.all(got == 0), f"d{label} of a call without pairs"
            continue
        assert rel(got, ref) < GRAD_TOL, (label, rel(got, ref))
        assert rel(got, tl) < GRAD_TOL, (label, "against the tl backward", rel(got, tl))
    assert torch.all(grads[0][~seen] == 0), "dq of rows without keys"
    release()


@pytest.mark.parametrize("name, dtype, N, D", BACKWARD, ids=[f"{n}-{str(t)[6:]}-N{s}-D{d}" for n, t, s, d in BACKWARD])
def test_forward_backward(gluon_bwd, gluon, name, dtype, N, D):
    """The Gluon backward (head dims 64, 128; the tl one at 256) on the Gluon forward's O and LSE."""
    Hq, Hkv = heads(name, Hq=8, Hkv=4)
    q, k, v = qkv(1, Hq, Hkv, N, N, D, dtype, seed=5, grad=True)
    check_backward(name, q, k, v, gluon_bwd)
    walk = pattern_walk(name)
    assert gluon == [walk]  # the tl forward of check_backward did not count
    assert gluon_bwd == ([walk] if D in (64, 128) else []), gluon_bwd


@pytest.mark.parametrize("method", ["fused", "ws"])
@pytest.mark.parametrize("name, dtype, N, D", [c for c in BACKWARD if c[3] in (64, 128)],
                         ids=[f"{n}-{str(t)[6:]}-N{s}-D{d}" for n, t, s, d in BACKWARD if d in (64, 128)])
def test_forward_backward_fused(monkeypatch, gluon_bwd, gluon, name, dtype, N, D, method):
    """The same with ATTNCC_GLUON_BWD=fused: the fused backward (bwd_fused.py, dQ by TMA reduce-add),
    and =ws (bwd_ws.py, the same warp-specialized)."""
    monkeypatch.setenv("ATTNCC_GLUON_BWD", method)
    Hq, Hkv = heads(name, Hq=8, Hkv=4)
    q, k, v = qkv(1, Hq, Hkv, N, N, D, dtype, seed=5, grad=True)
    check_backward(name, q, k, v, gluon_bwd)
    assert gluon_bwd == [pattern_walk(name)], gluon_bwd


@pytest.mark.parametrize("method", ["split", "fused", "ws"])
@pytest.mark.parametrize("name, Nq, Nk, q_offset, k_offset, dtype, D", [
    ("gqa", 1000, 4000, 3000, 0, torch.bfloat16, 128),   # a query chunk of a longer sequence, GQA 32/8
    ("causal", 300, 512, 0, 1000, torch.float16, 128),   # keys all after the queries: zero gradients
    ("causal", 777, 1500, 900, 100, torch.bfloat16, 64),  # both offsets, ragged, some rows without keys
    ("mqa", 512, 2048, 1536, 0, torch.float16, 64),
    ("dense", 700, 1900, 50, 3000, torch.bfloat16, 128),
])
def test_backward_offsets(monkeypatch, gluon_bwd, name, Nq, Nk, q_offset, k_offset, dtype, D, method):
    monkeypatch.setenv("ATTNCC_GLUON_BWD", method)
    Hq, Hkv = heads(name, Hq=8, Hkv=4)
    q, k, v = qkv(1, Hq, Hkv, Nq, Nk, D, dtype, seed=3, grad=True)
    check_backward(name, q, k, v, gluon_bwd, q_offset=q_offset, k_offset=k_offset)
    assert gluon_bwd == [pattern_walk(name)]


def test_rows_without_keys_backward(gluon_bwd, gluon):
    """Rows that see no key (lse = -inf from the Gluon forward) get zero gradients from the Gluon backward."""
    q, k, v = qkv(1, 8, 8, 256, 512, 128, torch.bfloat16, seed=7, grad=True)
    o, lse = module("causal").attention(q, k, v, q_offset=0, k_offset=128, return_lse=True)
    assert torch.all(lse[:, :, :128] == -math.inf)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    assert torch.all(dq[:, :, :128] == 0) and not torch.isnan(dq).any()
    assert not (torch.isnan(dk).any() or torch.isnan(dv).any())
    assert gluon == ["causal"] and gluon_bwd == ["causal"]


def test_torch_compile_runs_the_gluon_forward(gluon):
    """The custom op of torch.compile calls the same _forward."""
    mod = module("causal")
    q, k, v = qkv(2, 8, 8, 1024, 1024, 128, torch.bfloat16, seed=8)
    fn = torch.compile(lambda q, k, v: mod.attention(q, k, v), fullgraph=True)
    o = fn(q, k, v)
    assert rel(o, attncc.reference(pattern("causal"), q.double(), k.double(), v.double())) < TOL
    assert "causal" in gluon


# ------------------------------------------------------------------------------------------------
# rendered fragments


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_rendered_tiny(gluon, name):
    """One small launch per rendered spec first (a hang or a fault shows here, with its name)."""
    check_forward(name, *qkv(1, 2, 1, 300, 333, 128, torch.bfloat16, seed=9), q_offset=20,
                  **{k: min(v, 150) for k, v in RENDERED[name].items()})
    assert gluon == ["rendered"]


RENDERED_FORWARD = [(name, dtype) for name in sorted(RENDERED) for dtype in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("name, dtype", RENDERED_FORWARD, ids=[f"{n}-{str(t)[6:]}" for n, t in RENDERED_FORWARD])
def test_rendered_forward(gluon, name, dtype):
    Hq, Hkv = heads(name, Hq=8, Hkv=4)
    check_forward(name, *qkv(1, Hq, Hkv, 3000, 3000, 128, dtype, seed=10), **RENDERED[name])
    assert gluon == ["rendered"], gluon


@pytest.mark.parametrize("name, Nq, Nk, q_offset, k_offset, D", [
    ("sink_window", 1111, 2999, 1888, 0, 128),      # a query chunk at the end: sinks and window apart
    ("sliding_window", 777, 1500, 900, 100, 64),    # both offsets, ragged
    ("chunked_local", 1000, 3000, 2000, 0, 256),    # D = 256: 64-key blocks, O staged in Q
    ("prefix_lm", 600, 1300, 0, 700, 128),          # keys after the queries: only the prefix is seen
    ("cross_causal", 513, 2047, 0, 0, 128),         # bottom-right: n_k - n_q shifts the band
    ("longformer", 999, 999, 0, 0, 64),             # global rows and columns and a band: two segments
    ("alibi", 700, 1900, 1200, 0, 128),
    ("softcap", 1025, 1025, 0, 0, 256),
])
def test_rendered_offsets(gluon, name, Nq, Nk, q_offset, k_offset, D):
    Hq, Hkv = heads(name, Hq=8, Hkv=2)
    check_forward(name, *qkv(1, Hq, Hkv, Nq, Nk, D, torch.bfloat16, seed=11), q_offset=q_offset, k_offset=k_offset,
                  **RENDERED[name])
    assert gluon == ["rendered"]


def test_rendered_precondition_falls_back_to_tl(monkeypatch, gluon):
    """A call that breaks the closed form's precondition (window = 0) is refused when forced, and
    runs on tl with ATTNCC_BACKEND=auto once auto selects Gluon."""
    q, k, v = qkv(1, 4, 4, 512, 512, 128, torch.bfloat16, seed=12)
    with pytest.raises(ValueError, match="precondition"):
        module("sliding_window").attention(q, k, v, window=0)
    from attncc.runtime import gluon as gluon_settings

    monkeypatch.setenv("ATTNCC_BACKEND", "auto")
    monkeypatch.setattr(gluon_settings, "AUTO_SELECTS_GLUON", True)
    o = module("sliding_window").attention(q, k, v, window=0)
    assert torch.all(o == 0)  # window 0: no pair
    assert gluon == []


@pytest.mark.parametrize("method", ["split", "fused", "ws"])
@pytest.mark.parametrize("name", sorted(RENDERED))
def test_rendered_backward_tiny(monkeypatch, gluon_bwd, gluon, name, method):
    """One small Gluon backward per rendered spec first (a hang or a fault shows here, with its name),
    each method (ATTNCC_GLUON_BWD)."""
    monkeypatch.setenv("ATTNCC_GLUON_BWD", method)
    q, k, v = qkv(1, 2, 1, 300, 333, 64, torch.bfloat16, seed=15, grad=True)
    check_backward(name, q, k, v, gluon_bwd, q_offset=20, **{key: min(x, 150) for key, x in RENDERED[name].items()})
    assert gluon == ["rendered"] and gluon_bwd == ["rendered"], (gluon, gluon_bwd)


RENDERED_BACKWARD = [(name, dtype, D) for name in sorted(RENDERED) for dtype in (torch.bfloat16, torch.float16)
                     for D in (64, 128)]


@pytest.mark.parametrize("name, dtype, D", RENDERED_BACKWARD,
                         ids=[f"{n}-{str(t)[6:]}-D{d}" for n, t, d in RENDERED_BACKWARD])
def test_rendered_forward_backward(gluon_bwd, gluon, name, dtype, D):
    """The Gluon backward with the rendered query-block walk, masks and score derivative, on the Gluon
    forward's O and LSE: against the reference's gradients (dLSE included) and the module's tl ones."""
    Hq, Hkv = heads(name, Hq=8, Hkv=4)
    q, k, v = qkv(1, Hq, Hkv, 1500, 1500, D, dtype, seed=13, grad=True)
    check_backward(name, q, k, v, gluon_bwd, **{key: min(x, 400) for key, x in RENDERED[name].items()})
    assert gluon == ["rendered"] and gluon_bwd == ["rendered"], (gluon, gluon_bwd)


@pytest.mark.parametrize("method", ["fused", "ws"])
@pytest.mark.parametrize("name", sorted(RENDERED))
def test_rendered_forward_backward_fused(monkeypatch, gluon_bwd, gluon, name, method):
    """The same with ATTNCC_GLUON_BWD=fused (bwd_fused.py: the rendered qwalk, qmask and score
    derivative in the one key-block kernel, dQ by TMA reduce-add), bf16 at D = 128 (where it spills),
    and =ws (bwd_ws.py)."""
    monkeypatch.setenv("ATTNCC_GLUON_BWD", method)
    Hq, Hkv = heads(name, Hq=8, Hkv=4)
    q, k, v = qkv(1, Hq, Hkv, 1500, 1500, 128, torch.bfloat16, seed=13, grad=True)
    check_backward(name, q, k, v, gluon_bwd, **{key: min(x, 400) for key, x in RENDERED[name].items()})
    assert gluon == ["rendered"] and gluon_bwd == ["rendered"], (gluon, gluon_bwd)


@pytest.mark.parametrize("method", ["split", "fused", "ws"])
@pytest.mark.parametrize("name, Nq, Nk, q_offset, k_offset, D", [
    ("sink_window", 1111, 2999, 1888, 0, 128),      # a query chunk at the end: sinks and window apart
    ("sliding_window", 777, 1500, 900, 100, 64),    # both offsets, ragged
    ("chunked_local", 1000, 3000, 2000, 0, 128),
    ("prefix_lm", 600, 1300, 0, 700, 128),          # keys after the queries: only the prefix is seen
    ("cross_causal", 513, 2047, 0, 0, 64),          # bottom-right: n_k - n_q shifts the band
    ("longformer", 999, 999, 0, 0, 64),             # two segments in both walks
    ("alibi", 700, 1900, 1200, 0, 128),
    ("softcap", 1025, 777, 300, 0, 128),
    ("block_diagonal", 900, 1300, 400, 0, 64),
    ("local_bidirectional", 1000, 1000, 0, 37, 128),
])
def test_rendered_backward_offsets(monkeypatch, gluon_bwd, gluon, name, Nq, Nk, q_offset, k_offset, D, method):
    monkeypatch.setenv("ATTNCC_GLUON_BWD", method)
    Hq, Hkv = heads(name, Hq=8, Hkv=2)
    q, k, v = qkv(1, Hq, Hkv, Nq, Nk, D, torch.bfloat16, seed=16, grad=True)
    check_backward(name, q, k, v, gluon_bwd, q_offset=q_offset, k_offset=k_offset, **RENDERED[name])
    assert gluon_bwd == ["rendered"], gluon_bwd


def test_rendered_backward_head_dim_256_is_tl(gluon_bwd, gluon):
    """At D = 256 the Gluon forward runs and the tl backward takes its output (the Gluon backward
    takes 64 and 128)."""
    q, k, v = qkv(1, 4, 4, 700, 700, 256, torch.bfloat16, seed=17, grad=True)
    check_backward("softcap", q, k, v, gluon_bwd)
    assert gluon == ["rendered"] and gluon_bwd == []


# ------------------------------------------------------------------------------------------------
# block lists and [inputs] (tests/test_gluon_lists.py: the CPU emulation of the same host path)

# walks over the block lists of the Gluon tiles (the static ones made once per shape, document ids and
# padding lengths classified per call), and bias tables; params that put edges inside many tiles
LISTED = {"bigbird": {}, "dilated": {"window": 700, "dilation": 3}, "neighborhood_2d": {"width": 61, "radius": 3},
          "strided": {"stride": 97}, "document": {}, "padding": {}, "alibi_learned": {}, "t5_bias": {},
          "rope_causal": {}}  # (RoPE: the kernels read q and k as the module's pre-pass rotated them)
# q and k rotated in bf16 / fp16 before any kernel reads them (the tl kernels' too): the LSE is the
# reference's within what that rounding moves the scores (tests/gpu/test_gpu_specs.py: 5e-2)
LSE_TOL = {"rope_causal": 5e-2}


def spec_inputs(name, B, Hq, positions, seed, layout="contiguous"):
    """Random [inputs] on the GPU (tests/cases.inputs_for: documents of random lengths, some of one
    token; padding lengths 0..n; tables), in another memory layout: "strided" (every other element
    of a wider tensor), "broadcast" (batch row 0 for every row, stride 0)."""
    from cases import inputs_for

    out = {}
    for n, t in inputs_for(pattern(name), B, Hq, positions, torch.Generator().manual_seed(seed)).items():
        t = t.to(DEV)
        if layout == "strided":
            wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=DEV)
            wide[..., ::2] = t
            t = wide[..., ::2]
        elif layout == "broadcast" and t.dim() == 2:
            t = t[:1].expand(t.shape[0], -1)
        out[n] = t
    return out


def rendered_only(gluon) -> bool:
    """The Gluon forward ran, with the rendered walk, once per part call: a spec that runs by
    residue class or with its columns apart (attncc.runtime.residue: dilated, strided at these
    sizes) launches it once per class or part."""
    return bool(gluon) and set(gluon) == {"rendered"}


@pytest.mark.parametrize("name", sorted(LISTED))
def test_lists_tiny(gluon, name):
    """One small launch per spec first (a hang or a fault shows here, with its name)."""
    q, k, v = qkv(2, 2, 1, 300, 333, 128, torch.bfloat16, seed=20)
    check_forward(name, q, k, v, q_offset=20, lse_tol=LSE_TOL.get(name, 5e-3), **LISTED[name],
                  **spec_inputs(name, 2, 2, 353, seed=20))
    assert gluon == ["rendered"]


LISTS_FORWARD = [(name, dtype) for name in sorted(LISTED) for dtype in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("name, dtype", LISTS_FORWARD, ids=[f"{n}-{str(t)[6:]}" for n, t in LISTS_FORWARD])
def test_lists_forward(gluon, name, dtype):
    Hq, Hkv = heads(name, Hq=8, Hkv=4)
    check_forward(name, *qkv(2, Hq, Hkv, 3000, 3000, 128, dtype, seed=21), lse_tol=LSE_TOL.get(name, 5e-3),
                  **LISTED[name], **spec_inputs(name, 2, Hq, 3000, seed=21))
    assert rendered_only(gluon), gluon


@pytest.mark.parametrize("name, Nq, Nk, q_offset, k_offset, D, layout", [
    ("document", 1111, 2999, 1888, 0, 128, "strided"),    # a query chunk of a packed batch, ids strided
    ("document", 777, 1500, 900, 100, 64, "broadcast"),   # both offsets, one id row for every batch row
    ("padding", 1000, 3000, 0, 0, 256, "strided"),        # D = 256: 64-key blocks; some rows see no key
    ("strided", 999, 999, 0, 0, 64, "contiguous"),
    ("dilated", 1025, 2047, 1022, 0, 128, "contiguous"),  # 64-key blocks (per-pair integer work)
    ("neighborhood_2d", 1000, 1000, 0, 0, 256, "contiguous"),
    ("bigbird", 1500, 3000, 1500, 0, 128, "contiguous"),   # a query chunk: random blocks of later rows
    ("t5_bias", 700, 1900, 1200, 0, 128, "strided"),      # the table strided: its strides are read
    ("alibi_learned", 513, 2047, 0, 1000, 64, "strided"),
    ("rope_causal", 1000, 3000, 2000, 0, 128, "contiguous"),  # rotated at their positions (offsets)
])
def test_lists_offsets(gluon, name, Nq, Nk, q_offset, k_offset, D, layout):
    Hq, Hkv = heads(name, Hq=8, Hkv=2)
    positions = max(q_offset + Nq, k_offset + Nk)
    check_forward(name, *qkv(2, Hq, Hkv, Nq, Nk, D, torch.bfloat16, seed=22), q_offset=q_offset, k_offset=k_offset,
                  lse_tol=LSE_TOL.get(name, 5e-3), **LISTED[name],
                  **spec_inputs(name, 2, Hq, positions, seed=22, layout=layout))
    assert rendered_only(gluon), gluon


@pytest.mark.parametrize("name", ["document", "strided", "t5_bias"])
def test_lists_forward_backward(gluon_bwd, gluon, name):
    """The tl backward on the Gluon forward's O and LSE of a block-list walk or a bias table (the
    Gluon backward does not take their fragments: BACKWARD_REASON)."""
    Hq, Hkv = heads(name, Hq=8, Hkv=4)
    q, k, v = qkv(1, Hq, Hkv, 1500, 1500, 128, torch.bfloat16, seed=23, grad=True)
    check_backward(name, q, k, v, gluon_bwd, seed=24, **LISTED[name], **spec_inputs(name, 1, Hq, 1500, seed=23))
    assert rendered_only(gluon) and gluon_bwd == [], (gluon, gluon_bwd)
