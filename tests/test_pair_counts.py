"""``attncc.pair_counts``: explain's allowed pairs per tile of a static mask, from numpy, equal to
brute force (the float64 reference on every pair) for seeded random masks at odd sizes and tile
shapes, by each way it counts (classes of rows and keys; translation along the diagonal), and
cheap where the shipped specs need it."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import sympy
import torch
from sympy.core.function import AppliedUndef

import fuzz_specs
from attncc._reference import pair_mask
from attncc.pair_counts import TileCounter, Unsupported, mask_values
from attncc.spec import SpecError, load_spec, parse_spec
from tile_oracle import mask_spec, random_mask, random_overrides

SPECS = Path(__file__).resolve().parents[1] / "specs"
N_MASKS = 120  # half from the fuzzer's spec generator, half from the tile oracle's families
TILES = [(16, 16), (8, 24), (24, 8), (32, 16), (16, 48), (64, 32), (128, 64), (5, 7)]
BLOCK_LIST_SPECS = ["bigbird", "dilated", "strided", "neighborhood_2d"]


def _truth(pattern, n_q, n_k, block_m, block_n, params, batch, heads):
    """int64 ``[batch, heads, query blocks, key blocks]``: allowed pairs per tile, from every pair."""
    m = pair_mask(pattern, q_rows=n_q, k_rows=n_k, batch=batch, heads=heads, params=params)
    nqb, nkb = -(-n_q // block_m), -(-n_k // block_n)
    m = torch.nn.functional.pad(m, (0, nkb * block_n - n_k, 0, nqb * block_m - n_q))
    return m.view(batch, heads, nqb, block_m, nkb, block_n).sum((3, 5)).numpy()


def _static_masks(rng: random.Random, count: int):
    """(pattern, call params) of seeded static masks: the fuzzer's (any mix of clauses, floats,
    powers, products, n_q / n_k, b, h, random blocks, min / max; the spec's [inputs] dropped
    when its mask reads none) and the tile oracle's families (bands, chunks, strides, dilations,
    2D neighborhoods, global rows and columns) with call-time params."""
    out = []
    while len(out) < count:
        if len(out) % 2:
            mask, params = random_mask(rng)
            pattern = parse_spec(mask_spec(f"m{len(out)}", mask, params))
            out.append((pattern, {**pattern.param_values, **random_overrides(rng, params)}))
            continue
        text, _ = fuzz_specs.random_spec(rng)
        try:
            pattern = parse_spec(text)
        except SpecError:
            continue
        if pattern.kind == "softmax" and pattern.mask is not None and not pattern.mask.atoms(AppliedUndef):
            out.append((pattern.replace(inputs=()), dict(pattern.param_values)))
    return out


def test_counts_equal_brute_force_for_random_static_masks():
    rng = random.Random(2105)
    translated = reduced = 0
    for n, (pattern, params) in enumerate(_static_masks(rng, N_MASKS)):
        n_q, n_k = rng.randint(1, 230), rng.randint(1, 230)
        block_m, block_n = rng.choice(TILES)
        batch, heads = rng.choice([(1, 1), (1, 1), (2, 3), (1, 2)])
        case = f"#{n} {pattern.mask} params={params} {n_q}x{n_k} tile {block_m}x{block_n} batch={batch} heads={heads}"
        try:
            want = _truth(pattern, n_q, n_k, block_m, block_n, params, batch, heads)
        except (ValueError, ZeroDivisionError, TypeError):  # what the reference refuses, numpy does not count
            with pytest.raises(Unsupported):
                counter = TileCounter(pattern, n_q=n_q, n_k=n_k, block_m=block_m, block_n=block_n, params=params,
                                      batch=batch, heads=heads)
                for b in range(batch):
                    for h in range(heads):
                        counter.counts(b, h)
            continue
        counter = TileCounter(pattern, n_q=n_q, n_k=n_k, block_m=block_m, block_n=block_n, params=params,
                              batch=batch, heads=heads)
        for b in range(batch):
            for h in range(heads):
                for translate in (None, False, True) if counter.period else (None, False):
                    before = counter.evaluated
                    got = counter.counts(b, h, translate=translate)
                    assert np.array_equal(got, want[b, h]), f"{case} b={b} h={h} translate={translate}: " \
                        f"{np.argwhere(got != want[b, h])[:4].tolist()} differ"
                    translated += translate is True
                    reduced += translate is False and counter.evaluated - before < n_q * n_k
    # both ways of cutting the work were taken, not only the plain pass over every pair
    assert translated >= N_MASKS // 8 and reduced >= N_MASKS // 8, (translated, reduced)


@pytest.mark.parametrize("mask", [
    "where(i < 5, 1, 2) + j > 6",
    "min(i, 7) == min(j, 7) or (i // 8) % 3 == j % 5",
    "(i - j) ** 2 <= 9 or (j - i) ** 3 > 100 or -(i // -3) == j",
    "abs(i - j) * 0.5 <= 2.5 or i / 3 < j / 7 - 4",
    "(i * 0.1 + j * 0.2) * 10 < 3 * i or i ** 0.5 > j",
    "((i & j) == 0) != ((i ^ j) % 3 == 0) or (i >> 2) == (j >> 2) or (i << (j % 3)) < 40",
    "random_blocks(2, block=8, seed=3) or bucket(j - i, 8, 16) == 3",
    "random_blocks(2, block=8, seed=1) or j < 3",  # rows and keys in classes by i // 8, j // 8 alone
    "where(i < 5, j, 2 * j) > 6",  # rows read in a condition only: two classes
    "where(j % 4 == 1, i, 0) > 50",  # keys likewise
    "(i + b) % 2 == 0 and (j + h) % 3 != 1 and j < n_k - 3 * b",
    # Python's float // and %: the floor of the exact quotient (1 // 0.1 is 9.0, not floor(1 / 0.1))
    "i // 0.1 > j or (j * 0.7) // -0.3 > i - 60",
    "(i * 0.5) % 2 < 1 and (j - i) * 0.3 % -1.5 > -1.2",
])
def test_numpy_mask_is_the_reference(mask):
    """The evaluator node by node, floats and integer operators included, at every pair; and the
counts per tile (rows and keys in classes, or translated) of these masks."""
    pattern = parse_spec(mask_spec("m", mask, {}))
    env = {"b": np.asarray(1), "h": np.asarray(2), "n_q": 61, "n_k": 77, "n_heads": 3,
           "i": np.arange(61)[:, None], "j": np.arange(77)[None, :]}
    want = pair_mask(pattern, q_rows=61, k_rows=77, batch=2, heads=3)[1, 2].numpy()
    assert np.array_equal(np.broadcast_to(mask_values(pattern, env), want.shape), want)
    counter = TileCounter(pattern, n_q=61, n_k=77, block_m=8, block_n=24, batch=2, heads=3)
    for translate in (None, False, True) if counter.period else (None, False):
        assert np.array_equal(counter.counts(1, 2, translate=translate), _truth(pattern, 61, 77, 8, 24, {}, 2, 3)[1, 2])


@pytest.mark.parametrize("mask", ["exp(-abs(i - j)) > 0.1", "sigmoid(i - j) > 0.5", "(i + 0.5) ** 1.5 < j"])
def test_what_numpy_may_round_otherwise_takes_the_reference(mask, monkeypatch):
    from attncc import report
    from attncc.analysis import analyze

    pattern = parse_spec(mask_spec("m", mask, {}))
    with pytest.raises(Unsupported):
        TileCounter(pattern, n_q=40, n_k=30, block_m=16, block_n=16).counts()
    used = []
    original = report._reference_numbers
    monkeypatch.setattr(report, "_reference_numbers", lambda *a, **k: used.append(1) or original(*a, **k))
    d = report.explain_data(analyze(pattern), n_q=40, n_k=30, block_m=16, block_n=16)
    assert used == [1] and d["allowed_pairs"] == int(pair_mask(pattern, q_rows=40, k_rows=30).sum())


@pytest.mark.parametrize("name", BLOCK_LIST_SPECS)
def test_shipped_block_list_specs_evaluate_few_pairs(name):
    """What keeps `attncc explain` of these specs under a second: at the default size and tile it
    evaluates at most 1/16 of the pairs (translation: the tiles near the first row and key;
    classes: one row and key per 64), and the counts it cuts are the brute-force ones at 1024."""
    pattern = load_spec(SPECS / f"{name}.toml")
    counter = TileCounter(pattern, n_q=8192, n_k=8192, block_m=128, block_n=64)
    grid = counter.counts()
    assert counter.evaluated <= 8192 * 8192 // 16, counter.evaluated
    assert grid.shape == (64, 128) and int(grid.sum()) > 0
    small = TileCounter(pattern, n_q=1024, n_k=1000, block_m=128, block_n=64)
    assert np.array_equal(small.counts(), _truth(pattern, 1024, 1000, 128, 64, pattern.param_values, 1, 1)[0, 0])
    assert small.evaluated <= 1024 * 1000 // 2


def test_translation_needs_exact_integers_and_the_same_expression():
    """No period for what a shift changes (absolute positions, random blocks, n_k - j, float
    rounding, products past int64) and one, lcm of tiles and divisors, for what it does not."""
    def period(mask, n=4096):
        return TileCounter(parse_spec(mask_spec("m", mask, {})), n_q=n, n_k=n, block_m=32, block_n=16).period

    assert period("j <= i and (i - j) % 5 == 0") == 160
    assert period("abs(i // 48 - j // 48) <= 1 and abs(i % 48 - j % 48) <= 2") == 96
    assert period("j - n_k <= i - n_q") == 32
    for mask in ["i < 64 or j <= i", "random_blocks(2, block=32)", "n_k - j <= 9", "(i - j) * 0.3 < 2",
                 "(i - j) * 4611686018427387 < 5", "(i - j) * 2 ** 49 + 2 ** 61 + 5 < 0"]:
        assert period(mask) is None, mask


def test_the_references_errors_stay_its_own():
    """A divisor param of 0: explain raises the reference's ValueError, as before numpy counted
    (sympy's ZeroDivisionError of the substituted mask, seen first, is no answer)."""
    from attncc.analysis import analyze
    from attncc.report import explain_data

    plan = analyze(load_spec(SPECS / "neighborhood_2d.toml"))
    with pytest.raises(ValueError, match="division by zero: the divisor of i % width is 0 with width = 0"):
        explain_data(plan, n_q=300, n_k=200, block_m=32, block_n=16, params={"width": 0})
