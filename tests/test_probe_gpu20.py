"""Probe 20 (the Gluon sm90 path's host side and eligibility, on the CPU; its GPU half is
tests/gpu/test_gpu_probe20.py).

Read against the kernels (attncc/runtime/gluon/launch.py, backend.py, fwd_ws.py, bwd.py, common.py,
walks.py, the rendered fragments): TMA operands (``launch._tma_ready``: base and stride alignment, unit
last stride, broadcast dims), GQA, offsets, rows past Nq and keys past Nk, empty calls, B x H, the
backward's row buffers, RoPE's rotated copies, batch-broadcast k/v, and which calls ATTNCC_BACKEND=auto
hands to the Gluon forward.

Found (fixed here): a score with terms constant along the key (``bias = "0.1 * i"``, ``bias = "c"``,
the ``c * i`` of ``bias = "0.1 * j"``, ``mod = "s * 0.5 + 0.25 * i"``) was picked by auto
(``GluonFit.auto``; any custom spec of that kind with one closed-form segment). The ``tl`` kernels keep
such terms out of the key loop and add them to the LSE (``attncc.analysis.score.along_j``), exact at any
position; the rendered Gluon score adds them to every pair in float32 (attncc/codegen/gluon.py
``render_score``), where a large one rounds the pair's own score away: ``0.1 * i`` at i = 2**29 is
7.7e7 in log2 units, float32 ulp 8, so a row's scores collapse and its softmax is near uniform (the
host run of the rendered hook below). At real sizes (>= 2**28 pairs, head dim 128) that was the
default path's forward: silently wrong O and LSE, and the ``tl`` backward on that LSE. Fix: such Plans
get an ``auto_reason`` (attncc/analysis/builtin.py ``rendered_auto_reason``): auto keeps them on ``tl``.
Not fixed: ``ATTNCC_BACKEND=gluon`` still runs them on the rendered score (an xfail on the GPU).

Found (fixed here): an empty batch (B = 0, which bind takes and the ``tl`` path answers with empty
outputs) went on under ATTNCC_BACKEND=gluon to ``launch.attention``, whose TMA descriptor of a 0-sized
dim fails Triton's bare ``assert shape_dim > 0``: ``gluon_forward`` / ``gluon_backward`` now return no
pairs for it as for Nq = 0 or Nk = 0, and ``launch.check_operands`` names the sizes it needs.

Probed clean by reading (GPU cases in the GPU file): ``_tma_ready`` keeps exactly the views TMA can
read and copies the rest (checked here on CPU tensors against its own rule and Triton's
``TensorDescriptor`` asserts), the built-in walks' full ranges stay inside Nk / Nq.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

import attncc  # noqa: E402
from attncc.analysis import analyze  # noqa: E402
from attncc.analysis.builtin import gluon_fit  # noqa: E402
from attncc.analysis.score import along_j, canonical_score  # noqa: E402
from attncc.codegen import render_gluon  # noqa: E402
from attncc.runtime.gluon import launch  # noqa: E402
from attncc.spec import parse_spec  # noqa: E402
from cases import SPEC_NAMES, module, pattern  # noqa: E402

MASK = '[mask]\nwhere = "j <= i and i - j < 700"\n'
ROW_TERMS = ['bias = "0.1 * i"', 'bias = "0.1 * j"', 'bias = "c"', 'bias = "0.01 * i + 0.5 * (j - i)"',
             'mod = "s * 0.5 + 0.25 * i"', 'bias = "0.001 * h * i"']
NO_ROW_TERMS = ['bias = "0.25 * (j - i)"', 'bias = "alibi"', 'softcap = 30.0', 'mod = "s * 2"',
                'bias = "0.1 * (i - j) % 5"']


def spec_text(score):
    return f'[params]\nc = 0.0\n{MASK}[score]\n{score}\n'


def fit_of(text):
    return gluon_fit(analyze(canonical_score(parse_spec(text))))


@pytest.mark.parametrize("score", ROW_TERMS)
def test_auto_keeps_row_terms_on_tl(score):
    """The defect: these were GluonFit.auto (the default backend's forward on sm90 at real sizes)."""
    fit = fit_of(spec_text(score))
    assert fit.kind == "rendered"  # ATTNCC_BACKEND=gluon still takes them (not fixed: see the docstring)
    assert not fit.auto and "constant along the key" in fit.auto_reason, fit


@pytest.mark.parametrize("score", NO_ROW_TERMS)
def test_scores_without_row_terms_keep_auto(score):
    fit = fit_of(spec_text(score))
    assert fit.kind == "rendered" and fit.auto, fit.auto_reason


def test_compiled_module_carries_it():
    mod = attncc.compile('name = "row_term_probe20"\n' + spec_text('bias = "0.1 * i"'))
    assert mod.SPEC.gluon == "rendered" and mod.SPEC.gluon_auto is False


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_shipped_specs_have_no_row_terms(name):
    """The fix changes no shipped module (attncc build --check): none of their scores has a row term."""
    p = pattern(name)
    if p.kind != "softmax":
        pytest.skip("linear")
    assert along_j(canonical_score(p))[2] is None
    assert module(name).SPEC.gluon_auto == fit_of_pattern(p).auto


def fit_of_pattern(p):
    return gluon_fit(analyze(canonical_score(p)))


def test_rendered_score_rounds_a_large_row_term_away(tmp_path):
    """The cause, on the host: the rendered score hook (the text compiled for the GPU, run in torch with
    float32 tiles as the kernel's) of ``bias = "0.1 * i"`` at i near 2**29 gives a row whose softmax is
    far from the exact one (which the row term does not change); near 0 it is exact to float32."""
    from gluon_host import Fragments, ctx_of, load_fragments

    pat = parse_spec('name = "rowterm20"\n' + MASK + '[score]\nbias = "0.1 * i"\n')
    frag = Fragments(load_fragments(render_gluon(pat), tmp_path, "rowterm20"))
    gen = torch.Generator().manual_seed(0)
    qk = (4.0 * torch.randn(8, 64, generator=gen)).float()
    scale = 1.0 / math.sqrt(128)
    want = torch.softmax(qk.double() * scale, dim=1)
    errors = {}
    for base in (0, 2**29):
        i = torch.arange(base, base + 8).unsqueeze(1)
        j = torch.arange(base - 64, base).unsqueeze(0)
        s = frag.score(qk, i, j, base + 8, base + 8, scale * 1.4426950408889634, ctx_of(0, 0, 1, base + 7, ()))
        assert s.dtype == torch.float32
        p = torch.softmax(s.double() * math.log(2.0), dim=1)
        errors[base] = float((p - want).abs().max() / want.abs().max())
    assert errors[0] < 1e-4, errors
    assert errors[2**29] > 0.3, errors  # what the Gluon forward computed for such a call


# ------------------------------------------------------------------------------------------------
# launch._tma_ready against the rule TMA (and Triton's TensorDescriptor) imposes


def tma_readable(t) -> bool:
    """What Triton's gluon TensorDescriptor asserts of a [B, H, N, D] operand (16-byte base, 16-byte
    strides, unit last stride, every size > 0), plus no broadcast dim (stride 0 over a dim > 1)."""
    es = t.element_size()
    return (t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all(s * es % 16 == 0 for s in t.stride()[:-1])
            and all(s != 0 or n == 1 for s, n in zip(t.stride(), t.shape)))


def layouts(rng, dtype):
    """Seeded random views of [B, H, N, D]: contiguous, [B, N, H, D] transposed, sliced heads and
    head dims, storage offsets (aligned and not), broadcast batch and heads, odd length-1 strides."""
    B, H, N = rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 40)
    D = rng.choice([64, 128])
    kind = rng.choice(["plain", "bnhd", "heads", "offset", "batch0", "head0", "dim", "len1"])
    if kind == "plain":
        return torch.randn(B, H, N, D, dtype=dtype), kind
    if kind == "bnhd":
        return torch.randn(B, N, H, D, dtype=dtype).transpose(1, 2), kind
    if kind == "heads":
        return torch.randn(B, H + 2, N, D, dtype=dtype)[:, 1:H + 1], kind
    if kind == "offset":
        extra = rng.choice([1, 3, 8, 16])
        flat = torch.randn(B * H * N * D + extra, dtype=dtype)
        return flat[extra:].view(B, H, N, D), kind
    if kind == "batch0":
        return torch.randn(1, H, N, D, dtype=dtype).expand(B + 1, H, N, D), kind
    if kind == "head0":
        return torch.randn(B, 1, N, D, dtype=dtype).expand(B, H + 1, N, D), kind
    if kind == "dim":
        return torch.randn(B, H, N, D + rng.choice([1, 8, 64]), dtype=dtype)[..., :D], kind
    base = torch.randn(B * 7 * 3 + 64 * D, dtype=dtype)
    return base.as_strided((B, 1, 1, D), (7 * 3 + D, 3, 5, 1)), kind


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tma_ready_keeps_exactly_readable_views(dtype):
    rng = random.Random(20)
    seen = set()
    for _ in range(120):
        t, kind = layouts(rng, dtype)
        out = launch._tma_ready(t)
        seen.add((kind, out is t))
        assert torch.equal(out, t), kind
        assert tma_readable(out), (kind, out.stride(), out.data_ptr() % 16)
        assert (out is t) == tma_readable(t), (kind, t.stride(), t.data_ptr() % 16)
    assert {k for k, same in seen if same} >= {"plain", "bnhd", "heads"}
    assert {k for k, same in seen if not same} >= {"batch0", "head0", "len1"}


# ------------------------------------------------------------------------------------------------
# empty batches: the Gluon host path returns no pairs (as the tl path does) before any descriptor


@pytest.mark.parametrize("name, walk", [("causal", "causal"), ("dense", "dense"), ("sliding_window", "rendered")])
def test_gluon_forward_and_backward_of_an_empty_batch(name, walk):
    """B = 0 (bind takes it; the tl path returns empty o, lse and gradients): gluon_forward went on to
    launch.attention, whose TMA descriptor of a 0-sized dim fails Triton's ``assert shape_dim > 0``
    (ATTNCC_BACKEND=gluon on a GPU; here, without one, the device check raised first)."""
    from attncc.runtime import backend, call as call_mod

    mod = module(name)
    q = torch.randn(0, 2, 5, 64)
    k = v = torch.randn(0, 2, 7, 64)
    call = call_mod.bind(mod.SPEC, q, k, v, return_lse=True)
    o, lse = backend.gluon_forward(call, walk)
    assert o.shape == (0, 2, 5, 64) and lse.shape == (0, 2, 5)
    dq, dk, dv, extra = backend.gluon_backward(call, walk, o, lse, torch.zeros_like(o), None)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and extra == {}


def test_launch_refuses_empty_dims_by_name():
    with pytest.raises(ValueError, match="B, Hq, Hkv, Nq and Nk must be >= 1"):
        launch.check_operands(torch.randn(0, 2, 5, 64, dtype=torch.bfloat16),
                              *(torch.randn(0, 2, 7, 64, dtype=torch.bfloat16),) * 2)
