"""The Gluon sm90 forward on block-list walks and [inputs] (issue 20; docs/gluon.md "Rendered
fragments"), checked without a GPU:

- the specs whose key blocks have no closed form (strides, dilations, 2D neighborhoods) or depend on
  [inputs] (document ids, padding lengths) take a rendered walk over the block lists the module
  makes for the Gluon kernel's tiles, and those with bias tables (learned ALiBi slopes, T5) a score
  that reads them; every such spec has its ``_gluon.py`` file and the module hands calls to it;
- the whole host path through a generated module with ``ATTNCC_BACKEND=gluon``, its kernel replaced
  by an emulation (tests/gluon_host.py) that runs the launch's own arguments (the fragments, the
  lists and inputs as pointers with their strides) tile by tile as the ws consumer or the
  pipelined kernel walks: against the float64 reference at odd sizes, offsets, GQA, random
  document ids and lengths, inputs strided, transposed or broadcast; the blocks walked against the
  brute-force tile oracle (every non-empty tile once, unmasked only full ones; exactly the exact
  lists' classes for static patterns);
- each new spec's launch compiled for sm90 (tests/test_gluon_rendered.py's child processes).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

import attncc  # noqa: E402
from attncc._reference import pair_mask  # noqa: E402
from attncc.core import tiles  # noqa: E402
from attncc.runtime import backend  # noqa: E402
from attncc.runtime.gluon import launch  # noqa: E402
from cases import SMALL_PARAMS, inputs_for, module, pattern  # noqa: E402
from gluon_host import as_python, emulate_forward, emulated_forwards  # noqa: E402
from tile_oracle import tile_classes, truth_classes  # noqa: E402

import test_gluon_rendered as rendered  # noqa: E402

LISTED = ("bigbird", "dilated", "document", "neighborhood_2d", "padding", "strided")  # block-list walks
TABLES = ("alibi_learned", "t5_bias")  # closed-form walks, a score reading [inputs]
NEW = LISTED + TABLES + ("rope_causal",)  # (RoPE: q and k rotated by the module's pre-pass)
DYNAMIC = ("document", "padding")  # lists classified from the inputs on every call (may be loose)


def test_each_spec_takes_rendered_fragments():
    for name in NEW:
        mod = module(name)
        assert mod.SPEC.gluon == "rendered" and not mod.SPEC.gluon_reason, name
        frag = mod.SPEC.gluon_fragments.load()
        assert getattr(frag, "LISTS", False) == (name in LISTED)
        assert (getattr(frag, "block", None) is not None) == (name in LISTED)
        assert set(getattr(frag, "INPUTS", ())) == {d.name for d in pattern(name).inputs}
    assert module("causal_dropout").SPEC.gluon is None and "dropout" in module("causal_dropout").SPEC.gluon_reason


# why each keeps the tl backward (the Gluon backward's kernels read q, k, v and the params alone, and
# walk closed-form query blocks per key block)
BACKWARD_TL = {"alibi_learned": r"\[inputs\]", "bigbird": "no closed form", "dilated": "no closed form",
               "document": r"\[inputs\]", "neighborhood_2d": "no closed form", "padding": r"\[inputs\]",
               "rope_causal": "RoPE", "strided": "no closed form", "t5_bias": r"\[inputs\]"}


@pytest.mark.parametrize("name", NEW)
def test_each_spec_keeps_the_tl_backward_and_says_why(name):
    """The analysis, the fragments file, the module, explain's backend line and the backend agree: a
    Gluon forward, the tl backward, and the reason."""
    import re

    from attncc.analysis.builtin import gluon_fit
    from attncc.analysis.plan import analyze
    from attncc.analysis.residue import split_of
    from attncc.report import backend_text

    plan = analyze(pattern(name))
    got = gluon_fit(plan)
    assert got.kind == "rendered" and not got.backward and re.search(BACKWARD_TL[name], got.backward_reason)
    mod = module(name)
    frag = mod.SPEC.gluon_fragments.load()
    # (a module run by residue classes has its kernels' pattern: attncc.analysis.residue)
    split = split_of(pattern(name))  # (residue classes, summary columns: attncc.analysis.residue)
    kernels = gluon_fit(analyze(split.pattern)) if split is not None else got
    assert frag.BACKWARD_REASON == kernels.backward_reason and frag.QSEGMENTS == 0
    assert frag.qwalk is None and frag.qmask is None and not frag.backward_exact(None)
    assert "gluon_backward" not in open(mod.__file__).read()
    auto = ("Gluon sm90 forward (its rendered walks, mask and score) on sm90 "
            "for calls of at least 2**28 (batch x heads x queries x keys) pairs, tl elsewhere and with ATTNCC_BACKEND=triton")
    tl = f"tl; Gluon sm90 forward (its rendered walks, mask and score) with ATTNCC_BACKEND=gluon (auto keeps tl: {got.auto_reason})"
    assert backend_text(plan, head_dim=128, value_dim=128, dtype="bf16") == (
        (tl if got.auto_reason else auto) + f"; the backward tl (the Gluon backward does not take its fragments: "
                                            f"{got.backward_reason})")
    assert bool(got.auto_reason) is (name != "rope_causal")  # lists, [inputs]: measured slower or not timed


# ------------------------------------------------------------------------------------------------
# the host path, the kernel emulated


@pytest.fixture
def emulated(monkeypatch):
    """ATTNCC_BACKEND=gluon on the CPU, the kernels emulated; ``emulated(config)`` sets the tiles."""
    stubs = emulated_forwards(monkeypatch)

    def use(config):
        monkeypatch.setattr(backend, "gluon_config", lambda D: config)
        return stubs[config.kernel]
    return use


def odd_layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in another memory layout: "strided" (every other element of a wider tensor),
    "transposed" (column-major), "broadcast" (batch row 0 for every row: stride 0; changes values)."""
    if how == "strided":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if how == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    if how == "broadcast" and t.dim() == 2:
        return t[:1].expand(t.shape[0], -1)
    return t


CASES = [  # (B, Hq, Hkv, Nq, Nk, q_offset, k_offset, n_extra, layout)
    (2, 4, 2, 70, 90, 0, 0, 0, "strided"),
    (1, 2, 1, 45, 100, 30, 5, 0, "transposed"),
    (2, 2, 2, 100, 51, 61, 0, 17, "broadcast"),
    (1, 3, 1, 33, 77, 0, 40, 0, "contiguous"),
]


def run_case(emulated_config, name, case, seed, config):
    B, Hq, Hkv, Nq, Nk, q_offset, k_offset, n_extra, layout = case
    pat, mod = pattern(name), module(name)
    if pat.heads_q or pat.heads_kv:
        Hq, Hkv = pat.heads_q or Hq, pat.heads_kv or Hkv
    gen = torch.Generator().manual_seed(seed)
    positions = max(q_offset + Nq, k_offset + Nk) + n_extra
    inputs = {n: odd_layout(t, layout) for n, t in inputs_for(pat, B, Hq, positions, gen).items()}
    if name == "padding" and seed % 2:  # a row without a key at all, one with every key
        inputs["kv_len"] = odd_layout(torch.tensor([0, positions][:B] + [5] * (B - 2), dtype=torch.int32), layout)
    params = {**pat.param_values, **SMALL_PARAMS.get(name, {})}
    q = torch.randn(B, Hq, Nq, 64, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(B, Hkv, Nk, 64, generator=gen).to(torch.bfloat16) for _ in range(2))
    n = dict(n_q=q_offset + Nq + n_extra, n_k=k_offset + Nk + n_extra) if n_extra else {}
    stub = emulated_config(config)
    stub.results.clear()
    o, lse = mod.attention(q, k, v, q_offset=q_offset, k_offset=k_offset, return_lse=True, **n, **inputs, **params)
    (r,) = stub.results
    out, out_lse, walked, block_m, block_n, q_seen, k_seen = r.out, r.lse, r.walked, r.block_m, r.block_n, r.q, r.k
    ref, ref_lse = attncc.reference(pat, q.double(), k.double(), v.double(), return_lse=True, q_offset=q_offset,
                                    k_offset=k_offset, **n, **inputs, **params)
    if pat.rope is not None:  # the kernel read the module's rotated q, k (bf16): the reference's within bf16,
        assert float((out - ref).abs().max()) < 3e-2 and not torch.equal(q_seen, q)
        pat = dataclasses.replace(pat, rope=None)  # and exactly the unrotated pattern's on what it read
        ref, ref_lse = attncc.reference(pat, q_seen.double(), k_seen.double(), v.double(), return_lse=True,
                                        q_offset=q_offset, k_offset=k_offset, **n, **inputs, **params)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(out_lse), seen) and torch.equal(torch.isfinite(lse), seen)
    assert torch.all(out[~seen] == 0) and not torch.isnan(out).any()
    err = float((out - ref).abs().max())
    # float64 emulation: what is left is the score's float32 (a learned slope times distances up to
    # ~150 is ~1e2, rounded to ~1e-5), far below one pair more or less (~1e-2)
    assert err < 1e-4, err
    if seen.any():
        assert float((out_lse[seen] - ref_lse[seen]).abs().max()) < 1e-4
    assert float((o.double() - ref).abs().max()) < 3e-2  # what the module returned, in bf16

    # the blocks walked against the brute-force tile classes of every (b, h)
    truth = pair_mask(pat, q_rows=Nq, k_rows=Nk, q_offset=q_offset, k_offset=k_offset, batch=B, heads=Hq,
                      inputs=inputs, params=params, **n)
    assert len({w[:4] for w in walked}) == len(walked), "a block walked twice"
    for b in range(B):
        for h in range(Hq):
            classes = tile_classes(truth[b, h], block_m, block_n)[0]
            got = torch.zeros_like(classes)
            for (wb, wh, qb, kb, masked) in walked:
                if (wb, wh) == (b, h):
                    got[qb, kb] = tiles.PARTIAL if masked else tiles.FULL
            some = classes != tiles.EMPTY
            assert bool((got[some] != tiles.EMPTY).all()), f"a tile with allowed pairs not walked ({b}, {h})"
            assert bool((classes[got == tiles.FULL] == tiles.FULL).all()), f"a tile walked unmasked is not full"
            if name not in DYNAMIC:  # exact lists (or closed forms): exactly the non-empty tiles,
                assert torch.equal(got != tiles.EMPTY, some), (b, h)
                if config.kernel == "pipelined":  # and the full ones unmasked (ws: the first block masked)
                    assert torch.equal(got, classes), (b, h, (got != classes).nonzero()[:5].tolist())
    return walked


@pytest.mark.parametrize("name", NEW)
def test_host_path_emulated_against_the_reference(emulated, name):
    """Through the module: the ws kernel (BLOCK_N 16, its 128-row tiles) on two cases, the pipelined
    kernel at 32 x 16 tiles on the others."""
    ws = dataclasses.replace(launch.default_config(64, "ws"), block_n=16, pingpong=False)
    pipelined = launch.GluonConfig("pipelined", block_m=32, block_n=16, stages=2)
    # (BigBird's exact lists run its tile kernel in the interpreter: two cases, ~7 s)
    for n, case in enumerate(CASES[:2] if name == "bigbird" else CASES):
        run_case(emulated, name, case, seed=n, config=ws if n % 2 else pipelined)


def test_random_documents_and_lengths(emulated):
    """Seeded random documents and padding lengths at random sizes and offsets (pipelined, 16 x 16)."""
    import random
    rng = random.Random(5)
    config = launch.GluonConfig("pipelined", block_m=16, block_n=16, stages=2)
    for n in range(6):
        name = rng.choice(DYNAMIC)
        case = (rng.randint(1, 2), 2, rng.choice([1, 2]), rng.randint(1, 60), rng.randint(1, 60),
                rng.choice([0, rng.randint(1, 30)]), rng.choice([0, rng.randint(1, 30)]), rng.choice([0, 9]),
                rng.choice(["strided", "transposed", "contiguous"]))
        run_case(emulated, name, case, seed=100 + n, config=config)


def test_the_emulation_catches_a_wrong_list_walk(emulated, monkeypatch):
    """A walk that drops each tile's last block, or a block() that maps every position to block 0,
    fails the checks above."""
    frag = module("document").SPEC.gluon_fragments.load()
    real_walk, real_block = as_python(frag.walk), as_python(frag.block)

    def short_walk(*args):
        lo, full_lo, full_hi, hi = real_walk(*args)
        return lo, full_lo, full_hi - 1, hi - 1

    def first_block(t, qb, segs, ctx):
        return real_block(t, qb, segs, ctx) * 0

    config = launch.GluonConfig("pipelined", block_m=16, block_n=16, stages=2)
    for attr, wrong in (("walk", short_walk), ("block", first_block)):
        with monkeypatch.context() as m:
            m.setattr(frag, attr, wrong)
            with pytest.raises(AssertionError):
                run_case(emulated, "document", (1, 2, 1, 60, 60, 0, 0, 0, "contiguous"), seed=1, config=config)
    run_case(emulated, "document", (1, 2, 1, 60, 60, 0, 0, 0, "contiguous"), seed=1, config=config)


def oracle_lists(pat, problem, params, B, H):
    """BlockLists of the brute-force tile classes (tile_oracle) of every (b, h): what the module's
    exact lists are, made without the module."""
    from attncc.runtime.blocks import BlockLists

    grid = torch.stack([torch.stack([truth_classes(pat, problem, params, b=b, h=h)[0] for h in range(H)])
                        for b in range(B)])
    full_count, full_index, partial_count, partial_index = tiles.to_block_lists(grid)
    nqb, nkb = grid.shape[-2:]
    return BlockLists(full_count, full_index, partial_count, partial_index, stride_b=H * nqb, stride_h=nqb,
                      stride_row=1, width=nkb), grid


def test_random_masks_without_closed_form(tmp_path):
    """Seeded random masks (tile_oracle.random_mask: strides, dilations, moduli, unions) whose walks
    are block lists: their rendered walk, block and mask over the oracle's exact lists, emulated as
    the pipelined kernel walks, against the reference, the blocks walked exactly the oracle's."""
    import random

    from attncc.codegen import render_gluon
    from attncc.spec import SpecError, parse_spec
    from gluon_host import Fragments, load_fragments
    from tile_oracle import mask_spec, random_mask, random_overrides, random_problem

    rng = random.Random(31)
    checked = 0
    for n in range(40):
        mask, params = random_mask(rng)
        try:
            pat = parse_spec(mask_spec(f"l{n}", mask, params))
        except SpecError:
            continue
        text = render_gluon(pat)
        if text is None or "LISTS = True" not in text:
            continue
        frag = Fragments(load_fragments(text, tmp_path, f"l{n}"))
        problem = random_problem(rng, shapes=[(16, 16), (32, 16), (16, 32)])
        params = {**pat.param_values, **random_overrides(rng, pat.param_values)}
        B, H = 1, 2
        lists, grid = oracle_lists(pat, problem, params, B, H)
        p = problem
        q, k, v = rendered.qkv(B, H, 1, p.q_rows, p.k_rows, 16, seed=n)
        walked = set()
        n_q = p.q_offset + p.q_rows if p.n_q is None else p.n_q
        n_k = p.k_offset + p.k_rows if p.n_k is None else p.n_k
        args = tuple(params[x] for x in frag.module.PARAMS) + (
            lists.full_count, lists.full_index, lists.partial_count, lists.partial_index, lists.stride_b,
            lists.stride_h, lists.width, p.q_offset, p.block_m)
        o, lse = emulate_forward(frag, q, k, v, scale=0.3, q_offset=p.q_offset, k_offset=p.k_offset, n_q=n_q,
                                 n_k=n_k, pattern_args=args, block_m=p.block_m, block_n=p.block_n, walked=walked,
                                 kernel="pipelined")
        ref, ref_lse = attncc.reference(pat, q, k, v, return_lse=True, q_offset=p.q_offset, k_offset=p.k_offset,
                                        n_q=n_q, n_k=n_k, scale=0.3, **params)
        seen = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), seen) and torch.all(o[~seen] == 0), (mask, problem)
        assert float((o - ref).abs().max()) < 1e-6, (mask, problem)
        got = torch.zeros_like(grid)
        for (b, h, qb, kb, masked) in walked:
            got[b, h, qb, kb] = tiles.PARTIAL if masked else tiles.FULL
        assert torch.equal(got, grid), (mask, problem)
        checked += 1
    assert checked >= 6, checked


# ------------------------------------------------------------------------------------------------
# compiled for sm90


COMPILES = [(name, "ws", 128, "bfloat16") for name in NEW]
COMPILES += [("document", "pipelined", 64, "float16"), ("strided", "ws", 64, "float16"),
             ("dilated", "pipelined", 128, "bfloat16")]
if rendered.ALL:  # ATTNCC_GLUON_ALL=1: both kernels x 3 head dims x 2 dtypes x every spec here
    COMPILES = [(name, kernel, d, dt) for name in NEW for kernel in launch.KERNELS for d in (64, 128, 256)
                for dt in ("bfloat16", "float16")]


# The child compiling COMPILES (test_gluon_rendered.rendered_compiler) starts when collection ends
# (conftest.py, tests/early_child.py): it compiles on the core the tests before this module leave idle.
EARLY_CHILDREN = {"compiled": rendered.compile_child("test_gluon_lists", "m.COMPILES")}


@pytest.fixture(scope="module")
def compiled():
    return rendered.compiled_cases(EARLY_CHILDREN["compiled"])


@pytest.mark.parametrize("case", COMPILES, ids=lambda c: "-".join(map(str, c)))
def test_list_and_input_forwards_compile_for_sm90(compiled, case):
    name, kernel, d, _ = case
    c = compiled[case]
    frag = module(name).SPEC.gluon_fragments.load()
    cfg = backend.narrowed(launch.default_config(d, kernel), d, getattr(frag, "BLOCK_N", None))
    assert c["wgmma"] >= d // 16 + cfg.block_n // 16 and c["hgmma"] == c["wgmma"]
    assert c["tma_load"] and c["tma_store"] and c["p_from_registers"]
    assert launch.shared_bytes(cfg, d) <= c["shared"] <= launch.SM90_SHARED_BYTES
    inputs = sum(1 + 2 * len(pattern(name).input(n).dims) for n in getattr(frag, "INPUTS", ()))
    lists = 9 if getattr(frag, "LISTS", False) else 0
    tables = 2 * ("random_table" in open(frag.__file__).read())  # BigBird's (table, rows)
    assert len(c["signature"]["pattern_args"]) == len(frag.PARAMS) + lists + inputs + tables
    if kernel == "ws":
        assert c["wait1"], "S is not overlapped with P V"
        assert c["registers"] <= cfg.maxnreg
        # Per-tile scalars (list pointers, strides, params) may be parked between tiles (up to 120
        # bytes, ~40 LDL per kernel, at most 2 in a key loop at D = 128, 6 at D = 64 for strided's);
        # a 128-key tile of per-pair work spilled 264-768 bytes (codegen.gluon.NARROW_BLOCK_N).
        assert c["stack"] <= 128 and c["ldl"] <= 48 and 0 <= c["key_loop_ldl"] <= 8, (c["stack"], c["ldl"],
                                                                                    c["key_loop_ldl"])
    else:
        assert c["stack"] == 0 and c["registers"] <= 255
