"""Probe 23 of the Gluon sm90 backward that ATTNCC_BACKEND=auto (the default) now picks for chunk-aligned
Plans (GluonFit.backward_auto: block diagonal, chunked local and user specs alike), on the CPU: what it
found, each as a small seeded regression, and the probe's sweeps (marked slow).

Probed clean (tests/probe_gluon23.py, seeds 0-449): 450 seeded calls of block diagonal, chunked local
and 11 user specs (anti-causal chunks, shifted chunks, two chunkings, chunks of different query / key
sizes, n_k bounds, fixed heads, a spec scale; and look-alikes with a bias, softcap or mod that auto
must keep on tl) through the generated modules under ATTNCC_BACKEND=auto, the device stubbed as an
sm90 and the Gluon kernels emulated at the GPU's tiles: 187 ran the Gluon backward (of seeds
350-449's 37: chunks off the 128 tile in 26, not dividing N in 34, offsets off the tile in 11,
Nq != Nk in 25, GQA 24 / MQA 15, B > 1 17, k / v of batch 1 4, n_q / n_k 20, a loss on the LSE 14,
after the tl forward 7), 263 the
tl one (head dim 64, packed sequences, calls below AUTO_MIN_PAIRS, score terms, chunks <= 0, positions
past int32); auto's choice matched its rule on every call and o, lse, dq, dk, dv the float64
reference. tests/compile_gluon23.py: 15 such launches (30 kernels: chunk 1 / 16, Nq or Nk 1, offsets
1 / 16, one head) compiled for sm90 to cubins, clean. Not probed here: the fused method's emulation
(tests/test_gluon_bwd.py has it), the kernels on a GPU.

Found:

- auto took the Gluon backward for those Plans whatever ``ATTNCC_GLUON_BWD`` said: with ``fused`` it
  ran the fused kernel (measured slower than ``tl`` on chunked local, docs/performance.md session 22;
  auto's pick was measured with the split one), which is not deterministic, so under
  ``torch.use_deterministic_algorithms(True)`` a default-backend chunked_local / block_diagonal
  backward raised a RuntimeError on sm90 where auto runs the deterministic ``tl`` backward everywhere
  else. auto's pick is now the split backward's alone (attncc.runtime.backend.auto_picks_gluon_backward).
- The Plan's pick (attncc.analysis.builtin._chunk_aligned) took any band with a floor somewhere in both
  its bounds, so a window inside the chunks (``j > i - w and i // chunk == j // chunk``, ``i - j <= 3``
  and the chunks), a sliding window where the Gluon backward was measured slower (1.02-1.04x the
  ``tl`` one), went to the Gluon backward under auto; its docstring's shape, floor steps cut at most
  by the diagonal and by bounds the same on every row, is now the rule. (Session 24: with the
  one-warpgroup backward tiles the Gluon backward is faster on windows too, 0.94-0.96x; auto's pick is
  every single-segment walk and that rule is gone.)
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

import attncc  # noqa: E402
from attncc.analysis import analyze  # noqa: E402
from attncc.analysis.builtin import gluon_fit  # noqa: E402
from attncc.analysis.score import canonical_score  # noqa: E402
from attncc.spec import parse_spec  # noqa: E402
from attncc.runtime import backend, call as call_mod  # noqa: E402
from attncc.runtime.gluon import bwd, bwd_fused, launch  # noqa: E402
from cases import module, pattern  # noqa: E402
from gluon_emulation import EmulatedKernel  # noqa: E402
from kernel_compile import without_interpreter  # noqa: E402

CHUNKED = ("block_diagonal", "chunked_local")
ROOT = Path(__file__).resolve().parent.parent
# the slow sweeps' sizes (the probe's seeds 0-349 and compiles 0-14 ran clean, docstring)
SWEEP = int(os.environ.get("ATTNCC_PROBE23_CASES", "20"))


@pytest.fixture
def auto_sm90(monkeypatch):
    """ATTNCC_BACKEND=auto with CPU tensors standing in for an sm90 GPU's, every call past
    AUTO_MIN_PAIRS, the Gluon backward's kernels emulated (tests/gluon_emulation.py); the forward
    the tl one (auto's Gluon forward off), so that only the backward's choice is under test."""
    monkeypatch.setenv("ATTNCC_BACKEND", "auto")
    monkeypatch.setattr(call_mod, "_BOUND", {})
    monkeypatch.setattr(backend, "device_problem", lambda device: None)
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    monkeypatch.setattr(backend.gluon, "AUTO_MIN_PAIRS", 0)
    monkeypatch.setattr(backend.gluon, "AUTO_SELECTS_GLUON", False)
    monkeypatch.setattr(launch, "check_devices", lambda q, k, v: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        multi_processor_count=132, name="stub H100"))
    stubs = {}
    for kernel in (bwd.attn_bwd_dkdv, bwd.attn_bwd_dq, bwd_fused.attn_bwd_fused):
        stubs[kernel.fn.__name__] = EmulatedKernel(kernel)
        monkeypatch.setattr(kernel, "run", stubs[kernel.fn.__name__])
    return stubs


def random_call(rng):
    name = rng.choice(CHUNKED)
    Hkv = rng.choice((1, 2))
    shape = dict(B=rng.choice((1, 2)), Hq=Hkv * rng.choice((1, 2)), Hkv=Hkv, Nq=rng.choice((1, 16, 37, 64)),
                 Nk=rng.choice((1, 16, 37, 64)))
    kw = dict(chunk=rng.choice((1, 16, 37, 64, 1024)), q_offset=rng.choice((0, 16, 37)),
              k_offset=rng.choice((0, 16, 37)))
    return name, shape, kw


def tensors(shape, seed, D=128):
    gen = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, Nq, Nk = (shape[n] for n in ("B", "Hq", "Hkv", "Nq", "Nk"))
    return [torch.randn(*s, generator=gen).to(torch.bfloat16)
            for s in ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D), (B, Hq, Nq, D))]


def bound(name, shape, kw, seed):
    q, k, v, _ = tensors(shape, seed)
    positions = {n: kw[n] for n in ("q_offset", "k_offset")}
    return attncc.runtime.bind(module(name).SPEC, q, k, v, kwargs={"chunk": kw["chunk"]}, **positions)


def test_auto_picks_the_split_gluon_backward_alone(monkeypatch, auto_sm90):
    """auto's Gluon backward of a chunk-aligned Plan is the split or the ws one's pick: with
    ATTNCC_GLUON_BWD=fused auto keeps tl (the fused kernel was not what auto's pick was measured with),
    and so it does with ws under deterministic algorithms (ws is not deterministic; unset is split
    there); ATTNCC_BACKEND=gluon still runs the fused one. Seeded random calls."""
    rng = random.Random(23)
    for seed in range(12):
        name, shape, kw = random_call(rng)
        for method, deterministic, want in (("split", False, True), ("", False, True), ("ws", False, True),
                                            ("fused", False, False), ("", True, True), ("split", True, True),
                                            ("ws", True, False)):
            monkeypatch.setenv("ATTNCC_GLUON_BWD", method)
            call_mod._BOUND.clear()
            torch.use_deterministic_algorithms(deterministic)
            try:
                got = backend.gluon_backward_selected(bound(name, shape, kw, seed))
                assert backend.gluon_bwd_method() == (method or ("split" if deterministic else "ws"))
            finally:
                torch.use_deterministic_algorithms(False)
            assert got is want, (name, shape, kw, method, deterministic)
        monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
        assert backend.gluon_backward_selected(bound(name, shape, kw, seed)) is True
        monkeypatch.setenv("ATTNCC_BACKEND", "auto")


@pytest.mark.parametrize("method", ["fused", "ws"])
@pytest.mark.parametrize("seed", [0, 1])
def test_deterministic_default_backward_of_chunked_plans_runs(monkeypatch, auto_sm90, seed, method):
    """Under torch.use_deterministic_algorithms(True) with ATTNCC_GLUON_BWD=fused (or ws), the default
    backend's backward of block diagonal / chunked local runs (tl, deterministic) and matches the
    reference; it raised a RuntimeError from the fused Gluon backward auto had picked."""
    rng = random.Random(100 + seed)
    name = CHUNKED[seed]
    shape = dict(B=1, Hq=2, Hkv=rng.choice((1, 2)), Nq=rng.choice((9, 17)), Nk=rng.choice((9, 17)))
    chunk = rng.choice((5, 8, 11))
    monkeypatch.setenv("ATTNCC_GLUON_BWD", method)
    q, k, v, do = tensors(shape, seed)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.use_deterministic_algorithms(True)
    try:
        module(name).attention(*leaves, chunk=chunk, q_offset=3).backward(do)
    finally:
        torch.use_deterministic_algorithms(False)
    assert not any(s.launches for s in auto_sm90.values())
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(attncc.reference(pattern(name), *ref, chunk=chunk, q_offset=3), ref, do.double())
    for t, w in zip(leaves, want):
        assert float((t.grad.double() - w).norm() / w.norm()) < 2e-2


def chunk_spec(where: str):
    return parse_spec(f'name = "probe23"\n[params]\nchunk = 64\nw = 20\np = 5\nc2 = 48\n[mask]\nwhere = "{where}"\n')


@pytest.mark.parametrize("where, picked", [
    ("i // chunk == j // chunk", True),
    ("j <= i and i // chunk == j // chunk", True),
    ("j >= i and i // chunk == j // chunk", True),  # the transpose of chunked local
    ("i // chunk == j // chunk and i // c2 == j // c2", True),
    ("i // chunk == j // chunk and j >= p", True),  # a bound the same on every row
    ("i // chunk == j // chunk and j < n_k - 3", True),
    ("abs(i // chunk - j // chunk) <= 1", True),
    ("j <= i and j > i - w and i // chunk == j // chunk", True),  # a sliding window inside the chunks
    ("i // chunk == j // chunk and i - j <= 3", True),
    ("j <= i and j > i - w", True),
    ("j < 4 or (j <= i and j > i - w)", False),  # sink + window: two key segments per query block
    ("j <= i and (i - j) % 3 == 0", False),  # a residue class: block lists, no Gluon backward at all
])
def test_auto_backward_plans_are_single_segment_walks(where, picked):
    """GluonFit.backward_auto (session 24: measured faster with the one-warpgroup tiles on every
    single-segment walk, slower on sink + window's two segments): one segment per block both ways,
    whatever bounds it has; chunks (session 23's pick) and windows alike."""
    fit = gluon_fit(analyze(canonical_score(chunk_spec(where))))
    assert fit.backward_auto is picked, (where, fit.backward_reason, fit.backward_auto_reason)
    if not picked and fit.backward:
        assert "several segments" in fit.backward_auto_reason


@pytest.mark.parametrize("bias, picked", [("(j - i) * 0.5", True), ("0.1 * i", False), ("0.1 * j", False),
                                         ("where(h == 0, 0.25 * (j - i), 0.0)", True)])
def test_auto_backward_keeps_tl_for_row_terms(bias, picked):
    """A score with terms constant along the key (``0.1 * i``; ``0.1 * j`` is ``0.1 * (j - i)`` plus
    one): the Gluon kernels add them to every pair in float32, where at large positions they round the
    pair's own score away (probe 20, the forward's reason); auto keeps the tl backward as it keeps the
    tl forward. Relative terms (ALiBi's ``j - i``) are no row term."""
    spec = parse_spec(f'name = "rows24"\n[mask]\nwhere = "j <= i"\n[score]\nbias = "{bias}"\n')
    fit = gluon_fit(analyze(canonical_score(spec)))
    assert fit.backward and fit.backward_auto is picked and fit.auto is picked, (bias, fit.backward_auto_reason)
    if not picked:
        assert "constant along the key" in fit.backward_auto_reason


def _script(name, args, env):
    run = subprocess.run([sys.executable, str(ROOT / "tests" / name), *args], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=3600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]


@pytest.mark.slow
def test_auto_gluon_backward_sweep_matches_the_reference():
    """tests/probe_gluon23.py's seeded sweep (ATTNCC_PROBE23_CASES cases, ~6 s each): auto's choice of
    backward and the gradients through the emulated Gluon kernels against the float64 reference."""
    _script("probe_gluon23.py", ["--cases", str(SWEEP), "--start", "0"], {**os.environ, "TRITON_INTERPRET": "1"})


@pytest.mark.slow
def test_auto_gluon_backward_launches_compile_for_sm90():
    """tests/compile_gluon23.py: the Gluon backward launches auto makes for chunk-aligned specs at values
    Triton specializes (a chunk of 1 or 16, Nq = 1, offsets 1 / 16), compiled for sm90 (~15 s a case)."""
    _script("compile_gluon23.py", ["--cases", str(max(SWEEP // 5, 1)), "--start", "0"], without_interpreter())
