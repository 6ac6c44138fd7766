"""The tiles a kernel visits, as a grid and as a block graph (networkx).

The block graph has a node ``("q", qb)`` per query block and ``("k", kb)`` per key block,
and an edge ``("q", qb) -> ("k", kb)`` with ``cls = "full"`` or ``"partial"`` per tile the
kernel visits. Its CSR lists (forward: per query block; transposed: per key block, for the
dK/dV pass) are what block-list kernels read.
"""
from __future__ import annotations

from typing import Mapping, Optional

import sympy

from attncc.analysis.bands import FIRST, LAST
from attncc.analysis.plan import Plan
from attncc.analysis.walks import Iteration, bands_grid, precondition_holds
from attncc.core import tiles
from attncc.core.lazy import lazy_module
from attncc.spec import symbols as S

# imported on first use: `attncc build` never imports them
nx = lazy_module("networkx")
torch = lazy_module("torch")

_CLASS_NAME = {tiles.FULL: "full", tiles.PARTIAL: "partial"}


def plan_grid(plan: Plan, *, q_rows: int, k_rows: int, block_m: int, block_n: int, q_offset: int = 0,
              k_offset: int = 0, n_q: Optional[int] = None, n_k: Optional[int] = None,
              params: Optional[Mapping[str, object]] = None, inputs: Optional[Mapping[str, torch.Tensor]] = None,
              batch: int = 1, heads: int = 1, device="cpu", walk: str = "forward") -> torch.Tensor:
    """The tile classes the kernel of ``walk`` (:data:`WALKS`) uses: int8 ``[B|1, H|1, nqb, nkb]``
    (``[B|1, H|1, nkb, nqb]`` for the dK/dV walk).

    Static patterns: :func:`walk_grid` (per b / h when the mask depends on them); patterns with
    ``[inputs]``: the interval classifier on ``inputs`` (the dK/dV walk: its transpose)."""
    if plan.dynamic:
        n_q = q_offset + q_rows if n_q is None else n_q
        n_k = k_offset + k_rows if n_k is None else n_k
        grid = tiles.classify_grid(plan.classifier, q_offset=q_offset, k_offset=k_offset, q_rows=q_rows,
                                   k_rows=k_rows, block_m=block_m, block_n=block_n, n_q=n_q, n_k=n_k,
                                   params={**plan.pattern.param_values, **(params or {})},
                                   inputs=dict(inputs or {}), batch=batch, heads=heads, device=device)
        return grid.transpose(-1, -2).contiguous() if walk == "dkdv" else grid
    free = plan.pattern.mask.free_symbols if plan.pattern.mask is not None else set()
    nb = batch if S.b in free else 1
    nh = heads if S.h in free else 1
    common = dict(q_offset=q_offset, k_offset=k_offset, q_rows=q_rows, k_rows=k_rows, block_m=block_m,
                  block_n=block_n, n_q=n_q, n_k=n_k, params=params)
    rows = [torch.stack([walk_grid(plan, walk, **common, b=b, h=h) for h in range(nh)]) for b in range(nb)]
    return torch.stack(rows).to(device)


def walk_path(plan: Plan, walk: str, *, q_rows: int, k_rows: int, q_offset: int = 0, k_offset: int = 0,
              n_q: Optional[int] = None, n_k: Optional[int] = None,
              params: Optional[Mapping[str, object]] = None) -> str:
    """Which code path of ``walk`` a call of these sizes takes, as words for ``attncc explain``."""
    w = plan.transposed if walk == "dkdv" else plan.forward
    if w.kind is Iteration.DENSE:
        return "dense"
    if plan.dynamic:
        return "block lists classified per call from the inputs (interval classifier)"
    if w.kind is Iteration.BLOCK_LIST:
        return f"exact block lists, built once per shape (no closed form: {w.reason})"
    if breaks_precondition(plan, walk, q_rows=q_rows, k_rows=k_rows, q_offset=q_offset, k_offset=k_offset,
                           n_q=n_q, n_k=n_k, params=params):
        return f"exact block lists, built once per shape (this call breaks the closed form's {w.precondition})"
    return f"closed form, {'one segment' if w.segments == 1 else 'two segments'} per block"


def breaks_precondition(plan: Plan, walk: str, *, q_rows: int, k_rows: int, q_offset: int = 0, k_offset: int = 0,
                        n_q: Optional[int] = None, n_k: Optional[int] = None,
                        params: Optional[Mapping[str, object]] = None) -> bool:
    """Whether a call of these sizes breaks the precondition of ``walk``'s closed form (it then takes
    the exact block lists); False for walks without one."""
    w = plan.transposed if walk == "dkdv" else plan.forward
    if w.precondition is sympy.true:
        return False
    n_q = q_offset + q_rows if n_q is None else n_q
    n_k = k_offset + k_rows if n_k is None else n_k
    first, rows = (k_offset, k_rows) if walk == "dkdv" else (q_offset, q_rows)
    env = dict({**plan.pattern.param_values, **(params or {})}, n_q=n_k if walk == "dkdv" else n_q,
               n_k=n_q if walk == "dkdv" else n_k)
    env.update({FIRST: first, LAST: first + rows - 1})
    return not precondition_holds(w, env)


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
EXACT_CHUNK_PAIRS = 1 << 22  # pairs evaluated at once by exact_tiles


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def exact_tiles(plan: Plan, *, q_rows: int, k_rows: int, block_m: int, block_n: int, q_offset: int = 0,
                k_offset: int = 0, n_q: Optional[int] = None, n_k: Optional[int] = None,
                params: Optional[Mapping[str, object]] = None, b: int = 0, h: int = 0):
    """(some, every): bool ``[n_query_blocks, n_key_blocks]``: the tile holds an allowed pair / all
    its pairs (existing rows and keys) are allowed, by evaluating the mask on every pair (the
    interval program on one-pair tiles, where its intervals are points), query rows in chunks.
    Exact for integer masks: every integer operator of :mod:`attncc.core.tiles` gives single
    numbers their exact value. Float arithmetic stays widened (``tiles.widen``) and ``sin`` /
    ``cos`` / ``tan`` unbounded: a pair on a float boundary, or under those, counts as maybe
    allowed, its tile PARTIAL where the kernels' exact lists (the mask in float64) may have
    EMPTY or FULL."""
    n_q = q_offset + q_rows if n_q is None else n_q
    n_k = k_offset + k_rows if n_k is None else n_k
    params = {**plan.pattern.param_values, **(params or {})}
    nqb, nkb = _cdiv(q_rows, block_m), _cdiv(k_rows, block_n)
    some = torch.zeros(nqb, nkb, dtype=torch.bool)
    every = torch.ones(nqb, nkb, dtype=torch.bool)
    rows_per_chunk = max(block_m, EXACT_CHUNK_PAIRS // max(k_rows, 1) // block_m * block_m)
    pad_k = nkb * block_n - k_rows
    for r0 in range(0, q_rows, rows_per_chunk):
        rows = min(rows_per_chunk, q_rows - r0)
        grid = tiles.classify_grid(plan.classifier, q_offset=q_offset + r0, k_offset=k_offset, q_rows=rows,
                                   k_rows=k_rows, block_m=1, block_n=1, n_q=n_q, n_k=n_k, params=params, inputs={},
                                   batch=b + 1, heads=h + 1, device="cpu")
        grid = grid[min(b, grid.shape[0] - 1), min(h, grid.shape[1] - 1)]
        pad = (0, pad_k, 0, _cdiv(rows, block_m) * block_m - rows)
        blocks = (slice(r0 // block_m, r0 // block_m + _cdiv(rows, block_m)),)
        shape = (_cdiv(rows, block_m), block_m, nkb, block_n)
        allowed = torch.nn.functional.pad(grid != tiles.EMPTY, pad, value=False)
        surely = torch.nn.functional.pad(grid == tiles.FULL, pad, value=True)
        some[blocks] = allowed.view(shape).any(3).any(1)
        every[blocks] = surely.view(shape).all(3).all(1)
    return some, every


def _classes(some, every, whole):
    return torch.where(some, torch.where(every & whole, tiles.FULL, tiles.PARTIAL), tiles.EMPTY).to(torch.int8)


def walk_grid(plan: Plan, walk: str, *, q_rows: int, k_rows: int, block_m: int, block_n: int, q_offset: int = 0,
              k_offset: int = 0, n_q: Optional[int] = None, n_k: Optional[int] = None,
              params: Optional[Mapping[str, object]] = None, b: int = 0, h: int = 0) -> torch.Tensor:
    """What the kernel of ``walk`` (one of :data:`WALKS`) does with each tile of a static pattern
    (no ``[inputs]``) for batch row ``b``, head ``h``: int8 EMPTY (not visited), PARTIAL (visited,
    mask evaluated) or FULL (visited, no mask code). ``[n_query_blocks, n_key_blocks]`` for the
    forward and dQ walks, ``[n_key_blocks, n_query_blocks]`` for the dK/dV walk. A BANDS walk
    whose precondition fails for these sizes shows the exact block lists the call takes instead."""
    if walk not in WALKS:
        raise ValueError(f"walk must be one of {WALKS}, got {walk!r}")
    if plan.dynamic:
        raise ValueError(f"{plan.pattern.name}: the tiles of a pattern with [inputs] depend on them")
    n_q = q_offset + q_rows if n_q is None else n_q
    n_k = k_offset + k_rows if n_k is None else n_k
    params = {**plan.pattern.param_values, **(params or {})}
    transposed = walk == "dkdv"
    w = plan.transposed if transposed else plan.forward
    # the walk's outer blocks ("rows") and inner blocks
    if transposed:
        outer, inner = (k_offset, k_rows, block_n), (q_offset, q_rows, block_m)
    else:
        outer, inner = (q_offset, q_rows, block_m), (k_offset, k_rows, block_n)
    n_outer, n_inner = _cdiv(outer[1], outer[2]), _cdiv(inner[1], inner[2])
    if w.kind is Iteration.DENSE:
        whole = ((torch.arange(n_inner) + 1) * inner[2] <= inner[1]).view(1, -1)
        return _classes(torch.ones(n_outer, n_inner, dtype=torch.bool), torch.ones(n_outer, 1, dtype=torch.bool), whole)
    env = dict(params, n_q=n_k if transposed else n_q, n_k=n_q if transposed else n_k, b=b, h=h)
    if w.kind is Iteration.BANDS:
        first, last = outer[0], outer[0] + outer[1] - 1
        if precondition_holds(w, {**env, FIRST: first, LAST: last}):
            starts = outer[0] + torch.arange(n_outer, dtype=torch.int64) * outer[2]
            env.update(q_lo=starts, q_hi=torch.clamp(starts + outer[2] - 1, max=last), k_offset=inner[0],
                       N_K=inner[1], BLOCK_N=inner[2])
            return bands_grid(w, env, n_outer, n_inner)
    some, every = exact_tiles(plan, q_rows=q_rows, k_rows=k_rows, block_m=block_m, block_n=block_n,
                              q_offset=q_offset, k_offset=k_offset, n_q=n_q, n_k=n_k, params=params, b=b, h=h)
    if transposed:
        whole = ((torch.arange(_cdiv(q_rows, block_m)) + 1) * block_m <= q_rows).view(-1, 1)
        return _classes(some, every, whole).transpose(0, 1).contiguous()
    whole = ((torch.arange(_cdiv(k_rows, block_n)) + 1) * block_n <= k_rows).view(1, -1)
    return _classes(some, every, whole)
