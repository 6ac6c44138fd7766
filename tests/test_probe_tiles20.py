"""Probe 20: walks and masks at forced tile shapes other than the defaults (``ATTNCC_CONFIG``,
``ATTNCC_CONFIG_DKDV``, ``ATTNCC_CONFIG_DQ``, ``ATTNCC_DECODE_CONFIG``), seeded, under the
interpreter, against ``attncc.reference`` (float64) and brute force.

Probed (all clean; the counts are what the probe ran, this file keeps a sample of each):

- shipped softmax specs (sliding_window, sink_window, chunked_local, block_diagonal,
  neighborhood_2d, prefix_lm, longformer, bigbird, strided, dilated, document, local_bidirectional,
  cross_causal, causal, alibi, softcap) with each kernel's tile drawn from 16x32, 32x16, 16x16,
  64x16, 16x64, 128x16, 16x128 (forward, dK/dV and dQ different), params at 1, 2, 3, 5, 7, a tile
  +- 1, 2 tiles + 1; Nq != Nk (1..80), q_offset / k_offset / n_q / n_k, B and H > 1 with GQA
  (1-3 query heads per key head), head dims 8/16/32: o, LSE (finite rows and values) and dq, dk,
  dv of a loss reading o and the LSE: 160 cases; 48 more with ``ATTNCC_FAST_LAUNCH=1`` (configs
  changing between calls of one module in one process); 64 more with some of the three variables
  unset (a forced backward on the interpreter's forward, and the reverse: document's per-call
  block lists classified at the forward's shape);
- ``decode`` at a forced ``BLOCK_N`` of 16-128 and ``ATTNCC_DECODE_SPLITS`` 1, 2, 3, 5, contiguous
  and paged caches (page sizes 16, 17, 24, 48: pages not aligned to tiles), 1-16 new rows,
  rows of kv_len 0 and below Nq: 200 cases;
- random masks (test_probe_exact17's formula and merged-band generators) at 64x16, 16x64, 128x16,
  16x128, 64x32, 32x64, 256x16, 16x256, with call-time param overrides, offsets past a tile,
  B = 2, GQA, LSE in the loss; with and without the residue / column splits forced on
  (``ATTNCC_RESIDUE_MIN_ROWS=2``, ``ATTNCC_COLUMN_MIN_ROWS=4``): 152 cases;
- packed varlen calls (``cu_seqlens_q`` / ``cu_seqlens_k``, 1-3 sequences of 0-40 rows each side) of the
  static shipped specs at the same forced tiles, o and dq, dk, dv per sequence: 60 cases (not kept
  here: tests/test_varlen.py covers the path);
- ``attncc explain --json --block MxN`` on the static shipped specs at 64x16, 16x64, 128x16,
  16x128, 256x16 and shapes no kernel runs (48x16, 24x40, 1x1, 3x7, 7x3, 5x96, 100x9), lengths
  block multiples +- 1 and random up to 300, Nq != Nk: visited / unmasked tiles of both walks and
  the allowed pairs against brute force: 1200 cases.

Found: nothing wrong at these shapes.
"""
from __future__ import annotations

import contextlib
import io
import json
import random

import pytest
import torch

import attncc
from attncc._reference import pair_mask
from attncc.explain import main_explain
from cases import ROOT, build_inline, inputs_for, module, pattern
from test_probe_exact17 import formula_mask, merge_mask, random_overrides
from tile_oracle import mask_spec, tile_classes

SPECS = ["sliding_window", "sink_window", "chunked_local", "block_diagonal", "neighborhood_2d", "prefix_lm",
         "longformer", "bigbird", "strided", "dilated", "document", "local_bidirectional", "cross_causal",
         "causal", "alibi", "softcap"]
PARAMS = {"sliding_window": ["window"], "sink_window": ["sinks", "window"], "chunked_local": ["chunk"],
          "block_diagonal": ["chunk"], "neighborhood_2d": ["width", "radius"], "prefix_lm": ["prefix"],
          "longformer": ["g", "w"], "strided": ["stride"], "dilated": ["window", "dilation"],
          "local_bidirectional": ["w"]}
POSITIVE = ("chunk", "width", "dilation", "stride")  # divisors: at least 1
SHAPES = [(16, 32), (32, 16), (16, 16), (64, 16), (16, 64), (128, 16), (16, 128)]
VARS = ("ATTNCC_CONFIG", "ATTNCC_CONFIG_DKDV", "ATTNCC_CONFIG_DQ")


def _odd_params(rng, name, tile):
    """Each param of ``name`` at 1, 2, 3, 5, 7, a tile +- 1, ... (divisors at least 1)."""
    def value(k):
        v = rng.choice([1, 2, 3, 5, 7, tile - 1, tile + 1, tile, 2 * tile + 1, rng.randint(0, 40)])
        return max(1 if k in POSITIVE else 0, v)
    return {k: value(k) for k in PARAMS.get(name, [])}


def _force(monkeypatch, shapes):
    """Forced (forward, dK/dV, dQ) tiles; a None leaves that kernel's config to the runtime."""
    for var, shape in zip(VARS, shapes):
        if shape is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, f"BLOCK_M={shape[0]},BLOCK_N={shape[1]},num_warps=4,num_stages=1")


def _compare(p, mod, q, k, v, call_kw, gen):
    """o, LSE and the gradients of a loss reading both, against the float64 reference: the
    labels that differ (with their errors)."""
    go = torch.randn(q.shape[:3] + (v.shape[-1],), generator=gen)
    gl = torch.randn(q.shape[:3], generator=gen)
    o, lse = mod.attention(q, k, v, return_lse=True, **call_kw)
    fin = torch.isfinite(lse)
    grads = torch.autograd.grad((o * go).sum() + (torch.where(fin, lse, 0) * gl).sum(), (q, k, v))
    ri = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro, rl = attncc.reference(p, *ri, return_lse=True, **call_kw)
    rfin = torch.isfinite(rl)
    rg = torch.autograd.grad((ro * go.double()).sum() + (torch.where(rfin, rl, 0) * gl.double()).sum(), ri)
    bad = [] if torch.equal(fin, rfin) else [("finite lse rows", int((fin != rfin).sum()))]
    for label, x, r in zip(("o", "lse", "dq", "dk", "dv"), (o.detach(), torch.where(fin, lse, 0).detach()) + grads,
                           (ro.detach(), torch.where(rfin, rl, 0).detach()) + rg):
        err = float((x.double() - r).abs().max()) if x.numel() else 0.0
        if not err <= 1e-4 + 1e-3 * float(r.abs().max() if r.numel() else 0):
            bad.append((label, err))
    return bad


def _spec_case(seed, monkeypatch, drop=()):
    rng = random.Random(seed)
    name = SPECS[seed % len(SPECS)]
    shapes = [None if var in drop else rng.choice(SHAPES) for var in VARS]
    _force(monkeypatch, shapes)
    p, mod = pattern(name), module(name)
    kw = _odd_params(rng, name, rng.choice([16, 32, 64]))
    B, Hkv = rng.choice([1, 2]), rng.choice([1, 2])
    Hq = p.heads_q or Hkv * rng.choice([1, 2, 3])
    Hkv = p.heads_kv or Hkv
    nq, nk = rng.randint(1, 80), rng.randint(1, 80)
    pos = {}
    if name == "document":
        nk = nq
    else:
        if rng.random() < 0.5:
            pos["q_offset"] = rng.choice([1, 5, 15, 16, 17, 33, 63])
        if rng.random() < 0.5:
            pos["k_offset"] = rng.choice([1, 3, 16, 31, 40])
        if rng.random() < 0.3:
            pos["n_q"] = pos.get("q_offset", 0) + nq + rng.choice([0, 1, 17])
        if rng.random() < 0.3:
            pos["n_k"] = pos.get("k_offset", 0) + nk + rng.choice([0, 1, 17])
    D = rng.choice([16, 8, 32])
    gen = torch.Generator().manual_seed(seed)
    inputs = inputs_for(p, B, Hq, nq, gen)
    q = torch.randn(B, Hq, nq, D, generator=gen).requires_grad_()
    k, v = (torch.randn(B, Hkv, nk, D, generator=gen).requires_grad_() for _ in range(2))
    bad = _compare(p, mod, q, k, v, {**pos, **kw, **inputs}, gen)
    return (name, shapes, kw, (B, Hq, Hkv, nq, nk, D), pos), bad


def test_shipped_specs_at_forced_tiles(monkeypatch):
    """The shipped softmax specs, each kernel at its own forced tile (the probe's seeds 0-159:
    one per spec kept), odd params, offsets, GQA."""
    failures = []
    for seed in range(16, 32):
        desc, bad = _spec_case(seed, monkeypatch)
        if bad:
            failures.append((seed, desc, bad))
    assert not failures, failures[:3]


@pytest.mark.parametrize("drop", [("ATTNCC_CONFIG",), ("ATTNCC_CONFIG_DKDV", "ATTNCC_CONFIG_DQ"), ("ATTNCC_CONFIG_DQ",)])
def test_document_lists_when_only_some_kernels_are_forced(monkeypatch, drop):
    """document (block lists classified per call by the forward, shared with the backward at the
    forward's shape unless a backward config is forced): some kernels forced, the others not."""
    seed = next(s for s in range(10, 400, len(SPECS)) if SPECS[s % len(SPECS)] == "document")
    failures = []
    for s in (seed, seed + len(SPECS)):
        desc, bad = _spec_case(s, monkeypatch, drop=drop)
        if bad:
            failures.append((s, desc, bad))
    assert not failures, failures


def test_decode_at_forced_block_n(monkeypatch):
    """decode at a forced BLOCK_N (16-128) and split count, contiguous and paged caches whose pages
    (16, 17, 24, 48 slots) do not line up with the tiles, against the reference per batch row."""
    failures = []
    for seed in range(24):
        rng = random.Random(seed)
        name = [s for s in SPECS if s != "bigbird"][seed % (len(SPECS) - 1)]
        bn, splits = rng.choice([16, 32, 64, 128]), rng.choice([1, 2, 3, 5])
        monkeypatch.setenv("ATTNCC_DECODE_CONFIG", f"BLOCK_N={bn},num_warps=4,num_stages=1")
        monkeypatch.setenv("ATTNCC_DECODE_SPLITS", str(splits))
        p, mod = pattern(name), module(name)
        kw = _odd_params(rng, name, bn)
        B, Hkv = rng.choice([1, 2, 3]), rng.choice([1, 2])
        Hq = p.heads_q or Hkv * rng.choice([1, 2, 3])
        Hkv = p.heads_kv or Hkv
        nq, D = rng.choice([1, 1, 2, 3, 5, 16]), rng.choice([8, 16])
        nmax = rng.randint(nq, 90)
        lens = [rng.choice([0, max(nq - 1, 0), nmax, rng.randint(0, nmax)]) for _ in range(B)]
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(B, Hq, nq, D, generator=gen)
        k, v = (torch.randn(B, Hkv, nmax, D, generator=gen) for _ in range(2))
        inputs = inputs_for(p, B, Hq, nmax, gen)
        page = rng.choice([16, 17, 24, 48]) if name != "document" and rng.random() < 0.5 else None
        kv_len = torch.tensor(lens, dtype=torch.int32)
        if page:
            npg = -(-nmax // page)
            table = torch.randperm(B * npg + 2, generator=gen)[:B * npg].view(B, npg).to(torch.int32)
            kp, vp = (torch.zeros(B * npg + 2, page, Hkv, D) for _ in range(2))
            for b in range(B):
                for j in range(nmax):
                    kp[table[b, j // page], j % page] = k[b, :, j]
                    vp[table[b, j // page], j % page] = v[b, :, j]
            o, lse = mod.decode(q, kp, vp, kv_len=kv_len, block_table=table, return_lse=True, **kw, **inputs)
        else:
            o, lse = mod.decode(q, k, v, kv_len=kv_len, return_lse=True, **kw, **inputs)
        for b, n in enumerate(lens):
            if n < nq:  # the first nq - n rows sit before position 0: no key (o = 0, lse = -inf)
                if not ((o[b, :, :nq - n] == 0).all() and (lse[b, :, :nq - n] == float("-inf")).all()):
                    failures.append((seed, name, bn, splits, page, kw, lens, b, "rows before position 0"))
                continue
            sub = {key: (t[b:b + 1, :n] if t.dim() == 2 else t[b:b + 1]) for key, t in inputs.items()}
            ro, rl = attncc.reference(p, q[b:b + 1].double(), k[b:b + 1, :, :n].double(), v[b:b + 1, :, :n].double(),
                                      q_offset=n - nq, return_lse=True, **kw, **sub)
            fin = torch.isfinite(rl)
            e_o = float((o[b:b + 1].double() - ro).abs().max())
            e_l = float(torch.where(fin, lse[b:b + 1].double() - rl, 0).abs().max())
            if not torch.equal(fin, torch.isfinite(lse[b:b + 1])) or e_o > 1e-4 or e_l > 1e-4:
                failures.append((seed, name, bn, splits, page, kw, lens, b, e_o, e_l))
    assert not failures, failures[:3]


EXPLAIN_SPECS = [s for s in SPECS if s not in ("bigbird", "document")]
EXPLAIN_SHAPES = [(64, 16), (16, 64), (128, 16), (16, 128), (48, 16), (24, 40), (1, 1), (3, 7), (7, 3), (5, 96),
                  (100, 9), (256, 16)]


def test_explain_block_counts_equal_brute_force():
    """``attncc explain --json --block MxN`` (the command) on the static shipped specs at tile shapes
    exact17 did not draw, odd params, Nq != Nk: both walks' visited / unmasked tiles and the pairs."""
    failures = []
    for seed in range(120):
        rng = random.Random(seed)
        name = EXPLAIN_SPECS[seed % len(EXPLAIN_SPECS)]
        bm, bn = rng.choice(EXPLAIN_SHAPES)
        kw = _odd_params(rng, name, rng.choice([bm, bn]))
        n = max(1, rng.choice([rng.randint(1, 300), bm * rng.randint(1, 5) + rng.choice([-1, 0, 1])]))
        nk = max(1, rng.choice([n, rng.randint(1, 300), bn * rng.randint(1, 5) + rng.choice([-1, 0, 1])]))
        argv = [str(ROOT / "specs" / f"{name}.toml"), "--n", str(n), "--nk", str(nk), "--block", f"{bm}x{bn}", "--json"]
        argv += [a for key, value in kw.items() for a in ("--param", f"{key}={value}")]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main_explain(argv) == 0, argv
        d = json.loads(out.getvalue())
        truth = pair_mask(attncc.load_spec(argv[0]), q_rows=n, k_rows=nk, params=kw)[0, 0]
        for walk, want in zip(("forward", "dkdv"), tile_classes(truth, bm, bn)):
            w = d["walks"][walk]
            if (w["visited"], w["unmasked"]) != (int((want != 0).sum()), int((want == 2).sum())):
                failures.append((argv, walk, w["visited"], w["unmasked"], w["path"]))
        if d["allowed_pairs"] != int(truth.sum()):
            failures.append((argv, "pairs", d["allowed_pairs"], int(truth.sum())))
    assert not failures, failures[:3]


WIDE = [(64, 16), (16, 64), (128, 16), (16, 128), (64, 32), (32, 64), (256, 16), (16, 256)]


@pytest.mark.parametrize("splits", [False, True])
def test_random_masks_at_wide_tiles(tmp_path, monkeypatch, splits):
    """exact17's random formulas and merged bands at tall and wide tiles, B = 2 and GQA, call-time
    overrides, offsets past a tile; with the residue / column splits forced on or not."""
    if splits:
        monkeypatch.setenv("ATTNCC_RESIDUE_MIN_ROWS", "2")
        monkeypatch.setenv("ATTNCC_COLUMN_MIN_ROWS", "4")
    rng = random.Random(2003 if splits else 2002)
    cases = {f"w{int(splits)}_{n}": (formula_mask if n % 2 else merge_mask)(rng) for n in range(3)}
    modules = build_inline({key: mask_spec(key, m, p) for key, (m, p) in cases.items()}, tmp_path)
    failures, checked = [], 0
    for key, (mask, params) in cases.items():
        p, mod = modules[key]
        for case in range(2):
            shapes = [rng.choice(WIDE) for _ in VARS]
            _force(monkeypatch, shapes)
            over = random_overrides(rng, params)
            B, Hkv = rng.choice([1, 2]), rng.choice([1, 2])
            Hq = Hkv * rng.choice([1, 2])
            nq, nk = rng.randint(1, 90), rng.randint(1, 90)
            pos = dict(q_offset=rng.choice([0, 0, 15, 17, 63, 129]), k_offset=rng.choice([0, 0, 16, 33, 127]))
            try:
                pair_mask(p, q_rows=1, k_rows=1, params=over)
            except ValueError:
                continue  # a divisor of 0: the reference refuses it too
            gen = torch.Generator().manual_seed(case)
            q = torch.randn(B, Hq, nq, 16, generator=gen).requires_grad_()
            k, v = (torch.randn(B, Hkv, nk, 16, generator=gen).requires_grad_() for _ in range(2))
            bad = _compare(p, mod, q, k, v, {**pos, **over}, gen)
            checked += 1
            if bad:
                failures.append((mask, params, over, shapes, (B, Hq, Hkv, nq, nk), pos, bad))
    assert not failures, failures[:3]
    assert checked >= 3, checked
