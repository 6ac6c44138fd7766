"""What the analysis found for one problem size: density, tiles, FLOPs, bytes, bounds.

The numbers ``attncc explain`` prints and draws. The density is exact: FULL tiles count
all their pairs, PARTIAL tiles are counted by evaluating the mask on their pairs only
(with the float64 reference's :func:`attncc._reference.pair_mask`).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

from attncc.analysis.graph import plan_grid, walk_path
from attncc.analysis.plan import Plan
from attncc.analysis.walks import Iteration
from attncc.analysis.score import score_report
from attncc.runtime import tiles
from attncc._lazy import lazy_module

torch = lazy_module("torch")  # on first use: `attncc build` never imports it

BF16_BYTES = 2
INDEX_BYTES = 4  # int32 block lists
SYNTHETIC_DOCUMENTS = 4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def synthesize_inputs(plan: Plan, *, batch: int, heads: int, positions: int) -> Dict[str, torch.Tensor]:
    """Representative inputs for a data-dependent pattern, by declared dims and dtype:
    an integer input along positions splits them into SYNTHETIC_DOCUMENTS equal segments
    (document ids), one without positions holds 3/4 of the positions (a length), bool
    inputs are all true, floating ones zero."""
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


def explain_data(plan: Plan, *, n_q: int, n_k: int, block_m: int = 128, block_n: int = 64, head_dim: int = 128,
                 batch: int = 1, heads: int = 1, params: Optional[Mapping[str, object]] = None,
                 inputs: Optional[Mapping[str, torch.Tensor]] = None) -> dict:
    """The numbers of one problem: ``n_q`` query rows and ``n_k`` key rows (positions from 0).

    Keys: iteration, dynamic, sizes, tiles {empty, full, partial} (over all batch rows and
    heads), allowed_pairs, pairs, density, flops (4·B·H·Nq·Nk·D·density), dense_flops,
    visited_flops (what the kernel computes: whole tiles it visits), bytes (q, k, v, o once
    in bf16 plus the block lists), block_list_bytes, naive_score_memory_bytes (a dense fp32
    score matrix) and score_memory_bytes (this pattern's visited tiles, were they stored),
    bounds (the key-range steps per clause, as text), classifier (the interval program as
    lines), synthesized_inputs (names of the inputs made up because none were given), score
    (what the kernels make of ``[score].mod``: :func:`attncc.analysis.score.score_report`).
    """
    pattern = plan.pattern
    params = {**pattern.param_values, **(params or {})}
    synthesized = []
    inputs = dict(inputs or {})
    if pattern.mask is not None and not all(d.name in inputs for d in pattern.inputs):
        made = synthesize_inputs(plan, batch=batch, heads=heads, positions=max(n_q, n_k))
        synthesized = sorted(set(made) - set(inputs))
        inputs = {**made, **inputs}
    grid = plan_grid(plan, q_rows=n_q, k_rows=n_k, block_m=block_m, block_n=block_n, params=params,
                     inputs=inputs, batch=batch, heads=heads)
    nqb, nkb = grid.shape[-2:]
    full_grid = grid.expand(batch, heads, nqb, nkb)
    counts = {name: int((full_grid == cls).sum()) for name, cls in
              (("empty", tiles.EMPTY), ("full", tiles.FULL), ("partial", tiles.PARTIAL))}

    rows = torch.clamp(n_q - torch.arange(nqb) * block_m, max=block_m).view(nqb, 1)
    cols = torch.clamp(n_k - torch.arange(nkb) * block_n, max=block_n).view(1, nkb)
    area = rows * cols
    full_pairs = int(((full_grid == tiles.FULL) * area).sum())
    if pattern.mask is None:  # partial only for a ragged key tail: every existing pair counts
        partial_pairs = int(((full_grid == tiles.PARTIAL) * area).sum())
    else:
        partial_pairs = _allowed_in_partial_tiles(plan, grid, q_rows=n_q, k_rows=n_k, block_m=block_m, block_n=block_n,
                                                  n_q=n_q, n_k=n_k, batch=batch, heads=heads, params=params,
                                                  inputs=inputs) if counts["partial"] else 0
    allowed = full_pairs + partial_pairs
    pairs = batch * heads * n_q * n_k
    density = allowed / pairs if pairs else 0.0
    visited = counts["full"] + counts["partial"]

    walks = {}
    for walk, w in (("forward", plan.forward), ("dkdv", plan.transposed)):
        g = full_grid if walk == "forward" else plan_grid(
            plan, q_rows=n_q, k_rows=n_k, block_m=block_m, block_n=block_n, params=params, inputs=inputs,
            batch=batch, heads=heads, walk="dkdv").expand(batch, heads, nkb, nqb)
        walks[walk] = {
            "kind": w.kind.value,
            "path": walk_path(plan, walk, q_rows=n_q, k_rows=n_k, params=params),
            "reason": w.reason,
            "bands": list(w.cover.lines()) if w.cover is not None else [],
            "tiles": {name: int((g == cls).sum()) for name, cls in
                      (("empty", tiles.EMPTY), ("full", tiles.FULL), ("partial", tiles.PARTIAL))},
            "visited": int((g != tiles.EMPTY).sum()),
            "unmasked": int((g == tiles.FULL).sum()),
        }

    heads_kv = pattern.heads_kv or heads
    value_dim = pattern.value_dim or head_dim
    qkvo = BF16_BYTES * batch * (heads * n_q * head_dim + heads_kv * n_k * (head_dim + value_dim)
                                 + heads * n_q * value_dim)
    list_bytes = 0
    if plan.iteration is Iteration.BLOCK_LIST:  # two counts and two padded index rows per query block
        list_bytes = INDEX_BYTES * grid.shape[0] * grid.shape[1] * nqb * (2 + 2 * nkb)

    out = {
        "pattern": pattern.name,
        "source": pattern.source,
        "iteration": plan.iteration.value,
        "dynamic": plan.dynamic,
        "n_q": n_q, "n_k": n_k, "block_m": block_m, "block_n": block_n, "head_dim": head_dim,
        "batch": batch, "heads": heads, "params": params,
        "query_blocks": nqb, "key_blocks": nkb,
        "tiles": counts,
        "allowed_pairs": allowed,
        "pairs": pairs,
        "density": density,
        "flops": 4.0 * pairs * head_dim * density,
        "dense_flops": 4.0 * pairs * head_dim,
        "visited_flops": 4.0 * visited * block_m * block_n * head_dim,
        "bytes": qkvo + list_bytes,
        "block_list_bytes": list_bytes,
        "naive_score_memory_bytes": 4 * pairs,
        "score_memory_bytes": 4 * visited * block_m * block_n,
        "block_stats": [f"{s.input}[{', '.join(map(str, s.index))}]" + (f" per block along {s.axis_var}" if s.axis_var else "")
                        for s in plan.block_stats],
        "synthesized_inputs": synthesized,
        "walks": walks,
        "classifier": list(plan.classifier.lines()) + [f"result: {plan.classifier.result}"] if plan.classifier else [],
        "score": score_report(pattern),
    }
    return out
