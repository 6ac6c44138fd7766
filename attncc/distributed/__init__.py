"""Context parallelism: attention of one sequence sharded over the ranks of a process group.

Public: :func:`attention`, :class:`Layout`, :func:`make_layout`, :func:`shard`, :func:`unshard`,
:func:`gather`, :func:`chunk_classes` (EMPTY / PARTIAL / FULL per chunk pair), :func:`merge`
(the LSE merge of partial results), :data:`stats` / :func:`reset_stats` (what was sent and
skipped). See docs/context-parallel.md.
"""
from attncc.distributed.api import attention, gather, make_layout
from attncc.distributed.classes import EMPTY, FULL, PARTIAL, chunk_classes, row_work
from attncc.distributed.comm import CommStats, reset_stats
from attncc.distributed.layout import Layout, shard, unshard
from attncc.distributed.pairs import merge

__all__ = ["attention", "Layout", "make_layout", "shard", "unshard", "gather", "chunk_classes", "row_work",
           "merge", "EMPTY", "PARTIAL", "FULL", "stats", "reset_stats", "CommStats"]


def __getattr__(name):
    if name == "stats":  # the live counters (reset_stats replaces the object)
        from attncc.distributed import comm

        return comm.stats
    raise AttributeError(f"module 'attncc.distributed' has no attribute {name!r}")
