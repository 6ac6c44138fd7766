"""The integer fragments of the Gluon kernels, checked on the CPU by brute force: the key-block
walks with their mask (every allowed pair lies in a walked block, every block called full is full),
the backward's query-block walks of a key block (the same, transposed) and the persistent
schedule's tile order (every tile once, heaviest query blocks first in a group).

Gluon functions do not run on the CPU; these fragments only do scalar integer arithmetic on
non-negative operands (where Triton's truncating `//` equals Python's), so their bodies run here
as Python functions with `gl`'s scalar helpers mapped to Python's. Rendered walks (codegen, after
issue 17) get the same check.
"""
from __future__ import annotations

import random
import types

import pytest

pytest.importorskip("triton.experimental.gluon")

from attncc.runtime.gluon import common, fwd_ws, walks  # noqa: E402

_GL = types.SimpleNamespace(minimum=min, maximum=max, cdiv=lambda a, b: -(-a // b), to_tensor=lambda x: x)


def as_python(jit_fn):
    fn = jit_fn.fn
    return types.FunctionType(fn.__code__, {**fn.__globals__, "gl": _GL}, fn.__name__, fn.__defaults__,
                              fn.__closure__)


@pytest.mark.parametrize("pattern", sorted(walks.PATTERNS))
def test_walk_covers_every_allowed_pair_and_full_blocks_are_full(pattern):
    walk, mask = (None if f is None else as_python(f) for f in walks.PATTERNS[pattern])
    clamp = as_python(common.clamp_walk)
    rng = random.Random(0)

    def near_block_edge():  # off-by-ones live at multiples of the block sizes
        return max(0, 16 * rng.randrange(0, 40) + rng.choice([0, 0, 1, 2, -1, -2]))

    for _ in range(150):
        block_m, block_n = rng.choice([64, 128]), rng.choice([16, 64, 128])
        q_offset, k_offset = rng.choice([0, near_block_edge()]), rng.choice([0, near_block_edge()])
        Nq, Nk = max(1, near_block_edge()), max(1, near_block_edge())
        for qb in range(-(-Nq // block_m)):
            q_lo = q_offset + qb * block_m
            q_hi = q_lo + block_m - 1
            lo, full_lo, full_hi, hi = clamp(*walk(q_lo, q_hi, Nk, k_offset, Nq, Nk, block_n))
            assert lo <= full_lo <= full_hi <= hi
            for kb in range(-(-Nk // block_n) + 2):
                keys = range(k_offset + kb * block_n, k_offset + min(Nk, (kb + 1) * block_n))
                pairs = [(i, j) for i in range(q_lo, q_hi + 1) for j in keys]
                allowed = [mask is None or mask(i, j, Nq, Nk) for i, j in pairs]
                if any(allowed):
                    assert lo <= kb < hi, (pattern, q_lo, kb, lo, hi)
                if full_lo <= kb < full_hi:
                    assert len(keys) == block_n and all(allowed), (pattern, q_lo, kb, full_lo, full_hi)


@pytest.mark.parametrize("pattern", sorted(walks.QWALKS))
def test_key_block_walk_covers_every_allowed_pair_and_full_blocks_are_full(pattern):
    """The dK/dV kernel's walk over query blocks per key block: every query block holding an allowed
    pair with one of the block's existing keys is walked; a block called full has all BLOCK_M rows
    inside Nq and every pair with an existing key allowed (keys past Nk are never stored)."""
    assert set(walks.QWALKS) == set(walks.PATTERNS)
    qwalk, mask = (None if f is None else as_python(f) for f in (walks.QWALKS[pattern], walks.PATTERNS[pattern][1]))
    clamp = as_python(common.clamp_walk)
    rng = random.Random(2)

    def near_block_edge():
        return max(0, 16 * rng.randrange(0, 40) + rng.choice([0, 0, 1, 2, -1, -2]))

    walked = full = 0
    for _ in range(150):
        block_m, block_n = rng.choice([16, 64, 128]), rng.choice([64, 128])
        q_offset, k_offset = rng.choice([0, near_block_edge()]), rng.choice([0, near_block_edge()])
        Nq, Nk = max(1, near_block_edge()), max(1, near_block_edge())
        for kb in range(-(-Nk // block_n)):
            k_lo = k_offset + kb * block_n
            k_hi = min(k_lo + block_n, k_offset + Nk) - 1
            lo, full_lo, full_hi, hi = clamp(*qwalk(k_lo, k_hi, Nq, q_offset, Nq, Nk, block_m))
            assert lo <= full_lo <= full_hi <= hi
            for qb in range(-(-Nq // block_m) + 2):
                rows = range(q_offset + qb * block_m, q_offset + min(Nq, (qb + 1) * block_m))
                allowed = [mask is None or mask(i, j, Nq, Nk) for i in rows for j in range(k_lo, k_hi + 1)]
                if any(allowed):
                    assert lo <= qb < hi, (pattern, k_lo, qb, lo, hi)
                    walked += 1
                if full_lo <= qb < full_hi:
                    assert len(rows) == block_m and all(allowed), (pattern, k_lo, qb, full_lo, full_hi)
                    full += 1
    assert walked and full


def test_tile_order_covers_every_tile_once_heaviest_first_in_each_head_group():
    tile_coords = as_python(fwd_ws.tile_coords)
    rng = random.Random(1)
    for _ in range(200):
        n_qb, bh, head_group = rng.randrange(1, 40), rng.randrange(1, 70), rng.randrange(1, 20)
        order = [tile_coords(t, n_qb, bh, head_group) for t in range(n_qb * bh)]
        assert sorted(order) == [(qb, h) for qb in range(n_qb) for h in range(bh)]
        for t in range(1, len(order)):
            same_group = t // (head_group * n_qb) == (t - 1) // (head_group * n_qb)
            if same_group:
                assert order[t][0] <= order[t - 1][0]
            assert order[t][1] // head_group >= order[t - 1][1] // head_group  # groups in order


def test_snake_schedule_hands_out_every_tile_once_and_evens_out_causal_work():
    """fwd_ws.scheduled_tile with SNAKE: CTA p's loop indices t = p, p + P, ... (P CTAs) map to a
    permutation of the tiles, each CTA keeps its number of tiles (its partitions' barrier phases
    count them), and under causal walk lengths (query block qb walks qb + 1 key blocks) the busiest
    CTA's work is within one tile's of the mean, where the plain order's is not."""
    rng = random.Random(2)
    for case in range(300):
        if case == 0:
            n_qb, bh, nprog = 64, 32, 132  # causal 8K, B2 H16 on an H100: the plain order's busiest CTA 1.19x the mean
        else:
            n_qb, bh, nprog = rng.randrange(1, 40), rng.randrange(1, 70), rng.randrange(1, 140)
        T = n_qb * bh
        nprog = min(nprog, T)
        loads = {}
        for snake in (False, True):
            seen, work = [], []
            for pid in range(nprog):
                gl = types.SimpleNamespace(**vars(_GL), program_id=lambda axis, pid=pid: pid,
                                           num_programs=lambda axis: nprog)
                fn = fwd_ws.scheduled_tile.fn
                scheduled = types.FunctionType(fn.__code__, {**fn.__globals__, "gl": gl,
                                                             "tile_coords": as_python(fwd_ws.tile_coords)})
                # the plain order in head groups as launch.head_group makes them (6 heads of 8K keys)
                group = bh if snake or case else 6
                mine = [scheduled(t, n_qb, bh, group, snake) for t in range(pid, T, nprog)]
                seen += mine
                work.append(sum(qb + 1 for qb, _ in mine))
            assert sorted(seen) == [(qb, h) for qb in range(n_qb) for h in range(bh)], (n_qb, bh, nprog, snake)
            loads[snake] = work
        mean = sum(loads[True]) / nprog
        assert max(loads[True]) <= mean + n_qb, (n_qb, bh, nprog)
        if case == 0:
            assert max(loads[False]) > 1.15 * mean and max(loads[True]) < 1.01 * mean


def test_snake_schedule_is_picked_for_the_causal_walk_only(monkeypatch):
    from attncc.runtime.gluon import launch

    monkeypatch.delenv("ATTNCC_GLUON_SCHEDULE", raising=False)
    causal_walk = launch.pattern_fragments("causal")[0]
    assert launch.snake_schedule("causal", causal_walk)
    assert not launch.snake_schedule("dense", launch.pattern_fragments("dense")[0])
    assert not launch.snake_schedule("dense", causal_walk)  # a rendered walk passes pattern "dense"
    monkeypatch.setenv("ATTNCC_GLUON_SCHEDULE", "grouped")
    assert not launch.snake_schedule("causal", causal_walk)
    monkeypatch.setenv("ATTNCC_GLUON_SCHEDULE", "snake")
    assert launch.snake_schedule("dense", launch.pattern_fragments("dense")[0])
    monkeypatch.setenv("ATTNCC_GLUON_SCHEDULE", "fast")
    with pytest.raises(ValueError, match="ATTNCC_GLUON_SCHEDULE must be 'snake' or 'grouped'"):
        launch.snake_schedule("causal", causal_walk)
