"""``attncc.distributed.attention``: context-parallel attention of a generated module.

    import attncc.distributed as cp
    lay = cp.make_layout("headtail", n, world)                  # or "contiguous", "balanced"
    q_local = cp.shard(q_full, lay, rank)                       # [B, H, local rows, D]
    o_local = cp.attention(q_local, k_local, v_local, module=generated.causal, layout=lay)
    o_local.sum().backward()                                    # dq, dk, dv of the local rows

See docs/context-parallel.md.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch
import torch.distributed as dist

from attncc.distributed import comm as _comm
from attncc.distributed.classes import chunk_classes, resolve, row_work
from attncc.distributed.layout import KINDS, Layout, balanced, contiguous, headtail, unshard
from attncc.distributed.pairs import PairCall
from attncc.runtime.call import autocast_operands, broadcast_kv_batch, scale_keyword

COMMS = ("allgather", "ring", "ulysses")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, module, group=None, layout="auto",
              comm: str = "auto", return_lse: bool = False, scale=None, pattern=None, **inputs_and_params):
    """Attention of the whole sequence, sharded over the ranks of ``group`` (default: the world).

    ``q [B, Hq, local rows, D]``, ``k``, ``v [B, Hkv, local rows, D / Dv]``: this rank's rows of
    the sequence in ``layout`` (a :class:`Layout`, or a layout name: "contiguous", "headtail",
    "balanced", or "auto" = "balanced" for masked patterns and "contiguous" for unmasked ones;
    a name stands for ``make_layout(name, N, W, module=..., **params_and_inputs)`` with its defaults,
    N = W * local rows: tensors sharded with other settings (``tile``, ``chunks_per_rank``, another
    length) need that Layout passed). Every rank must make the same call: one all-gather of a digest
    of it (layout, shapes, dtypes, comm, scale, params, inputs' shapes, gradients) per call checks that
    and raises on every rank, naming what differs (mismatched calls would exchange mismatched messages). Returns this rank's rows of ``o [B, Hq, local rows, Dv]``
    (and the natural-log LSE ``[B, Hq, local rows]``, float32, with ``return_lse=True``), equal to
    the module's single-device ``attention`` of the unsharded tensors. Differentiable in q, k, v:
    every rank must run the backward (it communicates).

    ``module``: a generated softmax module (or a spec, compiled with ``attncc.compile``);
    ``pattern``: its spec, where the module's ``SPEC.source`` cannot be found. ``comm``:
    "allgather", "ring", "ulysses", or "auto" (Ulysses where the heads divide by W, the pattern
    does not read the head index and Hq / Hkv + 1 <= W, else ring). Params by keyword as in the module's ``attention``;
    inputs indexed by positions (``doc[b, n]``) are passed whole, the same on every rank.
    One rank (or no process group) with a one-chunk layout calls the module directly.
    """
    target = resolve(module, pattern)
    spec = target.spec
    rank, world = _rank_world(group)
    _check_qkv(spec.name, q, k, v)
    # under torch.autocast, as the module's attention, before any path is chosen: cast per chunk pair
    # (by bind) o came back in the autocast dtype from one chunk, in q's from several, and the pairs'
    # backward (outside autocast) recomputed P from float32 q, k against the forward's bfloat16 LSE
    q, k, v = autocast_operands(q, k, v)
    k, v = broadcast_kv_batch(q, k, v)  # k, v of batch 1 (as the module's attention)
    if spec.dropout:
        raise NotImplementedError(f"attncc.distributed: {spec.name} has attention dropout; context parallelism "
                                  f"does not implement it")
    softmax_scale, kwargs = scale_keyword(spec, scale, inputs_and_params)
    _refuse_position_keywords(spec, kwargs)
    params = {p.name: kwargs[p.name] for p in spec.params if p.name in kwargs}
    inputs = {d.name: kwargs[d.name] for d in spec.inputs if d.name in kwargs}
    for d in spec.inputs:
        t = inputs.get(d.name)
        if d.grad and isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(f"attncc.distributed: input {d.name} wants a gradient; gradients of "
                                      f"learned inputs are not implemented under context parallelism")
    B, Hq, n_local = q.shape[:3]
    if world > 1:
        _check_same_call(group, q.device, n_local if isinstance(layout, str) else None, {
            "layout": layout if isinstance(layout, str) else (layout.bounds, layout.owner, layout.world)
            if isinstance(layout, Layout) else type(layout).__name__,
            "shapes (B, Hq, Hkv, D, Dv)": (B, Hq, k.shape[1], q.shape[-1], v.shape[-1]),
            "dtypes": (str(q.dtype), str(k.dtype), str(v.dtype)),
            "comm": comm, "scale": softmax_scale, "params": sorted(params.items()),
            "inputs": sorted((n, tuple(t.shape), str(t.dtype)) if isinstance(t, torch.Tensor) else (n, repr(t))
                             for n, t in inputs.items()),
            "gradients": torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
            "return_lse": return_lse})
    _check_position_inputs(spec, inputs, layout.n if isinstance(layout, Layout) else n_local * world)
    lay = resolve_layout(layout, n_local=n_local, world=world, rank=rank, target=target, params=params,
                         inputs=inputs)
    # checked at every world size: a misspelt comm passed on one process and failed on several
    mode = resolve_comm(comm, target=target, heads_q=Hq, heads_kv=k.shape[1], world=world)
    if lay.num_chunks == 1:  # one rank, one chunk: the plain kernel
        return target.module.attention(q, k, v, return_lse=return_lse, scale=scale, **inputs_and_params)
    # one rank with several chunks: the chunk pairs and their merge without communication (what
    # ``python -m bench cp`` times against the plain kernel)
    mode = "ring" if world == 1 else mode
    if mode == "ulysses":
        hs = _comm.HeadShards(lay, group, rank, world)
        qh, kh, vh = (_comm.SeqToHeads.apply(t, hs) for t in (q, k, v))
        o, lse = target.module.attention(qh, kh, vh, return_lse=True, scale=scale, **inputs_and_params)
        o = _comm.HeadsToSeq.apply(o, hs)
        if not return_lse:
            return o
        return o, _comm.HeadsToSeq.apply(lse.unsqueeze(-1), hs).squeeze(-1)
    classes = chunk_classes(target.pattern, lay.bounds, params=params, inputs=inputs, batch=B, heads=Hq)
    sched = _comm.Schedule(PairCall(target, lay.n, softmax_scale, kwargs), lay, classes, group, rank, world)
    strategy = _comm.RING if mode == "ring" else _comm.ALLGATHER
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        o, lse = _comm.ContextParallelFunction.apply(sched, strategy, q, k, v)
    else:
        with torch.no_grad():
            o, lse = strategy.forward(sched, q, k, v)
    return (o, lse) if return_lse else o


def make_layout(kind: str, n: int, world: int, /, *, module=None, pattern=None, tile: Optional[int] = None,
                chunks_per_rank: Optional[int] = None, batch: Optional[int] = None, **inputs_and_params) -> Layout:
    """The layout ``kind`` of a sequence of ``n`` positions over ``world`` ranks.

    "contiguous" and "headtail" need nothing else. "balanced" (and "auto", which is "balanced"
    for masked patterns, "contiguous" for unmasked ones) needs the ``module`` (or ``pattern``),
    its params and, for data-dependent masks, its inputs (full length) and the ``batch`` size
    (None: the size of the inputs' ``b`` dim, 1 without one; a layout name in :func:`attention` takes
    this default too):
    the work of each query row is the non-EMPTY ``tile`` x ``tile`` tiles its block visits
    (classes.row_work; ``tile=None``: 64, or n / 1024 rounded up to a power of two for longer
    sequences, so that the host classifies at most 1024 x 1024 tiles: ~6 ms at n = 512K for a
    document mask, 0.2 s with tile 128); ``chunks_per_rank`` as in
    :func:`attncc.distributed.layout.balanced`. ``kind``, ``n`` and ``world`` are positional only:
    a spec's param or input of one of those names is passed by keyword like any other (attention's
    layout names call this with the call's params and inputs)."""
    if kind == "contiguous" or (world == 1 and kind in KINDS + ("auto",)):
        return contiguous(n, world)  # one rank: one chunk, the plain kernel
    if kind == "headtail":
        return headtail(n, world)
    if kind not in ("balanced", "auto"):
        raise ValueError(f"attncc.distributed: layout must be a Layout or one of {', '.join(KINDS)}, auto; "
                         f"got {kind!r}")
    if module is None and pattern is None:
        raise ValueError(f"attncc.distributed: the {kind} layout needs module= (or pattern=): it balances the "
                         f"pattern's work")
    pat = resolve(module, pattern).pattern if module is not None else resolve_pattern(pattern)
    if kind == "auto" and pat.mask is None:
        return contiguous(n, world)
    names = {p.name for p in pat.params}
    params = {k: v for k, v in inputs_and_params.items() if k in names}
    inputs = {k: v for k, v in inputs_and_params.items() if k not in names}
    if tile is None:
        tile = max(64, 1 << max(0, (n - 1) // 1024).bit_length())
    if batch is None:
        batch = next((inputs[d.name].shape[d.dims.index("b")] for d in pat.inputs
                      if "b" in d.dims and isinstance(inputs.get(d.name), torch.Tensor)), 1)
    work = row_work(pat, n, tile=tile, params=params, inputs=inputs, batch=batch)
    return balanced(n, world, work, chunks_per_rank=chunks_per_rank, min_rows=tile)


def resolve_pattern(pattern):
    from attncc.distributed.classes import as_pattern

    return as_pattern(pattern)


def resolve_layout(layout, *, n_local: int, world: int, rank: int, target, params, inputs) -> Layout:
    """The :class:`Layout` of a call: ``layout`` itself, or the named one for N = W * ``n_local``;
    checked against the group and this rank's rows."""
    if isinstance(layout, Layout):
        lay = layout
    elif isinstance(layout, str):
        lay = make_layout(layout, n_local * world, world, module=target.module, pattern=target.pattern,
                          **params, **inputs)  # make_layout's defaults: the same layout as the docs' sharding
        if any(lay.local_len(r) != n_local for r in range(world)):
            raise ValueError(f"attncc.distributed: the {layout!r} layout of {n_local * world} positions over {world} "
                             f"ranks gives them {[lay.local_len(r) for r in range(world)]} rows, not {n_local} each; "
                             f"pass the Layout (make_layout({layout!r}, n, world, ...)) that the tensors were "
                             f"sharded with")
    else:
        raise TypeError(f"attncc.distributed: layout must be a Layout or a name, got {type(layout).__name__}")
    if lay.world != world:
        raise ValueError(f"attncc.distributed: the layout is for {lay.world} ranks, the group has {world}")
    if lay.local_len(rank) != n_local:
        raise ValueError(f"attncc.distributed: rank {rank} holds {n_local} rows, its chunks in the layout "
                         f"have {lay.local_len(rank)}")
    return lay


def resolve_comm(comm_mode: str, *, target, heads_q: int, heads_kv: int, world: int) -> str:
    """``comm_mode`` checked, or the one "auto" picks."""
    if comm_mode not in COMMS + ("auto",):
        raise ValueError(f"attncc.distributed: comm must be one of {', '.join(COMMS)}, auto; got {comm_mode!r}")
    why_not = ulysses_problem(target, heads_q, heads_kv, world)
    if comm_mode == "auto":
        # Ulysses moves q, k, v and o ((W - 1) / W of each rank's rows), the all-gather K and V
        # (all of them, W - 1 times): Ulysses sends fewer bytes when group + 1 <= W (group = Hq / Hkv)
        # and balances any mask exactly; the ring can send less where the mask skips blocks.
        # Not measured yet (docs/context-parallel.md).
        return "ulysses" if why_not is None and heads_q // heads_kv + 1 <= world else "ring"
    if comm_mode == "ulysses" and why_not:
        raise ValueError(f"attncc.distributed: comm='ulysses' cannot shard {target.spec.name} by heads: {why_not}")
    return comm_mode


def ulysses_problem(target, heads_q: int, heads_kv: int, world: int) -> Optional[str]:
    """Why the heads cannot be sharded over ``world`` ranks (None: they can)."""
    spec, pattern = target.spec, target.pattern
    if heads_q % world or heads_kv % world:
        return f"{heads_q} query and {heads_kv} key/value heads do not divide by {world} ranks"
    if spec.heads_q is not None or spec.heads_kv is not None:
        return "the spec fixes its head counts"
    for d in spec.inputs:
        if "h" in d.dims:
            return f"input {d.name} is indexed by the head"
    from attncc.spec import symbols as S

    for expr in (pattern.mask, pattern.bias, pattern.mod):
        if expr is not None and expr.free_symbols & {S.h, S.n_heads}:
            return "the pattern reads the head index (h or n_heads)"
    return None


def gather(x: torch.Tensor, layout: Layout, group=None, dim: int = 2) -> torch.Tensor:
    """The full-sequence tensor on every rank from each rank's part ``x`` (an all-gather; not
    differentiable)."""
    rank, world = _rank_world(group)
    if world == 1:
        return x
    L = layout.max_local_len()
    mine = _comm.padded(x, L, dim)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    return unshard([p.narrow(dim, 0, layout.local_len(r)) for r, p in enumerate(parts)], layout, dim)


def _check_same_call(group, device, rows: Optional[int], fields: dict) -> None:
    """Every rank must make the same call: the same layout, shapes, dtypes, comm, scale, params,
    inputs' shapes and whether gradients follow; else the ranks exchange mismatched messages (a
    hang, or silently wrong rows: a rank receiving fewer rows than it expects gets no error from
    gloo). One all-gather of a few int64 per call compares them, and every rank raises on a
    difference, naming it. ``rows``: this rank's row count where a layout name is given, which
    means N / W rows on every rank (a rank cannot see that alone: 22 rows on one rank and 21 on
    the other would each look like a valid split); None for a Layout object."""
    mine = torch.tensor([-1 if rows is None else rows] + [_digest(v) for v in fields.values()],
                        dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    every = [t.tolist() for t in every]
    counts = [r[0] for r in every]
    if rows is not None and len(set(counts)) > 1:
        raise ValueError(f"attncc.distributed: a layout name needs the same rows on every rank, got {counts}; pass the "
                         f"Layout the tensors were sharded with (make_layout(name, n, world, ...))")
    differ = [name for i, name in enumerate(fields, 1) if len({r[i] for r in every}) > 1]
    if differ:
        raise ValueError(f"attncc.distributed: every rank must make the same call, but the ranks' {', '.join(differ)} "
                         f"differ (rank {dist.get_rank(group)} has {', '.join(f'{n}={fields[n]!r}' for n in differ)})")


def _digest(value) -> int:
    """A 63-bit digest of ``repr(value)``, the same in every process (``hash`` of a str is not)."""
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little") >> 1


def _rank_world(group):
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("attncc.distributed: a group was given but torch.distributed is not initialized")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _check_qkv(name: str, q, k, v) -> None:
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attncc.distributed: {arg} must be a 4-D tensor [B, H, local rows, D]")
    if not q.shape[2] == k.shape[2] == v.shape[2]:
        raise ValueError(f"attncc.distributed ({name}): q, k, v must hold the same rows of one sequence "
                         f"(self-attention); "
                         f"got {q.shape[2]}, {k.shape[2]}, {v.shape[2]} rows")


# The module's keywords that place or pack the rows: under context parallelism the layout does (every
# row at its position 0..N-1 of one sequence per batch row).
_POSITION_KEYWORDS = ("q_offset", "k_offset", "n_q", "n_k", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                      "max_seqlen_k")


def _refuse_position_keywords(spec, kwargs) -> None:
    """A TypeError for the module's position keywords (see _POSITION_KEYWORDS), whatever the layout and
    comm: they reached the chunk pairs' kernel calls as params (an error naming ``<spec>.attention``, which
    takes them), and the one-chunk and Ulysses paths' module call as themselves (taken there), so whether a
    call ran depended on the world size."""
    names = {p.name for p in spec.params} | {d.name for d in spec.inputs}
    given = [k for k in _POSITION_KEYWORDS if k in kwargs and k not in names]
    if given:
        raise TypeError(f"attncc.distributed.attention ({spec.name}): {', '.join(given)} not supported: the layout "
                        f"places every row at its position 0..N-1 of the sequence (for packed sequences, use a "
                        f"document mask)")


def _check_position_inputs(spec, inputs, n: int) -> None:
    for d in spec.inputs:
        t = inputs.get(d.name)
        if not isinstance(t, torch.Tensor):
            continue  # the kernel's checks name what is missing
        if t.dim() != len(d.dims):  # (the chunk classes read it before any kernel checks it)
            raise ValueError(f"attncc.distributed: input {d.name} must have {len(d.dims)} dims "
                             f"({', '.join(map(str, d.dims))}), got shape {tuple(t.shape)}")
        for axis, dim in enumerate(d.dims):
            if dim == "n" and t.dim() > axis and t.shape[axis] < n:
                raise ValueError(f"attncc.distributed: input {d.name} dim {axis} ('n') has {t.shape[axis]} entries; "
                                 f"inputs indexed by positions are passed whole on every rank (the sequence has {n} "
                                 f"positions), not sharded")
