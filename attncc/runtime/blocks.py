"""Per-call iteration lists for patterns whose tiles are not closed-form.

Static patterns (BigBird's random blocks) are classified once per shape and cached;
data-dependent ones (document ids, lengths) are classified from their inputs on every
call, on the device, with no host synchronization.
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch

from attncc.runtime import semantics, tiles
from attncc.runtime.call import Call


def block_lists(program, call: Call, block_m: int, block_n: int, *, dynamic: bool) -> Tuple:
    """The kernel's list arguments: (full_count, full_index, partial_count, partial_index,
    stride_b, stride_h, stride_q, width) for a grid of this call's tiles.

    When a backward will follow (``call.for_backward`` is a dict), the transposed lists are
    made from the same grid and kept there for :func:`backward_block_lists`."""
    if call.for_backward is not None:
        lists, lists_t = block_lists_both(program, call, block_m, block_n, dynamic=dynamic)
        call.for_backward[("block_lists", block_m, block_n)] = (lists, lists_t)
        return lists
    if dynamic:
        grid = _classify(program, call, block_m, block_n, call.inputs)
        return _lists(grid, call)
    key = (program, str(call.q.device), call.Nq, call.Nk, call.q_offset, call.k_offset, call.n_q, call.n_k,
           block_m, block_n, tuple(sorted(call.params.items())))
    return _lists(_static_grid(key, call.B, call.Hq), call)


def block_lists_both(program, call: Call, block_m: int, block_n: int, *, dynamic: bool) -> Tuple:
    """(forward lists, transposed lists) of one grid of this call's tiles, in the format of
    :func:`block_lists`. The transposed lists have one row per key block, listing the query
    blocks that see it (the dK/dV kernel's iteration). Static patterns: cached per shape."""
    if dynamic:
        grid = _classify(program, call, block_m, block_n, call.inputs)
        return _lists(grid, call), _lists(grid.transpose(-1, -2).contiguous(), call)
    key = (program, str(call.q.device), call.Nq, call.Nk, call.q_offset, call.k_offset, call.n_q, call.n_k,
           block_m, block_n, tuple(sorted(call.params.items())))
    return _static_lists_both(key, call.B, call.Hq)


def backward_block_lists(program, call: Call, block_m: int, block_n: int, *, dynamic: bool) -> Tuple:
    """The (forward, transposed) lists for the backward of ``call``: those its forward kept
    (:func:`block_lists` with ``call.for_backward`` set), else classified now."""
    kept = (call.for_backward or {}).get(("block_lists", block_m, block_n))
    if kept is not None:
        return kept
    return block_lists_both(program, call, block_m, block_n, dynamic=dynamic)


@functools.lru_cache(maxsize=64)
def _static_lists_both(key, batch: int, heads: int):
    grid = _static_grid(key, batch, heads)
    return _lists(grid, None), _lists(grid.transpose(-1, -2).contiguous(), None)


@functools.lru_cache(maxsize=256)
def _static_grid(key, batch: int, heads: int):
    program, device, Nq, Nk, q_offset, k_offset, n_q, n_k, block_m, block_n, params = key
    return tiles.classify_grid(program, q_offset=q_offset, k_offset=k_offset, q_rows=Nq, k_rows=Nk,
                               block_m=block_m, block_n=block_n, n_q=n_q, n_k=n_k, params=dict(params),
                               inputs={}, batch=batch, heads=heads, device=device)


def _classify(program, call: Call, block_m: int, block_n: int, inputs):
    return tiles.classify_grid(program, q_offset=call.q_offset, k_offset=call.k_offset, q_rows=call.Nq,
                               k_rows=call.Nk, block_m=block_m, block_n=block_n, n_q=call.n_q, n_k=call.n_k,
                               params=call.params, inputs=inputs, batch=call.B, heads=call.Hq,
                               device=call.q.device)


def _lists(grid: torch.Tensor, call: Call):
    full_count, full_index, partial_count, partial_index = tiles.to_block_lists(grid)
    nb, nh, nqb, nkb = grid.shape
    stride_b = nh * nqb if nb > 1 else 0
    stride_h = nqb if nh > 1 else 0
    return full_count, full_index, partial_count, partial_index, stride_b, stride_h, 1, nkb


@functools.lru_cache(maxsize=64)
def random_table(n_q: int, n_k: int, r: int, block: int, seed: int, device: str):
    """BigBird's chosen key random-blocks per query random-block: int32 [rows, r] (rows =
    ceil(n_q / block)), padded with -1 where fewer than r key blocks exist."""
    rows = max(1, -(-n_q // block))
    n_key_blocks = -(-n_k // block)
    table = torch.full((rows, max(r, 1)), -1, dtype=torch.int32)
    for qr in range(rows):
        chosen = semantics.random_block_set(qr, n_key_blocks, r, seed)
        table[qr, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return table.to(device), rows
