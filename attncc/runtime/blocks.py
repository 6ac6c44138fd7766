"""Block lists for the walks that are not closed-form.

Static patterns (strides, dilations, 2D neighborhoods, random blocks, calls that break a closed
form's precondition) take *exact* lists: every pair of every tile evaluated once by the
module's generated kernel, then cached per (kernel, device, sizes, positions, params, tile
shape): a static pattern pays nothing after its first call (:func:`exact_block_lists`).
Data-dependent ones (document ids, lengths) are classified from their inputs on every call by
the interval classifier, on the device, with no host synchronization.
"""
from __future__ import annotations

import collections
import functools
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from attncc.core import semantics, tiles
from attncc.runtime.call import Call


class BlockLists(NamedTuple):
    """The blocks a kernel walks per row of blocks, as the attention kernels take them (their
    list parameters, in this order: :data:`attncc.codegen.softmax.LIST_ARGS`). A row is a query
    block for the forward and dQ kernels and a key block for the dK/dV kernel ("transposed"
    lists); the listed blocks are of the other side. EMPTY blocks are in neither list.

    - ``full_count``: int32 ``[Bl, Hl, rows]``, the row's FULL blocks (every pair allowed,
      walked without the mask);
    - ``full_index``: int32 ``[Bl, Hl, rows, width]``, their block indices in increasing order
      in the first ``full_count`` entries of the row (the other entries are not read);
    - ``partial_count``, ``partial_index``: the same for PARTIAL blocks (walked with the mask);
    - ``stride_b``, ``stride_h``: the counts' element strides between batch rows and between
      heads; 0 when ``Bl`` or ``Hl`` is 1 (a mask that reads neither b nor h: one list for all);
    - ``stride_row``: between rows (1);
    - ``width``: entries per index row (the number of blocks of the other side): entry ``t``
      of row ``r`` (``r = b * stride_b + h * stride_h + row * stride_row``) is at
      ``index[r * width + t]``.
    """

    full_count: torch.Tensor
    full_index: torch.Tensor
    partial_count: torch.Tensor
    partial_index: torch.Tensor
    stride_b: int
    stride_h: int
    stride_row: int
    width: int


# A tile-list kernel (the generated ``_tile_lists`` of a data-dependent pattern, see
# attncc.codegen.tile_kernel): ``kernel(call, block_m, block_n, transposed)`` returns
# ``(lists, lists_t)``, ``lists_t`` None unless ``transposed``; the same lists as
# :func:`classified_lists` (dynamic), in one launch.


def block_lists(program, call: Call, block_m: int, block_n: int, *, dynamic: bool, kernel=None) -> BlockLists:
    """The forward's :class:`BlockLists` for a grid of this call's tiles.

    When a backward will follow (``call.for_backward`` is a dict), the transposed lists are
    made from the same classification and kept there for :func:`backward_block_lists`.
    ``kernel``: the pattern's tile-list kernel (data-dependent patterns), else the torch path."""
    kept = call.for_backward
    if kept is not None:  # backward_block_lists, inlined (once per call that trains)
        key = ("block_lists", block_m, block_n)
        both = kept.get(key)
        if both is None:
            both = kept[key] = block_lists_both(program, call, block_m, block_n, dynamic=dynamic, kernel=kernel)
        return both[0]
    if kernel is not None:
        return kernel(call, block_m, block_n, False)[0]
    return classified_lists(program, call, block_m, block_n, dynamic=dynamic, transposed=False)[0]


def block_lists_both(program, call: Call, block_m: int, block_n: int, *, dynamic: bool,
                     kernel=None) -> Tuple[BlockLists, BlockLists]:
    """(forward lists, transposed lists) of one classification of this call's tiles, each
    :class:`BlockLists`. The transposed lists have one row per key block, listing the query
    blocks that see it (the dK/dV kernel's iteration); their width is the number of query
    blocks. Static patterns: cached per shape."""
    if kernel is not None:
        return kernel(call, block_m, block_n, True)
    return classified_lists(program, call, block_m, block_n, dynamic=dynamic, transposed=True)


def backward_block_lists(program, call: Call, block_m: int, block_n: int, *, dynamic: bool,
                         kernel=None) -> Tuple[BlockLists, BlockLists]:
    """The (forward, transposed) lists for the backward of ``call`` with tiles of
    ``block_m`` x ``block_n``: those kept in ``call.for_backward`` (by its forward, or by an
    earlier request of this shape), else made now (and kept there). The dK/dV and dQ kernels
    may ask for different tile shapes: each shape is classified once per call."""
    key = ("block_lists", block_m, block_n)
    kept = (call.for_backward or {}).get(key)
    if kept is not None:
        return kept
    both = block_lists_both(program, call, block_m, block_n, dynamic=dynamic, kernel=kernel)
    if call.for_backward is not None:
        call.for_backward[key] = both
    return both


def classified_lists(program, call: Call, block_m: int, block_n: int, *, dynamic: bool,
                     transposed: bool) -> Tuple[BlockLists, Optional[BlockLists]]:
    """The torch path: (forward lists, transposed lists or None) from ``tiles.classify_grid``
    and ``tiles.to_block_lists`` (about 50 small torch ops per dynamic call)."""
    if dynamic:
        grid = _classify(program, call, block_m, block_n, call.inputs)
        return _lists(grid, call), (_lists(grid.transpose(-1, -2).contiguous(), call) if transposed else None)
    key = call.cached(("static_lists", program, block_m, block_n), lambda: (
        program, str(call.q.device), call.Nq, call.Nk, call.q_offset, call.k_offset, call.n_q, call.n_k,
        block_m, block_n, tuple(sorted(call.params.items()))))
    return _static_lists(key, call.B, call.Hq, transposed)


# Static patterns' lists per (shape key, batch, heads, transposed): made once (with host reads:
# BigBird's random-block tables are built on the CPU), then only read. Never made during CUDA
# graph capture: the kernels of a capture do not run until the graph is replayed, so lists cached
# then would hold garbage for every eager call (and the CPU table cannot be copied in).
_STATIC: dict = {}
MAX_STATIC = 256


def _static_lists(key, batch: int, heads: int, transposed: bool):
    slot = (key, batch, heads, transposed)
    found = _STATIC.get(slot)
    if found is None:
        device = key[1]
        if device.startswith("cuda") and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"attncc: the block lists of this static pattern at this shape (Nq = {key[2]}, Nk = {key[3]}, "
                f"tiles {key[8]}x{key[9]}) are made on the first call, which cannot be inside a CUDA graph "
                f"capture: call the attention once before capturing (a warm-up run, as torch.cuda.graphs asks)")
        grid = _static_grid(key, batch, heads)
        found = (_lists(grid, None), _lists(grid.transpose(-1, -2).contiguous(), None) if transposed else None)
        if len(_STATIC) >= MAX_STATIC:
            _STATIC.clear()
        _STATIC[slot] = found
    return found


EXACT_CACHE_SIZE = 64
_exact_cache: "collections.OrderedDict[tuple, Tuple]" = collections.OrderedDict()


def exact_block_lists(tile_codes: Callable, call: Call, block_m: int, block_n: int, *,
                      per_head: bool) -> Tuple[BlockLists, BlockLists]:
    """(forward lists, transposed lists), :class:`BlockLists`, from an exact
    classification of every tile: ``tile_codes(call, block_m, block_n)`` gives int8 codes
    ``[B|1, H|1, nqb, nkb]``, bit 0 set when the tile holds an allowed pair, bit 1 when all its
    pairs (existing rows and keys) are allowed. A tile is FULL in the forward lists when all are
    and its key block is whole, in the transposed lists (per key block, its query blocks) when
    all are and its query block is whole: each walk runs unmasked only what it may.
    ``per_head``: the mask reads b or h (one grid per batch row and head). Cached (LRU), except
    for packed variable-length batches: one grid per sequence, its own lengths (from
    ``cu_seqlens``, on the device), classified on every call."""
    if call.varlen:
        return _exact_lists_of(tile_codes(call, block_m, block_n), block_m, block_n,
                               call.cu_seqlens_q.diff().view(-1, 1, 1, 1), call.cu_seqlens_k.diff().view(-1, 1, 1, 1))
    key = (tile_codes, str(call.q.device), call.Nq, call.Nk, call.q_offset, call.k_offset, call.n_q, call.n_k,
           block_m, block_n, tuple(sorted(call.params.items())), (call.B, call.Hq) if per_head else None)
    hit = _exact_cache.get(key)
    if hit is not None:
        try:
            _exact_cache.move_to_end(key)
        except KeyError:  # another thread evicted it since the get (threads serving calls of many shapes)
            pass
        return hit
    if key[1].startswith("cuda") and torch.cuda.is_current_stream_capturing():
        # a capture does not run its kernels until replay: lists cached now would hold garbage
        raise RuntimeError(
            f"attncc: the exact block lists of this pattern at this shape (Nq = {call.Nq}, Nk = {call.Nk}, "
            f"tiles {block_m}x{block_n}) are made on the first call, which cannot be inside a CUDA graph "
            f"capture: call the attention once before capturing (a warm-up run, as torch.cuda.graphs asks)")
    both = _exact_lists_of(tile_codes(call, block_m, block_n), block_m, block_n, call.Nq, call.Nk)
    _exact_cache[key] = both
    while len(_exact_cache) > EXACT_CACHE_SIZE:
        try:
            _exact_cache.popitem(last=False)
        except KeyError:  # emptied by other threads meanwhile
            break
    return both


def _exact_lists_of(codes: torch.Tensor, block_m: int, block_n: int, n_rows, n_keys) -> Tuple[BlockLists, BlockLists]:
    """(forward lists, transposed lists) of exact tile codes; ``n_rows`` / ``n_keys``: the query
    rows and keys (ints, or tensors broadcasting over the codes' batch dim: per sequence)."""
    some, every = (codes & 1) != 0, (codes & 2) != 0
    nqb, nkb = codes.shape[-2:]
    key_whole = (torch.arange(nkb, device=codes.device) + 1).view(1, nkb) * block_n <= n_keys
    query_whole = (torch.arange(nqb, device=codes.device) + 1).view(nqb, 1) * block_m <= n_rows

    def classes(full):
        return torch.where(some, torch.where(full, tiles.FULL, tiles.PARTIAL), tiles.EMPTY).to(torch.int8)

    return (_lists(classes(every & key_whole), None),
            _lists(classes(every & query_whole).transpose(-1, -2).contiguous(), None))


@functools.lru_cache(maxsize=16)
def no_lists(device) -> BlockLists:
    """List arguments for a kernel launched on its closed-form walk (LISTS=False): never read."""
    empty = torch.zeros(1, dtype=torch.int32, device=device)
    return BlockLists(empty, empty, empty, empty, stride_b=0, stride_h=0, stride_row=0, width=1)


def packed_size(rows: int, width: int) -> int:
    """int32 entries of :func:`packed_lists` for ``rows`` list rows of ``width`` entries."""
    return 2 * ((rows + 3) // 4 * 4) + 2 * ((rows * width + 3) // 4 * 4)


def packed_lists(buffer: torch.Tensor, offset: int, nb: int, nh: int, n_rows: int, width: int) -> BlockLists:
    """The lists of one tile-list kernel orientation stored in the int32 ``buffer`` from
    ``offset``: ``[full counts | partial counts | full index | partial index]``, counts
    ``[nb, nh, n_rows]``, indices ``[nb, nh, n_rows, width]``, each part starting 16-byte
    aligned (the kernel computes the same offsets)."""
    return packed_layout(offset, nb, nh, n_rows, width).lists(buffer)


class PackedLayout(NamedTuple):
    """Where :func:`packed_lists` finds the parts of one orientation (see there): the counts'
    and the indices' shape and strides, each part's offset, and the lists' own numbers."""

    count_shape: Tuple[int, ...]
    count_strides: Tuple[int, ...]
    index_shape: Tuple[int, ...]
    index_strides: Tuple[int, ...]
    offsets: Tuple[int, int, int, int]  # full count, full index, partial count, partial index
    stride_b: int
    stride_h: int
    width: int

    def lists(self, buffer: torch.Tensor) -> BlockLists:
        cs, cst, ks, kst, (fc, fi, pc, pi) = (self.count_shape, self.count_strides, self.index_shape,
                                              self.index_strides, self.offsets)
        return BlockLists(buffer.as_strided(cs, cst, fc), buffer.as_strided(ks, kst, fi),
                          buffer.as_strided(cs, cst, pc), buffer.as_strided(ks, kst, pi),
                          self.stride_b, self.stride_h, 1, self.width)


@functools.lru_cache(maxsize=1024)
def packed_layout(offset: int, nb: int, nh: int, n_rows: int, width: int) -> PackedLayout:
    """The :class:`PackedLayout` of one orientation of :func:`packed_lists` (computed once per shape)."""
    R = nb * nh * n_rows
    R_pad, RK_pad = (R + 3) // 4 * 4, (R * width + 3) // 4 * 4
    return PackedLayout((nb, nh, n_rows), (nh * n_rows, n_rows, 1), (nb, nh, n_rows, width),
                        (nh * n_rows * width, n_rows * width, width, 1),
                        (offset, offset + 2 * R_pad, offset + R_pad, offset + 2 * R_pad + RK_pad),
                        stride_b=nh * n_rows if nb > 1 else 0, stride_h=n_rows if nh > 1 else 0, width=width)


class TilePlan(NamedTuple):
    """A generated module's tile-list kernel launch for one call signature (its ``_tile_plan``):
    ``launch(buffer, *inputs)`` runs the kernel into an int32 buffer of ``size`` entries, which
    ``lists`` (and, when transposed lists are made too, ``lists_t``) read."""

    size: int
    launch: Callable
    layout: PackedLayout
    layout_t: Optional[PackedLayout]

    def lists(self, buffer: torch.Tensor) -> Tuple[BlockLists, Optional[BlockLists]]:
        """(forward lists, transposed lists or None) in ``buffer``, after ``launch``."""
        return self.layout.lists(buffer), (None if self.layout_t is None else self.layout_t.lists(buffer))


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


def _lists(grid: torch.Tensor, call: Call) -> BlockLists:
    """The lists of a grid of tile classes ``[Bl, Hl, rows, blocks]`` (``tiles.to_block_lists``)."""
    full_count, full_index, partial_count, partial_index = tiles.to_block_lists(grid)
    nb, nh, rows, width = grid.shape
    return BlockLists(full_count, full_index, partial_count, partial_index, stride_b=nh * rows if nb > 1 else 0,
                      stride_h=rows if nh > 1 else 0, stride_row=1, width=width)


_TABLES: dict = {}


def random_table(n_q: int, n_k: int, r: int, block: int, seed: int, device: str):
    """BigBird's chosen key random-blocks per query random-block: int32 [rows, r] (rows =
    ceil(n_q / block)), padded with -1 where fewer than r key blocks exist. Made on the CPU once
    per shape and copied to ``device``; not inside a CUDA graph capture (see :func:`_static_lists`)."""
    key = (n_q, n_k, r, block, seed, device)
    found = _TABLES.get(key)
    if found is not None:
        return found
    if device.startswith("cuda") and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"attncc: BigBird's random-block table for n_q = {n_q}, n_k = {n_k} is made on the first "
                           f"call, which cannot be inside a CUDA graph capture: call the attention once before capturing")
    rows = max(1, -(-n_q // block))
    n_key_blocks = -(-n_k // block)
    table = torch.full((rows, max(r, 1)), -1, dtype=torch.int32)
    for qr in range(rows):
        chosen = semantics.random_block_set(qr, n_key_blocks, r, seed)
        table[qr, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    if len(_TABLES) >= 64:
        _TABLES.clear()
    found = _TABLES[key] = (table.to(device), rows)
    return found
