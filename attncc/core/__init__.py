"""The vocabulary every stage shares: the bottom layer, which imports nothing else of attncc.

- :mod:`~attncc.core.semantics`: the built-ins' numbers (ALiBi slopes, T5 buckets, BigBird's
  random blocks), the head-dim limit and the check of a call's param values, in pure Python;
- :mod:`~attncc.core.tiles`: tile classes, block statistics, interval programs and the interval
  arithmetic that runs them on tile grids;
- :mod:`~attncc.core.feature_maps`: linear attention's feature-map numbers (torch);
- :mod:`~attncc.core.lazy`: modules imported on first use; :mod:`~attncc.core.version`.

The spec, the analysis, the code generator, the runtime and the reference all take these from
here, so they cannot disagree on them (docs/DESIGN-NOTES.md, "Stages and the import rule").
"""
