"""Expressions mean what attncc.reference says, exactly: integer ``//`` and ``%`` by literals
and params at any position and sign, and float arithmetic in masks (float64, as the
reference). Checked on the printed code itself (tests/printed.py) and on whole kernels."""
from __future__ import annotations

import random

import pytest
import sympy
import torch

import attncc
from attncc._reference import evaluate, pair_mask
from attncc.spec import parse_spec
from attncc.spec import symbols as S
from attncc.spec.ir import Param
from cases import build_inline, rel_err
from printed import run_printed

DIVISORS = list(range(1, 301)) + [511, 1000, 4096, 65535, 65536, 65537, 1_000_003, 2**31 - 1]


def _positions(n, seed):
    """Positions below 2^20 (most below 65536), with the edges of many quotients."""
    gen = torch.Generator().manual_seed(seed)
    edges = [0, 1, 40, 41, 42, 65535, 65536, 65537, 2**20 - 1] + [d * k + e for d in (41, 47, 55, 61, 82, 255)
                                                                   for k in (1, 7, 1000) for e in (-1, 0, 1)]
    rest = torch.cat([torch.randint(0, 65536, (n // 2,), generator=gen), torch.randint(0, 2**20, (n // 2,), generator=gen)])
    return torch.cat([torch.tensor(edges), rest]).to(torch.int32)


def _floordiv(a, d):
    return torch.div(a, d, rounding_mode="floor")


# score code: every divisor up to 256 (the float32 defect's range) and the large ones by default,
# 257..300 with -m slow; mask code: every fourth divisor and the large ones (the same integer code)
SWEEPS = {"score_code": (False, [d for d in DIVISORS if not 256 < d <= 300]),
          "score_code_257_300": (False, [d for d in DIVISORS if 256 < d <= 300]),
          "mask_code": (True, DIVISORS[::4] + DIVISORS[-8:])}


@pytest.mark.parametrize("float64, divisors", [pytest.param(*v, id=k, marks=pytest.mark.slow if "257" in k else ())
                                               for k, v in SWEEPS.items()])
def test_floor_division_and_modulo_by_params_sweep(float64, divisors):
    """``i // w``, ``(i - j) // w`` (negative numerators), ``(i - j) % w`` (and in mask code
    also ``i % w``, ``-(j // -w)``) with w a runtime param, for every divisor 1..300 and large
    ones, through the hoister and the printer, equal Python's. (Was ``floor(x * (1.0 / w))``
    in float32: wrong quotients for 38 divisors below 256.)"""
    params = [Param(f"w{k}", d, "int") for k, d in enumerate(divisors)]
    forms = {"i // w": lambda w: sympy.floor(S.i / w), "(i - j) // w": lambda w: sympy.floor((S.i - S.j) / w),
             "(i - j) % w": lambda w: sympy.Mod(S.i - S.j, w)}
    if float64:
        forms.update({"i % w": lambda w: sympy.Mod(S.i, w), "-(j // -w)": lambda w: -sympy.floor(-S.j / w)})
    exprs = [f(p.symbol) for p in params for f in forms.values()]
    i = _positions(1024, 0)
    j = i[torch.randperm(i.numel(), generator=torch.Generator().manual_seed(1))]
    got = iter(run_printed(exprs, params, {}, i, j, float64=float64, out_dtype=torch.int64))
    i64, j64 = i.long(), j.long()
    python = {"i // w": lambda d: _floordiv(i64, d), "(i - j) // w": lambda d: _floordiv(i64 - j64, d),
              "(i - j) % w": lambda d: torch.remainder(i64 - j64, d), "i % w": lambda d: torch.remainder(i64, d),
              "-(j // -w)": lambda d: -_floordiv(-j64, d)}
    for d in divisors:
        for form in forms:
            assert torch.equal(next(got), python[form](d)), (d, form)


def test_floor_division_and_modulo_by_literals_and_negative_params():
    """Literal divisors (positive and negative) and negative param values, same checks."""
    lits = [d for d in DIVISORS[::3]] + [-1, -2, -7, -41, -256]
    exprs = []
    for d in lits:
        exprs += [sympy.floor(S.i / d), sympy.Mod(S.i, d), sympy.floor((S.i - S.j) / d), sympy.Mod(S.i - S.j, d)]
    neg = [Param("w", -41, "int")]
    w = neg[0].symbol
    exprs += [sympy.floor(S.i / w), sympy.Mod(S.i, w), sympy.floor((S.i - S.j) / w), sympy.Mod(S.j - S.i, w)]
    i = _positions(512, 2)
    j = i[torch.randperm(i.numel(), generator=torch.Generator().manual_seed(3))]
    got = run_printed(exprs, neg, {}, i, j, float64=False, out_dtype=torch.int64)
    i64, j64 = i.long(), j.long()
    for k, d in enumerate(lits + [-41]):
        want = [_floordiv(i64, d), torch.remainder(i64, d), _floordiv(i64 - j64, d)]
        want.append(torch.remainder((j64 - i64) if k == len(lits) else (i64 - j64), d))
        for n, x in enumerate(want):
            assert torch.equal(got[4 * k + n], x), (d, n)
    for value in (-3, -300, 65537):  # the same kernel, other param values
        got = run_printed(exprs[-4:], neg, {"w": value}, i, j, float64=True, out_dtype=torch.int64)
        assert torch.equal(got[0], _floordiv(i64, value)) and torch.equal(got[2], _floordiv(i64 - j64, value))
        assert torch.equal(got[1], torch.remainder(i64, value)) and torch.equal(got[3], torch.remainder(j64 - i64, value))


def test_host_printing_and_explain_keep_integer_division_whole():
    """Host-side Python printing is Python's // and %; explain's report shows the key loop's
    ``j // w`` whole (was ``floor(j*c0)`` with ``c0 = 1/w`` hoisted), and ``(i - j) % w`` as the
    sum of the row's and the column's residues."""
    from attncc.analysis.score import score_report
    from attncc.codegen.printer import PythonPrinter

    w = sympy.Symbol("w", integer=True)
    exprs = [sympy.floor((S.i - S.j) / w), sympy.Mod(S.i - S.j, w), -sympy.floor(-S.i / w), sympy.floor(S.i / 7)]
    pr = PythonPrinter({S.i: "i", S.j: "j", w: "w"})
    texts = [pr(e) for e in exprs]
    for i, j, d in [(5, 90, 41), (0, 1, 3), (100, 7, -9), (2**40 + 3, 5, 65537)]:
        got = [eval(t, {}, {"i": i, "j": j, "w": d}) for t in texts]  # noqa: S307 - our own printed text
        assert got == [(i - j) // d, (i - j) % d, -(-i // d), i // 7]
    p = parse_spec('head_dim = 16\n[params]\nw = 41\n[score]\nmod = "s + (j // w) * 0.1 + (i - j) % w"\n')
    report = score_report(p)
    # (i - j) % w leaves the pairs as the sum of residues (analysis.separable): i's per row
    assert "j // w" in report["loop_mod"] and "(row0 + (-j) % w) % w" in report["loop_mod"], report
    assert report["hoisted_per_row"] == ["row0 = i % w"], report
    assert not any("1/w" in h or "w**(-1)" in h for h in report["hoisted_per_program"]), report


# -- float arithmetic in masks ---------------------------------------------------------

def _float_masks(rng):
    """(mask text, params text, i positions, j positions): random float-valued masks whose
    boundary runs through the grid, at positions where float32 would not resolve it."""
    big = rng.randrange(2**20, 2**22)
    c = round(rng.uniform(0.1, 0.9), 6)
    d = round(c * (1 + rng.uniform(1e-9, 3e-8)), 12)
    root = rng.randrange(1000, 2000)
    out = [
        (f"i * {c} < j * {d}", "", range(big, big + 48), range(big - 8, big + 40)),
        (f"i * x < j * y + {round(rng.uniform(-0.5, 0.5), 6)}", f"x = {c}\ny = {d}\n", range(big, big + 48),
         range(big - 8, big + 40)),
        (f"i * {c} // 1 == j * {c} // 1", "", range(big, big + 48), range(big, big + 48)),
        (f"(i + 1) / (j + 1) < {round(rng.uniform(0.5, 1.5), 3)}", "", range(1, 49), range(1, 49)),
        ("i / 49 >= j / 49", "", range(0, 120, 3), range(0, 120, 5)),
        ("i ** 0.5 > j", "", range(root * root - 24, root * root + 24), range(root - 3, root + 3)),
        ("sqrt(i) >= j - kk", "kk = 1\n", range(root * root - 24, root * root + 24), range(root - 2, root + 4)),
        (f"abs(i * {c} - j * {d}) < {round(rng.uniform(0.5, 3), 4)}", "", range(big, big + 48),
         range(big - 8, big + 40)),
        (f"i % {c * 7} < j % {c * 3} + 0.25", "", range(big, big + 48), range(big, big + 48)),
        (f"(i - j) ** 2 * {c} <= 4.5 or i * 0.1 + j * 0.2 > {round(0.3 * big + 3.14159, 5)}", "",
         range(big, big + 48), range(big, big + 48)),
    ]
    return out


def test_float_masks_printed_in_float64_equal_the_reference():
    """Mask code computes float arithmetic in float64 as the reference does: every pair
    decided identically (was float32: ``i ** 0.5 > j`` had error 0.20)."""
    rng = random.Random(7)
    for trial in range(3):
        for text, params, irange, jrange in _float_masks(rng):
            p = parse_spec(f"[params]\n{params}[mask]\nwhere = \"{text}\"\n")
            ii, jj = torch.meshgrid(torch.tensor(list(irange)), torch.tensor(list(jrange)), indexing="ij")
            i, j = ii.reshape(-1).to(torch.int32), jj.reshape(-1).to(torch.int32)
            env = {"i": i.long(), "j": j.long(), "n_q": 1, "n_k": 1, "b": 0, "h": 0, "n_heads": 1, **p.param_values}
            want = evaluate(p.mask, env)
            (got,) = run_printed([p.mask], p.params, {}, i, j, float64=True, out_dtype=torch.int64)
            bad = (got.bool() != want).nonzero().flatten()
            assert bad.numel() == 0, (text, [(int(i[n]), int(j[n])) for n in bad[:5]])


def test_float_param_override_is_exact_in_masks():
    """A float param passed per call reaches mask code in float64 (a Python float kernel
    argument would be float32)."""
    p = parse_spec('[params]\nx = 0.5\n[mask]\nwhere = "i * x < j"\n')
    i = torch.arange(3_000_000, 3_000_064, dtype=torch.int32).repeat_interleave(64)
    j = (torch.arange(0, 64, dtype=torch.int32) + 1_110_000 - 32).repeat(64)
    value = 0.37
    (got,) = run_printed([p.mask], p.params, {"x": value}, i, j, float64=True, out_dtype=torch.int64)
    want = i.double() * value < j.double()
    assert torch.equal(got.bool(), want) and want.any() and not want.all()


def test_classifier_is_sound_near_float_boundaries():
    """The block classifier never calls a tile EMPTY or FULL that a pair on a float boundary
    contradicts: its float64 intervals are rounded in another order than the reference's, so it
    widens them (tiles.widen). Without that, ``i * 0.3 - j * 0.3 < 0.3`` had EMPTY tiles with
    allowed pairs even with 16 x 16 tiles."""
    from attncc.analysis import analyze
    from attncc.core import tiles

    masks = ["i * 0.1 + 0.2 < j * 0.1 + 0.3", "i * 0.3 - j * 0.3 < 0.3", "(i + 0.1) * 3 < (j + 0.2) * 3 - 0.3",
             "abs(i * 0.7 - j * 0.7) <= 1.4", "(i + 1) / (j + 1) <= 1 or i * 0.37 // 1 == j * 0.37 // 1"]
    for text in masks:
        p = parse_spec(f'[mask]\nwhere = "{text}"\n')
        program = analyze(p).classifier
        for off in (0, 123457, 2**30 + 17):
            allowed = pair_mask(p, q_rows=40, k_rows=40, q_offset=off, k_offset=off)[0, 0]
            for bm, bn in ((1, 1), (2, 3), (16, 16)):
                grid = tiles.classify_grid(program, q_offset=off, k_offset=off, q_rows=40, k_rows=40, block_m=bm,
                                           block_n=bn, n_q=off + 40, n_k=off + 40, params={}, inputs={}, batch=1,
                                           heads=1, device="cpu")[0, 0]
                for qb in range(grid.shape[0]):
                    for kb in range(grid.shape[1]):
                        tile = allowed[qb * bm:(qb + 1) * bm, kb * bn:(kb + 1) * bn]
                        cls = int(grid[qb, kb])
                        assert not (cls == tiles.EMPTY and tile.any()), (text, off, bm, bn, qb, kb)
                        assert not (cls == tiles.FULL and not tile.all()), (text, off, bm, bn, qb, kb)
    # integer masks are not widened: still exact
    p = parse_spec('[mask]\nwhere = "i // 7 == j // 7"\n')
    assert not any(op == "widen" for _, op, _ in analyze(p).classifier.steps)


def test_classifier_is_exact_on_integer_division_by_params():
    """``//`` and ``%`` by an int param are integer arithmetic, as by a literal: never widened, so
    the classifier is exact on one-pair tiles (the exact tile lists and ``explain`` of static masks
    rely on it). sympy's ``is_integer`` of ``floor(i / w)`` is None (w could be 0): they were
    widened as float arithmetic, and tiles with every pair allowed came out PARTIAL."""
    from attncc.analysis import analyze
    from attncc.core import tiles

    masks = ["i // w == j // w", "i % w < 3", "(i - j) % w == 0", "w * (i // w) <= j", "j >= i - i % w",
             "abs(i // w - j // w) <= 1 and abs(i % w - j % w) <= 1", "(i + 1) // w * w <= j + w % 3"]
    for text in masks:
        p = parse_spec(f'[params]\nw = 5\n[mask]\nwhere = "{text}"\n')
        program = analyze(p).classifier
        assert not any(op == "widen" for _, op, _ in program.steps), text
        for off in (0, 2**30 + 17):
            allowed = pair_mask(p, q_rows=24, k_rows=24, q_offset=off, k_offset=off)[0, 0]
            grid = tiles.classify_grid(program, q_offset=off, k_offset=off, q_rows=24, k_rows=24, block_m=1,
                                       block_n=1, n_q=off + 24, n_k=off + 24, params={"w": 5}, inputs={}, batch=1,
                                       heads=1, device="cpu")[0, 0]
            want = torch.where(allowed, tiles.FULL, tiles.EMPTY).to(grid.dtype)
            assert torch.equal(grid, want), (text, off)


# -- whole kernels ----------------------------------------------------------------------

def _qkv(B, Hq, Hkv, Nq, Nk, D, seed, Dv=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=gen).requires_grad_()
    k = torch.randn(B, Hkv, Nk, D, generator=gen).requires_grad_()
    v = torch.randn(B, Hkv, Nk, Dv or D, generator=gen).requires_grad_()
    return q, k, v, gen


FLOORDIV_SPEC = """head_dim = 16
dtypes = ["float32"]
[params]
w = 41
[inputs]
t = { dims = [8], dtype = "float32", grad = true }
[mask]
where = "i // w == j // w or (i - j) % w == 3"
[score]
bias = "t[(i - j) // w % 8] + t[(j - i) // w % 8]"
"""


@pytest.fixture(scope="module")
def floordiv_param(tmp_path_factory):
    """FLOORDIV_SPEC's (pattern, module), built once for every w."""
    return build_inline({"floordiv_param": FLOORDIV_SPEC}, tmp_path_factory.mktemp("floordiv"))["floordiv_param"]


@pytest.mark.parametrize("w", [41, pytest.param(47, marks=pytest.mark.slow), 55])
def test_floor_division_by_param_in_kernels_forward_backward_decode(floordiv_param, w):
    """``//`` and ``%`` by a param in the mask and inside an input index (the backward crashed
    there: a float pointer offset), forward, backward (with the table's gradient) and decode,
    at positions past 65536 (w = 47, a third divisor, with -m slow)."""
    p, mod = floordiv_param
    q, k, v, gen = _qkv(1, 2, 1, 45, 45, 16, w)
    t = torch.randn(8, generator=gen).requires_grad_()
    offset = 65536 + 17 * w
    g = torch.randn(1, 2, 45, 16, generator=gen)
    o = mod.attention(q, k, v, t=t, w=w, q_offset=offset, k_offset=offset)
    grads = torch.autograd.grad((o * g).sum(), (q, k, v, t))
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v, t)]
    ref = attncc.reference(p, *ref_in[:3], t=ref_in[3], w=w, q_offset=offset, k_offset=offset)
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), ref_in)
    assert rel_err(o.detach(), ref.detach()) < 1e-4
    for x, r in zip(grads, ref_grads):
        assert rel_err(x, r) < 1e-3
    last = mod.decode(q[:, :, -3:].detach(), k.detach(), v.detach(), kv_len=torch.tensor([45], dtype=torch.int32),
                      t=t.detach(), w=w)
    dref = attncc.reference(p, q[:, :, -3:].detach().double(), k.detach().double(), v.detach().double(), t=t.detach(),
                            w=w, q_offset=42)
    assert rel_err(last, dref) < 1e-4


FLOAT_MASKS = {
    "fm_ratio": ('i * x < j * y', "x = 0.37\ny = 0.3700000037\n"),
    "fm_sqrt": ("i ** 0.5 > j", ""),
    "fm_floor": ("i * 0.37 // 1 == j * 0.37 // 1 or j <= i - 20", ""),
}


@pytest.mark.parametrize("name", sorted(FLOAT_MASKS))
def test_float_masks_in_kernels_allow_the_reference_pairs(tmp_path, name):
    """Which pairs the forward kernel lets through (v one-hot per key, equal scores: o[i, j] > 0
    exactly where allowed) is the reference's mask, at positions near 3e6; forward and
    backward then match on random data."""
    where, params = FLOAT_MASKS[name]
    text = f'head_dim = 16\nvalue_dim = 32\ndtypes = ["float32"]\n[params]\n{params}[mask]\nwhere = "{where}"\n'
    p, mod = build_inline({name: text}, tmp_path)[name]
    N, offset = 32, 2_973_000 if name != "fm_sqrt" else 1724 * 1724 - 16
    q_off, k_off = offset, (offset if name != "fm_sqrt" else 1724 - 8)
    q = torch.zeros(1, 1, N, 16)
    v = torch.eye(N).view(1, 1, N, N)
    o = mod.attention(q, torch.zeros(1, 1, N, 16), v, q_offset=q_off, k_offset=k_off)
    allowed = pair_mask(p, q_rows=N, k_rows=N, q_offset=q_off, k_offset=k_off)[0, 0]
    assert allowed.any() and not allowed.all(), "the boundary should cross the tile"
    assert torch.equal(o[0, 0] > 0, allowed)
    q, k, v, gen = _qkv(1, 2, 1, N, N, 16, 5, Dv=32)
    g = torch.randn(1, 2, N, 32, generator=gen)
    o = mod.attention(q, k, v, q_offset=q_off, k_offset=k_off)
    grads = torch.autograd.grad((o * g).sum(), (q, k, v))
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = attncc.reference(p, *ref_in, q_offset=q_off, k_offset=k_off)
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), ref_in)
    assert rel_err(o.detach(), ref.detach()) < 1e-4
    for x, r in zip(grads, ref_grads):
        assert rel_err(x, r) < 1e-3
