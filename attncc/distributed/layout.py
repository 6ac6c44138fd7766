"""How a sequence is cut into chunks and which rank holds which chunk.

A :class:`Layout` is plain data: chunk ``c`` covers the global positions
``[bounds[c], bounds[c + 1])`` and lives on rank ``owner[c]``. A rank's local tensor is the
concatenation, along the sequence dim, of its chunks in increasing position order. Chunks may
have unequal sizes (and may be empty): a (query chunk, key chunk) pair is one kernel call with
the chunks' offsets, so nothing in the kernels asks for equal chunks.

Layouts (``make_layout``):

- ``contiguous``: ``world`` chunks, rank r holds chunk r (sizes differ by at most one).
- ``headtail``: ``2 * world`` chunks, rank r holds chunks r and 2W-1-r: under a causal mask
  the early chunk's light rows and the late chunk's heavy rows even out.
- ``balanced``: chunks placed by the Plan's per-chunk work (the non-empty tiles each query row
  visits, :func:`attncc.distributed.classes.row_work`). With ``chunks_per_rank = 1``, ``world``
  contiguous chunks whose boundaries move until every rank has the same work (so their sizes
  differ); with ``chunks_per_rank = c >= 2``, ``c * world`` chunks of equal size dealt to ranks,
  heaviest first, each to the rank with the least work so far that has fewer than ``c`` chunks
  (every rank holds the same number of rows, and the work is even up to one chunk's); by
  default c is the fewest of 2, 4, 8 that evens the work out to 5%.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

KINDS = ("contiguous", "headtail", "balanced")


@dataclass(frozen=True)
class Layout:
    """Chunks of one sequence and their ranks.

    ``bounds``: ``C + 1`` non-decreasing ints from 0 to ``n``; chunk ``c`` is the positions
    ``[bounds[c], bounds[c + 1])``.
    ``owner``: ``C`` ranks in ``[0, world)``; every rank owns at least one chunk.
    ``world``: the number of ranks.
    ``kind``: how it was made ("contiguous", "headtail", "balanced" or "custom"), for messages.
    """

    bounds: Tuple[int, ...]
    owner: Tuple[int, ...]
    world: int
    kind: str = "custom"

    def __post_init__(self):
        b, o = tuple(int(x) for x in self.bounds), tuple(int(x) for x in self.owner)
        object.__setattr__(self, "bounds", b)
        object.__setattr__(self, "owner", o)
        if not isinstance(self.world, int) or self.world < 1:
            raise ValueError(f"Layout: world must be a positive int, got {self.world!r}")
        if len(b) < 2 or b[0] != 0 or any(x > y for x, y in zip(b, b[1:])):
            raise ValueError(f"Layout: bounds must rise from 0 (C + 1 ints, C >= 1), got {b}")
        if len(o) != len(b) - 1:
            raise ValueError(f"Layout: {len(b) - 1} chunks but {len(o)} owners")
        if any(not 0 <= r < self.world for r in o):
            raise ValueError(f"Layout: owners must be ranks in [0, {self.world}), got {o}")
        missing = sorted(set(range(self.world)) - set(o))
        if missing:
            raise ValueError(f"Layout: ranks {missing} own no chunk")

    @property
    def n(self) -> int:
        """The sequence length."""
        return self.bounds[-1]

    @property
    def num_chunks(self) -> int:
        return len(self.owner)

    def size(self, c: int) -> int:
        return self.bounds[c + 1] - self.bounds[c]

    def chunks_of(self, rank: int) -> Tuple[int, ...]:
        """The chunks of ``rank`` in the order its local tensor holds them (by position)."""
        return _chunks_of(self, rank)

    def local_len(self, rank: int) -> int:
        """Rows of ``rank``'s local tensor."""
        return sum(self.size(c) for c in self.chunks_of(rank))

    def local_start(self, c: int) -> int:
        """Where chunk ``c`` starts in its owner's local tensor."""
        return _local_starts(self)[c]

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """The global positions of ``rank``'s local rows (int64 ``[local_len]``): position
        embeddings and RoPE outside attention take them."""
        parts = [torch.arange(self.bounds[c], self.bounds[c + 1], device=device) for c in self.chunks_of(rank)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)

    def max_local_len(self) -> int:
        return max(self.local_len(r) for r in range(self.world))


@functools.lru_cache(maxsize=1024)
def _chunks_of(layout: Layout, rank: int) -> Tuple[int, ...]:
    return tuple(c for c, r in enumerate(layout.owner) if r == rank)


@functools.lru_cache(maxsize=256)
def _local_starts(layout: Layout) -> Tuple[int, ...]:
    starts = [0] * layout.num_chunks
    for r in range(layout.world):
        at = 0
        for c in layout.chunks_of(r):
            starts[c] = at
            at += layout.size(c)
    return tuple(starts)


def even_bounds(n: int, pieces: int) -> Tuple[int, ...]:
    """``pieces + 1`` bounds cutting ``n`` into pieces whose sizes differ by at most one
    (the longer ones first)."""
    q, r = divmod(n, pieces)
    out, at = [0], 0
    for p in range(pieces):
        at += q + (p < r)
        out.append(at)
    return tuple(out)


def contiguous(n: int, world: int) -> Layout:
    _check_n(n, world)
    return Layout(even_bounds(n, world), tuple(range(world)), world, "contiguous")


def headtail(n: int, world: int) -> Layout:
    _check_n(n, world)
    owner = tuple(range(world)) + tuple(reversed(range(world)))
    return Layout(even_bounds(n, 2 * world), owner, world, "headtail")


# chunks_per_rank=None tries these in turn and keeps the first within BALANCE_TOLERANCE
AUTO_CHUNKS_PER_RANK = (2, 4, 8)
BALANCE_TOLERANCE = 1.05  # the busiest rank's work over the mean


def balanced(n: int, world: int, row_work: torch.Tensor, *, chunks_per_rank: Optional[int] = None,
             align: int = 1, min_rows: int = 1) -> Layout:
    """The ``balanced`` layout for the work profile ``row_work`` (float ``[n]``: the work of
    each query row; see the module docstring). ``chunks_per_rank=None``: 2, 4 or 8, the fewest
    whose busiest rank has at most 5% more work than the mean (else the most even of them):
    causal masks need 2, packed documents longer than a chunk more; never chunks shorter than
    ``min_rows`` (the resolution of ``row_work``: finer chunks cannot be balanced by it) beyond 2
    per rank. ``align``: chunk boundaries at multiples of it (the last boundary is ``n``) when
    that leaves every chunk non-empty."""
    _check_n(n, world)
    if chunks_per_rank is not None and (not isinstance(chunks_per_rank, int) or chunks_per_rank < 1):
        raise ValueError(f"balanced layout: chunks_per_rank must be an int >= 1 or None, got {chunks_per_rank!r}")
    work = torch.as_tensor(row_work, dtype=torch.float64).flatten()
    if work.numel() != n:
        raise ValueError(f"balanced layout: row_work has {work.numel()} entries, the sequence {n}")
    prefix = torch.cat([work.new_zeros(1), torch.cumsum(work, 0)])
    if chunks_per_rank == 1:
        bounds = _equal_work_bounds(prefix, world, align)
        return Layout(bounds, tuple(range(world)), world, "balanced")
    if chunks_per_rank is not None:
        return _dealt(n, world, prefix, chunks_per_rank, align)
    best = None
    for c in AUTO_CHUNKS_PER_RANK:
        if c * world > n or (best is not None and c * world * min_rows > n):
            break
        lay = _dealt(n, world, prefix, c, align)
        spread = _imbalance(lay, prefix)
        if best is None or spread < best[0]:
            best = (spread, lay)
        if spread <= BALANCE_TOLERANCE:
            break
    return best[1] if best is not None else _dealt(n, world, prefix, 1, align)


def _imbalance(lay: Layout, prefix: torch.Tensor) -> float:
    loads = [sum(float(prefix[lay.bounds[c + 1]] - prefix[lay.bounds[c]]) for c in lay.chunks_of(r))
             for r in range(lay.world)]
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def _dealt(n: int, world: int, prefix: torch.Tensor, chunks_per_rank: int, align: int) -> Layout:
    """``chunks_per_rank * world`` chunks of equal size dealt heaviest first."""
    pieces = chunks_per_rank * world
    bounds = _aligned(even_bounds(n, pieces), align) if n >= pieces * align else even_bounds(n, pieces)
    chunk_work = [float(prefix[bounds[c + 1]] - prefix[bounds[c]]) for c in range(pieces)]
    load = [0.0] * world
    count = [0] * world
    owner = [0] * pieces
    # heaviest first (ties: earlier chunk), to the least-loaded rank with room (ties: lower rank)
    for c in sorted(range(pieces), key=lambda c: (-chunk_work[c], c)):
        r = min((r for r in range(world) if count[r] < chunks_per_rank), key=lambda r: (load[r], r))
        owner[c] = r
        load[r] += chunk_work[c]
        count[r] += 1
    return Layout(bounds, tuple(owner), world, "balanced")


def _equal_work_bounds(prefix: torch.Tensor, world: int, align: int) -> Tuple[int, ...]:
    """Bounds of ``world`` contiguous chunks of about equal work, each at least one row
    (``align`` rows where the length allows)."""
    n = prefix.numel() - 1
    step = align if n >= world * align else 1
    total = float(prefix[-1])
    bounds = [0]
    for r in range(1, world):
        target = total * r / world
        cut = int(torch.searchsorted(prefix, torch.tensor([target], dtype=prefix.dtype)).item())
        cut = int(round(cut / step)) * step
        # at least `step` rows for this chunk and for each one after it
        cut = max(cut, bounds[-1] + step)
        cut = min(cut, n - (world - r) * step)
        bounds.append(cut)
    bounds.append(n)
    return tuple(bounds)


def _aligned(bounds: Sequence[int], align: int) -> Tuple[int, ...]:
    if align <= 1:
        return tuple(bounds)
    out = [0] + [int(round(b / align)) * align for b in bounds[1:-1]] + [bounds[-1]]
    return tuple(out) if all(x < y for x, y in zip(out, out[1:])) else tuple(bounds)


def _check_n(n: int, world: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"layout: the sequence length must be a positive int, got {n!r}")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"layout: world must be a positive int, got {world!r}")
    if n < world:
        raise ValueError(f"layout: a sequence of {n} positions cannot give each of {world} ranks a row")


# ---------------------------------------------------------------------------
# Moving tensors between the full sequence and the ranks' shards (no communication)
# ---------------------------------------------------------------------------

def shard(x: torch.Tensor, layout: Layout, rank: int, dim: int = 2) -> torch.Tensor:
    """``rank``'s local part of the full-sequence tensor ``x`` (sequence along ``dim``; 2 for
    ``[B, H, N, D]``, 1 for token ids ``[B, N]``). A new tensor (contiguous)."""
    _check_full(x, layout, dim, "shard")
    if not 0 <= rank < layout.world:
        raise ValueError(f"shard: rank must be in [0, {layout.world}), got {rank}")
    parts = [x.narrow(dim, layout.bounds[c], layout.size(c)) for c in layout.chunks_of(rank)]
    return torch.cat(parts, dim).contiguous()


def unshard(parts: Sequence[torch.Tensor], layout: Layout, dim: int = 2) -> torch.Tensor:
    """The full-sequence tensor from every rank's local part (``parts[r]`` of rank r)."""
    if len(parts) != layout.world:
        raise ValueError(f"unshard: {len(parts)} parts for a layout of {layout.world} ranks")
    pieces: List[Optional[torch.Tensor]] = [None] * layout.num_chunks
    for r, x in enumerate(parts):
        if x.shape[dim] != layout.local_len(r):
            raise ValueError(f"unshard: rank {r}'s part has {x.shape[dim]} rows along dim {dim}, "
                             f"the layout gives it {layout.local_len(r)}")
        for c in layout.chunks_of(r):
            pieces[c] = x.narrow(dim, layout.local_start(c), layout.size(c))
    return torch.cat(pieces, dim)


def _check_full(x: torch.Tensor, layout: Layout, dim: int, who: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor, got {type(x).__name__}")
    if x.shape[dim] != layout.n:
        raise ValueError(f"{who}: the tensor has {x.shape[dim]} rows along dim {dim}, the layout {layout.n}")
