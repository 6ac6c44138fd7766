"""Stage 2: Pattern -> Plan. Public entry point: ``analyze(pattern)``.

Decides how each kernel loop finds its blocks (a :class:`Walk` per loop: the forward and dQ
kernels' key blocks per query block, the dK/dV kernel's query blocks per key block) and, per
tile of ``BLOCK_M x BLOCK_N``, whether it is EMPTY, FULL or PARTIAL. For static masks this is
exact: closed forms where the mask is a union of monotone bands (:mod:`attncc.analysis.bands`,
:mod:`attncc.analysis.walks`), exact block lists otherwise; masks over ``[inputs]`` are
classified per call by an interval program (:mod:`attncc.analysis.classifier`, run by
:mod:`attncc.core.tiles`). It also splits the score into what the key loop computes and what it
hoists or leaves to the LSE (:mod:`attncc.analysis.score`). What a Plan does at one size, counted
for ``attncc explain``, is :func:`attncc.report.explain_data`.
"""
from attncc.analysis.graph import WALKS, block_graph, exact_tiles, graph_to_csr, plan_grid, walk_grid
from attncc.analysis.plan import Plan, analyze, transposed_mask, transposed_pattern
from attncc.analysis.walks import Iteration, Walk

__all__ = ["analyze", "Plan", "Iteration", "Walk", "WALKS", "walk_grid", "exact_tiles", "plan_grid", "block_graph",
           "graph_to_csr", "transposed_mask", "transposed_pattern"]
