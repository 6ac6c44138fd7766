"""The Gluon sm90 forward with fragments rendered from the Plan (issue 20 item 1; docs/gluon.md
"Rendered fragments"), checked without a GPU:

- which Plans take rendered fragments (attncc.analysis.builtin.gluon_fit) and why the others do
  not; the generated modules and their ``_gluon.py`` files carry it; ``attncc build`` writes,
  checks and removes the second file;
- the rendered walks against the brute-force tile oracle (tests/tile_oracle.py) at many tile
  shapes, lengths, offsets and params, for every shipped spec that has them and for seeded
  random band masks: the walked blocks are exactly the non-empty tiles, the unmasked ones exactly
  the full ones, the segments ordered, disjoint and ascending; the rendered mask against the
  reference's on every pair;
- the whole forward emulated on the CPU (tests/gluon_host.py: the rendered fragments and the
  kernels' own per-tile functions run in torch, tile by tile as the ws kernel's consumer walks)
  against ``attncc.reference``, for every such spec and seeded random specs with score hooks;
- the host path through a generated module with ``ATTNCC_BACKEND=gluon`` (the kernel stubbed by the
  emulation): the launch's arguments, then the ``tl`` backward on its output;
- CI compiles the rendered forward of every such spec for sm90 (a child process without
  TRITON_INTERPRET, started when collection ends: tests/early_child.py): the launch a generated
  module makes, through Triton's own specialization, to a cubin with wgmma, TMA, the overlap of S
  with P V, and no spills in the key loop (at D = 128; at D = 64 and 256 on two specs with ``-m slow``);
  and their backward, split (dK/dV and dQ kernels: one head dim and dtype per spec, the four in turn,
  by default, the other with ``-m slow``) and fused (ATTNCC_GLUON_BWD=fused; D = 128, and D = 64 on two
  specs with ``-m slow``), with its resources bounded. ATTNCC_GLUON_ALL=1 also compiles every kernel at
  every head dim and dtype.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import pickle
import random
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

import attncc  # noqa: E402
from attncc._reference import pair_mask  # noqa: E402
from attncc.analysis import analyze  # noqa: E402
from attncc.analysis.builtin import gluon_fit  # noqa: E402
from attncc.analysis.score import canonical_score  # noqa: E402
from attncc.codegen import build, render_files, render_gluon, stale  # noqa: E402
from attncc.core import tiles  # noqa: E402
from attncc.runtime import backend, call as call_mod  # noqa: E402
from attncc.runtime.gluon import fwd_pipelined, fwd_ws, launch  # noqa: E402
from attncc.spec import SpecError, load_spec, parse_spec  # noqa: E402
from cases import SMALL_PARAMS, SPEC_NAMES, inputs_for, module, pattern  # noqa: E402
from early_child import EarlyChild  # noqa: E402
from gluon_host import C, Fragments, ctx_of, emulate_forward, load_fragments, write_lse  # noqa: E402
from kernel_compile import without_interpreter  # noqa: E402
from tile_oracle import (Problem, mask_spec, random_cover_mask, random_mask, random_overrides,  # noqa: E402
                         random_problem, truth_classes)

ROOT = Path(__file__).resolve().parent.parent
LOG2E = 1.4426950408889634

# The shipped specs the Gluon forward computes with rendered fragments (the built-in walks: dense,
# causal, gqa, mqa, tests/test_gluon_wiring.py); every other softmax spec has a reason.
RENDERED = ("alibi", "block_diagonal", "chunked_local", "cross_causal", "local_bidirectional", "longformer",
            "prefix_lm", "sink_window", "sliding_window", "softcap")
# Rendered too, with a walk over block lists or a score reading [inputs]: tests/test_gluon_lists.py.
RENDERED_LISTS = ("alibi_learned", "bigbird", "dilated", "document", "neighborhood_2d", "padding", "rope_causal",
                  "strided", "t5_bias")
BUILTIN = {"dense": "dense", "causal": "causal", "gqa": "causal", "mqa": "causal"}
NOT_GLUON = {"causal_dropout": "dropout"}
SPEC_PROBLEMS = [Problem(77, 77), Problem(45, 100, 1, 0), Problem(100, 45, 3, 30), Problem(130, 61, 29, 14, 200, 90),
                 Problem(64, 64, 16, 32), Problem(61, 130, 40, 7), Problem(5, 200, 150, 0), Problem(200, 3, 0, 90)]
SPEC_TILES = [(16, 16), (32, 16), (16, 32), (64, 32), (128, 64), (128, 128)]


def fit(p):
    return gluon_fit(analyze(canonical_score(p)))


def fragments_of(name):
    return Fragments(module(name).SPEC.gluon_fragments.load())


def call_like(params, *, q_offset, Nq, n_q, n_k, k_offset=0, Nk=1):
    """What the fragments file's host functions read of a call."""
    return types.SimpleNamespace(params=params, q_offset=q_offset, Nq=Nq, n_q=n_q, n_k=n_k, k_offset=k_offset, Nk=Nk)


# ------------------------------------------------------------------------------------------------
# which Plans, and the generated files


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_shipped_specs(name):
    p = pattern(name)
    got = fit(p)
    if name in RENDERED + RENDERED_LISTS:
        assert got.kind == "rendered" and not got.reason
        assert got.backward == (name in RENDERED), got.backward_reason  # the others: tests/test_gluon_lists.py
    elif name in BUILTIN:
        assert got.kind == BUILTIN[name]
    else:
        assert got.kind is None, name
        if p.kind == "softmax":
            import re
            assert re.search(NOT_GLUON[name], got.reason), got.reason


@pytest.mark.parametrize("name", [n for n in SPEC_NAMES if pattern(n).kind == "softmax"])
def test_generated_files_carry_it(name):
    """SpecInfo.gluon / gluon_reason / gluon_fragments, the _forward branch, and the _gluon.py file
    for exactly the rendered specs, with the spec and its hash in its header."""
    mod = module(name)
    want = fit(pattern(name))
    assert mod.SPEC.gluon == want.kind and mod.SPEC.gluon_reason == want.reason
    gluon_file = ROOT / "generated" / f"{name}_gluon.py"
    assert gluon_file.is_file() == (want.kind == "rendered")
    assert (mod.SPEC.gluon_fragments is not None) == (want.kind == "rendered")
    if want.kind == "rendered":
        text = gluon_file.read_text()
        assert f"spec sha256 {pattern(name).source_hash}" in text and f"Spec: specs/{name}.toml" in text
        assert mod.SPEC.gluon_fragments.path == gluon_file
        assert "_rt.gluon_forward(call, \"rendered\"" in (ROOT / "generated" / f"{name}.py").read_text()


def test_build_writes_checks_and_removes_the_fragments(tmp_path):
    spec = tmp_path / "w.toml"
    spec.write_text('[params]\nwindow = 4\n[mask]\nwhere = "j <= i and i - j < window"\n')
    out = tmp_path / "gen"
    assert build([spec], out) == [out / "w.py"]  # the module; its fragments beside it
    assert (out / "w_gluon.py").read_text() == render_gluon(load_spec(spec))
    assert stale([spec], out) == []
    (out / "w_gluon.py").unlink()
    assert stale([spec], out) == [out / "w_gluon.py"]
    build([spec], out)
    spec.write_text('[mask]\nwhere = "j <= i * 0.5"\n')  # float arithmetic: no fragments any more
    assert stale([spec], out) == [out / "w.py", out / "w_gluon.py"]
    build([spec], out)
    assert sorted(p.name for p in out.iterdir()) == ["__init__.py", "w.py"]
    assert stale([spec], out) == []


def test_a_spec_named_like_another_ones_fragments_is_refused(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('name = "x"\n[mask]\nwhere = "causal"\n')
    b.write_text('name = "x_gluon"\n')
    with pytest.raises(SpecError, match="x_gluon.*Gluon fragments"):
        build([a, b], tmp_path / "gen")
    assert not (tmp_path / "gen").exists()


def test_the_module_cache_writes_the_fragments_beside_the_module(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    mod = attncc.compile('name = "cached_window"\n[params]\nwindow = 5\n[mask]\nwhere = "j <= i and i - j < window"\n')
    frag = mod.SPEC.gluon_fragments
    assert frag.path.is_file() and frag.path.parent == Path(mod.__file__).parent
    assert frag.load().SEGMENTS == 1 and frag.load().PARAMS == ("window",)


def test_what_gluon_cannot_print_leaves_the_module_on_tl(monkeypatch):
    """A fragment the Gluon printer refuses (the analysis let it through: a bug) costs the Gluon
    forward, not the build: no fragments file, and the module says why."""
    import attncc.codegen.gluon as codegen_gluon
    from attncc.codegen.printer import NotGluon

    def refuse(pattern, plan):
        raise NotGluon("float64 arithmetic (x) in Gluon fragments")

    monkeypatch.setattr(codegen_gluon, "gluon_context", refuse)
    files = render_files(pattern("sliding_window"))
    assert set(files) == {".py"} and render_gluon(pattern("sliding_window")) is None
    assert 'gluon_reason="its Gluon fragments cannot be printed (float64 arithmetic (x) in Gluon fragments)"' in \
        files[".py"] and "gluon_forward" not in files[".py"]


def test_explain_names_the_gluon_forward_a_plan_gets():
    from attncc.report import backend_text

    def text(name, **kw):
        return backend_text(analyze(canonical_score(pattern(name))), **{"head_dim": 128, "value_dim": 128,
                                                                          "dtype": "bf16", **kw})
    assert text("sink_window") == ("tl; Gluon sm90 forward and backward (its rendered walks, mask and score) with "
                                   "ATTNCC_BACKEND=gluon (auto keeps tl: 2 key segments per query block, where the "
                                   "Gluon forward was measured at 1.24x the tl forward's time (sink + window))")
    assert text("softcap", head_dim=256, value_dim=256) == (
        "Gluon sm90 forward (its rendered walks, mask and score) on sm90 "
        "for calls of at least 2**28 (batch x heads x queries x keys) pairs, tl elsewhere and with ATTNCC_BACKEND=triton; "
        "the backward tl (the Gluon backward takes head dims 64, 128)")
    assert text("causal") == ("Gluon sm90 forward and backward (built-in causal walk) on sm90 "
                              "for calls of at least 2**28 (batch x heads x queries x keys) pairs, tl elsewhere and "
                              "with ATTNCC_BACKEND=triton")
    assert text("causal", head_dim=64, value_dim=64) == (
        "Gluon sm90 backward (built-in causal walk) on sm90 for calls of at least 2**28 (batch x heads x queries x "
        "keys) pairs, tl elsewhere and with ATTNCC_BACKEND=triton; the forward tl (auto keeps tl at head dim 64: it "
        "picks Gluon at 128, 256); both Gluon with ATTNCC_BACKEND=gluon")
    assert text("causal", head_dim=256, value_dim=256) == (
        "Gluon sm90 forward (built-in causal walk) on sm90 "
        "for calls of at least 2**28 (batch x heads x queries x keys) pairs, tl elsewhere and with ATTNCC_BACKEND=triton; the "
        "backward tl (the Gluon backward takes head dims 64, 128)")
    assert text("causal_dropout").startswith("tl only: it has dropout")
    assert text("alibi", head_dim=96, value_dim=96).startswith("tl only for this call: head dim 96")


def test_a_forward_whose_transposed_walk_has_no_closed_form_keeps_the_tl_backward(tmp_path, monkeypatch):
    """Rows bounded on both sides that see every key have a closed-form key walk but no closed-form
    query-block walk: the Gluon forward takes the fragments, the backward stays tl, and every place
    says why (the analysis, the fragments file, the module, explain, the backend)."""
    from attncc.report import backend_text

    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(call_mod, "_BOUND", {})
    monkeypatch.setattr(backend, "device_problem", lambda device: None)
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    text = ('name = "rows_and_band"\n[params]\nw = 19\n[mask]\n'
            'where = "abs(i - j) <= w or i >= 19 or (j >= 14 and j < 47)"\n')
    got = fit(parse_spec(text))
    assert got.kind == "rendered" and not got.backward and "query blocks per key block have no closed form" in \
        got.backward_reason
    mod = attncc.compile(text)
    frag = mod.SPEC.gluon_fragments.load()
    assert frag.qwalk is None and frag.qmask is None and frag.BACKWARD_REASON == got.backward_reason
    assert "gluon_backward" not in Path(mod.__file__).read_text()
    assert backend_text(analyze(parse_spec(text)), head_dim=128, value_dim=128, dtype="bf16").endswith(
        f"the backward tl (the Gluon backward does not take its fragments: {got.backward_reason})")
    q = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    call = attncc.runtime.bind(mod.SPEC, q, q, q)
    assert backend.gluon_selected(call) is True and backend.gluon_backward_selected(call) is False
    assert backend.gluon_backward_problems(call) == (
        f"the Gluon backward does not take rows_and_band's fragments: {got.backward_reason}",)
    # a shipped one takes both
    call = attncc.runtime.bind(module("sink_window").SPEC, q, q, q, kwargs=dict(window=3))
    assert backend.gluon_backward_selected(call) is True


def test_reasons_are_clauses_and_the_forced_backend_gives_them(monkeypatch):
    monkeypatch.setattr(call_mod, "_BOUND", {})
    monkeypatch.setattr(backend, "device_problem", lambda device: None)
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    q = torch.randn(1, 2, 8, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"causal_dropout's pattern is not one the Gluon kernels compute: it has "
                                         r"dropout.*attncc explain specs/causal_dropout.toml"):
        module("causal_dropout").attention(q, q, q)
    # a rendered spec whose call breaks its walk's precondition (window >= 1) stays on tl, and says so
    call = attncc.runtime.bind(module("sink_window").SPEC, q, q, q, kwargs=dict(window=0, sinks=2))
    with pytest.raises(ValueError, match="breaks the precondition of the pattern's closed-form walk"):
        backend.gluon_selected(call)
    assert backend.gluon_selected(attncc.runtime.bind(module("sink_window").SPEC, q, q, q, kwargs=dict(window=3))) is True


# ------------------------------------------------------------------------------------------------
# the walks and the mask against brute force


def segment_grid(frag: Fragments, problem: Problem, params, b=0, h=0, transposed=False):
    """The tile classes walking the rendered segments gives (0 EMPTY, 1 PARTIAL, 2 FULL), after
    checking the walk's contract: every raw segment ordered (no clamp needed), the non-empty ones
    disjoint and ascending, inside the blocks. ``transposed``: the dK/dV kernel's walk (qwalk: per
    key block its query blocks, [nkb, nqb]), evaluated as the kernel calls it (key_tile_walk)."""
    p = problem
    n_q = p.q_offset + p.q_rows if p.n_q is None else p.n_q
    n_k = p.k_offset + p.k_rows if p.n_k is None else p.n_k
    nqb, nkb = -(-p.q_rows // p.block_m), -(-p.k_rows // p.block_n)
    ctx = ctx_of(b, h, 1, p.q_offset + p.q_rows - 1, tuple(params[n] for n in frag.module.PARAMS))
    if transposed:
        n_outer, n_inner, segments = nkb, nqb, frag.module.QSEGMENTS
        k_lo = p.k_offset + torch.arange(nkb) * p.block_n
        k_hi = torch.minimum(k_lo + p.block_n, torch.tensor(p.k_offset + p.k_rows)) - 1
        raw = frag.qwalk(k_lo, k_hi, torch.tensor(p.q_rows), torch.tensor(p.q_offset), torch.tensor(n_q),
                         torch.tensor(n_k), p.block_m, ctx)
        clamped = C.key_tile_walk(torch.arange(nkb), torch.tensor(p.k_offset), torch.tensor(p.q_rows),
                                  torch.tensor(p.k_rows), torch.tensor(p.q_offset), torch.tensor(n_q), torch.tensor(n_k),
                                  ctx, frag.qwalk, segments, p.block_m, p.block_n)
    else:
        n_outer, n_inner, segments = nqb, nkb, frag.segments
        q_lo = p.q_offset + torch.arange(nqb) * p.block_m
        raw = frag.walk(q_lo, q_lo + p.block_m - 1, torch.tensor(p.k_rows), torch.tensor(p.k_offset),
                        torch.tensor(n_q), torch.tensor(n_k), p.block_n, ctx)
        clamped = C.tile_walk(torch.arange(nqb), torch.tensor(p.q_offset), torch.tensor(p.k_rows),
                              torch.tensor(p.k_offset), torch.tensor(n_q), torch.tensor(n_k), ctx, frag.walk,
                              segments, p.block_m, p.block_n)
    assert len(raw) == 4 * segments
    grid = torch.zeros(n_outer, n_inner, dtype=torch.int8)
    kb = torch.arange(n_inner).view(1, -1)
    end = torch.zeros(n_outer, 1, dtype=torch.int64)
    for s in range(segments):
        lo, flo, fhi, hi = (torch.as_tensor(x).to(torch.int64).reshape(-1, 1).expand(n_outer, 1)
                            for x in raw[4 * s:4 * s + 4])
        assert bool(((0 <= lo) & (lo <= flo) & (flo <= fhi) & (fhi <= hi) & (hi <= n_inner)).all()), (s, raw)
        live = hi > lo
        assert not bool((live & (lo < end)).any()), "segments overlap or are out of order"
        end = torch.where(live, hi, end)
        grid = torch.where((lo <= kb) & (kb < hi), torch.where((flo <= kb) & (kb < fhi), 2, 1).to(torch.int8), grid)
    # the kernels' clamp of each segment changes nothing in an ordered walk
    assert all(torch.equal(torch.as_tensor(a).expand(n_outer), torch.as_tensor(c).expand(n_outer))
               for a, c in zip(raw, clamped))
    return grid


def check_walk(frag: Fragments, pat, problem: Problem, params, b=0, h=0) -> bool:
    """The rendered walks (the forward's and, with a backward, the dK/dV kernel's transposed one) and
    masks (mask, and qmask solved for the query) against brute force for one problem; False when the
    call breaks the forward walk's precondition (the Gluon path then refuses it)."""
    n_q = problem.q_offset + problem.q_rows if problem.n_q is None else problem.n_q
    n_k = problem.k_offset + problem.k_rows if problem.n_k is None else problem.n_k
    call = call_like(params, q_offset=problem.q_offset, Nq=problem.q_rows, n_q=n_q, n_k=n_k,
                     k_offset=problem.k_offset, Nk=problem.k_rows)
    if not frag.module.exact(call):
        return False
    want, want_t = truth_classes(pat, problem, params, b=b, h=h)
    got = segment_grid(frag, problem, params, b, h)
    assert torch.equal(got, want), (problem, (got != want).nonzero()[:5].tolist())
    backward = frag.qwalk is not None and frag.module.backward_exact(call)
    if backward:
        got = segment_grid(frag, problem, params, b, h, transposed=True)
        assert torch.equal(got, want_t), ("transposed", problem, (got != want_t).nonzero()[:5].tolist())
    i = (problem.q_offset + torch.arange(problem.q_rows)).view(-1, 1)
    j = (problem.k_offset + torch.arange(problem.k_rows)).view(1, -1)
    ctx = ctx_of(b, h, h + 1, problem.q_offset + problem.q_rows - 1, tuple(params[n] for n in frag.module.PARAMS))
    truth = pair_mask(pat, **problem.positions, batch=b + 1, heads=h + 1, params=params)[b, h]
    for fn, on in ((frag.mask, True), (frag.qmask, backward)):
        if fn is not None and on:  # the dK/dV kernel's orientation: i [1, M], j [N, 1]
            # (a mask that is a constant, a never-true one's False, is a Python bool)
            allowed = torch.as_tensor(fn(i.T, j.T, torch.tensor(n_q), torch.tensor(n_k), ctx)).expand(
                problem.k_rows, problem.q_rows)
            assert torch.equal(allowed.T, truth), problem
            assert torch.equal(torch.as_tensor(fn(i, j, torch.tensor(n_q), torch.tensor(n_k), ctx)).expand_as(truth),
                               truth), problem
    return True


@pytest.mark.parametrize("name", RENDERED)
def test_rendered_walks_of_shipped_specs_are_exact(name):
    frag, pat = fragments_of(name), pattern(name)
    params = {**pat.param_values, **SMALL_PARAMS.get(name, {})}
    checked = 0
    for problem in SPEC_PROBLEMS:
        for block_m, block_n in SPEC_TILES:
            checked += check_walk(frag, pat, dataclasses.replace(problem, block_m=block_m, block_n=block_n), params)
    assert checked == len(SPEC_PROBLEMS) * len(SPEC_TILES)


def random_fragments(rng, tmp_path, generator, count):
    """(pattern, fragments) of seeded random masks whose Plans take rendered fragments."""
    out = []
    for n in range(count):
        mask, params = generator(rng)
        pat = parse_spec(mask_spec(f"r{n}", mask, params))
        text = render_gluon(pat)
        if text is not None:
            frag = Fragments(load_fragments(text, tmp_path, f"r{n}"))
            if not getattr(frag.module, "LISTS", False):  # block-list walks: tests/test_gluon_lists.py
                out.append((pat, frag))
    return out


@pytest.mark.parametrize("generator, count, seed, two", [(random_cover_mask, 50, 20, 5), (random_mask, 70, 21, 1)],
                         ids=["covers", "any"])
def test_rendered_walks_of_random_masks_are_exact(tmp_path, generator, count, seed, two):
    """Seeded random masks (bands, chunks, sinks, global rows and columns, unions; tile_oracle),
    three problems each (lengths, offsets, n_q / n_k, tile shapes including non-square, param
    overrides, batch rows and heads), where the precondition holds."""
    rng = random.Random(seed)
    cases = random_fragments(rng, tmp_path, generator, count)
    checked = two_segments = backward = two_qsegments = 0
    for pat, frag in cases:
        for _ in range(3):
            problem = random_problem(rng, shapes=[(16, 16), (32, 16), (16, 32), (64, 32), (128, 64), (128, 128)])
            params = {**pat.param_values, **random_overrides(rng, pat.param_values)}
            checked += check_walk(frag, pat, problem, params, b=rng.randint(0, 1), h=rng.randint(0, 2))
        two_segments += frag.segments == 2
        backward += frag.qwalk is not None
        two_qsegments += frag.module.QSEGMENTS == 2
    assert len(cases) >= count // 4 and checked >= len(cases) and two_segments >= two, (len(cases), checked, two_segments)
    assert backward >= len(cases) * 3 // 4 and two_qsegments >= two, (len(cases), backward, two_qsegments)


def test_the_kernels_walk_the_segments_block_after_block():
    """common.py's helpers over clamped segments, on random ones (empty ones anywhere): the ws
    consumers' prologue block and per-segment starts, and the pipelined kernel's t-th block, block
    count and full test, all give the blocks of the segments in order, each once."""
    rng = random.Random(23)
    for _ in range(300):
        n = rng.choice([1, 2, 3])
        bounds, at = [], 0
        for _ in range(n):
            if rng.random() < 0.3:  # an empty segment
                x = rng.randint(0, 30)
                bounds.append((x, x, x, x))
                continue
            lo = at + rng.randint(0, 4)
            flo = lo + rng.randint(0, 3)
            fhi = flo + rng.randint(0, 3)
            hi = max(fhi + rng.randint(0, 3), lo + 1)
            bounds.append((lo, flo, fhi, hi))
            at = hi
        segs = tuple(torch.tensor(x) for b in bounds for x in b)
        want = [kb for lo, _, _, hi in bounds for kb in range(lo, hi)]
        full = {kb for _, flo, fhi, _ in bounds for kb in range(flo, fhi)}
        assert int(C.walk_blocks(segs, n)) == len(want)
        assert [int(C.nth_block(segs, torch.tensor(t), n)) for t in range(len(want))] == want
        assert [bool(C.is_full(segs, torch.tensor(kb), n)) for kb in want] == [kb in full for kb in want]
        first, some = C.walk_start(segs, n)
        assert bool(some) == bool(want)
        if want:
            walked = [int(first)]
            for s in range(n):
                walked += list(range(int(C.segment_start(segs[4 * s], first, n)), int(segs[4 * s + 3])))
            assert walked == want, (bounds, walked)


# ------------------------------------------------------------------------------------------------
# the whole forward, emulated on the CPU, against the reference


def qkv(B, Hq, Hkv, Nq, Nk, D, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=torch.float64) for s in
            ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D))]


def check_emulation(frag, pat, params, *, Nq, Nk, q_offset=0, k_offset=0, n_q=None, n_k=None, block_m=32,
                    block_n=16, B=1, Hq=2, Hkv=1, scale=0.3, seed=0):
    q, k, v = qkv(B, Hq, Hkv, Nq, Nk, 16, seed)
    walked = set()
    args = tuple(params[n] for n in frag.module.PARAMS)
    o, lse = emulate_forward(frag, q, k, v, scale=scale, q_offset=q_offset, k_offset=k_offset, n_q=n_q, n_k=n_k,
                             pattern_args=args, block_m=block_m, block_n=block_n, walked=walked)
    ref, ref_lse = attncc.reference(pat, q, k, v, return_lse=True, q_offset=q_offset, k_offset=k_offset, n_q=n_q,
                                    n_k=n_k, scale=scale, **params)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen) and not torch.isnan(o).any()
    assert torch.all(o[~seen] == 0)
    # float64 throughout: what is left is float32 in scores (params, ALiBi slopes), far below one
    # pair more or less (~1e-2)
    err = float((o - ref).abs().max())
    assert err < 1e-5, err
    if seen.any():
        assert float((lse[seen] - ref_lse[seen]).abs().max()) < 1e-5
    assert len({w[:4] for w in walked}) == len(walked), "a block walked twice"
    return walked


@pytest.mark.parametrize("name", RENDERED)
def test_emulated_forward_of_shipped_specs(name):
    frag, pat = fragments_of(name), pattern(name)
    params = {**pat.param_values, **SMALL_PARAMS.get(name, {})}
    for kw in (dict(Nq=70, Nk=90, B=2, Hq=4, Hkv=2), dict(Nq=45, Nk=100, q_offset=30, k_offset=5, block_m=16, block_n=32),
               dict(Nq=33, Nk=40, q_offset=0, k_offset=60, n_q=120, n_k=130), dict(Nq=100, Nk=51, q_offset=61)):
        check_emulation(frag, pat, params, **kw)


def test_emulated_forward_of_random_specs_with_score_hooks(tmp_path):
    """The fuzz generator's specs (biases, ALiBi, softcap, score transforms, params, masks) whose
    Plans take rendered fragments, at random offsets and lengths."""
    from gluon_host import fuzz_rendered

    rng = random.Random(22)
    seen = {"score": 0, "mask": 0, "segments2": 0}
    for n, text, pat, _ in fuzz_rendered(rng, "f"):
        if seen["score"] >= 12:
            break
        frag = Fragments(load_fragments(render_gluon(pat), tmp_path, f"f{n}"))
        if getattr(frag.module, "LISTS", False) or pat.inputs:  # lists, [inputs]: tests/test_gluon_lists.py
            continue
        q_offset, k_offset = rng.choice([0, 0, rng.randint(1, 40)]), rng.choice([0, 0, rng.randint(1, 40)])
        Nq, Nk = rng.randint(1, 70), rng.randint(1, 70)
        call = call_like(pat.param_values, q_offset=q_offset, Nq=Nq, n_q=q_offset + Nq, n_k=k_offset + Nk)
        if not frag.module.exact(call):
            continue
        Hq = pat.heads_q or 2
        check_emulation(frag, pat, pat.param_values, Nq=Nq, Nk=Nk, q_offset=q_offset, k_offset=k_offset,
                        block_m=rng.choice([16, 32]), block_n=rng.choice([16, 32]), Hq=Hq,
                        Hkv=pat.heads_kv or (2 if Hq % 2 == 0 else 1), scale=rng.choice([0.25, 0.5]), seed=n)
        seen["score"] += frag.score is not None
        seen["mask"] += frag.mask is not None
        seen["segments2"] += frag.segments == 2
    assert seen["score"] >= 12 and seen["mask"] >= 5, seen


def test_emulation_catches_a_wrong_fragment(tmp_path):
    """The emulation is a check: a walk that drops the last block, or a mask that lets one more key
    through, gives a different forward."""
    pat = pattern("sliding_window")
    text = render_gluon(pat)
    params = {"window": 9}
    for name, broken in (("short", text.replace("    return kv_lo, kv_full_lo, kv_full_hi, kv_hi",
                                                "    return kv_lo, kv_full_lo, kv_full_hi, kv_hi - 1")),
                         ("wide", text.replace("(j <= i))", "(j <= (i + 1)))"))):
        assert broken != text
        frag = Fragments(load_fragments(broken, tmp_path, name))
        with pytest.raises(AssertionError):
            check_emulation(frag, pat, params, Nq=40, Nk=40)


# ------------------------------------------------------------------------------------------------
# the host path through a generated module, the kernel stubbed by the emulation


class EmulatedKernel:
    """Stands in for a Gluon kernel's ``run``: records the launch, and computes what the kernel would
    from the launch's own arguments (the fragments, pattern_args, offsets) with the emulation."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __call__(self, *args, grid, warmup, **kwargs):
        import inspect
        self.launches.append((args, kwargs, grid))
        a = inspect.signature(self.kernel.fn).bind(*args, **{k: v for k, v in kwargs.items()
                                                             if k in self.kernel.arg_names}).arguments
        q, k, v, o = (a[n].base for n in ("q_desc", "k_desc", "v_desc", "o_desc"))
        frag = types.SimpleNamespace(walk=_host(a["WALK"]), mask=_host(a["MASK"]), score=_host(a["SCORE"]),
                                     segments=a["SEGMENTS"], module=None)
        out, lse = emulate_forward(frag, q.double(), k.double(), v.double(), scale=a["qk_scale"] / LOG2E,
                                   q_offset=a["q_offset"], k_offset=a["k_offset"], n_q=a["n_q"], n_k=a["n_k"],
                                   pattern_args=a["pattern_args"], block_m=128, block_n=k_block(a))
        o.copy_(out.to(o.dtype))
        write_lse(a, lse)


def _host(fn):
    from gluon_host import as_python
    return as_python(fn)


def k_block(a):
    return a["k_desc"].block_shape[2]


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(call_mod, "_BOUND", {})
    monkeypatch.setattr(backend, "device_problem", lambda device: None)
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "check_devices", lambda q, k, v: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        multi_processor_count=132, name="stub H100"))
    from gluon_emulation import EmulatedKernel as EmulatedBackward

    from attncc.runtime.gluon import bwd, bwd_ws
    stubs = {}
    for kernel in (fwd_ws.attn_fwd_ws, fwd_pipelined.attn_fwd_pipelined):
        stubs[kernel.fn.__name__] = EmulatedKernel(kernel)
        monkeypatch.setattr(kernel, "run", stubs[kernel.fn.__name__])
    for kernel in (bwd.attn_bwd_dkdv, bwd.attn_bwd_dq, bwd_ws.attn_bwd_ws):  # the backward's kernels, emulated too
        stubs[kernel.fn.__name__] = EmulatedBackward(kernel)
        monkeypatch.setattr(kernel, "run", stubs[kernel.fn.__name__])
    return stubs


@pytest.mark.parametrize("name, params", [("sink_window", {"sinks": 3, "window": 70}), ("alibi", {}),
                                          ("prefix_lm", {"prefix": 60})])
def test_module_hands_rendered_fragments_to_the_kernel(monkeypatch, emulated, name, params):
    """ATTNCC_BACKEND=gluon through the generated module: the ws kernel gets the module's fragments,
    SEGMENTS and the call's params as pattern_args; what it returns is the reference's, and the
    Gluon backward (its kernels emulated, the tl preprocess interpreted) takes it: the gradients are
    the reference's."""
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    mod = module(name)
    for kernel in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        monkeypatch.setattr(mod, kernel, None)  # the tl kernels must not run
    frag = mod.SPEC.gluon_fragments.load()
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 100, 64, generator=gen).to(torch.bfloat16).requires_grad_()
    k, v = (torch.randn(1, 2, 130, 64, generator=gen).to(torch.bfloat16).requires_grad_() for _ in range(2))
    o, lse = mod.attention(q, k, v, q_offset=40, return_lse=True, **params)
    (args, kwargs, grid), = emulated["attn_fwd_ws"].launches
    assert kwargs["WALK"] is frag.walk and kwargs["MASK"] is frag.mask and kwargs["SCORE"] is frag.score
    assert kwargs["SEGMENTS"] == frag.SEGMENTS
    full = {**pattern(name).param_values, **params}
    assert args[list(fwd_ws.attn_fwd_ws.arg_names).index("pattern_args")] == tuple(full[n] for n in frag.PARAMS)
    ref, ref_lse = attncc.reference(pattern(name), q.detach().double(), k.detach().double(), v.detach().double(),
                                    return_lse=True, q_offset=40, **params)
    assert float((o.detach().double() - ref).abs().max()) < 2e-2 and torch.equal(lse.isinf(), ref_lse.isinf())
    fin = torch.isfinite(lse)
    assert float((lse.detach()[fin].double() - ref_lse[fin]).abs().max()) < 1e-4
    # the forward wrote its LSE in log2 units too, which the Gluon backward reads instead of the
    # natural one taken back (one float32 rounding each way: 2**ulp off weights at large scores)
    assert kwargs["STORE_RAW"] is True and o.grad_fn.has_raw
    raw = args[list(fwd_ws.attn_fwd_ws.arg_names).index("lse_raw_ptr")]
    assert raw.data_ptr() != lse.data_ptr() and raw is o.grad_fn.saved_tensors[-1]
    assert torch.allclose(raw[fin], lse.detach()[fin] * LOG2E) and torch.equal(raw.isinf(), lse.isinf())
    read = []
    given = launch.attention_backward
    monkeypatch.setattr(launch, "attention_backward", lambda *a, **kw: read.append(kw["lse_raw"]) or given(*a, **kw))
    do = torch.randn(o.shape, generator=gen).to(o.dtype)
    o.backward(do)  # the Gluon backward on the Gluon forward's output
    assert len(read) == 1 and read[0] is raw
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(attncc.reference(pattern(name), *leaves, q_offset=40, **params), leaves, do.double())
    for t, w in zip((q, k, v), want):
        assert float((t.grad.double() - w).norm() / w.norm()) < 2e-2
    # the default backward: ws (split under deterministic algorithms)
    assert len(emulated["attn_bwd_ws"].launches) == 1 and not emulated["attn_bwd_dq"].launches


def test_row_terms_keep_the_natural_lse_on_the_gluon_paths():
    """A score with terms constant along j: the tl backward's LSE in log2 units leaves them out, the
    Gluon kernels' scores hold them, so neither Gluon kernel hands its log2 LSE to the other's backward
    (the natural LSE, which holds them, goes between them); without row terms both do."""
    row = attncc.compile('name = "gluon_row_term"\n[mask]\nwhere = "causal"\n[score]\nbias = "0.1 * i + 0.01 * j"\n')
    plain = attncc.compile('name = "gluon_no_row_term"\n[mask]\nwhere = "causal"\n[score]\nbias = "0.01 * (j - i)"\n')
    for mod, raw in ((row, False), (plain, True)):
        text = Path(mod.__file__).read_text()
        assert mod.SPEC.gluon == "rendered" and "_rt.gluon_forward(" in text and "_rt.gluon_backward(" in text
        assert text.count("raw=True") == (2 if raw else 0), mod.SPEC.name


# ------------------------------------------------------------------------------------------------
# compiled for sm90


ALL = os.environ.get("ATTNCC_GLUON_ALL") == "1"
# (spec, kernel, head dim, dtype): the wired config (ws without ping-pong, bf16, D = 128) for every
# rendered spec; the pipelined kernel and fp16 on one; the other head dims (the two-segment walk, a
# score hook, the D = 256 tiles with O staged in Q) with -m slow (COMPILES_SLOW, the slow child: ~8 s
# of CPU each, as much as a spec's D = 128 forward; tests/test_gluon_compile.py compiles the ws kernel
# at D = 64 and 256 by default, on the built-in walks)
COMPILES = [(name, "ws", 128, "bfloat16") for name in RENDERED]
COMPILES += [("sink_window", "pipelined", 128, "float16")]
COMPILES_SLOW = [("softcap", "ws", 256, "float16"), ("longformer", "ws", 64, "bfloat16")]
if ALL:
    COMPILES = [(name, kernel, d, dt) for name in RENDERED for kernel in launch.KERNELS for d in (64, 128, 256)
                for dt in ("bfloat16", "float16")]
# the backward (dK/dV and dQ kernels, ~1.5 s each): every rendered spec at both head dims and both
# dtypes, the pairs alternating (ATTNCC_GLUON_ALL=1: all four per spec); by default one of each spec's
# pair, the four (head dim, dtype) in turn over the specs, the other with -m slow (BWD_SLOW: its own child)
BWD_PAIRS = (((128, "bfloat16"), (64, "float16")), ((128, "float16"), (64, "bfloat16")))
BWD_COMPILES = [(name, "bwd", *BWD_PAIRS[n % 2][n // 2 % 2]) for n, name in enumerate(RENDERED)]
BWD_SLOW = [(name, "bwd", *BWD_PAIRS[n % 2][1 - n // 2 % 2]) for n, name in enumerate(RENDERED)]
# the fused backward (ATTNCC_GLUON_BWD=fused, one kernel, ~3 s): every rendered spec at D = 128 (where
# it spills), the dtype alternating; at D = 64 a two-segment walk and a score hook with -m slow
BWD_COMPILES += [(name, "bwd-fused", 128, ("bfloat16", "float16")[n % 2]) for n, name in enumerate(RENDERED)]
BWD_SLOW += [(name, "bwd-fused", 64, "bfloat16") for name in ("longformer", "softcap")]
# the ws backward (ATTNCC_GLUON_BWD=ws, ~15 s each): every rendered spec at D = 128, bf16, with -m slow
BWD_SLOW += [(name, "bwd-ws", 128, "bfloat16") for name in RENDERED]
if ALL:
    BWD_COMPILES = [(name, kernel, d, dt) for name in RENDERED for kernel in ("bwd", "bwd-fused", "bwd-ws")
                    for d in (64, 128) for dt in ("bfloat16", "float16")]
    COMPILES_SLOW = BWD_SLOW = []

CHILD = r"""
import pickle, sys
sys.path.insert(0, {tests!r})
import {module} as m
import test_gluon_rendered as t
from early_child import pool_map, watch_parent
watch_parent()
cases = {cases}
compile_case = t.rendered_compiler()
results = {{}}
for part in pool_map(lambda i: compile_case(cases[i]), len(cases)):  # forked: they inherit the stubs
    results.update(part)
with open(sys.argv[1], "wb") as f:
    pickle.dump(results, f)
"""


def compile_child(module_name: str, cases: str) -> EarlyChild:
    """The child process that compiles the cases (``cases``: their expression in ``module_name``)
    with :func:`rendered_compiler`, in one process beside the tests before the module, in two once
    its fixture waits, and writes {(name, kernel, d, dtype): the compiled launch's numbers} to
    ``compiled.pickle`` in its folder."""
    code = CHILD.format(tests=str(ROOT / "tests"), module=module_name, cases=cases)
    return EarlyChild(module_name, lambda folder: [sys.executable, "-c", code, str(folder / "compiled.pickle")],
                      lambda folder: without_interpreter(), timeout=900, cwd=ROOT)


def compiled_cases(child: EarlyChild) -> dict:
    """What the child of :func:`compile_child` compiled (waiting for it)."""
    outcome = child.result()
    assert outcome.returncode == 0, outcome.failure()
    with open(outcome.child.folder / "compiled.pickle", "rb") as f:
        return pickle.load(f)


def rendered_compiler():
    """Run in a process without TRITON_INTERPRET: the function that compiles one case, its launch
    through its generated module (ATTNCC_BACKEND=gluon, the device stubbed, a call with offsets
    and GQA), for sm90 as Triton specializes the recorded arguments (tests/kernel_compile.py). A
    "bwd" case is the module's Gluon backward of that call: its dK/dV and dQ launches, two results
    ("dkdv", "dq"); "bwd-fused" the same with ATTNCC_GLUON_BWD=fused: one launch, "fused"; "bwd-ws" with
    ATTNCC_GLUON_BWD=ws: one launch, "ws"."""
    from kernel_compile import compile_launch, launch_of

    from attncc.runtime.gluon import bwd, bwd_fused, bwd_ws, preprocess

    os.environ["ATTNCC_BACKEND"] = "gluon"
    call_mod.interpreting = lambda: True  # CPU tensors pass the call's checks, as under the interpreter
    backend.interpreting = lambda: False  # and the backend takes them for an sm90 GPU's
    backend.device_problem = lambda device: None
    launch.check_devices = lambda q, k, v: None
    torch.cuda.get_device_properties = lambda device: types.SimpleNamespace(multi_processor_count=132)
    # the tl preprocess and the fused backward's tl postprocess: not here
    preprocess.bwd_preprocess = preprocess.bwd_postprocess = collections.defaultdict(lambda: lambda *a, **kw: None)
    import attncc.runtime as rt
    real_forward = rt.gluon_forward  # (loads the runtime: its exports are attributes from then on)

    def forward(call, walk, lists=None, rotated=None, raw=False):
        if rotated is not None:  # nor the RoPE pre-pass: q and k as they are (the same signature)
            rotated = (lambda: (call.q, call.k))
        if lists is not None:  # the modules' list kernels cannot run here: zeros of the lists' shapes
            lists = (lambda m, n: rt.blocks.BlockLists(
                *[torch.zeros(call.B, 1, -(-call.Nq // m), *w, dtype=torch.int32) for w in ((), (-(-call.Nk // n),))] * 2,
                stride_b=-(-call.Nq // m) if call.B > 1 else 0, stride_h=0, stride_row=1, width=-(-call.Nk // n)))
        return real_forward(call, walk, lists, rotated, raw)
    rt.gluon_forward = backend.gluon_forward = forward
    recorded = []
    for kernel in (fwd_ws.attn_fwd_ws, fwd_pipelined.attn_fwd_pipelined, bwd.attn_bwd_dkdv, bwd.attn_bwd_dq,
                   bwd_fused.attn_bwd_fused, bwd_ws.attn_bwd_ws):
        kernel.run = (lambda kernel: lambda *a, grid, warmup, **kw: recorded.append(launch_of(kernel, a, kw)))(kernel)

    def compile_case(case):
        name, kernel, d, dtype = case
        backend.gluon_config = lambda D, kernel=kernel: launch.default_config(D, kernel) if kernel == "pipelined" else \
            dataclasses.replace(launch.default_config(D, "ws"), pingpong=False)
        dt = getattr(torch, dtype)
        q = torch.randn(1, 4, 300, d).to(dt)
        k, v = (torch.randn(1, 2, 200, d).to(dt) for _ in range(2))
        recorded.clear()
        inputs = inputs_for(pattern(name), 1, 4, 400, torch.Generator().manual_seed(0))  # [inputs], if any
        if kernel.startswith("bwd"):
            os.environ["ATTNCC_GLUON_BWD"] = {"bwd-fused": "fused", "bwd-ws": "ws"}.get(kernel, "split")
            call = attncc.runtime.bind(module(name).SPEC, q, k, v, q_offset=100, kwargs=inputs)
            assert backend.gluon_backward_selected(call), backend.gluon_backward_problems(call)
            o, lse = torch.zeros_like(q), torch.zeros(1, 4, 300)
            backend.gluon_backward(call, "rendered", o, lse, torch.zeros_like(q))
            parts = {"bwd-fused": ("fused", ), "bwd-ws": ("ws", )}.get(kernel, ("dkdv", "dq"))
        else:
            module(name).attention(q, k, v, q_offset=100, **inputs)
            parts = (kernel,)
        assert len(recorded) == len(parts), recorded
        return {(name, part, d, dtype): _compiled_numbers(compile_launch(rec, "cubin"), rec,
                                                          forward=not kernel.startswith("bwd"))
                for part, rec in zip(parts, recorded)}

    return compile_case


def _compiled_numbers(c, rec, forward: bool):
    """What the tests check of a compiled launch: resources, instruction counts, the launch's signature;
    a forward's the most spilled registers read back in one key loop (key_loop_ldl)."""
    import re

    registers, stack = launch._resource_usage(c.stages["cubin"])
    sass = launch._cuobjdump(c.stages["cubin"], "-sass")
    ptx = c.stages["ptx"]
    return dict(
        registers=registers, stack=stack, shared=c.metadata["shared"], wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
        hgmma=len(re.findall(r"\bHGMMA\.", sass)), ldl=len(re.findall(r"\bLDL", sass)),
        wait1=bool(re.search(r"wgmma\.wait_group\.sync\.aligned\s+1;", ptx)),
        tma_load=bool(re.search(r"cp\.async\.bulk\.tensor\.4d\.shared::cluster\.global", ptx)),
        tma_store=bool(re.search(r"cp\.async\.bulk\.tensor\.4d\.global\.shared::cta", ptx)),
        p_from_registers=bool(re.search(r"HGMMA\.\S+ R\d+, R\d+, gdesc", sass)),
        tma_reduce=len(re.findall(r"cp\.reduce\.async\.bulk\.tensor\.4d\.global\.shared::cta\.add", ptx)),
        key_loop_ldl=key_loop_ldl(sass, sum(block_shape(dict(rec.signature)["k_desc"])) // 16) if forward else None,
        signature=dict(rec.signature))


def block_shape(desc_type: str) -> tuple:
    """The rows and columns of a 4-d TMA descriptor's block from its signature type (launch._desc_type):
    a K descriptor's block is BLOCK_N x D, and one key block's S and P V take (BLOCK_N + D) / 16 wgmmas."""
    import re
    rows, cols = re.search(r"\[1, ?1, ?(\d+), ?(\d+)\]", desc_type).groups()
    return int(rows), int(cols)


def key_loop_ldl(sass: str, step_mma: int) -> int:
    """The most local-memory loads (LDL: spilled registers read back) in one key loop of the SASS: an
    innermost loop (by its backward branch) of ``step_mma`` wgmmas, one block's S and P V (-1: none)."""
    import re
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = set()
    for a, text in ins:
        m = re.search(r"\bBRA\s+(0x[0-9a-f]+)", text)  # cuobjdump -sass: branch targets as addresses
        if m and int(m.group(1), 16) < a:
            loops.add((int(m.group(1), 16), a))
    def count(lo, hi, what):
        return sum(lo <= a <= hi and what in t for a, t in ins)

    with_mma = [(lo, hi) for lo, hi in loops if count(lo, hi, "HGMMA")]
    inner = [(lo, hi) for lo, hi in with_mma if not any((lo, hi) != o and lo <= o[0] and o[1] <= hi for o in with_mma)]
    return max((count(lo, hi, "LDL") for lo, hi in inner if count(lo, hi, "HGMMA") == step_mma), default=-1)


# The child compiling COMPILES and BWD_COMPILES starts when collection ends (conftest.py,
# tests/early_child.py): it compiles on the core the tests before this module leave idle.
EARLY_CHILDREN = {"compiled": compile_child("test_gluon_rendered", "m.COMPILES + m.BWD_COMPILES"),
                  "compiled_slow": compile_child("test_gluon_rendered", "m.COMPILES_SLOW + m.BWD_SLOW")}


@pytest.fixture(scope="module")
def compiled():
    return compiled_cases(EARLY_CHILDREN["compiled"])


@pytest.fixture(scope="module")
def compiled_slow():
    return compiled_cases(EARLY_CHILDREN["compiled_slow"])


@pytest.mark.parametrize("case", COMPILES, ids=lambda c: "-".join(map(str, c)))
def test_rendered_forward_compiles_for_sm90(compiled, case):
    name, kernel, d, _ = case
    c = compiled[case]
    cfg = launch.default_config(d, kernel)
    assert c["wgmma"] >= d // 16 + cfg.block_n // 16 and c["hgmma"] == c["wgmma"]
    assert c["tma_load"] and c["tma_store"] and c["p_from_registers"]
    assert launch.shared_bytes(cfg, d) <= c["shared"] <= launch.SM90_SHARED_BYTES
    segments = module(name).SPEC.gluon_fragments.load().SEGMENTS
    params = module(name).SPEC.params
    assert len(c["signature"]["pattern_args"]) == len(params)
    if kernel == "ws":
        assert c["wait1"], "S is not overlapped with P V"
        assert c["registers"] <= cfg.maxnreg
        # The per-tile scalars of a rendered walk (more than a built-in's) may be parked on the
        # stack between tiles: a few words, loaded once per tile. A mask or score that kept per-key
        # values across the key loop spilled ~100 words (a mask written as j - n_k <= i - n_q before
        # it was solved for j): that is what this bounds.
        assert c["stack"] <= 64 and c["ldl"] <= 32 * segments, (c["stack"], c["ldl"])
    else:
        assert c["stack"] == 0 and c["registers"] <= 255


@pytest.mark.slow
@pytest.mark.parametrize("case", COMPILES_SLOW, ids=lambda c: "-".join(map(str, c)))
def test_rendered_forward_compiles_for_sm90_at_the_other_head_dims(compiled_slow, case):
    """The forwards of COMPILES_SLOW, checked as above."""
    test_rendered_forward_compiles_for_sm90(compiled_slow, case)


# wgmma per kernel at the default tiles, as the built-in walks' (docs/gluon.md): one loop, whatever the segments
BWD_WGMMA = {("dkdv", 128): 24, ("dkdv", 64): 16, ("dq", 128): 20, ("dq", 64): 16, ("fused", 128): 40,
             ("fused", 64): 24, ("ws", 128): 64, ("ws", 64): 48}


# the ws kernel's stack (bytes) and LDL in the whole kernel, rendered specs at D = 128 (measured, Triton 3.6)
WS_SPILLS = (64, 32)


@pytest.mark.parametrize("case", BWD_COMPILES, ids=lambda c: "-".join(map(str, c)))
def test_rendered_backward_compiles_for_sm90(compiled, case):
    """Both backward kernels of a rendered spec, as its module launches them: wgmma from shared memory
    and from registers (P^T, dS^T, dS), TMA, the shared memory of the built-in walks' kernels, and
    registers within the launch's 255 with no stack but a word or two of per-program walk scalars
    (two-segment walks, softcap at D = 128: 8 bytes, reloaded once per step, outside the tile math).
    The fused kernel ("bwd-fused"): its dQ partial by one TMA reduce-add, and at D = 128 the spills
    the built-in walks' fused kernel has (64-80 bytes) plus a word or so of the rendered walk's
    (80-112 bytes measured, docs/gluon.md); none at D = 64. The ws kernel ("bwd-ws"): the fused kernel's
    GEMMs in both consumer warpgroups, its registers the launch's cap (setmaxnreg moves them), its
    spills bounded as measured (docs/gluon.md, "bwd_ws.py")."""
    name, kernel, d, dtype = case
    shared = {part: launch.bwd_shared_bytes(launch.default_bwd_config(d, method), d)[part]
              for method, parts in launch.BWD_METHODS.items() for part in parts}
    frag = module(name).SPEC.gluon_fragments.load()
    for part in {"bwd-fused": ("fused", ), "bwd-ws": ("ws", )}.get(kernel, ("dkdv", "dq")):
        c = compiled[(name, part, d, dtype)]
        assert c["wgmma"] == BWD_WGMMA[(part, d)] and c["hgmma"] == c["wgmma"], (part, c["wgmma"])
        assert c["tma_load"] and c["tma_store"] and c["p_from_registers"] and c["wait1"], part
        assert c["tma_reduce"] == {"fused": 1, "ws": d // 32}.get(part, 0), part
        assert shared[part] <= c["shared"] <= shared[part] + 1024 <= launch.SM90_SHARED_BYTES, (part, c["shared"])
        spills = WS_SPILLS if part == "ws" else (128, 32) if part == "fused" and d == 128 else (8, 2)
        assert c["registers"] <= 255 and c["stack"] <= spills[0] and c["ldl"] <= spills[1], (
            part, c["registers"], c["stack"], c["ldl"])
        assert len(c["signature"]["pattern_args"]) == len(frag.PARAMS)


@pytest.mark.slow
@pytest.mark.parametrize("case", BWD_SLOW, ids=lambda c: "-".join(map(str, c)))
def test_rendered_backward_compiles_for_sm90_at_the_other_head_dim(compiled_slow, case):
    """The other (head dim, dtype) of each spec's pair and the fused kernel at D = 64 (BWD_SLOW),
    checked as above."""
    test_rendered_backward_compiles_for_sm90(compiled_slow, case)
