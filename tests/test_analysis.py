"""The analysis against brute force: every tile of every spec, classified by evaluating
the mask on every pair (``attncc._reference.pair_mask``, independent of the analysis).

For each tile: FULL => every pair allowed and every key row exists; EMPTY => no pair
allowed. Checked for the interval classifier (every pattern: sound) and for the walks of static
patterns (exact), over tile shapes, ragged lengths, Nq != Nk, offsets and explicit n_q/n_k.
tests/test_exact_plans.py checks the walks' exactness on random masks.
"""
from __future__ import annotations

import glob
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attncc._reference import pair_mask
from attncc.analysis import Iteration, analyze, block_graph, graph_to_csr, plan_grid, walk_grid
from attncc.core import tiles
from attncc.report import explain_data
from attncc.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted(glob.glob(str(ROOT / "specs" / "*.toml")))
SMALL = {"window": 37, "w": 13, "g": 5, "prefix": 21, "stride": 8, "dilation": 3}
TILES = [(16, 16), (32, 16), (16, 64), (24, 40)]
# (q_rows, k_rows, q_offset, k_offset, n_q, n_k): ragged, cross, offsets, a chunk of longer
# sequences. Offset differences of 1 and 15 (mod 16) put a block's last row on a key block's
# first key and a key block's last key on a query block's first row: the boundary cases.
LENGTHS = [(77, 77, 0, 0, None, None), (45, 100, 1, 0, None, None), (37, 53, 29, 14, None, None),
           (50, 70, 30, 13, 120, 90)]
# the analysis evaluates these masks only approximately on single pairs (sin: an interval of
# [-1, 1]); the kernels' exact block lists evaluate them in Triton (tests/test_exact_plans.py)
NOT_EXACT = {"sin"}
BATCH, HEADS = 2, 3

# Masks beyond specs/, for the corners of the normal form, the bounds and the intervals.
EXTRA = {
    "gap": "i - j >= 3 and i - j <= 20",
    "mod_or_rows": "j % 5 == 0 or i < 10",
    "max_lower": "max(i - 20, 0) <= j and j <= i",
    "min_upper": "min(i, 30) >= j",
    "where_bool": "where(i < 30, j <= i, j >= i - 5)",
    "where_num": "j <= where(i < 30, i, 2 * i - 25)",
    "coef2": "2 * j <= i + 3",
    "coef3": "3 * i >= 2 * j - 7 and 3 * j >= i",
    "div_real": "i / 3 >= j / 2",
    "ne": "j != i",
    "not_window": "not (abs(i - j) <= 3)",
    "floor_blocks": "i // 7 == j // 7",
    "ceil": "-((-i) // 4) <= j",
    "mod_sum": "(i + j) % 4 == 1 and j <= i + 5",
    "nonlinear": "j * 2 < i or j > i * i // 50",
    "head_guard": "h < 2 or j <= i",
    "row_window": "j <= i and 50 <= i and i < 70",
    "row_coef": "2 * i >= 7 + j and 3 * i <= 200 and 5 * i >= 231",
    "cross_chunk": "j - n_k <= i - n_q and j > n_k - 40",
    "bucket": "bucket(j - i) >= 20",
    "bucket_uni": "bucket(j - i, bidirectional=False) <= 9",
    "sin": "sin(i) > 0 or j <= i",
    "bigbird_small": "abs(i // 8 - j // 8) <= 1 or i < 8 or j < 8 or random_blocks(2, block=8, seed=3)",
    "random_only": "random_blocks(1, block=16, seed=1) and j <= i",
    "too_complex": " and ".join(f"(i < {3 * k} or j > {5 * k})" for k in range(1, 9)),
}
EXTRA_TOML = {
    "float_param": '[params]\nwin = 10.5\n[mask]\nwhere = "abs(i - j) < win"',
    "guard_param": '[params]\nbig = 5\n[mask]\nwhere = "big > 3 and j <= i"',
    "bool_input": '[inputs]\nseg = { dims = ["h", "n"], dtype = "bool" }\n[mask]\nwhere = "seg[h, j] or i == j"',
    "shifted_input": '[inputs]\ndoc = { dims = ["b", "n"], dtype = "int32" }\n[mask]\nwhere = "doc[b, j + 1] <= doc[b, i]"',
    "padding_causal": '[inputs]\nkv_len = { dims = ["b"], dtype = "int32" }\n[mask]\nwhere = "j < kv_len[b] and j <= i"',
    "input_sum": '[inputs]\nflag = { dims = ["b", "n"], dtype = "int32" }\n[mask]\nwhere = "flag[b, i] + flag[b, j] >= 1"',
    "input_const": '[inputs]\ndoc = { dims = ["b", "n"], dtype = "int32" }\n[mask]\nwhere = "doc[b, 0] == doc[b, j]"',
    "head_input": '[inputs]\nhw = { dims = ["h"], dtype = "int32" }\n[mask]\nwhere = "i - j < hw[h] and j <= i"',
    "pair_table": '[inputs]\npair = { dims = ["n", "n"], dtype = "int32" }\n[mask]\nwhere = "pair[j, i] == 0 or j == i"',
}


def _patterns():
    out = []
    for f in SPECS:
        p = load_spec(f)
        if p.kind != "linear":
            out.append(pytest.param(p, id=Path(f).stem))
    for name, text in EXTRA.items():
        out.append(pytest.param(parse_spec(f'name = "{name}"\n[mask]\nwhere = "{text}"'), id=name))
    for name, text in EXTRA_TOML.items():
        out.append(pytest.param(parse_spec(f'name = "{name}"\n{text}'), id=name))
    return out


PATTERNS = _patterns()


def _params(p):
    return {q.name: SMALL[q.name] for q in p.params if q.name in SMALL}


def _inputs(p, positions, rng):
    """Random inputs: documents with some of length 1, padding lengths, small integer tables."""
    out = {}
    for d in p.inputs:
        shape = [BATCH if x == "b" else HEADS if x == "h" else positions if x == "n" else x for x in d.dims]
        if d.dtype == "bool":
            out[d.name] = torch.tensor([rng.random() < 0.3 for _ in range(torch.Size(shape).numel())]).view(shape)
        elif d.name == "doc":
            rows = []
            for _ in range(shape[0]):
                ids, doc = [], 0
                while len(ids) < positions:
                    ids += [doc] * rng.choice([1, 1, 2, 3, 9, 17, 40, 100])
                    doc += 1
                rows.append(ids[:positions])
            out[d.name] = torch.tensor(rows, dtype=torch.int32)
        elif d.name == "kv_len":
            out[d.name] = torch.tensor([rng.randrange(0, positions + 3) for _ in range(shape[0])], dtype=torch.int32)
        elif d.name == "hw":
            out[d.name] = torch.tensor([rng.randrange(0, 30) for _ in range(shape[0])], dtype=torch.int32)
        else:  # 0 / 1 entries at the declared type (the reference refuses an int tensor for a float input)
            dtype = getattr(torch, d.dtype) if d.dtype.startswith(("float", "bfloat")) else torch.int32
            out[d.name] = torch.tensor([rng.random() < 0.2 for _ in range(torch.Size(shape).numel())],
                                       dtype=dtype).view(shape)
    return out


def _tile_truth(truth, block_m, block_n):
    """Per tile: some pair allowed / every existing pair allowed; and which key blocks are whole."""
    B, H, nq, nk = truth.shape
    nqb, nkb = -(-nq // block_m), -(-nk // block_n)
    pad = (0, nkb * block_n - nk, 0, nqb * block_m - nq)
    anyp = torch.nn.functional.pad(truth, pad, value=False).view(B, H, nqb, block_m, nkb, block_n).any(5).any(3)
    t = torch.nn.functional.pad(truth, pad, value=True).view(B, H, nqb, block_m, nkb, block_n).all(5).all(3)
    whole = (torch.arange(nkb) + 1) * block_n <= nk
    return anyp, t, whole.view(1, 1, 1, nkb)


def _check_grid(grid, anyp, allp, whole, exact, what):
    grid = grid.expand(anyp.shape)
    bad_empty = (grid == tiles.EMPTY) & anyp
    assert not bad_empty.any(), f"{what}: EMPTY tiles with allowed pairs at {torch.nonzero(bad_empty)[:5].tolist()}"
    bad_full = (grid == tiles.FULL) & ~(allp & whole)
    assert not bad_full.any(), f"{what}: FULL tiles with a masked pair or key tail at {torch.nonzero(bad_full)[:5].tolist()}"
    if exact:
        missed = (grid != tiles.FULL) & allp & whole
        assert not missed.any(), f"{what}: tiles all allowed but not FULL at {torch.nonzero(missed)[:5].tolist()}"


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: "q{}k{}off{}_{}n{}_{}".format(*x))
@pytest.mark.parametrize("pattern", PATTERNS)
def test_tiles_against_brute_force(pattern, lengths):
    q_rows, k_rows, q_offset, k_offset, n_q, n_k = lengths
    plan = analyze(pattern)
    params = _params(pattern)
    rng = random.Random(f"{pattern.name}{lengths}")
    positions = max(q_offset + q_rows, k_offset + k_rows, n_q or 0, n_k or 0) + 2
    inputs = _inputs(pattern, positions, rng)
    truth = pair_mask(pattern, q_rows=q_rows, k_rows=k_rows, q_offset=q_offset, k_offset=k_offset, n_q=n_q, n_k=n_k,
                      batch=BATCH, heads=HEADS, inputs=inputs, params=params)
    n_q_ = q_offset + q_rows if n_q is None else n_q
    n_k_ = k_offset + k_rows if n_k is None else n_k
    exact = not pattern.inputs and pattern.name not in NOT_EXACT
    for block_m, block_n in TILES:
        anyp, allp, whole = _tile_truth(truth, block_m, block_n)
        where = f"{pattern.name} {lengths} tile {block_m}x{block_n}"
        common = dict(q_offset=q_offset, k_offset=k_offset, q_rows=q_rows, k_rows=k_rows, block_m=block_m,
                      block_n=block_n)
        grid = tiles.classify_grid(plan.classifier, **common, n_q=n_q_, n_k=n_k_, params=params, inputs=inputs,
                                   batch=BATCH, heads=HEADS, device="cpu")
        assert grid.dtype == torch.int8 and grid.shape[-2:] == anyp.shape[-2:]
        _check_grid(grid, anyp, allp, whole, False, where + " (classifier)")

        if not pattern.inputs:  # the dK/dV walk: per key block its query blocks, FULL ones whole
            t = torch.stack([torch.stack([walk_grid(plan, "dkdv", **common, n_q=n_q, n_k=n_k, params=params, b=b, h=h)
                                          for h in range(HEADS)]) for b in range(BATCH)]).transpose(-1, -2)
            q_whole = ((torch.arange(anyp.shape[-2]) + 1) * block_m <= q_rows).view(1, 1, -1, 1)
            _check_grid(t, anyp, allp, q_whole, exact, where + " (dK/dV walk)")

        # the kernel's grid as a networkx block graph and its CSR lists, both directions
        kgrid = plan_grid(plan, **common, n_q=n_q, n_k=n_k, params=params, inputs=inputs, batch=BATCH, heads=HEADS)
        _check_grid(kgrid, anyp, allp, whole, exact, where + " (plan_grid)")
        b, h = BATCH - 1, HEADS - 1
        g = block_graph(plan, **common, n_q=n_q, n_k=n_k, params=params, inputs=inputs, batch=BATCH, heads=HEADS,
                        b=b, h=h)
        g2d = kgrid.expand(BATCH, HEADS, *kgrid.shape[2:])[b, h]
        nqb, nkb = g2d.shape
        for transpose in (False, True):
            want = tiles.to_block_lists(g2d.transpose(-1, -2) if transpose else g2d)
            got = graph_to_csr(g, nqb, nkb, transpose=transpose)
            for w, x in zip(want, got):
                assert torch.equal(w, x), f"{where}: CSR from the graph differs (transpose={transpose})"


SWEEP = ["causal", "sliding_window", "cross_causal", "local_bidirectional", "longformer", "prefix_lm", "gap",
         "max_lower", "coef2", "coef3", "row_window", "row_coef", "where_num", "cross_chunk", "guard_param",
         "floor_blocks", "ceil", "min_upper"]


@pytest.mark.parametrize("pattern", [p for p in PATTERNS if p.id in SWEEP])
def test_walks_over_every_block_alignment(pattern):
    """Every residue of q_offset modulo BLOCK_M and of q_offset - k_offset modulo BLOCK_N:
    each off-by-one of a bound shows up at one of them."""
    plan = analyze(pattern)
    params = _params(pattern)
    q_rows, k_rows = 48, 90
    for block_m, block_n in ((16, 16), (16, 32)):
        for d in range(block_n):
            q_offset, k_offset = 40 + d, (2 * d) % block_n
            truth = pair_mask(pattern, q_rows=q_rows, k_rows=k_rows, q_offset=q_offset, k_offset=k_offset,
                              params=params)
            anyp, allp, whole = _tile_truth(truth, block_m, block_n)
            common = dict(q_offset=q_offset, k_offset=k_offset, q_rows=q_rows, k_rows=k_rows, block_m=block_m,
                          block_n=block_n)
            where = f"{pattern.name} k_offset={k_offset} tile {block_m}x{block_n}"
            grid = walk_grid(plan, "forward", **common, params=params)
            _check_grid(grid, anyp, allp, whole, True, where + " (forward walk)")
            grid = tiles.classify_grid(plan.classifier, **common, n_q=q_offset + q_rows, n_k=k_offset + k_rows,
                                       params=params, inputs={}, batch=1, heads=1, device="cpu")
            _check_grid(grid, anyp, allp, whole, False, where + " (classifier)")


def test_iteration_per_spec():
    plans = {Path(f).stem: analyze(load_spec(f)) for f in SPECS}
    got = {name: (p.forward.kind.value, p.transposed.kind.value, p.dynamic) for name, p in plans.items()}
    assert got["dense"] == ("dense", "dense", False) and got["t5_bias"] == ("dense", "dense", False)
    assert got["linear_elu"][0] == "dense"
    for name in ("causal", "sliding_window", "cross_causal", "prefix_lm", "longformer", "local_bidirectional",
                 "alibi", "gqa", "mqa", "softcap", "rope_causal"):
        assert got[name] == ("bands", "bands", False), name
    for name in ("bigbird", "strided", "dilated"):  # no closed form: exact block lists
        assert got[name] == ("block_list", "block_list", False), name
        assert plans[name].forward.reason and plans[name].needs_exact_lists
    assert got["document"] == ("block_list", "block_list", True) and got["padding"] == ("block_list", "block_list", True)
    assert plans["prefix_lm"].forward.segments == 1, "j < prefix or j <= i merges into one band"
    assert plans["longformer"].forward.segments == 2, "a column and a band"
    assert not plans["causal"].needs_exact_lists and plans["sliding_window"].needs_exact_lists


def test_too_complex_masks_take_exact_block_lists():
    plan = analyze(next(p.values[0] for p in PATTERNS if p.id == "too_complex"))
    assert plan.iteration is Iteration.BLOCK_LIST and "too many clauses" in plan.forward.reason


def test_block_stats_of_document():
    plan = analyze(load_spec(ROOT / "specs" / "document.toml"))
    assert {(s.input, s.axis_var, s.block) for s in plan.block_stats} == {("doc", "i", "m"), ("doc", "j", "n")}
    assert plan.classifier is not None and plan.forward.kind is Iteration.BLOCK_LIST and plan.forward.cover is None


def test_document_tiles_are_exact_for_aligned_documents():
    """Documents aligned to the tiles: every tile inside one document below the diagonal is FULL."""
    p = load_spec(ROOT / "specs" / "document.toml")
    doc = (torch.arange(256) // 64).view(1, -1).to(torch.int32)
    grid = tiles.classify_grid(analyze(p).classifier, q_offset=0, k_offset=0, q_rows=256, k_rows=256, block_m=32,
                               block_n=32, n_q=256, n_k=256, params={}, inputs={"doc": doc}, batch=1, heads=1,
                               device="cpu")[0, 0]
    qb, kb = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    same_doc = (qb // 2) == (kb // 2)
    assert torch.equal(grid == tiles.FULL, same_doc & (kb < qb))
    assert torch.equal(grid == tiles.EMPTY, ~same_doc | (kb > qb))


def test_band_texts():
    def lines(name, **over):
        return analyze(load_spec(ROOT / "specs" / f"{name}.toml")).forward.cover.lines()

    assert lines("causal") == ("band: -inf <= j <= x",)
    assert lines("prefix_lm") == ("band: -inf <= j <= max(x, prefix - 1)",)
    assert lines("longformer") == ("rows: rows -inf <= x <= g - 1: -inf <= j <= inf", "column: -inf <= j <= g - 1",
                                   "band: -w + x <= j <= w + x", "exact when: -2*w <= 0")


# ---------------------------------------------------------------------------
# runtime pieces
# ---------------------------------------------------------------------------

def test_tiles_imports_no_compiler():
    code = ("import sys, attncc.runtime.tiles; "
            "bad = [m for m in ('sympy', 'networkx', 'jinja2', 'attncc.spec', 'attncc.analysis') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_to_block_lists_matches_rows():
    g = torch.Generator().manual_seed(0)
    grid = torch.randint(0, 3, (2, 3, 7, 9), generator=g).to(torch.int8)
    fc, fi, pc, pi = tiles.to_block_lists(grid)
    assert fc.dtype == fi.dtype == torch.int32 and fi.shape == (2, 3, 7, 9)
    assert all(t.is_contiguous() for t in (fc, fi, pc, pi)), "kernels index the lists with row strides"
    for idx in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(7)).tolist():
        row = grid[tuple(idx)]
        for count, lst, cls in ((fc, fi, tiles.FULL), (pc, pi, tiles.PARTIAL)):
            want = torch.nonzero(row == cls).flatten().tolist()
            n = int(count[tuple(idx)])
            assert lst[tuple(idx)][:n].tolist() == want and not lst[tuple(idx)][n:].any()
    tfc, tfi, _, _ = tiles.to_block_lists(grid.transpose(-1, -2))
    assert tfc.shape == (2, 3, 9) and torch.equal(tfc, (grid == tiles.FULL).sum(-2).to(torch.int32))
    assert tfi.is_contiguous() and tfi.shape == (2, 3, 9, 7)


def _random_interval(rng, integer=True):
    a = rng.randint(-40, 40) if integer else rng.uniform(-40, 40)
    b = a + (rng.randint(0, 30) if integer else rng.uniform(0, 30))
    return a, b


def _points(iv, rng, integer=True):
    a, b = iv
    pts = [a, b] + [(rng.randint(a, b) if integer else rng.uniform(a, b)) for _ in range(6)]
    return pts


UNARY = {
    "neg": lambda x: -x, "abs_": abs, "floor_": lambda x: x // 1,
    "pow_int": (lambda x: x**3, 3), "pow_int_even": (lambda x: x**2, 2),
}


def test_interval_ops_are_sound():
    """Each op's interval holds the op applied to points of its argument intervals,
    with the intervals as tensors and as Python numbers."""
    import math

    rng = random.Random(0)
    binary = {
        "add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y,
        "min_": min, "max_": max,
        "div": lambda x, y: x / y if y != 0 else None,
        "floordiv": lambda x, y: x // y if y != 0 else None,
        "mod": lambda x, y: x % y if y != 0 else None,
    }
    for trial in range(400):
        x, y = _random_interval(rng), _random_interval(rng)
        if trial % 3 == 0:
            y = (y[0], y[0])  # point divisors exercise the constant paths
        for as_tensor in (False, True):
            def wrap(iv):
                if not as_tensor:
                    return iv
                return tuple(torch.tensor([float(v)], dtype=torch.float64) for v in iv)

            for op, fn in binary.items():
                args = (wrap(x), wrap(y)) if op != "mod" else (wrap(x), wrap(y) if not as_tensor or y[0] != y[1] else y[0], True)
                lo, hi = getattr(tiles, op)(*args)
                lo, hi = float(lo if not isinstance(lo, torch.Tensor) else lo.item()), float(hi if not isinstance(hi, torch.Tensor) else hi.item())
                for p in _points(x, rng):
                    for q in _points(y, rng):
                        v = fn(p, q)
                        if v is None:
                            continue
                        assert lo - 1e-9 <= v <= hi + 1e-9, f"{op}({x}, {y}) gave [{lo}, {hi}], but {op}({p}, {q}) = {v}"
            for op, fn in UNARY.items():
                name, arg = (op, ())
                if isinstance(fn, tuple):
                    fn, n = fn
                    name, arg = "pow_int", (n,)
                lo, hi = getattr(tiles, name)(wrap(x), *arg)
                lo, hi = float(lo if not isinstance(lo, torch.Tensor) else lo.item()), float(hi if not isinstance(hi, torch.Tensor) else hi.item())
                for p in _points(x, rng):
                    assert lo <= fn(p) <= hi, f"{op}({x}) gave [{lo}, {hi}], but at {p}: {fn(p)}"
            for op in ("le", "lt", "eq", "ne"):
                mt, mf = getattr(tiles, op)(wrap(x), wrap(y))
                mt, mf = bool(mt if not isinstance(mt, torch.Tensor) else mt.item()), bool(mf if not isinstance(mf, torch.Tensor) else mf.item())
                fn = {"le": lambda p, q: p <= q, "lt": lambda p, q: p < q, "eq": lambda p, q: p == q,
                      "ne": lambda p, q: p != q}[op]
                for p in _points(x, rng):
                    for q in _points(y, rng):
                        assert (mt if fn(p, q) else mf), f"{op}({x}, {y}) said ({mt}, {mf}) but ({p}, {q}) gives {fn(p, q)}"
    assert math.isinf(tiles.unbounded()[1])


def test_bucket_interval_is_sound():
    from attncc.core import semantics

    rng = random.Random(1)
    for bidir in (1, 0):
        for _ in range(200):
            a = rng.randint(-300, 300)
            b = a + rng.randint(0, 200)
            lo, hi = tiles.bucket((torch.tensor(float(a)), torch.tensor(float(b))), 32, 128, bidir)
            values = [semantics.t5_bucket(d, 32, 128, bool(bidir)) for d in range(a, b + 1)]
            assert float(lo) <= min(values) and max(values) <= float(hi)


# ---------------------------------------------------------------------------
# explain
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["causal", "longformer", "document", "bigbird", "dense", "padding"])
def test_explain_density_is_exact(name):
    p = load_spec(ROOT / "specs" / f"{name}.toml")
    params = _params(p)
    inputs = _inputs(p, 203, random.Random(name)) if p.inputs else None
    d = explain_data(analyze(p), n_q=201, n_k=150, block_m=32, block_n=16, head_dim=64, batch=BATCH, heads=HEADS,
                     params=params, inputs=inputs)
    truth = pair_mask(p, q_rows=201, k_rows=150, batch=BATCH, heads=HEADS, inputs=inputs, params=params)
    assert d["allowed_pairs"] == int(truth.sum())
    assert d["density"] == pytest.approx(truth.float().mean().item())
    assert sum(d["tiles"].values()) == BATCH * HEADS * 7 * 10
    assert d["flops"] == pytest.approx(4 * BATCH * HEADS * 201 * 150 * 64 * d["density"])
    assert d["dense_flops"] == 4 * BATCH * HEADS * 201 * 150 * 64
    assert d["naive_score_memory_bytes"] == BATCH * HEADS * 201 * 150 * 4


def test_explain_cli_json(capsys):
    from attncc.explain import main_explain

    assert main_explain([str(ROOT / "specs" / "sliding_window.toml"), "--n", "1000", "--nk", "700", "--block",
                         "64x32", "--param", "window=100", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert {"density", "tiles", "flops", "dense_flops", "iteration"} <= set(d)
    assert d["iteration"] == "bands" and set(d["tiles"]) == {"empty", "full", "partial"}
    assert main_explain([str(ROOT / "specs" / "document.toml"), "--n", "300"]) == 0
    assert "block_list" in capsys.readouterr().out
