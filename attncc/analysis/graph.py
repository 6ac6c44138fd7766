"""The tiles a kernel visits, as a grid and as a block graph (networkx).

The block graph has a node ``("q", qb)`` per query block and ``("k", kb)`` per key block,
and an edge ``("q", qb) -> ("k", kb)`` with ``cls = "full"`` or ``"partial"`` per tile the
kernel visits. Its CSR lists (forward: per query block; transposed: per key block, for the
dK/dV pass) are what block-list kernels read.
"""
from __future__ import annotations

from typing import Mapping, Optional

import networkx as nx
import torch

from attncc.analysis.plan import Iteration, Plan, eval_key_ranges
from attncc.runtime import tiles
from attncc.spec import symbols as S

_CLASS_NAME = {tiles.FULL: "full", tiles.PARTIAL: "partial"}


def plan_grid(plan: Plan, *, q_rows: int, k_rows: int, block_m: int, block_n: int, q_offset: int = 0,
              k_offset: int = 0, n_q: Optional[int] = None, n_k: Optional[int] = None,
              params: Optional[Mapping[str, object]] = None, inputs: Optional[Mapping[str, torch.Tensor]] = None,
              batch: int = 1, heads: int = 1, device="cpu") -> torch.Tensor:
    """The tile classes the kernel of ``plan`` uses: int8 ``[B|1, H|1, nqb, nkb]``.

    DENSE: every tile FULL but the key tail; AFFINE: from the key ranges (per b / h when
    they depend on them); BLOCK_LIST: from the interval classifier."""
    n_q = q_offset + q_rows if n_q is None else n_q
    n_k = k_offset + k_rows if n_k is None else n_k
    params = {**plan.pattern.param_values, **(params or {})}
    common = dict(q_offset=q_offset, k_offset=k_offset, q_rows=q_rows, k_rows=k_rows, block_m=block_m,
                  block_n=block_n, n_q=n_q, n_k=n_k)
    if plan.iteration is Iteration.AFFINE:
        free = set().union(*[e.free_symbols for kr in plan.key_ranges for _, e in kr.items()]) if plan.key_ranges else set()
        nb = batch if S.b in free else 1
        nh = heads if S.h in free else 1
        rows = [torch.stack([eval_key_ranges(plan, **common, params=params, b=b, h=h) for h in range(nh)])
                for b in range(nb)]
        return torch.stack(rows).to(device)
    program = plan.classifier if plan.iteration is Iteration.BLOCK_LIST else None
    return tiles.classify_grid(program, **common, params=params, inputs=dict(inputs or {}), batch=batch,
                               heads=heads, device=device)


def grid_to_graph(grid2d: torch.Tensor) -> nx.DiGraph:
    """The block graph of one ``[nqb, nkb]`` grid of tile classes."""
    nqb, nkb = grid2d.shape
    g = nx.DiGraph()
    g.add_nodes_from((("q", qb) for qb in range(nqb)), side="q")
    g.add_nodes_from((("k", kb) for kb in range(nkb)), side="k")
    for qb, kb in torch.nonzero(grid2d != tiles.EMPTY).tolist():
        g.add_edge(("q", qb), ("k", kb), cls=_CLASS_NAME[int(grid2d[qb, kb])])
    return g


def block_graph(plan: Plan, *, b: int = 0, h: int = 0, **grid_args) -> nx.DiGraph:
    """The block graph of batch row ``b``, head ``h``; ``grid_args`` as for :func:`plan_grid`."""
    grid = plan_grid(plan, **grid_args)
    return grid_to_graph(grid[min(b, grid.shape[0] - 1), min(h, grid.shape[1] - 1)].cpu())


def graph_to_csr(graph: nx.DiGraph, n_query_blocks: int, n_key_blocks: int, transpose: bool = False):
    """CSR lists of a block graph, in the format of :func:`attncc.runtime.tiles.to_block_lists`:
    ``(full_count, full_idx, partial_count, partial_idx)``, int32, one row per query block
    (``transpose=True``: per key block, listing query blocks), indices increasing, padded
    with 0 to the number of columns."""
    n_rows, n_cols = (n_key_blocks, n_query_blocks) if transpose else (n_query_blocks, n_key_blocks)
    out = []
    for cls in ("full", "partial"):
        count = torch.zeros(n_rows, dtype=torch.int32)
        idx = torch.zeros(n_rows, n_cols, dtype=torch.int32)
        for r in range(n_rows):
            if transpose:
                cols = sorted(q for (_, q), _n, c in graph.in_edges(("k", r), data="cls") if c == cls)
            else:
                cols = sorted(k for _n, (_, k), c in graph.out_edges(("q", r), data="cls") if c == cls)
            count[r] = len(cols)
            idx[r, :len(cols)] = torch.tensor(cols, dtype=torch.int32)
        out += [count, idx]
    return tuple(out)


# The three walks of a softmax pattern's kernels: the forward and the dQ kernel give each query
# block its key blocks, the dK/dV kernel gives each key block its query blocks.
WALKS = ("forward", "dq", "dkdv")


def walk_grid(plan: Plan, walk: str, *, q_rows: int, k_rows: int, block_m: int, block_n: int, q_offset: int = 0,
              k_offset: int = 0, n_q: Optional[int] = None, n_k: Optional[int] = None,
              params: Optional[Mapping[str, object]] = None, b: int = 0, h: int = 0) -> torch.Tensor:
    """What the kernel of ``walk`` (one of :data:`WALKS`) does with each tile of a static pattern
    (no ``[inputs]``) for batch row ``b``, head ``h``: int8 EMPTY (not visited), PARTIAL (visited,
    mask evaluated) or FULL (visited, no mask code). ``[n_query_blocks, n_key_blocks]`` for the
    forward and dQ walks, ``[n_key_blocks, n_query_blocks]`` for the dK/dV walk."""
    if walk not in WALKS:
        raise ValueError(f"walk must be one of {WALKS}, got {walk!r}")
    if plan.dynamic:
        raise ValueError(f"{plan.pattern.name}: the tiles of a pattern with [inputs] depend on them")
    n_q = q_offset + q_rows if n_q is None else n_q
    n_k = k_offset + k_rows if n_k is None else n_k
    params = {**plan.pattern.param_values, **(params or {})}
    common = dict(q_offset=q_offset, k_offset=k_offset, q_rows=q_rows, k_rows=k_rows, block_m=block_m,
                  block_n=block_n, n_q=n_q, n_k=n_k)
    if plan.iteration is Iteration.AFFINE:
        if walk == "dkdv":
            from attncc.codegen.backward import transposed_plan  # (moves into the analysis)

            return eval_key_ranges(transposed_plan(plan.pattern), q_offset=k_offset, k_offset=q_offset,
                                   q_rows=k_rows, k_rows=q_rows, block_m=block_n, block_n=block_m, n_q=n_k, n_k=n_q,
                                   params=params, b=b, h=h, clip_rows=False)
        return eval_key_ranges(plan, **common, params=params, b=b, h=h, clip_rows=False)
    if plan.iteration is Iteration.DENSE:  # every tile full but the walked axis's ragged tail
        if walk == "dkdv":
            return tiles.classify_grid(None, **dict(common, q_offset=k_offset, k_offset=q_offset, q_rows=k_rows,
                                                    k_rows=q_rows, block_m=block_n, block_n=block_m),
                                       params={}, inputs={}, batch=1, heads=1, device="cpu")[0, 0]
        return tiles.classify_grid(None, **common, params={}, inputs={}, batch=1, heads=1, device="cpu")[0, 0]
    grid = tiles.classify_grid(plan.classifier, **common, params=params, inputs={}, batch=b + 1, heads=h + 1,
                               device="cpu")
    grid = grid[min(b, grid.shape[0] - 1), min(h, grid.shape[1] - 1)]
    return grid.transpose(0, 1).contiguous() if walk == "dkdv" else grid
