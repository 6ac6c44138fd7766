"""Which (query chunk, key chunk) pairs hold allowed pairs, and how much work each query row is.

:func:`chunk_classes` is the one place that decides, per pair of chunks of a layout, EMPTY (no
allowed pair: never computed, never sent), FULL (every pair allowed) or PARTIAL. It runs the
Plan's interval program (``attncc.analysis.analyze(pattern).classifier``, the program the
block-list kernels run per tile) once over the grid of chunks, with every chunk as one "tile":
sound by construction (EMPTY and FULL are never claimed wrongly) and exact for the affine masks
of specs/ (causal, windows, prefix-LM) at chunk granularity. Its cost is O(C^2) for C chunks
plus, for masks that read position-indexed inputs (document ids), one min/max pass over those
inputs (O(B N)); static masks are cached per (pattern, bounds, params). ``exact=True``
evaluates the dense pair mask instead (``attncc.reference.pair_mask``, O(N^2): tests only).

:func:`row_work` is the Plan's work profile for the ``balanced`` layout: per query row, the
number of key tiles of ``tile`` rows its query block visits (non-EMPTY tiles of the same
classifier over the whole sequence): O((N / tile)^2) on the host, once per static pattern
and length, per call for data-dependent masks.

:func:`resolve` finds the Pattern of a generated module (the analysis needs it; the kernels do not).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from attncc.core import tiles
from attncc.core.tiles import EMPTY, FULL, PARTIAL

__all__ = ["EMPTY", "PARTIAL", "FULL", "Target", "resolve", "chunk_classes", "row_work"]


@dataclass(frozen=True)
class Target:
    """A generated softmax module, its Pattern, and its kernel launchers.

    ``forward(call) -> (o, lse)`` and ``backward(call, o, lse, do) -> (dq, dk, dv, input_grads)``
    are the module's launchers (``attncc.runtime.compiled.launchers``), called per chunk pair."""

    module: object
    pattern: object
    forward: Callable
    backward: Optional[Callable]

    @property
    def spec(self):
        return self.module.SPEC


def resolve(module, pattern=None) -> Target:
    """The :class:`Target` of ``module``: a generated module (``generated.causal``, or one from
    ``attncc.compile``), or a spec (anything ``attncc.compile`` takes: a path, TOML text, a dict),
    compiled here. ``pattern``: the module's Pattern or spec when it cannot be found from the
    module's ``SPEC.source`` (modules compiled from text); it must be the module's spec (same hash).
    Cached for hashable arguments (modules, paths, text, Patterns): every call of
    ``attncc.distributed.attention`` resolves its module."""
    try:
        hash((module, pattern))
    except TypeError:  # a dict spec
        return _resolve(module, pattern)
    return _resolve_cached(module, pattern)


def _resolve(module, pattern) -> Target:
    from attncc.runtime.compiled import launchers

    if not hasattr(module, "SPEC"):
        import attncc

        pattern = as_pattern(module) if pattern is None else pattern
        module = attncc.compile(module)
    spec = module.SPEC
    if spec.kind != "softmax":
        raise ValueError(f"attncc.distributed: {spec.name} is a {spec.kind} pattern; context parallelism "
                         f"supports softmax attention only")
    pattern = _module_pattern(module) if pattern is None else as_pattern(pattern)
    if pattern.source_hash != spec.spec_hash:
        raise ValueError(f"attncc.distributed: the pattern given ({pattern.name}, spec hash {pattern.source_hash}) "
                         f"is not the one module {spec.name} was generated from (spec hash {spec.spec_hash})")
    forward, backward = launchers(spec)
    return Target(module, pattern, forward, backward)


_resolve_cached = functools.lru_cache(maxsize=64)(_resolve)


def as_pattern(spec):
    """The Pattern of a spec given as a Pattern, a dict of spec keys, TOML text or a path."""
    from attncc.module_cache import toml_text
    from attncc.spec import Pattern, load_spec, parse_spec

    if isinstance(spec, Pattern):
        return spec
    if isinstance(spec, dict):
        return parse_spec(toml_text(spec))
    if isinstance(spec, str) and ("\n" in spec or "=" in spec or not spec.strip()):
        return parse_spec(spec)
    if isinstance(spec, (str, os.PathLike)):
        return load_spec(spec)
    raise TypeError(f"attncc.distributed: pattern must be a Pattern, a spec path, TOML text or a dict, "
                    f"got {type(spec).__name__}")


@functools.lru_cache(maxsize=64)
def _module_pattern(module):
    """The Pattern behind a generated module: its ``SPEC.source`` file (as given, from the
    working directory, the repository root, or next to the module's folder) with the same hash."""
    from attncc.spec import load_spec

    import attncc

    spec = module.SPEC
    source = Path(spec.source)
    places = [source, Path(attncc.__file__).resolve().parent.parent / source]
    if getattr(module, "__file__", None):
        places.append(Path(module.__file__).resolve().parent.parent / source)
    for path in places:
        if path.is_file():
            pattern = load_spec(path)
            if pattern.source_hash == spec.spec_hash:
                return pattern
    raise ValueError(f"attncc.distributed: cannot find the spec of module {spec.name} (source {spec.source!r}, "
                     f"hash {spec.spec_hash}); pass pattern= (the spec it was generated from: a path, TOML text, "
                     f"a dict or a Pattern)")


# ---------------------------------------------------------------------------
# Chunk-pair classes
# ---------------------------------------------------------------------------

def chunk_classes(pattern, bounds: Sequence[int], *, params: Optional[Mapping[str, object]] = None,
                  inputs: Optional[Mapping[str, torch.Tensor]] = None, batch: int = 1, heads: int = 1,
                  exact: bool = False) -> torch.Tensor:
    """int8 ``[C, C]`` on the CPU: entry ``[qc, kc]`` is EMPTY, PARTIAL or FULL for the queries of
    chunk ``qc`` against the keys of chunk ``kc`` of one sequence of ``n = bounds[-1]`` positions
    (chunk ``c`` = positions ``[bounds[c], bounds[c + 1])``; ``n_q = n_k = n``), over every batch row
    and head (EMPTY / FULL only when so for all of them). Pairs with an empty chunk are EMPTY.

    ``pattern``: a Pattern, a generated module or a :class:`Target`. ``params``: param values
    (defaults otherwise); ``inputs``: the mask's input tensors, full length along positions.
    ``exact``: from the dense pair mask (O(n^2); tests), else the Plan's interval program."""
    pattern = _pattern_of(pattern)
    bounds = tuple(int(b) for b in bounds)
    params = dict(params or {})
    inputs = _as_read(pattern, inputs)
    if exact:
        grid = _exact_classes(pattern, bounds, params, inputs, batch, heads)
    else:
        from attncc.analysis import analyze

        plan = analyze(pattern)
        if plan.dynamic or inputs:
            grid = _interval_classes(plan.classifier, bounds, params, inputs, batch, heads)
        else:
            grid = _static_classes(plan.classifier, bounds, tuple(sorted(params.items())), batch, heads)
    sizes = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])])
    empty = (sizes[:, None] == 0) | (sizes[None, :] == 0)
    return torch.where(empty, EMPTY, grid).to(torch.int8)


def _as_read(pattern, inputs) -> dict:
    """``inputs`` at the values the kernels read (attncc.runtime.call.input_as_read): the classes
    must see what the kernels compare. Read as given, a float64 input declared float32 told
    ``x[b, i] >= x[b, j]`` false for 1 and 1 + 1e-12, which the kernels (and the reference) round
    to one float32 value: the chunk pair was EMPTY, never computed, its keys missing from o."""
    from attncc.runtime.call import input_as_read

    declared = {d.name: d.dtype for d in pattern.inputs}
    return {name: input_as_read("attncc.distributed (chunk classes)", name, declared[name], t)
            if name in declared and isinstance(t, torch.Tensor) else t for name, t in dict(inputs or {}).items()}


def _pattern_of(x):
    if isinstance(x, Target):
        return x.pattern
    if hasattr(x, "SPEC"):
        return resolve(x).pattern
    return x


@functools.lru_cache(maxsize=256)
def _static_classes(program, bounds, params, batch, heads):
    return _interval_classes(program, bounds, dict(params), {}, batch, heads)


def _interval_classes(program, bounds, params, inputs, batch, heads) -> torch.Tensor:
    C = len(bounds) - 1
    n = bounds[-1]
    if program is None:  # no mask: every pair allowed
        return torch.full((C, C), FULL, dtype=torch.int8)
    device = next((t.device for t in inputs.values()), torch.device("cpu"))
    stats = [detail[0] for _, kind, detail in program.leaves if kind == "input"]
    if any(s.axis_var == "ij" for s in stats):
        return _pairwise_classes(program, bounds, params, inputs, batch, heads, device)
    lo = torch.tensor(bounds[:-1], dtype=torch.float64, device=device)
    # an empty chunk gets a one-row interval; its pairs are EMPTY in the end anyway
    hi = torch.maximum(torch.tensor(bounds[1:], dtype=torch.float64, device=device) - 1, lo)
    env = tiles.leaf_values(program, i=(lo.view(1, 1, C, 1), hi.view(1, 1, C, 1)),
                            j=(lo.view(1, 1, 1, C), hi.view(1, 1, 1, C)), n_q=n, n_k=n, params=params,
                            inputs=inputs, batch=batch, heads=heads, device=device, who="attncc.distributed: ",
                            input_interval=lambda stat, t: _chunk_input_interval(stat, t, bounds, batch, heads))
    may_true, may_false = tiles.run_interval_program(program, env)
    return _reduce_classes(may_true, may_false, C)


def _chunk_input_interval(stat, tensor, bounds, batch, heads):
    """The interval of an input read over each chunk: the per-position values (tiles of one
    row) reduced to their min and max over every chunk's positions."""
    n = bounds[-1]
    lo, hi = tiles.input_interval(stat, tensor, q_offset=0, k_offset=0, q_rows=n, k_rows=n, block_m=1,
                                  block_n=1, batch=batch, heads=heads)
    if stat.axis_var not in ("i", "j"):  # a point per (b, h): the same for every chunk
        return lo, hi
    dim = 2 if stat.axis_var == "i" else 3
    parts_lo, parts_hi = [], []
    for a, b in zip(bounds, bounds[1:]):
        a = min(a, n - 1)
        rows = max(b - a, 1)
        parts_lo.append(lo.narrow(dim, a, rows).amin(dim, keepdim=True))
        parts_hi.append(hi.narrow(dim, a, rows).amax(dim, keepdim=True))
    return torch.cat(parts_lo, dim), torch.cat(parts_hi, dim)


def _pairwise_classes(program, bounds, params, inputs, batch, heads, device):
    """One 1 x 1 grid per chunk pair (inputs read by both i and j: min and max over the pair)."""
    C = len(bounds) - 1
    n = bounds[-1]
    out = torch.full((C, C), EMPTY, dtype=torch.int8)
    for qc in range(C):
        for kc in range(C):
            q_rows, k_rows = bounds[qc + 1] - bounds[qc], bounds[kc + 1] - bounds[kc]
            if q_rows and k_rows:
                grid = tiles.classify_grid(program, q_offset=bounds[qc], k_offset=bounds[kc], q_rows=q_rows,
                                           k_rows=k_rows, block_m=q_rows, block_n=k_rows, n_q=n, n_k=n,
                                           params=params, inputs=inputs, batch=batch, heads=heads, device=device,
                                           who="attncc.distributed: ")
                out[qc, kc] = _reduce_grid(grid).item()
    return out


def _reduce_classes(may_true, may_false, C):
    mt = torch.as_tensor(may_true)
    mf = torch.as_tensor(may_false, device=mt.device)
    shape = torch.broadcast_shapes(mt.shape, mf.shape, (1, 1, C, C))
    grid = torch.where(mt, torch.where(mf, PARTIAL, FULL), EMPTY).to(torch.int8).expand(shape)
    return _reduce_grid(grid)


def _reduce_grid(grid: torch.Tensor) -> torch.Tensor:
    """[B|1, H|1, R, C] classes -> [R, C]: EMPTY / FULL where so for every batch row and head."""
    flat = grid.reshape(-1, *grid.shape[-2:])
    all_empty = (flat == EMPTY).all(0)
    all_full = (flat == FULL).all(0)
    return torch.where(all_empty, EMPTY, torch.where(all_full, FULL, PARTIAL)).to(torch.int8).cpu()


def _exact_classes(pattern, bounds, params, inputs, batch, heads):
    from attncc._reference import pair_mask

    n = bounds[-1]
    mask = pair_mask(pattern, q_rows=n, k_rows=n, batch=batch, heads=heads, inputs=inputs, params=params)
    mask = mask.reshape(-1, n, n).cpu()
    C = len(bounds) - 1
    out = torch.full((C, C), EMPTY, dtype=torch.int8)
    for qc in range(C):
        for kc in range(C):
            block = mask[:, bounds[qc]:bounds[qc + 1], bounds[kc]:bounds[kc + 1]]
            if block.numel() and block.any():
                out[qc, kc] = FULL if block.all() else PARTIAL
    return out


# ---------------------------------------------------------------------------
# The work profile of the balanced layout
# ---------------------------------------------------------------------------

def row_work(pattern, n: int, *, tile: int = 64, params: Optional[Mapping[str, object]] = None,
             inputs: Optional[Mapping[str, torch.Tensor]] = None, batch: int = 1) -> torch.Tensor:
    """float64 ``[n]`` on the CPU: per query row, the number of non-EMPTY ``tile`` x ``tile`` key
    tiles its query block visits, summed over the batch rows (head 0 stands for every head)."""
    pattern = _pattern_of(pattern)
    params = dict(params or {})
    inputs = _as_read(pattern, inputs)
    if not inputs:
        return _static_row_work(pattern, n, tile, tuple(sorted(params.items())), batch)
    return _row_work(pattern, n, tile, params, inputs, batch)


@functools.lru_cache(maxsize=64)
def _static_row_work(pattern, n, tile, params, batch):
    return _row_work(pattern, n, tile, dict(params), {}, batch)


def _row_work(pattern, n, tile, params, inputs, batch):
    from attncc.analysis import analyze

    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"attncc.distributed: tile must be a positive int, got {tile!r}")
    device = next((t.device for t in inputs.values()), torch.device("cpu"))
    grid = tiles.classify_grid(analyze(pattern).classifier, q_offset=0, k_offset=0, q_rows=n, k_rows=n,
                               block_m=tile, block_n=tile, n_q=n, n_k=n, params=params, inputs=inputs,
                               batch=batch, heads=1, device=device,
                               who="attncc.distributed (the work of each row, for the balanced layout): ")
    visited = (grid != EMPTY).sum(-1).reshape(-1, grid.shape[-2]).sum(0).to(torch.float64).cpu()
    if grid.shape[0] == 1:  # the mask does not depend on b: every batch row visits the same tiles
        visited = visited * batch
    return visited.repeat_interleave(tile)[:n]
