"""Stage 2: Pattern -> Plan. Public entry point: ``analyze(pattern)``.

Decides per tile of ``BLOCK_M x BLOCK_N`` whether it is EMPTY, FULL or PARTIAL and how
a query block finds its key blocks (:class:`Iteration`): closed-form bounds for affine
masks (:mod:`attncc.analysis.ranges`), block lists for the others, classified by an
interval program (:mod:`attncc.analysis.classifier`, run by :mod:`attncc.runtime.tiles`).
"""
from attncc.analysis.graph import block_graph, graph_to_csr, plan_grid
from attncc.analysis.plan import Iteration, Plan, analyze, eval_key_ranges
from attncc.analysis.ranges import KeyRange
from attncc.analysis.report import explain_data
from attncc.runtime.tiles import BlockStat, IntervalProgram, TileClass

__all__ = ["analyze", "Plan", "Iteration", "KeyRange", "IntervalProgram", "BlockStat", "TileClass",
           "eval_key_ranges", "plan_grid", "block_graph", "graph_to_csr", "explain_data"]
