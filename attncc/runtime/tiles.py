"""The tile vocabulary and interval classifier as generated modules import them.

They live in :mod:`attncc.core.tiles`, shared with the analysis (which may not import the
runtime); generated modules name them ``attncc.runtime.tiles`` (``_rt.tiles.BlockStat``,
``from attncc.runtime.tiles import BlockStat``), since they import ``attncc.runtime`` alone.
"""
from attncc.core.tiles import *  # noqa: F401,F403 - the generated modules' names for them
