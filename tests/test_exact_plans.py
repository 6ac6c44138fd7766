"""Exactness is the Plan's contract: for a static pattern (no ``[inputs]``), at every tile shape,
lengths, offsets and params, the tiles each walk visits are exactly the tiles with an allowed
pair, and the tiles it runs without mask code exactly the FULL ones (``tile_oracle``). Checked
for every static spec and for seeded random masks, forward, dQ and dK/dV, analysis only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import random
from pathlib import Path

import pytest
import torch

from attncc.analysis import analyze
from attncc.analysis.graph import walk_grid
from attncc.core import tiles
from attncc.spec import load_spec, parse_spec
from cases import SMALL_PARAMS, SPEC_FILES, stream_parts
from tile_oracle import Problem, mask_spec, random_cover_mask, random_mask, random_overrides, random_problem, truth_classes

N_RANDOM_MASKS = 500  # any mix of the families (most have no closed form: exact block lists)
N_COVER_MASKS = 250  # shapes with closed forms: a band with columns and global rows around it
N_RANDOM_DEFAULT, N_COVER_DEFAULT = 200, 100  # the first of each run by default (CI's time), the rest with -m slow
PROBLEMS_PER_MASK = 2
STATIC_SPECS = [Path(f).stem for f in SPEC_FILES
                if load_spec(f).kind == "softmax" and not load_spec(f).inputs]
SPEC_PROBLEMS = [Problem(77, 77), Problem(45, 100, 1, 0), Problem(100, 45, 3, 30), Problem(130, 61, 29, 14, 200, 90),
                 Problem(64, 64, 16, 32), Problem(61, 130, 40, 7)]
SPEC_TILES = [(16, 16), (32, 16), (16, 32), (64, 32), (128, 64), (32, 64)]


def _mismatches(pattern, plan, problem: Problem, params=None):
    """(walk, kind, count) for every walk whose tiles differ from the truth: kind "unsound" (an
    allowed pair skipped, or a FULL tile that is not) or "inexact" (a PARTIAL tile that is EMPTY
    or FULL)."""
    want = dict(zip(("forward", "dkdv"), truth_classes(pattern, problem, params)))
    want["dq"] = want["forward"]
    out = []
    for walk in ("forward", "dq", "dkdv"):
        got = walk_grid(plan, walk, **problem.positions, block_m=problem.block_m, block_n=problem.block_n,
                        params=params)
        w = want[walk]
        assert got.shape == w.shape, (walk, tuple(got.shape), tuple(w.shape))
        unsound = ((got == tiles.EMPTY) & (w != tiles.EMPTY)) | ((got == tiles.FULL) & (w != tiles.FULL))
        inexact = (got == tiles.PARTIAL) & (w != tiles.PARTIAL)
        for kind, bad in (("unsound", unsound), ("inexact", inexact)):
            if bad.any():
                out.append((walk, kind, int(bad.sum())))
    return out


def _report(failures, total):
    lines = [f"{len(failures)} of {total} cases differ from brute force:"]
    for what, bad in failures[:25]:
        lines.append(f"  {what}: " + ", ".join(f"{w} {k} x{n}" for w, k, n in bad))
    return "\n".join(lines)


@pytest.mark.parametrize("name", STATIC_SPECS)
def test_static_specs_are_exact(name):
    pattern = load_spec(Path(SPEC_FILES[0]).parent / f"{name}.toml")
    plan = analyze(pattern)
    params = SMALL_PARAMS.get(name)
    failures, total = [], 0
    for problem in SPEC_PROBLEMS:
        for block_m, block_n in SPEC_TILES:
            case = dataclasses.replace(problem, block_m=block_m, block_n=block_n)
            bad = _mismatches(pattern, plan, case, params)
            total += 1
            if bad:
                failures.append((f"{name} {case}", bad))
    assert not failures, _report(failures, total)


@pytest.mark.parametrize("generator, seed, checked", [
    pytest.param(generator, seed, part.values[0], marks=part.marks, id=f"{name}-{part.id}")
    for generator, count, default, seed, name in ((random_mask, N_RANDOM_MASKS, N_RANDOM_DEFAULT, 16, "any"),
                                                  (random_cover_mask, N_COVER_MASKS, N_COVER_DEFAULT, 17, "covers"))
    for part in stream_parts(count, default)])
def test_random_static_masks_are_exact(generator, seed, checked):
    """Seeded masks (unions of bands, chunks, strides, dilations, 2D neighborhoods, global rows /
    columns, sinks; constants and int params) on random lengths, offsets, tile shapes and
    call-time params: the masks ``checked`` of the seed's stream (cases.stream_parts: the first
    ones by default, the rest with ``-m slow``)."""
    rng = random.Random(seed)
    failures, total, closed = [], 0, 0
    for n in range(checked.stop):
        mask, params = generator(rng)
        cases = []
        for _ in range(PROBLEMS_PER_MASK):
            problem = random_problem(rng)
            cases.append((problem, random_overrides(rng, params)))
        if n not in checked:
            continue
        pattern = parse_spec(mask_spec(f"random{n}", mask, params))
        plan = analyze(pattern)
        closed += plan.forward.kind.value == "bands"
        for problem, over in cases:
            bad = _mismatches(pattern, plan, problem, over)
            total += 1
            if bad:
                failures.append((f"{mask!r} params={params} call params={over} {problem}", bad))
    assert not failures, _report(failures, total)
    assert closed >= len(checked) // (5 if generator is random_mask else 2), \
        f"only {closed} of {len(checked)} masks have closed forms"


def test_oracle_classes_by_hand():
    """The oracle itself on a 4x6 mask with 2x3 tiles (and its ragged variants)."""
    from tile_oracle import tile_classes

    truth = torch.tensor([[1, 1, 1, 0, 0, 0],
                          [1, 1, 1, 1, 0, 0],
                          [1, 1, 1, 1, 1, 1],
                          [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    fwd, dkdv = tile_classes(truth, 2, 3)
    F, P, E = tiles.FULL, tiles.PARTIAL, tiles.EMPTY
    assert fwd.tolist() == [[F, P], [P, F]]
    assert dkdv.tolist() == [[F, P], [P, F]]
    fwd, dkdv = tile_classes(truth[:3, :5], 2, 3)  # ragged: key block 1 and query block 1 are short
    assert fwd.tolist() == [[F, P], [F, P]]  # [2, 0..2] all allowed: FULL; key block 1 short: never FULL
    assert dkdv.tolist() == [[F, P], [P, P]]  # query block 1 short: never FULL in the dK/dV walk
    fwd, _ = tile_classes(torch.zeros(3, 3, dtype=torch.bool), 2, 2)
    assert (fwd == E).all()


@pytest.mark.parametrize("name", STATIC_SPECS)
def test_explain_counts_equal_brute_force(name):
    """``attncc explain --json``: visited and unmasked tiles of both walks, at several tile shapes."""
    import json

    from attncc.explain import main_explain

    path = Path(SPEC_FILES[0]).parent / f"{name}.toml"
    pattern = load_spec(path)
    params = SMALL_PARAMS.get(name, {})
    for (block_m, block_n), (n, nk) in zip(SPEC_TILES, [(200, 150), (77, 140), (129, 129), (150, 64)] * 2):
        argv = [str(path), "--n", str(n), "--nk", str(nk), "--block", f"{block_m}x{block_n}", "--json"]
        argv += [a for k, v in params.items() for a in ("--param", f"{k}={v}")]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main_explain(argv) == 0
        d = json.loads(out.getvalue())
        fwd, dkdv = truth_classes(pattern, Problem(n, nk, block_m=block_m, block_n=block_n), params)
        for walk, want in (("forward", fwd), ("dkdv", dkdv)):
            w = d["walks"][walk]
            got = (w["visited"], w["unmasked"])
            rows = d["batch"] * d["heads"]  # (no static spec's mask reads b or h)
            assert got == (rows * int((want != tiles.EMPTY).sum()), rows * int((want == tiles.FULL).sum())), \
                (walk, block_m, block_n, w["path"])


def test_walk_steps_print_as_integer_code():
    """Every walk's steps print as integer kernel code: no float rounding (tl.floor) of an
    integer, floor division as // of a non-negative numerator except by an int param (_floordiv
    then, Python's floor semantics)."""
    from attncc.codegen.walks import render_walk

    rng = random.Random(21)
    patterns = [load_spec(f) for f in SPEC_FILES]
    patterns += [parse_spec(mask_spec(f"p{n}", *random_cover_mask(rng))) for n in range(60)]
    for pattern in patterns:
        if pattern.kind != "softmax":
            continue
        plan = analyze(pattern)
        for transposed in (False, True):
            w = render_walk(plan, transposed)
            for name, code in w["steps"]:
                assert "tl.floor" not in code, (pattern.mask, name, code)
                assert "_floordiv" not in code or "prm_" in code, (pattern.mask, name, code)


def _explain_path(pattern, walk="forward"):
    from attncc.report import explain_data

    return explain_data(analyze(pattern), n_q=64, n_k=64, block_m=16, block_n=16)["walks"][walk]["path"]


def test_a_mask_that_hung_the_former_analysis_is_analyzed_at_once():
    """``abs(min(n_q - b, w + i)) == max(max(j, n_q, 1), b ** 3, 1)`` took over 60 s in the former
    key-range analysis (analysis/ranges.py). Now: a second or two (the limit leaves room for a busy
    CI machine), exact block lists, and explain says why."""
    import time

    analyze.cache_clear()
    start = time.perf_counter()
    pattern = parse_spec('[params]\nw = 3\n[mask]\nwhere = "abs(min(n_q - b, w + i)) == max(max(j, n_q, 1), b ** 3, 1)"\n')
    plan = analyze(pattern)
    assert time.perf_counter() - start < 15
    assert plan.forward.kind.value == plan.transposed.kind.value == "block_list"
    assert "depends on b or h" in plan.forward.reason
    assert "exact block lists" in _explain_path(pattern) and plan.forward.reason in _explain_path(pattern)


def test_atoms_past_the_budget_take_the_exact_lists():
    """An atom of more operations than the closed forms' budget (bands.MAX_ATOM_OPS) is left to the
    exact block lists, deterministically, and explain says so; the tiles stay exact."""
    from attncc.analysis.bands import MAX_ATOM_OPS

    small = parse_spec('[mask]\nwhere = "j >= ' + " + ".join(f"i // {k}" for k in range(2, 6)) + '"\n')
    big = parse_spec('[mask]\nwhere = "j >= ' + " + ".join(f"i // {k}" for k in range(2, 50)) + '"\n')
    assert analyze(small).forward.kind.value == "bands"  # the same family within the budget
    plan = analyze(big)
    assert plan.forward.kind.value == "block_list" and f"more than {MAX_ATOM_OPS} operations" in plan.forward.reason
    assert "budget" in _explain_path(big)
    problem = Problem(70, 130, 3, 0, block_m=16, block_n=32)
    assert not _mismatches(big, plan, problem)


@pytest.mark.parametrize("where, params", [
    ("j < (i // d + 1) * d", {"d": 7}),  # block-causal: a query sees its whole chunk and those before
    ("j < (i // 16 + 1) * 16", {}),
    ("j > i // d * d - w", {"d": 5, "w": 3}),
    ("j < (i // d + 1) * d and j > i - w * d", {"d": 3, "w": 4}),
])
def test_strict_comparisons_of_floors_have_closed_forms(where, params):
    """``a < b`` of integer terms is ``a - b + 1 <= 0``; sympy leaves ``floor(i / d)`` of an int param
    undecided (d = 0), but calls check their divisors nonzero, so such atoms get the closed forms their
    ``<=`` twins get (they took exact block lists) and walk exactly the allowed tiles, also with the
    call's divisor negative (the closed form's precondition)."""
    pattern = parse_spec(mask_spec("strict", where, params))
    plan = analyze(pattern)
    assert plan.forward.kind.value == plan.transposed.kind.value == "bands", plan.forward.reason
    rng = random.Random(18)
    failures = []
    for _ in range(40):
        problem, over = random_problem(rng), random_overrides(rng, params)
        if "d" in over and rng.random() < 0.2:
            over["d"] = -over["d"] or -1
        bad = _mismatches(pattern, plan, problem, over)
        if bad:
            failures.append((f"{problem} {over}", bad))
    assert not failures, _report(failures, 40)
