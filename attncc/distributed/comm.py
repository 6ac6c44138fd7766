"""The communication schedules of context-parallel attention: all-gather, ring, Ulysses.

Every rank holds its chunks of q, k, v (see layout.py). For all-gather and ring, a
:class:`Schedule` fixes before any tensor moves which (query chunk, key chunk) pairs are computed
(the non-EMPTY ones of ``classes``) and which key chunks go to which rank (those a rank's query
chunks need); every rank derives the same schedule from the same layout, params and inputs, so
the sends and receives match without any handshake. K and V travel packed as one tensor
``[B, Hkv, rows, D + Dv]`` (one message instead of two); the dK/dV that go back to the chunks'
owners travel the same way, in float32 (partial sums of several ranks).

- all-gather: every rank's K/V to every rank (one collective, its transfer overlapped with the
  local pairs); the remote pairs after it; in the backward, K/V gathered again and the remote
  dK/dV summed to their owners by one reduce-scatter.
- ring: W - 1 steps; at step s rank r sends its key chunks to rank r + s and receives those of
  rank r - s (mod W): the rotation schedule of ring attention with each block sent straight to
  the rank that uses it (one hop on NVLink/NVSwitch), so a block no query of the receiver
  attends to is never sent, and no rank forwards a block it does not need. Step s + 1's transfer
  runs while step s computes. In the backward the dK/dV of a received block go back to its owner
  in the opposite rotation, overlapped likewise.
- Ulysses: all-to-all from sequence shards to head shards (every rank: the whole sequence for
  H / W heads), the plain kernel, and back; autograd through the all-to-alls.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from attncc.distributed.layout import Layout
from attncc.distributed.pairs import PairCall, key_runs, merge_
from attncc.core.tiles import EMPTY


@dataclass
class CommStats:
    """What this process's distributed calls did, summed since :func:`reset_stats` (per process).

    ``messages`` / ``messages_skipped``: ring point-to-point messages sent, and not sent because
    the receiver's pairs with them are all EMPTY (forward K/V and backward dK/dV alike).
    ``chunks_sent`` / ``chunks_skipped``: the same counted in key chunks.
    ``bytes_sent``: bytes this rank put on the wire (collectives: its shard times the peers it reaches).
    ``pairs_computed``: kernel calls (one per query chunk and key run); ``pairs_skipped``: EMPTY
    (query chunk, key chunk) pairs never computed.
    """

    messages: int = 0
    messages_skipped: int = 0
    chunks_sent: int = 0
    chunks_skipped: int = 0
    bytes_sent: int = 0
    pairs_computed: int = 0
    pairs_skipped: int = 0


stats = CommStats()


def reset_stats() -> CommStats:
    """Zero the counters; returns the values they had."""
    global stats
    old, stats = stats, CommStats()
    return old


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class Schedule:
    """One distributed call, fixed before any tensor moves.

    ``pairs``: the kernel calls' common arguments; ``classes``: int8 ``[C, C]`` chunk-pair
    classes of ``layout`` (classes.chunk_classes); ``group``, ``rank``, ``world``: the process group."""

    pairs: PairCall
    layout: Layout
    classes: torch.Tensor
    group: object
    rank: int
    world: int
    _need: Dict[Tuple[int, int], Tuple[int, ...]] = field(default_factory=dict, repr=False)

    def need(self, dst: int, src: int) -> Tuple[int, ...]:
        """The chunks of rank ``src`` that some query chunk of rank ``dst`` attends to."""
        key = (dst, src)
        if key not in self._need:
            mine = self.layout.chunks_of(dst)
            self._need[key] = tuple(c for c in self.layout.chunks_of(src)
                                    if self.layout.size(c) and any(int(self.classes[qc, c]) != EMPTY for qc in mine))
        return self._need[key]

    @functools.cached_property
    def local_rows(self) -> Tuple[Tuple[int, int, int], ...]:
        """``(chunk, local start, rows)`` of this rank's chunks: the rows of its local tensors."""
        lay = self.layout
        return tuple((c, lay.local_start(c), lay.size(c)) for c in lay.chunks_of(self.rank))

    def buffer_rows(self, chunks: Sequence[int]) -> Tuple[Tuple[int, int, int], ...]:
        """``(chunk, row start, rows)`` of ``chunks`` packed back to back in a buffer."""
        out, at = [], 0
        for c in chunks:
            out.append((c, at, self.layout.size(c)))
            at += self.layout.size(c)
        return tuple(out)

    def rows_of(self, kv: torch.Tensor, chunks: Sequence[int]) -> torch.Tensor:
        """This rank's local rows of ``chunks``, packed (what a message carries)."""
        lay = self.layout
        return torch.cat([kv.narrow(2, lay.local_start(c), lay.size(c)) for c in chunks], 2).contiguous()

    def peer(self, r: int) -> int:
        """The global rank of group rank ``r`` (what point-to-point ops take)."""
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def count_skipped_pairs(self) -> None:
        lay = self.layout
        stats.pairs_skipped += sum(1 for qc, _, rows in self.local_rows if rows
                                   for kc in range(lay.num_chunks)
                                   if lay.size(kc) and int(self.classes[qc, kc]) == EMPTY)

    # -- the pairs of one key buffer ------------------------------------------------

    def forward_pairs(self, q, o_acc, lse_acc, kv, rows) -> None:
        """Fold the pairs of this rank's query chunks with the key chunks ``rows`` of ``kv``
        (``(chunk, row start, rows)``, see key_runs) into the accumulators."""
        D = q.shape[-1]
        bounds = self.layout.bounds
        for qc, qs, ql in self.local_rows:
            if not ql:
                continue
            for c0, a, b in key_runs(self.classes, qc, rows):
                o, lse = self.pairs.forward(q[:, :, qs:qs + ql], kv[:, :, a:b, :D], kv[:, :, a:b, D:], bounds[qc],
                                            bounds[c0])
                merge_(o_acc[:, :, qs:qs + ql], lse_acc[:, :, qs:qs + ql], o, lse)
                stats.pairs_computed += 1

    def backward_pairs(self, q, o, lse, do, dlse, dq_acc, kv, rows, dkv) -> None:
        """Add the gradients of the same pairs: dQ into ``dq_acc`` (local rows), dK|dV into
        ``dkv`` (float32, the rows of ``kv``); ``dlse``: the LSE's gradient or None."""
        D = q.shape[-1]
        bounds = self.layout.bounds
        for qc, qs, ql in self.local_rows:
            if not ql:
                continue
            sl = slice(qs, qs + ql)
            for c0, a, b in key_runs(self.classes, qc, rows):
                dq, dk, dv = self.pairs.backward(q[:, :, sl], kv[:, :, a:b, :D], kv[:, :, a:b, D:], o[:, :, sl],
                                                 lse[:, :, sl], do[:, :, sl], bounds[qc], bounds[c0],
                                                 None if dlse is None else dlse[:, :, sl])
                dq_acc[:, :, sl] += dq
                dkv[:, :, a:b, :D] += dk
                dkv[:, :, a:b, D:] += dv


def _accumulators(q, v):
    B, Hq, nl, _ = q.shape
    o_acc = torch.zeros(B, Hq, nl, v.shape[-1], dtype=torch.float32, device=q.device)
    lse_acc = torch.full((B, Hq, nl), float("-inf"), dtype=torch.float32, device=q.device)
    return o_acc, lse_acc


def _split_grads(s: Schedule, q, k, dq_acc, dkv):
    D = q.shape[-1]
    return dq_acc.to(q.dtype), dkv[..., :D].to(k.dtype), dkv[..., D:].to(k.dtype)


# ---------------------------------------------------------------------------
# Ring (rotation) schedule
# ---------------------------------------------------------------------------

_P2P_READY = set()


def _p2p_ready(s: Schedule) -> None:
    """NCCL: the first call of ``batch_isend_irecv`` in a group must involve every rank of it,
    and the ring's first steps may skip some; one barrier per group before the first ring step
    makes a collective the group's first call instead (every rank reaches this line first)."""
    key = id(s.group)
    if key not in _P2P_READY and s.world > 1:
        if dist.get_backend(s.group) == "nccl":
            dist.barrier(group=s.group)
        _P2P_READY.add(key)


def _p2p(s: Schedule, sends, recvs) -> List:
    """Post point-to-point ops (``[(tensor, group rank)]`` each); returns their requests."""
    ops = [dist.P2POp(dist.isend, t, s.peer(p), s.group) for t, p in sends]
    ops += [dist.P2POp(dist.irecv, t, s.peer(p), s.group) for t, p in recvs]
    return dist.batch_isend_irecv(ops) if ops else []


def _wait(reqs) -> None:
    for r in reqs:
        r.wait()


def _count_message(s: Schedule, chunks_sent: Sequence[int], src: int, t=None) -> None:
    """Count one ring message of ``src``'s chunks (``t``: the tensor sent, None: not sent)."""
    total = len(s.layout.chunks_of(src))
    stats.chunks_sent += len(chunks_sent)
    stats.chunks_skipped += total - len(chunks_sent)
    if t is None:
        stats.messages_skipped += 1
    else:
        stats.messages += 1
        stats.bytes_sent += _nbytes(t)


def _kv_exchange(s: Schedule, kv: torch.Tensor, step: int):
    """Post step ``step``'s K/V transfer: this rank's chunks that rank r + step needs go there,
    those of rank r - step that this rank needs come here. Returns (requests, buffer, chunks, sent)."""
    r, W = s.rank, s.world
    dst, src = (r + step) % W, (r - step) % W
    send_chunks, recv_chunks = s.need(dst, r), s.need(r, src)
    sends = [(s.rows_of(kv, send_chunks), dst)] if send_chunks else []
    _count_message(s, send_chunks, r, sends[0][0] if sends else None)
    buf = None
    if recv_chunks:
        rows = sum(s.layout.size(c) for c in recv_chunks)
        buf = kv.new_empty(kv.shape[0], kv.shape[1], rows, kv.shape[3])
    reqs = _p2p(s, sends, [(buf, src)] if buf is not None else [])
    return reqs, buf, recv_chunks, sends


def ring_forward(s: Schedule, q, k, v):
    kv = torch.cat([k, v], -1)
    o_acc, lse_acc = _accumulators(q, v)
    s.count_skipped_pairs()
    _p2p_ready(s)
    pending = _kv_exchange(s, kv, 1) if s.world > 1 else None
    s.forward_pairs(q, o_acc, lse_acc, kv, s.local_rows)
    for step in range(1, s.world):
        reqs, buf, chunks, _sent = pending
        _wait(reqs)
        pending = _kv_exchange(s, kv, step + 1) if step + 1 < s.world else None
        if chunks:
            s.forward_pairs(q, o_acc, lse_acc, buf, s.buffer_rows(chunks))
    return o_acc.to(q.dtype), lse_acc


def ring_backward(s: Schedule, q, k, v, o, lse, do, dlse=None):
    r, W = s.rank, s.world
    kv = torch.cat([k, v], -1)
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
    _p2p_ready(s)
    pending = _kv_exchange(s, kv, 1) if W > 1 else None
    s.backward_pairs(q, o, lse, do, dlse, dq_acc, kv, s.local_rows, dkv)
    returning = None  # the previous step's dK/dV transfer: (requests, buffer, chunks, sent)
    for step in range(1, W):
        reqs, buf, chunks, _sent = pending
        _wait(reqs)
        pending = _kv_exchange(s, kv, step + 1) if step + 1 < W else None
        part = None
        if chunks:
            part = torch.zeros(*buf.shape, dtype=torch.float32, device=q.device)
            s.backward_pairs(q, o, lse, do, dlse, dq_acc, buf, s.buffer_rows(chunks), part)
        # dK/dV of rank r - step's chunks go back to it; ours come from rank r + step
        src, back_from = (r - step) % W, (r + step) % W
        _count_message(s, chunks, src, part)
        back_chunks = s.need(back_from, r)
        back = dkv.new_empty(dkv.shape[0], dkv.shape[1], sum(s.layout.size(c) for c in back_chunks),
                             dkv.shape[3]) if back_chunks else None
        transfer = (_p2p(s, [(part, src)] if part is not None else [], [(back, back_from)] if back is not None else []),
                    back, back_chunks, part)
        if returning is not None:
            _add_returned(s, dkv, returning)
        returning = transfer
    if returning is not None:
        _add_returned(s, dkv, returning)
    return _split_grads(s, q, k, dq_acc, dkv)


def _add_returned(s: Schedule, dkv, transfer) -> None:
    reqs, buf, chunks, _sent = transfer
    _wait(reqs)
    for c, at, rows in s.buffer_rows(chunks):
        dkv[:, :, s.layout.local_start(c):s.layout.local_start(c) + rows] += buf[:, :, at:at + rows]


# ---------------------------------------------------------------------------
# All-gather
# ---------------------------------------------------------------------------

def padded(x: torch.Tensor, rows: int, dim: int = 2) -> torch.Tensor:
    """``x`` with zero rows appended along ``dim`` up to ``rows`` (collectives take equal sizes)."""
    if x.shape[dim] == rows:
        return x.contiguous()
    pad = list(x.shape)
    pad[dim] = rows - x.shape[dim]
    return torch.cat([x, x.new_zeros(pad)], dim).contiguous()


def _start_gather(s: Schedule, kv: torch.Tensor):
    L = s.layout.max_local_len()
    mine = padded(kv, L)
    parts = [torch.empty_like(mine) for _ in range(s.world)]
    work = dist.all_gather(parts, mine, group=s.group, async_op=True)
    stats.bytes_sent += _nbytes(mine) * (s.world - 1)
    return work, parts


def _remote_kv(s: Schedule, parts: List[torch.Tensor]):
    """The gathered K/V in global position order, and the ``(chunk, row, rows)`` of the other ranks' chunks."""
    lay = s.layout
    full = torch.cat([parts[lay.owner[c]].narrow(2, lay.local_start(c), lay.size(c)) for c in range(lay.num_chunks)], 2)
    rows = tuple((c, lay.bounds[c], lay.size(c)) for c in range(lay.num_chunks) if lay.owner[c] != s.rank)
    return full, rows


def allgather_forward(s: Schedule, q, k, v):
    kv = torch.cat([k, v], -1)
    o_acc, lse_acc = _accumulators(q, v)
    s.count_skipped_pairs()
    work, parts = _start_gather(s, kv)
    s.forward_pairs(q, o_acc, lse_acc, kv, s.local_rows)  # while the gather runs
    work.wait()
    full, rows = _remote_kv(s, parts)
    s.forward_pairs(q, o_acc, lse_acc, full, rows)
    return o_acc.to(q.dtype), lse_acc


def allgather_backward(s: Schedule, q, k, v, o, lse, do, dlse=None):
    lay = s.layout
    kv = torch.cat([k, v], -1)
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
    work, parts = _start_gather(s, kv)
    s.backward_pairs(q, o, lse, do, dlse, dq_acc, kv, s.local_rows, dkv)
    work.wait()
    full, rows = _remote_kv(s, parts)
    dkv_full = torch.zeros(*full.shape, dtype=torch.float32, device=q.device)
    s.backward_pairs(q, o, lse, do, dlse, dq_acc, full, rows, dkv_full)
    # the remote dK/dV to their owners, summed over the ranks: one reduce-scatter
    L = lay.max_local_len()
    sends = [padded(torch.cat([dkv_full.narrow(2, lay.bounds[c], lay.size(c)) for c in lay.chunks_of(p)], 2), L)
             for p in range(s.world)]
    got = torch.empty_like(sends[0])
    dist.reduce_scatter(got, sends, group=s.group)
    stats.bytes_sent += sum(_nbytes(t) for p, t in enumerate(sends) if p != s.rank)
    dkv += got[:, :, :kv.shape[2]]
    return _split_grads(s, q, k, dq_acc, dkv)


@dataclass(frozen=True)
class Strategy:
    name: str
    forward: object
    backward: object


RING = Strategy("ring", ring_forward, ring_backward)
ALLGATHER = Strategy("allgather", allgather_forward, allgather_backward)


def group_device(group, like) -> torch.device:
    """Where the collectives of the group's checks take their tensors, the same on every rank whatever
    its call: the CPU for gloo, for NCCL the GPU of ``like`` (q), or the current one."""
    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    if isinstance(like, torch.Tensor) and like.is_cuda:
        return like.device
    return torch.device("cuda", torch.cuda.current_device())


def agree(group, world: int, error: Optional[BaseException], what: str, like=None) -> None:
    """Raise on every rank of the group when the part of a call that each rank checks alone failed on
    some: one all-gather of a flag per rank. A rank that raised alone left the others waiting for its
    messages for ever (an input changed in place on one rank before the backward)."""
    if world > 1:
        mine = torch.tensor([int(error is not None)], dtype=torch.int64, device=group_device(group, like))
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine, group=group)
        raise_for_failed([int(t) for t in every], error, what)
    elif error is not None:
        raise error


def agree_unchanged(watched, name: str, kwargs: dict, group, world: int, like=None) -> None:
    """Before a backward communicates: the params and [inputs] it reads again (``watched``, from
    ``runtime.autograd.watch`` at the forward) checked against changes in place on every rank, and
    :func:`agree` on the outcome (``name``: the spec; ``kwargs``: the call's, which name them)."""
    from attncc.runtime.autograd import check_watched

    error = None
    try:
        check_watched(watched, lambda: (f"{name} (context parallel)", tuple(kwargs.items())))
    except RuntimeError as e:
        error = e
    agree(group, world, error, "its backward", like=like)


def raise_for_failed(failed: Sequence[int], error: Optional[BaseException], what: str) -> None:
    """After every rank said whether its own checks failed (``failed``: a flag per group rank): this
    rank's ``error`` raised again, or a ValueError naming the ranks that failed."""
    if error is not None:
        raise error
    bad = [str(r) for r, f in enumerate(failed) if f]
    if bad:
        raise ValueError(f"attncc.distributed: rank{'s' if len(bad) > 1 else ''} {', '.join(bad)} of the group could "
                         f"not make {what} (the error there says why); every rank must make the same call")


class ContextParallelFunction(torch.autograd.Function):
    """``o, lse`` of the local query rows over the whole sequence, with dQ local and dK/dV
    summed at their owners in the backward (every rank must run the backward: it communicates)."""

    @staticmethod
    def forward(ctx, sched: Schedule, strategy: Strategy, q, k, v):
        from attncc.runtime.autograd import watch

        o, lse = strategy.forward(sched, q, k, v)
        ctx.sched, ctx.strategy = sched, strategy
        # the params and [inputs] every pair's backward reads again: changed in place before the
        # backward, they would give gradients of a mask the forward never used (runtime.autograd)
        ctx.watched = watch(sched.pairs.kwargs.values())
        ctx.save_for_backward(q, k, v, o, lse)
        # an output the loss does not use passes None (an unused LSE costs the backward nothing)
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        from attncc.runtime.autograd import no_double_backward
        from attncc.runtime.call import backward_cotangents

        do, dlse = backward_cotangents(f"{ctx.sched.pairs.target.spec.name} (context parallel) attention's backward",
                                       do, dlse)
        q, k, v, o, lse = ctx.saved_tensors
        if do is None:  # only the LSE reaches the loss
            do = torch.zeros_like(o)
        s = ctx.sched
        agree_unchanged(ctx.watched, s.pairs.target.spec.name, s.pairs.kwargs, s.group, s.world, like=q)
        with torch.no_grad():
            dq, dk, dv = ctx.strategy.backward(ctx.sched, q, k, v, o, lse, do, dlse)
        if torch.is_grad_enabled():
            dq, dk, dv = no_double_backward(ctx.sched.pairs.target.spec.name, [dq, dk, dv], (q, k, v, do, dlse))
        return None, None, dq, dk, dv


# ---------------------------------------------------------------------------
# Ulysses: sequence shards <-> head shards
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadShards:
    """The layout and group of an all-to-all between sequence shards and head shards."""

    layout: Layout
    group: object
    rank: int
    world: int


def seq_to_heads(x: torch.Tensor, hs: HeadShards) -> torch.Tensor:
    """``[B, H, local rows, ...]`` (sequence shards) -> ``[B, H / W, N, ...]``: the whole sequence,
    in position order, of this rank's block of H / W heads."""
    lay, W = hs.layout, hs.world
    hp = x.shape[1] // W
    L = lay.max_local_len()
    sends = [padded(x[:, p * hp:(p + 1) * hp], L) for p in range(W)]
    got = _all_to_all(sends, hs)
    return torch.cat([got[lay.owner[c]].narrow(2, lay.local_start(c), lay.size(c)) for c in range(lay.num_chunks)], 2)


def heads_to_seq(y: torch.Tensor, hs: HeadShards) -> torch.Tensor:
    """The inverse of :func:`seq_to_heads`."""
    lay, W = hs.layout, hs.world
    L = lay.max_local_len()
    sends = [padded(torch.cat([y.narrow(2, lay.bounds[c], lay.size(c)) for c in lay.chunks_of(p)], 2), L)
             for p in range(W)]
    got = _all_to_all(sends, hs)
    return torch.cat([t[:, :, :lay.local_len(hs.rank)] for t in got], 1)


def _all_to_all(sends: List[torch.Tensor], hs: HeadShards) -> List[torch.Tensor]:
    got = [torch.empty_like(sends[0]) for _ in sends]
    dist.all_to_all(got, sends, group=hs.group)
    stats.bytes_sent += sum(_nbytes(t) for p, t in enumerate(sends) if p != hs.rank)
    return got


class SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, hs: HeadShards):
        ctx.hs = hs
        return seq_to_heads(x, hs)

    @staticmethod
    def backward(ctx, g):
        return heads_to_seq(g.contiguous(), ctx.hs), None


class HeadsToSeq(torch.autograd.Function):
    """Head shards back to sequence shards. ``before_backward(like)``: called first in the backward,
    before the all-to-all (the module's backward comes after it: a check that raised there on one
    rank left the others in the next all-to-all)."""

    @staticmethod
    def forward(ctx, y, hs: HeadShards, before_backward=None):
        ctx.hs, ctx.before_backward = hs, before_backward
        return heads_to_seq(y, hs)

    @staticmethod
    def backward(ctx, g):
        if ctx.before_backward is not None:
            ctx.before_backward(g)
        return seq_to_heads(g.contiguous(), ctx.hs), None, None
