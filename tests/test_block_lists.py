"""Block lists travel as attncc.runtime.blocks.BlockLists: named, in the order of the kernels'
list parameters, with the shapes, dtypes and strides its docstring gives."""
from __future__ import annotations

import pytest
import torch

from attncc.codegen.softmax import LIST_ARGS
from attncc.runtime import bind, blocks
from attncc.runtime.blocks import BlockLists
from cases import inputs_for, module, pattern


def test_kernel_list_parameters_are_its_fields_in_order():
    assert [a.removeprefix("list_") for a in LIST_ARGS] == list(BlockLists._fields)


def _check(lists, rows: int, width: int):
    assert isinstance(lists, BlockLists)
    nb, nh = lists.full_count.shape[:2]
    for count, index in ((lists.full_count, lists.full_index), (lists.partial_count, lists.partial_index)):
        assert count.dtype == index.dtype == torch.int32
        assert tuple(count.shape) == (nb, nh, rows) and tuple(index.shape) == (nb, nh, rows, width)
    assert lists.width == width and lists.stride_row == 1
    assert lists.stride_b == (nh * rows if nb > 1 else 0) and lists.stride_h == (rows if nh > 1 else 0)
    flat_count = {name: getattr(lists, name).flatten() for name in ("full_count", "partial_count")}
    for name, index in (("full_count", lists.full_index), ("partial_count", lists.partial_index)):
        for r, n in enumerate(flat_count[name].tolist()):  # entry t of row r at index[r * width + t]
            entries = index.flatten()[r * width:r * width + n]
            assert entries.tolist() == sorted(set(entries.tolist())) and all(0 <= e < width for e in entries.tolist())


@pytest.mark.parametrize("name,how", [("document", "kernel"), ("document", "torch"), ("neighborhood_2d", "exact"),
                                      ("sliding_window", "none")])
def test_host_lists_are_block_lists(name, how):
    B, H, Nq, Nk, bm, bn = 2, 2, 45, 70, 16, 32
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.zeros(B, H, n, 16) for n in (Nq, Nk, Nk))
    mod = module(name)
    call = bind(mod.SPEC, q, k, v, kwargs=inputs_for(pattern(name), B, H, Nk, gen))
    rows, width = -(-Nq // bm), -(-Nk // bn)
    if how == "none":
        lists = blocks.no_lists(q.device)
        assert isinstance(lists, BlockLists) and lists.stride_b == lists.stride_h == 0
        return
    if how == "exact":
        fwd, t = mod._exact_lists(call, bm, bn)
    elif how == "kernel":
        fwd, t = mod._tile_lists(call, bm, bn, True)
    else:
        fwd, t = blocks.classified_lists(mod.MASK_TILES, call, bm, bn, dynamic=True, transposed=True)
    _check(fwd, rows, width)
    _check(t, width, rows)
