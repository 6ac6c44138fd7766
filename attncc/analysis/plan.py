"""Pattern -> Plan: how each kernel loop finds its blocks (its :class:`Walk`)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import sympy

from attncc.analysis import symbols as A
from attncc.analysis.bands import NoBand, cover
from attncc.analysis.classifier import compile_mask
from attncc.analysis.normal_form import TooComplex, to_dnf
from attncc.analysis.tile_dot import Lowering, TileDot, tile_dots
from attncc.analysis.walks import Iteration, Walk, bands_walk
from attncc.core.lazy import lazy_module
from attncc.core.tiles import BlockStat, IntervalProgram
from attncc.spec import symbols as S
from attncc.spec.builtins import RandomBlocks
from attncc.spec.ir import Pattern

torch = lazy_module("torch")  # on first use: `attncc build` never imports it


@dataclass(frozen=True)
class Plan:
    """What the analysis found about a Pattern; the input of code generation.

    ``pattern``: the Pattern analyzed.
    ``forward``: the walk of the forward and dQ kernels (per query block, its key blocks).
    ``transposed``: the walk of the dK/dV kernel (per key block, its query blocks): the walk of
        the transposed mask (:func:`transposed_pattern`), in which "rows" are key positions.
    ``iteration``: ``forward.kind``.
    ``classifier``: the mask as an interval program over tiles (None when there is no mask):
        patterns with ``[inputs]`` classify their tiles with it on every call.
    ``dynamic``: the tiles depend on ``[inputs]`` (both walks are block lists made per call).
    ``block_stats``: the input reads the classifier makes (per-block min/max of an input
        along positions, or a point gathered by b / h).
    ``lowering``: the dots of the bias (and the mod's terms free of the score) that the kernels
        compute as tile products (:mod:`attncc.analysis.tile_dot`; :attr:`dots`), and the bias and
        mod with each of them as its ``DotTile`` value: the score code renders :attr:`kernel_pattern`.

    For a static pattern both walks are exact (``attncc.analysis.walks``): the blocks they visit
    are exactly those with an allowed pair, the ones they run unmasked exactly the FULL ones.
    """

    pattern: Pattern
    iteration: Iteration
    forward: Walk
    transposed: Walk
    classifier: Optional[IntervalProgram]
    dynamic: bool
    block_stats: Tuple[BlockStat, ...]
    lowering: Lowering = Lowering()

    @property
    def dots(self) -> Tuple[TileDot, ...]:
        return self.lowering.dots

    @property
    def kernel_pattern(self) -> Pattern:
        """The pattern whose score the kernels compute: ``pattern`` with its lowered dots as their
        tile products' values (``lowering``)."""
        if not self.dots:
            return self.pattern
        return self.pattern.replace(bias=self.lowering.bias, mod=self.lowering.mod)

    @property
    def walks(self) -> Tuple[Walk, Walk]:
        return self.forward, self.transposed

    @property
    def needs_exact_lists(self) -> bool:
        """A static walk may take the exact block lists: it has no closed form, or one with a
        precondition that a call can break."""
        return not self.dynamic and any(w.kind is Iteration.BLOCK_LIST or w.precondition is not sympy.true
                                        for w in self.walks)


SWAP = {S.i: S.j, S.j: S.i, S.n_q: S.n_k, S.n_k: S.n_q}


def transposed_mask(pattern: Pattern):
    """The mask with the roles of queries and keys swapped (``i <-> j``, ``n_q <-> n_k``)."""
    return None if pattern.mask is None else pattern.mask.xreplace(SWAP)


def transposed_pattern(pattern: Pattern) -> Pattern:
    """The pattern of the dK/dV walk: its "queries" are our keys (score terms dropped)."""
    return pattern.replace(mask=transposed_mask(pattern), bias=None, mod=None, softcap=None, rope=None)


def _mentions_input(mask, pattern: Pattern) -> bool:
    names = {d.name for d in pattern.inputs}
    return any(f.func.__name__ in names for f in mask.atoms(sympy.core.function.AppliedUndef))


def static_walk(mask, int_params) -> Walk:
    """The walk of a static mask: BANDS when it has an exact closed form, else the exact block
    lists (with the reason)."""
    if mask.atoms(RandomBlocks) or mask.has(RandomBlocks):
        return Walk(Iteration.BLOCK_LIST, reason="random_blocks() has no closed form")
    try:
        clauses = to_dnf(mask, int_params)
        return bands_walk(cover(clauses, int_params))
    except TooComplex:
        return Walk(Iteration.BLOCK_LIST, reason="the mask has too many clauses for closed forms")
    except NoBand as e:
        return Walk(Iteration.BLOCK_LIST, reason=str(e))


@functools.lru_cache(maxsize=256)
def analyze(pattern: Pattern) -> Plan:
    """The Plan of ``pattern`` (cached: Patterns are frozen and hashable)."""
    clash = {p.name for p in pattern.params} & set(A.BOUND_SYMBOLS)
    if clash:
        raise ValueError(f"{pattern.source}: [params] may not be named {', '.join(sorted(clash))} "
                         f"(the names of the loop-bound symbols)")
    lowering = tile_dots(pattern)
    mask = pattern.mask
    if mask is None:
        dense = Walk(Iteration.DENSE)
        return Plan(pattern, Iteration.DENSE, dense, dense, None, False, (), lowering)
    program = compile_mask(pattern)
    stats = program.block_stats
    if _mentions_input(mask, pattern):
        lists = Walk(Iteration.BLOCK_LIST, reason="the mask reads [inputs]: tiles classified on every call")
        return Plan(pattern, Iteration.BLOCK_LIST, lists, lists, program, True, stats, lowering)
    int_params = frozenset(p.symbol for p in pattern.params if p.kind == "int")
    forward = static_walk(mask, int_params)
    transposed = static_walk(transposed_mask(pattern), int_params)
    return Plan(pattern, forward.kind, forward, transposed, program, False, stats, lowering)
