"""What the analysis found for one problem size: density, tiles, FLOPs, bytes, bounds.

The numbers ``attncc explain`` prints and draws (:func:`explain_data`), all exact:

- a static pattern whose walks have closed forms at these sizes (no ``[inputs]``; each walk
  DENSE, or BANDS with its precondition holding): plain Python ints, no torch. The tiles are
  the walks' steps run once per outer block (:mod:`attncc.analysis.intexpr`), so the counts are
  those of :func:`attncc.analysis.graph.walk_grid`; the allowed pairs are counted row by row
  from the forward walk's cover, whose bands are the mask's clauses solved exactly for the key
  (a row's allowed keys: every key on a full row, else the union of the columns' intervals and
  the band's);
- a static pattern whose walks take the exact block lists: the allowed pairs of every tile
  (:mod:`attncc.pair_counts`, numpy: the mask evaluated as the reference evaluates it, on one
  row and key per class of rows and keys it cannot tell apart, or on the tiles near the first
  row and key when a translation along the diagonal leaves it unchanged; no torch), each
  walk's visited and FULL tiles following from them; the float64 reference's
  :func:`attncc._reference.pair_mask` on every pair where numpy might round otherwise;
- ``[inputs]``: the tile grids as tensors, FULL tiles counting all their pairs and PARTIAL
  tiles counted by evaluating the mask on their pairs only (the reference's ``pair_mask``).

This module sits above the analysis and the reference (the analysis may not import the reference
it is checked against: docs/DESIGN-NOTES.md).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import sympy

from attncc.analysis.bands import FIRST, LAST, X, Cover
from attncc.analysis.builtin import gluon_fit
from attncc.analysis.graph import breaks_precondition, plan_grid, walk_path
from attncc.analysis.intexpr import Unsupported, compile_int
from attncc.analysis.plan import Plan
from attncc.analysis.score import score_report
from attncc.analysis.walks import Iteration, precondition_holds
from attncc.codegen.bounds import divisors
from attncc.core import tiles
from attncc.core.lazy import lazy_module
from attncc.runtime import gluon
from attncc.spec import symbols as S

torch = lazy_module("torch")  # on first use: `attncc build` and explain of a closed form never import it

# where auto's Gluon forward applies by size (attncc.runtime.backend.auto_picks_gluon)
AUTO_SIZE = f" for calls of at least 2**{gluon.AUTO_MIN_PAIRS.bit_length() - 1} (batch x heads x queries x keys) pairs"

# bytes per element of q, k, v and o: explain's --dtype (short names; a spec's names map to them)
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
INDEX_BYTES = 4  # int32 block lists
SYNTHETIC_DOCUMENTS = 4
CLASSES = (("empty", tiles.EMPTY), ("full", tiles.FULL), ("partial", tiles.PARTIAL))
WALK_NAMES = ("forward", "dkdv")  # the dQ kernel walks as the forward one


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def synthesize_inputs(plan: Plan, *, batch: int, heads: int, positions: int) -> Dict[str, torch.Tensor]:
    """Representative inputs for a data-dependent pattern, by declared dims and dtype
    (:func:`describe_synthetic` says it in words): an integer input along positions splits them
    into SYNTHETIC_DOCUMENTS equal segments (document ids), one without positions holds 3/4 of
    the positions (a length), bool inputs are all true, floating ones zero."""
    out = {}
    for decl in plan.pattern.inputs:
        shape = [batch if d == "b" else heads if d == "h" else positions if d == "n" else d for d in decl.dims]
        dtype = getattr(torch, decl.dtype)
        if decl.dtype == "bool":
            t = torch.ones(shape, dtype=torch.bool)
        elif dtype.is_floating_point:
            t = torch.zeros(shape, dtype=dtype)
        elif "n" in decl.dims:
            pos = torch.arange(positions) * SYNTHETIC_DOCUMENTS // max(positions, 1)
            view = [positions if d == "n" else 1 for d in decl.dims]
            t = pos.view(view).expand(shape).to(dtype).contiguous()
        else:
            t = torch.full(shape, (3 * positions) // 4, dtype=dtype)
        out[decl.name] = t
    return out


def describe_synthetic(plan: Plan, names, *, positions: int) -> Dict[str, str]:
    """What :func:`synthesize_inputs` made for each of ``names``, in words."""
    out = {}
    for decl in plan.pattern.inputs:
        if decl.name not in names:
            continue
        if decl.dtype == "bool":
            out[decl.name] = "all true"
        elif decl.dtype.startswith(("float", "bfloat")):
            out[decl.name] = "zeros"
        elif "n" in decl.dims:
            out[decl.name] = f"ids of {SYNTHETIC_DOCUMENTS} equal segments of the positions (documents)"
        else:
            out[decl.name] = f"{(3 * positions) // 4} everywhere (3/4 of the {positions} positions)"
    return out


# ---------------------------------------------------------------------------------------------
# static closed forms: plain Python ints
# ---------------------------------------------------------------------------------------------

def _walk_counts(plan: Plan, walk: str, *, n_q, n_k, block_m, block_n, params, b, h,
                 heads) -> Optional[Tuple[int, int, int]]:
    """(visited, FULL, FULL pairs) of one walk at batch row ``b``, head ``h`` (FULL pairs: the
    forward walk's, rows times keys of its FULL tiles), as :func:`~attncc.analysis.graph.walk_grid`
    gives them; None when the walk takes the exact block lists here."""
    transposed = walk == "dkdv"
    w = plan.transposed if transposed else plan.forward
    (o_rows, o_block), (i_rows, i_block) = ((n_k, block_n), (n_q, block_m)) if transposed else \
        ((n_q, block_m), (n_k, block_n))
    n_outer, n_inner = _cdiv(o_rows, o_block), _cdiv(i_rows, i_block)
    if w.kind is Iteration.DENSE:  # every tile; FULL but a ragged last inner block
        whole = i_rows // i_block
        return n_outer * n_inner, n_outer * whole, o_rows * whole * i_block
    if w.kind is not Iteration.BANDS:
        return None
    env = dict(params, n_q=n_k if transposed else n_q, n_k=n_q if transposed else n_k, b=b, h=h, n_heads=heads)
    last = o_rows - 1
    if not precondition_holds(w, {**env, FIRST: 0, LAST: last}):
        return None
    steps = [(sym, compile_int(e)) for sym, e in w.steps]
    out = {sym.name: sym for sym, _ in w.steps}
    env.update(k_offset=0, N_K=i_rows, BLOCK_N=i_block)
    visited = full = full_pairs = 0
    for start in range(0, o_rows, o_block):
        env["q_lo"], env["q_hi"] = start, min(start + o_block - 1, last)
        for sym, fn in steps:
            env[sym] = fn(env)
        if w.segments == 1:
            lo, hi, flo, fhi = (env[out[n]] for n in ("lo", "hi", "full_lo", "full_hi"))
            if not 0 <= lo <= flo <= fhi <= hi <= n_inner:
                raise AssertionError(f"walk out of order: lo={lo} full_lo={flo} full_hi={fhi} hi={hi}")
            n_full, n_visited = fhi - flo, hi - lo
        else:
            n_full = max(env[out["n_full"]], 0)
            n_visited = n_full + max(env[out["n_masked"]], 0)
        visited += n_visited
        full += n_full
        full_pairs += n_full * (env["q_hi"] - start + 1) * i_block  # FULL key blocks are whole
    return visited, full, full_pairs


def _allowed_by_rows(cover: Cover, *, n_rows: int, n_keys: int, env: Mapping) -> int:
    """Allowed pairs of rows ``[0, n_rows)`` and keys ``[0, n_keys)``, row by row from a cover
    (its guards and row ranges evaluated once, the band's bounds per row)."""
    def value(e, default=None):
        return default if e is None else compile_int(e)(env)

    full_rows = []  # (first, last) ranges of rows that allow every key
    for band in cover.rows:
        if value(band.guard):
            full_rows.append((value(band.row_lo, 0), value(band.row_hi, n_rows - 1)))
    columns = [(value(c.lower_at(0), 0), value(c.upper_at(0), n_keys - 1)) for c in cover.columns if value(c.guard)]
    band = cover.band if cover.band is not None and value(cover.band.guard) else None
    if band is not None:
        rows = (value(band.row_lo, 0), value(band.row_hi, n_rows - 1))
        lower = compile_int(band.lower_at(X)) if band.lower else None
        upper = compile_int(band.upper_at(X)) if band.upper else None
    row_env = dict(env)
    total = 0
    for x in range(n_rows):
        if any(a <= x <= z for a, z in full_rows):
            total += n_keys
            continue
        intervals = list(columns)
        if band is not None and rows[0] <= x <= rows[1]:
            row_env[X] = x
            intervals.append((0 if lower is None else lower(row_env), n_keys - 1 if upper is None else upper(row_env)))
        end = -1  # the union's last key so far
        for a, z in sorted(intervals):
            a, z = max(a, end + 1, 0), min(z, n_keys - 1)
            if a <= z:
                total += z - a + 1
                end = z
    return total


def _static_numbers(plan: Plan, *, n_q, n_k, block_m, block_n, params, nb, nh, batch, heads) -> Optional[dict]:
    """Tile counts per walk and allowed pairs over all batch rows and heads, and the number of
    grids (``nb * nh``: batch rows / heads with tiles of their own), or None when a walk takes
    the exact block lists at these sizes (or a bound is not integer arithmetic)."""
    weight = (batch if nb == 1 else 1) * (heads if nh == 1 else 1)
    counts = {walk: [0, 0] for walk in WALK_NAMES}  # visited, FULL
    allowed = full_pairs = 0
    try:
        for b in range(nb):
            for h in range(nh):
                for walk in WALK_NAMES:
                    c = _walk_counts(plan, walk, n_q=n_q, n_k=n_k, block_m=block_m, block_n=block_n, params=params,
                                     b=b, h=h, heads=heads)
                    if c is None:
                        return None
                    counts[walk][0] += weight * c[0]
                    counts[walk][1] += weight * c[1]
                    if walk == "forward":
                        full_pairs += weight * c[2]
                if plan.forward.kind is Iteration.DENSE:
                    allowed += weight * n_q * n_k
                else:
                    env = dict(params, n_q=n_q, n_k=n_k, b=b, h=h, n_heads=heads)
                    allowed += weight * _allowed_by_rows(plan.forward.cover, n_rows=n_q, n_keys=n_k, env=env)
    except Unsupported:
        return None
    tiles_per_walk = batch * heads * _cdiv(n_q, block_m) * _cdiv(n_k, block_n)
    visited = counts["forward"][0]
    if not full_pairs <= allowed <= visited * block_m * block_n:
        raise AssertionError(f"{plan.pattern.name}: {allowed} allowed pairs, but {full_pairs} in FULL tiles and "
                             f"{visited} tiles visited")
    return {"walks": {walk: {"empty": tiles_per_walk - v, "full": f, "partial": v - f}
                      for walk, (v, f) in counts.items()},
            "allowed": allowed, "grids": nb * nh}


# ---------------------------------------------------------------------------------------------
# tensors: exact block lists, [inputs]
# ---------------------------------------------------------------------------------------------

def _every_pair_numbers(plan: Plan, *, n_q, n_k, block_m, block_n, params, nb, nh, batch, heads) -> dict:
    """:func:`_static_numbers`' result from the allowed pairs of every tile: a static pattern's
    tiles are exact (the Plan's contract, tests/test_exact_plans.py), so each walk's visited
    tiles are those with an allowed pair and its FULL ones those whose pairs are all allowed, the
    walk's inner block whole (the forward walk's key block, the dK/dV walk's query block). For
    the walks that take the exact block lists here. The counts come from numpy
    (:mod:`attncc.pair_counts`: by classes of rows and keys, or by translation along the
    diagonal; no torch), or where it cannot match the reference, from the reference itself."""
    import numpy as np

    from attncc.pair_counts import TileCounter, Unsupported

    pattern = plan.pattern.replace(inputs=())  # a static mask reads none (those of the bias need none here)
    try:
        counter = TileCounter(pattern, n_q=n_q, n_k=n_k, block_m=block_m, block_n=block_n, params=params,
                              batch=nb, heads=heads)
        grids = [counter.counts(b, h) for b in range(nb) for h in range(nh)]
    except Unsupported:
        return _reference_numbers(plan, n_q=n_q, n_k=n_k, block_m=block_m, block_n=block_n, params=params, nb=nb,
                                  nh=nh, batch=batch, heads=heads)
    nqb, nkb = _cdiv(n_q, block_m), _cdiv(n_k, block_n)
    rows = np.minimum(n_q - np.arange(nqb) * block_m, block_m)  # rows of each query block, keys of each key block
    cols = np.minimum(n_k - np.arange(nkb) * block_n, block_n)
    area = rows[:, None] * cols[None, :]
    whole = {"forward": (cols == block_n)[None, :], "dkdv": (rows == block_m)[:, None]}
    weight = (batch // nb) * (heads // nh)
    visited = allowed = 0
    full = dict.fromkeys(WALK_NAMES, 0)
    for count in grids:
        every = count == area
        visited += int((count > 0).sum())
        allowed += int(count.sum())
        for walk in WALK_NAMES:
            full[walk] += int((every & whole[walk]).sum())
    walks = {walk: {"empty": batch * heads * nqb * nkb - weight * visited, "full": weight * full[walk],
                    "partial": weight * (visited - full[walk])} for walk in WALK_NAMES}
    return {"walks": walks, "allowed": weight * allowed, "grids": nb * nh}


def _reference_numbers(plan: Plan, *, n_q, n_k, block_m, block_n, params, nb, nh, batch, heads) -> dict:
    """:func:`_every_pair_numbers` with the float64 reference's
    :func:`~attncc._reference.pair_mask` on every pair (query rows in chunks): for the masks
    numpy might evaluate otherwise (and for the errors the reference raises)."""
    from attncc._reference import pair_mask
    from attncc.analysis.graph import EXACT_CHUNK_PAIRS

    pattern = plan.pattern.replace(inputs=())
    nqb, nkb = _cdiv(n_q, block_m), _cdiv(n_k, block_n)
    some = torch.zeros(nb, nh, nqb, nkb, dtype=torch.bool)
    every = torch.ones(nb, nh, nqb, nkb, dtype=torch.bool)
    allowed = 0
    rows_per_chunk = max(block_m, EXACT_CHUNK_PAIRS // n_k // block_m * block_m)
    for r0 in range(0, n_q, rows_per_chunk):
        rows = min(rows_per_chunk, n_q - r0)
        m = pair_mask(pattern, q_rows=rows, k_rows=n_k, q_offset=r0, n_q=n_q, n_k=n_k, batch=nb, heads=nh,
                      params=params, device="cpu")
        allowed += int(m.sum())
        pad = (0, nkb * block_n - n_k, 0, _cdiv(rows, block_m) * block_m - rows)
        shape = (nb, nh, _cdiv(rows, block_m), block_m, nkb, block_n)
        blocks = slice(r0 // block_m, r0 // block_m + _cdiv(rows, block_m))
        some[:, :, blocks] = torch.nn.functional.pad(m, pad, value=False).view(shape).any(5).any(3)
        every[:, :, blocks] = torch.nn.functional.pad(m, pad, value=True).view(shape).all(5).all(3)
    weight = (batch // nb) * (heads // nh)
    whole = {"forward": ((torch.arange(nkb) + 1) * block_n <= n_k).view(1, -1),
             "dkdv": ((torch.arange(nqb) + 1) * block_m <= n_q).view(-1, 1)}
    visited = weight * int(some.sum())
    walks = {}
    for walk in WALK_NAMES:
        full = weight * int((some & every & whole[walk]).sum())
        walks[walk] = {"empty": batch * heads * nqb * nkb - visited, "full": full, "partial": visited - full}
    return {"walks": walks, "allowed": weight * allowed, "grids": nb * nh}


def _runs(cols):
    """Consecutive runs ``(first, last + 1)`` of a sorted list of ints."""
    runs = []
    for c in cols:
        if runs and runs[-1][1] == c:
            runs[-1][1] = c + 1
        else:
            runs.append([c, c + 1])
    return runs


def _allowed_in_partial_tiles(plan: Plan, grid: torch.Tensor, *, q_rows, k_rows, block_m, block_n, n_q, n_k,
                              batch, heads, params, inputs) -> int:
    """Allowed pairs inside PARTIAL tiles, evaluating the mask on each run of consecutive
    partial tiles of a query block only (the work is the partial area, not Nq x Nk)."""
    from attncc._reference import pair_mask

    grid = grid.expand(batch, heads, *grid.shape[2:]).cpu()
    partial = grid == tiles.PARTIAL
    total = 0
    for qb in range(grid.shape[2]):
        cols = torch.nonzero(partial[:, :, qb].any(0).any(0)).flatten().tolist()
        r0, r1 = qb * block_m, min((qb + 1) * block_m, q_rows)
        for k0, k1 in _runs(cols):
            c0, c1 = k0 * block_n, min(k1 * block_n, k_rows)
            m = pair_mask(plan.pattern, q_rows=r1 - r0, k_rows=c1 - c0, q_offset=r0, k_offset=c0, n_q=n_q, n_k=n_k,
                          batch=batch, heads=heads, inputs=inputs, params=params, device="cpu")
            keep = partial[:, :, qb, k0:k1].repeat_interleave(block_n, dim=-1)[..., : c1 - c0]
            total += int((m & keep.unsqueeze(2)).sum())
    return total


def _tensor_numbers(plan: Plan, *, n_q, n_k, block_m, block_n, params, inputs, batch, heads) -> dict:
    """:func:`_static_numbers`' result from the tile grids of a pattern with ``[inputs]`` (the
    interval classifier on them), PARTIAL tiles' pairs evaluated."""
    grids = {walk: plan_grid(plan, q_rows=n_q, k_rows=n_k, block_m=block_m, block_n=block_n, params=params,
                             inputs=inputs, batch=batch, heads=heads, walk=walk) for walk in WALK_NAMES}
    grid = grids["forward"]
    nqb, nkb = grid.shape[-2:]
    full_grid = grid.expand(batch, heads, nqb, nkb)
    walks = {walk: {name: int((g.expand(batch, heads, *g.shape[2:]) == cls).sum()) for name, cls in CLASSES}
             for walk, g in grids.items()}
    rows = torch.clamp(n_q - torch.arange(nqb) * block_m, max=block_m).view(nqb, 1)
    cols = torch.clamp(n_k - torch.arange(nkb) * block_n, max=block_n).view(1, nkb)
    area = rows * cols
    full_pairs = int(((full_grid == tiles.FULL) * area).sum())
    partial_pairs = _allowed_in_partial_tiles(plan, grid, q_rows=n_q, k_rows=n_k, block_m=block_m, block_n=block_n,
                                              n_q=n_q, n_k=n_k, batch=batch, heads=heads, params=params,
                                              inputs=inputs) if walks["forward"]["partial"] else 0
    return {"walks": walks, "allowed": full_pairs + partial_pairs, "grids": grid.shape[0] * grid.shape[1]}


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------

def backend_text(plan: Plan, *, head_dim: int, value_dim: int, dtype: str) -> str:
    """Which forward and backward a call of this problem would run on an sm90 GPU
    (attncc.runtime.backend): the tl kernels, and the Gluon sm90 forward where it computes the Plan (a
    built-in walk, or fragments rendered from the Plan: attncc.analysis.builtin) and the head dims and
    dtype suit it, and the Gluon backward where it takes the Plan's walks too (built-in, or rendered
    with a query-block walk); else why tl only."""
    fit = gluon_fit(plan)
    if fit.kind is None:
        return f"tl only: {fit.reason}"
    dtypes = [DTYPE_SHORT[d] for d in gluon.DTYPES]
    problems = []
    if head_dim not in gluon.HEAD_DIMS:
        problems.append(f"head dim {head_dim} (the Gluon kernels take {', '.join(map(str, gluon.HEAD_DIMS))})")
    if value_dim != head_dim:
        problems.append(f"value dim {value_dim} != head dim {head_dim} (the Gluon kernels take Dv = D)")
    if dtype not in dtypes:
        problems.append(f"{dtype} (the Gluon kernels take {', '.join(dtypes)})")
    if problems:
        return f"tl only for this call: {'; '.join(problems)}"
    walk = "its rendered walks, mask and score" if fit.kind == "rendered" else f"built-in {fit.kind} walk"
    fwd = f"Gluon sm90 forward ({walk})"
    if not fit.backward:  # rendered fragments without a query-block walk
        bwd = f"; the backward tl (the Gluon backward does not take its fragments: {fit.backward_reason})"
    else:
        bwd = "" if head_dim in gluon.BWD_HEAD_DIMS else (
            f"; the backward tl (the Gluon backward takes head dims {', '.join(map(str, gluon.BWD_HEAD_DIMS))})")
    # what ATTNCC_BACKEND=auto takes (attncc.runtime.backend.auto_picks_gluon), and why not where it
    # keeps tl for a pattern the Gluon forward computes
    auto_fwd = gluon.AUTO_SELECTS_GLUON and fit.auto and head_dim in gluon.AUTO_HEAD_DIMS
    why_tl = ""
    if gluon.AUTO_SELECTS_GLUON and not auto_fwd:
        why_tl = (f" (auto keeps tl: {fit.auto_reason})" if fit.auto_reason else
                  f" (auto keeps tl at head dim {head_dim}: it picks Gluon at {', '.join(map(str, gluon.AUTO_HEAD_DIMS))})")
    if bwd:
        if auto_fwd:
            return f"{fwd} on sm90{AUTO_SIZE}, tl elsewhere and with ATTNCC_BACKEND=triton{bwd}"
        return f"tl; {fwd} with ATTNCC_BACKEND=gluon{why_tl}{bwd}"
    # (attncc.runtime.backend.auto_picks_gluon_backward)
    auto_bwd = gluon.AUTO_SELECTS_GLUON_BACKWARD or (fit.backward_auto and head_dim in gluon.AUTO_BWD_HEAD_DIMS)
    auto = [part for part, on in (("forward", auto_fwd),
                                  ("backward", auto_bwd)) if on]
    if len(auto) == 2:
        return f"Gluon sm90 forward and backward ({walk}) on sm90{AUTO_SIZE}, tl elsewhere and with ATTNCC_BACKEND=triton"
    if auto:
        forward_tl = f"; the forward tl{why_tl}" if auto == ["backward"] and why_tl else ""
        return (f"Gluon sm90 {auto[0]} ({walk}) on sm90{AUTO_SIZE}, tl elsewhere and with ATTNCC_BACKEND=triton"
                f"{forward_tl}; both Gluon with ATTNCC_BACKEND=gluon")
    return f"tl; Gluon sm90 forward and backward ({walk}) with ATTNCC_BACKEND=gluon{why_tl}"


# Tiles of the grids explain counts on (block lists, [inputs]: every tile of every batch row and head
# whose mask reads b or h, several arrays of them): ~1 GiB each at this bound. Closed forms count per
# block and take no grid.
MAX_GRID_TILES = 2**27


def _check_grid(pattern, tiles: int, nqb: int, nkb: int) -> None:
    """A ValueError for a tile grid too large to count (an unbounded --block 1x1 took 10 GB at
    --n 16384 and asked numpy for 512 GiB at 2**20), before any of it is allocated."""
    if tiles > MAX_GRID_TILES:
        raise ValueError(f"{pattern.name}'s tiles are counted on the whole tile grid (its loops take block lists or "
                         f"read [inputs]): {nqb} x {nkb} tiles (x batch rows and heads where the mask reads b or h) "
                         f"is {tiles}, more than 2**27; use larger tiles (--block) or shorter lengths")


def _check_divisors(pattern, params: Mapping[str, object], *, n_q: int, n_k: int, heads: int) -> None:
    """A ``//`` or ``%`` by params and sizes only that is 0 at these numbers: the ValueError a call
    raises (``attncc explain --param w=0`` counted nothing: a ZeroDivisionError or a traceback)."""
    sizes = {S.n_q: n_q, S.n_k: n_k, S.n_heads: heads}
    for _, d, whole in sorted(divisors(pattern), key=lambda x: str(x[2])):  # one error in every process
        values = {sym: sizes[sym] if sym in sizes else params.get(sym.name) for sym in d.free_symbols}
        if any(v is None for v in values.values()) or d.atoms(sympy.core.function.AppliedUndef):
            continue  # varies per pair (positions, b, h, input values): build refuses one that may be 0
        if d.xreplace({sym: sympy.sympify(v) for sym, v in values.items()}) == 0:
            named = ", ".join(f"{sym.name} = {values[sym]}" for sym in sorted(values, key=lambda x: x.name))
            raise ValueError(f"division by zero: the divisor of {whole} is 0" + (f" with {named}" if named else ""))


def explain_data(plan: Plan, *, n_q: int, n_k: int, block_m: int = 128, block_n: int = 64, head_dim: int = 128,
                 value_dim: Optional[int] = None, dtype: str = "bf16", batch: int = 1, heads: int = 1,
                 params: Optional[Mapping[str, object]] = None,
                 inputs: Optional[Mapping[str, torch.Tensor]] = None) -> dict:
    """The numbers of one problem: ``n_q`` query rows and ``n_k`` key rows (positions from 0).

    Keys: iteration, dynamic, sizes, dtype and element_bytes (of q, k, v, o), tiles {empty,
    full, partial} (of the forward walk, over all batch rows and heads), allowed_pairs, pairs,
    density, flops (2·B·H·Nq·Nk·(D + Dv)·density: QKᵀ and PV), dense_flops, visited_flops (what
    the kernel computes: whole tiles it visits), bytes (q, k, v, o once in ``dtype`` plus the
    block lists), block_list_bytes, naive_score_memory_bytes (a dense fp32 score matrix) and
    score_memory_bytes (this pattern's visited tiles, were they stored), walks (per walk: kind,
    path, reason, bands, tiles, visited, unmasked), block_stats, classifier (the interval
    program as lines), synthesized_inputs (names of the inputs made up because none were given)
    and synthetic_inputs (what they hold, in words), score (what the kernels do to a score:
    :func:`attncc.analysis.score.score_report`), backend (which forward runs on an sm90 GPU:
    :func:`backend_text`).
    """
    if dtype not in ELEMENT_BYTES:
        raise ValueError(f"dtype: expected one of {', '.join(ELEMENT_BYTES)}, got {dtype!r}")
    pattern = plan.pattern
    params = {**pattern.param_values, **(params or {})}
    _check_divisors(pattern, params, n_q=n_q, n_k=n_k, heads=heads)
    value_dim = value_dim or pattern.value_dim or head_dim
    synthesized = []
    inputs = dict(inputs or {})
    if plan.dynamic and not all(d.name in inputs for d in pattern.inputs):
        made = synthesize_inputs(plan, batch=batch, heads=heads, positions=max(n_q, n_k))
        synthesized = sorted(set(made) - set(inputs))
        inputs = {**made, **inputs}
    nqb, nkb = _cdiv(n_q, block_m), _cdiv(n_k, block_n)
    if plan.dynamic:
        _check_grid(pattern, batch * heads * nqb * nkb, nqb, nkb)
        numbers = _tensor_numbers(plan, n_q=n_q, n_k=n_k, block_m=block_m, block_n=block_n, params=params,
                                  inputs=inputs, batch=batch, heads=heads)
    else:
        free = pattern.mask.free_symbols if pattern.mask is not None else set()
        # as plan_grid: tiles of their own per batch row / head only where the mask reads b / h
        sizes = dict(n_q=n_q, n_k=n_k, block_m=block_m, block_n=block_n, params=params, batch=batch, heads=heads,
                     nb=batch if S.b in free else 1, nh=heads if S.h in free else 1)
        numbers = _static_numbers(plan, **sizes)
        if numbers is None:
            _check_grid(pattern, sizes["nb"] * sizes["nh"] * nqb * nkb, nqb, nkb)
            numbers = _every_pair_numbers(plan, **sizes)
    counts = numbers["walks"]["forward"]
    allowed = numbers["allowed"]
    pairs = batch * heads * n_q * n_k
    density = allowed / pairs if pairs else 0.0
    visited = counts["full"] + counts["partial"]

    walks = {}
    for walk, w in (("forward", plan.forward), ("dkdv", plan.transposed)):
        t = numbers["walks"][walk]
        walks[walk] = {
            "kind": w.kind.value,
            "path": walk_path(plan, walk, q_rows=n_q, k_rows=n_k, params=params),
            "reason": w.reason,
            "bands": list(w.cover.lines()) if w.cover is not None else [],
            # the blocks the kernels run first (templates/walks.j2 dispatch): those of rows that see
            # every key (every query, in dK/dV), for every batch row and head; None: the plain order
            "first": None if w.heavy_rows is None else f"x <= {w.heavy_rows}",
            "tiles": t,
            "visited": t["full"] + t["partial"],
            "unmasked": t["full"],
        }

    heads_kv = pattern.heads_kv or heads
    element = ELEMENT_BYTES[dtype]
    qkvo = element * batch * (heads * n_q * head_dim + heads_kv * n_k * (head_dim + value_dim)
                              + heads * n_q * value_dim)
    list_bytes = 0
    # the forward reads block lists (two counts and two padded index rows per query block): it has no
    # closed form, or this call breaks its precondition
    if plan.forward.kind is Iteration.BLOCK_LIST or (plan.forward.kind is Iteration.BANDS and breaks_precondition(
            plan, "forward", q_rows=n_q, k_rows=n_k, params=params)):
        list_bytes = INDEX_BYTES * numbers["grids"] * nqb * (2 + 2 * nkb)
    flops_per_pair = 2.0 * (head_dim + value_dim)  # q·k and p·v

    from attncc.analysis.residue import ColumnSplit, ResidueSplit, split_of

    split = split_of(pattern)
    columns = split if isinstance(split, ColumnSplit) else None
    split = split if isinstance(split, ResidueSplit) else None
    return {
        "pattern": pattern.name,
        "source": pattern.source,
        "iteration": plan.iteration.value,
        "dynamic": plan.dynamic,
        # the modulus of the residue classes a call of the module runs by (None: calls run whole)
        "residue": None if split is None else split.modulus,
        # the summary columns a call of the module runs apart (None: none)
        "columns": None if columns is None else f"j % {columns.modulus} == {columns.residue}",
        "n_q": n_q, "n_k": n_k, "block_m": block_m, "block_n": block_n, "head_dim": head_dim,
        "value_dim": value_dim, "spec_head_dims": list(pattern.head_dims), "dtype": dtype, "element_bytes": element,
        "batch": batch, "heads": heads, "heads_kv": heads_kv, "params": params,
        "query_blocks": nqb, "key_blocks": nkb,
        "tiles": counts,
        "allowed_pairs": allowed,
        "pairs": pairs,
        "density": density,
        "flops": flops_per_pair * allowed,
        "dense_flops": flops_per_pair * pairs,
        "visited_flops": flops_per_pair * visited * block_m * block_n,
        "bytes": qkvo + list_bytes,
        "block_list_bytes": list_bytes,
        "naive_score_memory_bytes": 4 * pairs,
        "score_memory_bytes": 4 * visited * block_m * block_n,
        "block_stats": [f"{s.input}[{', '.join(map(str, s.index))}]" + (f" per block along {s.axis_var}" if s.axis_var else "")
                        for s in plan.block_stats],
        "synthesized_inputs": synthesized,
        "synthetic_inputs": describe_synthetic(plan, synthesized, positions=max(n_q, n_k)),
        "walks": walks,
        "classifier": list(plan.classifier.lines()) + [f"result: {plan.classifier.result}"] if plan.classifier else [],
        "score": score_report(pattern, head_dim=head_dim, plan=plan),
        "backend": backend_text(plan, head_dim=head_dim, value_dim=value_dim, dtype=dtype),
    }
