"""Pattern -> Plan: how a kernel finds the key blocks of a query block."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import Enum
from typing import Mapping, Optional, Tuple

import sympy

from attncc.analysis import symbols as A
from attncc.analysis.classifier import compile_mask
from attncc.analysis.normal_form import LinearAtom, TooComplex, to_dnf
from attncc.analysis.ranges import KeyRange, clause_key_range, everything, key_range_grid, never
from attncc.runtime.tiles import BlockStat, IntervalProgram
from attncc.spec.builtins import RandomBlocks
from attncc.spec.ir import Pattern
from attncc._lazy import lazy_module

torch = lazy_module("torch")  # on first use: `attncc build` never imports it


class Iteration(str, Enum):
    """How the kernel walks the key blocks of a query block."""

    DENSE = "dense"  # no mask: every key block, all FULL but the key tail
    AFFINE = "affine"  # closed-form bounds: for kb in range(lo(qb), hi(qb)), per KeyRange
    BLOCK_LIST = "block_list"  # per-query-block lists of FULL and PARTIAL key blocks


@dataclass(frozen=True)
class Plan:
    """What the analysis found about a Pattern; the input of code generation.

    ``pattern``: the Pattern analyzed.
    ``iteration``: see :class:`Iteration`.
    ``key_ranges``: AFFINE only (empty otherwise): one :class:`KeyRange` per clause of the
        mask's DNF (``clauses``; a mask that is never true has one empty range); a tile is visited when some clause's ``[lo, hi)`` holds
        its key block and needs no mask when some clause's ``[full_lo, full_hi)`` does.
    ``clauses``: AFFINE only: per clause, its atoms as text (``key_ranges[k]`` belongs to
        ``clauses[k]``); atoms marked ``[other]`` are ones the bounds cannot use.
    ``classifier``: the mask as an interval program over tiles (None when there is no
        mask): BLOCK_LIST kernels run it (through ``tiles.classify_grid``) to build their
        block lists; explain and the tests run it for every iteration.
    ``dynamic``: BLOCK_LIST whose tiles depend on ``[inputs]``: classify per call.
        A static BLOCK_LIST (random blocks) depends only on the lengths and tile sizes
        and can be classified once and cached.
    ``block_stats``: the input reads the classifier makes (per-block min/max of an input
        along positions, or a point gathered by b / h).
    """

    pattern: Pattern
    iteration: Iteration
    key_ranges: Tuple[KeyRange, ...]
    clauses: Tuple[Tuple[str, ...], ...]
    classifier: Optional[IntervalProgram]
    dynamic: bool
    block_stats: Tuple[BlockStat, ...]


def _mentions_input(mask, pattern: Pattern) -> bool:
    names = {d.name for d in pattern.inputs}
    return any(f.func.__name__ in names for f in mask.atoms(sympy.core.function.AppliedUndef))


@functools.lru_cache(maxsize=256)
def analyze(pattern: Pattern) -> Plan:
    """The Plan of ``pattern`` (cached: Patterns are frozen and hashable)."""
    clash = {p.name for p in pattern.params} & set(A.BOUND_SYMBOLS)
    if clash:
        raise ValueError(f"{pattern.source}: [params] may not be named {', '.join(sorted(clash))} "
                         f"(the names of the loop-bound symbols)")
    mask = pattern.mask
    if mask is None:
        return Plan(pattern, Iteration.DENSE, (), (), None, False, ())
    program = compile_mask(pattern)
    stats = program.block_stats
    if _mentions_input(mask, pattern):
        return Plan(pattern, Iteration.BLOCK_LIST, (), (), program, True, stats)
    if mask.atoms(RandomBlocks) or mask.has(RandomBlocks):
        return Plan(pattern, Iteration.BLOCK_LIST, (), (), program, False, stats)
    int_params = frozenset(p.symbol for p in pattern.params if p.kind == "int")
    try:
        clauses = to_dnf(mask, int_params)
        ranges = tuple(clause_key_range(c) for c in clauses) or (never(),)
        text = tuple(tuple(sorted(str(a) if isinstance(a, LinearAtom) else f"{a} [other]" for a in c))
                     for c in clauses) or (("(never true)",),)
    except TooComplex:
        ranges, text = (everything(),), (("(mask too complex for closed-form bounds) [other]",),)
    return Plan(pattern, Iteration.AFFINE, ranges, text, program, False, stats)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def bound_env(plan: Plan, *, k_offset: int, k_rows: int, block_n: int, n_q: int, n_k: int,
              params: Optional[Mapping[str, object]] = None, b: int = 0, h: int = 0) -> dict:
    """Values of every symbol a key-range bound may use, except ``q_lo`` / ``q_hi``."""
    env = {p.name: p.value for p in plan.pattern.params}
    env.update(params or {})
    env.update(BLOCK_N=block_n, k_offset=k_offset, N_K=k_rows, n_q=n_q, n_k=n_k, b=b, h=h)
    return env


def eval_key_ranges(plan: Plan, *, q_offset: int, k_offset: int, q_rows: int, k_rows: int, block_m: int,
                    block_n: int, n_q: Optional[int] = None, n_k: Optional[int] = None,
                    params: Optional[Mapping[str, object]] = None, b: int = 0, h: int = 0,
                    clip_rows: bool = True) -> torch.Tensor:
    """Tile classes from an AFFINE plan's key ranges: int8 ``[n_query_blocks, n_key_blocks]``.

    A tile is FULL inside some clause's full range, else PARTIAL inside some clause's
    ``[lo, hi)``, else EMPTY. ``clip_rows``: give the last query block its last existing
    row as ``q_hi`` (else ``q_lo + block_m - 1``; both are sound)."""
    if plan.iteration is not Iteration.AFFINE:
        raise ValueError(f"eval_key_ranges needs an affine plan; this one is {plan.iteration.value}")
    n_q = q_offset + q_rows if n_q is None else n_q
    n_k = k_offset + k_rows if n_k is None else n_k
    nqb, nkb = _cdiv(q_rows, block_m), _cdiv(k_rows, block_n)
    q_lo = q_offset + torch.arange(nqb, dtype=torch.int64) * block_m
    q_hi = q_lo + block_m - 1
    if clip_rows:
        q_hi = torch.clamp(q_hi, max=q_offset + q_rows - 1)
    env = bound_env(plan, k_offset=k_offset, k_rows=k_rows, block_n=block_n, n_q=n_q, n_k=n_k, params=params, b=b, h=h)
    return key_range_grid(plan.key_ranges, env, q_lo, q_hi, nkb)
