"""The former per-clause key ranges (sound, not exact), kept while codegen moves to the walks.

Only codegen reads these (``Plan.key_ranges``, ``Plan.clauses``, ``Plan.legacy_iteration``):
what it rendered before the walks existed. Nothing here decides a tile class for the analysis.
"""
from __future__ import annotations

import functools
from typing import Mapping, Optional

import sympy
import torch

from attncc.analysis.normal_form import LinearAtom, TooComplex, to_dnf
from attncc.analysis.ranges import clause_key_range, everything, key_range_grid, never
from attncc.spec.builtins import RandomBlocks


@functools.lru_cache(maxsize=256)
def legacy(pattern):
    """(iteration name, key ranges, clause texts) as codegen rendered them before the walks."""
    mask = pattern.mask
    if mask is None:
        return "dense", (), ()
    names = {d.name for d in pattern.inputs}
    if any(f.func.__name__ in names for f in mask.atoms(sympy.core.function.AppliedUndef)):
        return "block_list", (), ()
    if mask.atoms(RandomBlocks) or mask.has(RandomBlocks):
        return "block_list", (), ()
    int_params = frozenset(p.symbol for p in pattern.params if p.kind == "int")
    try:
        clauses = to_dnf(mask, int_params)
        ranges = tuple(clause_key_range(c) for c in clauses) or (never(),)
        text = tuple(tuple(sorted(str(a) if isinstance(a, LinearAtom) else f"{a} [other]" for a in c))
                     for c in clauses) or (("(never true)",),)
    except TooComplex:
        ranges, text = (everything(),), (("(mask too complex for closed-form bounds) [other]",),)
    return "affine", ranges, text


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def eval_key_ranges(pattern, *, q_offset: int, k_offset: int, q_rows: int, k_rows: int, block_m: int,
                    block_n: int, n_q: Optional[int] = None, n_k: Optional[int] = None,
                    params: Optional[Mapping[str, object]] = None, b: int = 0, h: int = 0,
                    clip_rows: bool = True) -> torch.Tensor:
    """Tile classes from the former key ranges: int8 ``[n_query_blocks, n_key_blocks]``."""
    it, ranges, _ = legacy(pattern)
    if it != "affine":
        raise ValueError(f"eval_key_ranges needs an affine pattern; this one is {it}")
    n_q = q_offset + q_rows if n_q is None else n_q
    n_k = k_offset + k_rows if n_k is None else n_k
    nqb, nkb = _cdiv(q_rows, block_m), _cdiv(k_rows, block_n)
    q_lo = q_offset + torch.arange(nqb, dtype=torch.int64) * block_m
    q_hi = q_lo + block_m - 1
    if clip_rows:
        q_hi = torch.clamp(q_hi, max=q_offset + q_rows - 1)
    env = {p.name: p.value for p in pattern.params}
    env.update(params or {})
    env.update(BLOCK_N=block_n, k_offset=k_offset, N_K=k_rows, n_q=n_q, n_k=n_k, b=b, h=h)
    return key_range_grid(ranges, env, q_lo, q_hi, nkb)
