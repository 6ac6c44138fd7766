"""``attncc.distributed.attention``: context-parallel attention of a generated module.

    import attncc.distributed as cp
    lay = cp.make_layout("headtail", n, world)                  # or "contiguous", "balanced"
    q_local = cp.shard(q_full, lay, rank)                       # [B, H, local rows, D]
    o_local = cp.attention(q_local, k_local, v_local, module=generated.causal, layout=lay)
    o_local.sum().backward()                                    # dq, dk, dv of the local rows

See docs/context-parallel.md.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from attncc.core.semantics import plain_number
from attncc.distributed import comm as _comm
from attncc.distributed.classes import chunk_classes, resolve, row_work
from attncc.distributed.layout import KINDS, Layout, balanced, contiguous, headtail, unshard
from attncc.distributed.pairs import PairCall
from attncc.runtime.autograd import watch
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
    of it (module, layout, shapes, dtypes, comm, scale, params, inputs' shapes and values, gradients)
    per call checks that and raises on every rank, naming what differs or the rank whose own checks
    failed (mismatched calls would exchange mismatched messages). Returns this rank's rows of ``o [B, Hq, local rows, Dv]``
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
    rank, world = _rank_world(group)
    rows = q.shape[2] if isinstance(layout, str) and isinstance(q, torch.Tensor) and q.dim() == 4 else None
    try:
        call = _prepare(q, k, v, module=module, pattern=pattern, layout=layout, comm=comm, return_lse=return_lse,
                        scale=scale, inputs_and_params=inputs_and_params, rank=rank, world=world)
    except Exception as e:
        if world == 1:
            raise
        # the other ranks would go on to wait for this one's messages: every rank hears of it
        _check_same_call(group, _comm.group_device(group, q), rows, None, e)
        raise
    if world > 1:
        _check_same_call(group, _comm.group_device(group, call.q), rows, call, None)
    target, lay, mode, (q, k, v) = call.target, call.layout, call.mode, (call.q, call.k, call.v)
    if lay.num_chunks == 1:  # one rank, one chunk: the plain kernel
        return target.module.attention(q, k, v, return_lse=return_lse, scale=scale, **inputs_and_params)
    if mode == "ulysses":
        hs = _comm.HeadShards(lay, group, rank, world)
        qh, kh, vh = (_comm.SeqToHeads.apply(t, hs) for t in (q, k, v))
        o, lse = target.module.attention(qh, kh, vh, return_lse=True, scale=scale, **inputs_and_params)
        # the module's backward checks its params and inputs against changes in place, on this rank
        # alone: every rank checks them first, before the all-to-all of the gradients
        watched = watch(call.kwargs.values())
        checked = functools.partial(_comm.agree_unchanged, watched, target.spec.name, call.kwargs, group, world)
        o = _comm.HeadsToSeq.apply(o, hs, checked)
        if not return_lse:
            return o
        return o, _comm.HeadsToSeq.apply(lse.unsqueeze(-1), hs, checked).squeeze(-1)
    sched = _comm.Schedule(call.pairs, lay, call.classes, group, rank, world)
    strategy = _comm.RING if mode == "ring" else _comm.ALLGATHER
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        o, lse = _comm.ContextParallelFunction.apply(sched, strategy, q, k, v)
    else:
        with torch.no_grad():
            o, lse = strategy.forward(sched, q, k, v)
    return (o, lse) if return_lse else o


@dataclass(frozen=True)
class _Prepared:
    """One rank's call, checked and resolved without communication (see :func:`_prepare`)."""

    target: object  # classes.Target
    q: torch.Tensor  # q, k, v as the kernels take them (autocast, k and v of batch 1 broadcast)
    k: torch.Tensor
    v: torch.Tensor
    layout: Layout
    mode: str  # "allgather", "ring" (also one rank with several chunks) or "ulysses"
    softmax_scale: object
    kwargs: dict  # params and inputs by keyword (scale_keyword's)
    params: dict
    inputs: dict
    pairs: PairCall
    classes: Optional[torch.Tensor]  # the chunk-pair classes (allgather, ring)
    fields: dict  # what every rank must agree on (_check_same_call), by name


def _prepare(q, k, v, *, module, pattern, layout, comm, return_lse, scale, inputs_and_params, rank, world) -> _Prepared:
    """Everything about one rank's call that can fail, before any rank communicates: the module, the
    arguments, the layout, the comm mode, the chunk classes and one validation of the kernels' arguments
    (the pairs' calls). An error raised later, on some ranks only (the ranks without rows make no
    kernel call), left the others waiting for their messages."""
    target = resolve(module, pattern)
    spec = target.spec
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
    _check_position_inputs(spec, inputs, layout.n if isinstance(layout, Layout) else n_local * world)
    lay = resolve_layout(layout, n_local=n_local, world=world, rank=rank, target=target, params=params,
                         inputs=inputs)
    pairs = PairCall(target, lay.n, softmax_scale, kwargs)
    # the checks of every kernel call (cached by signature), made once here: a rank without rows makes
    # none, and q without heads divided by zero in resolve_comm
    pairs.bind(q, k, v, 0, 0)
    # checked at every world size: a misspelt comm passed on one process and failed on several
    mode = resolve_comm(comm, target=target, heads_q=Hq, heads_kv=k.shape[1], world=world)
    # one rank with several chunks: the chunk pairs and their merge without communication (what
    # ``python -m bench cp`` times against the plain kernel)
    mode = "ring" if world == 1 else mode
    classes = None
    if lay.num_chunks > 1 and mode != "ulysses":
        classes = chunk_classes(target.pattern, lay.bounds, params=params, inputs=inputs, batch=B, heads=Hq)
    fields = {
        "module": (spec.name, spec.spec_hash),
        "layout": (lay.bounds, lay.owner, lay.world),
        "shapes (B, Hq, Hkv, D, Dv)": (B, Hq, k.shape[1], q.shape[-1], v.shape[-1]),
        "dtypes": (str(q.dtype), str(k.dtype), str(v.dtype)),
        # numbers as the kernels read them: a one-element tensor's repr names its device (cuda:0 on
        # rank 0, cuda:1 on rank 1), so equal calls looked different
        "comm": comm, "scale": plain_number(softmax_scale), "params": sorted((n, plain_number(x)) for n, x in params.items()),
        "inputs": sorted((n, tuple(t.shape), str(t.dtype)) if isinstance(t, torch.Tensor) else (n, repr(t))
                         for n, t in inputs.items()),
        "gradients": torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
        "return_lse": return_lse}
    return _Prepared(target, q, k, v, lay, mode, softmax_scale, kwargs, params, inputs, pairs, classes, fields)


# Other ring-attention libraries' layout names, and what they are here (the refusal says it).
_STRIPED = ": a striped layout (rank r holding rows r, r + W, ...) is a Layout of one-row chunks, Layout(tuple(range(n + 1)), tuple(c % world for c in range(n)), world)"
LAYOUT_ALIASES = {
    "zigzag": ': "headtail" is the zigzag layout (each rank a head chunk and its mirror tail chunk)',
    "zig-zag": ': "headtail" is the zigzag layout (each rank a head chunk and its mirror tail chunk)',
    "load_balanced": ': "balanced" balances the pattern\'s work (or "headtail", the zigzag layout)',
    "striped": _STRIPED, "stripe": _STRIPED,
}


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
        hint = LAYOUT_ALIASES.get(str(kind).lower(), "")
        raise ValueError(f"attncc.distributed: layout must be a Layout or one of {', '.join(KINDS)}, auto; "
                         f"got {kind!r}{hint}")
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


def _check_same_call(group, device, rows: Optional[int], call: Optional[_Prepared], error: Optional[BaseException]) -> None:
    """Every rank must make the same call: the same module, layout, shapes, dtypes, comm, scale,
    params, inputs (shapes, dtypes and values) and whether gradients follow; else the ranks exchange
    mismatched messages (a hang, or silently wrong rows: a rank receiving fewer rows than it expects
    gets no error from gloo; document ids that differ gave each rank its own mask). One all-gather of
    a few int64 per call compares them, and every rank raises on a difference, naming it. A rank whose
    own checks failed (``error``, ``call`` None) takes part too: it raises its error and the others say
    which rank it was (before, they went on to wait for its messages for ever). ``rows``: this rank's
    row count where a layout name is given, which means N / W rows on every rank (a rank cannot see
    that alone: 22 rows on one rank and 21 on the other would each look like a valid split); None
    for a Layout object."""
    fields = {} if call is None else call.fields
    mine = torch.tensor([int(error is not None), -1 if rows is None else rows]
                        + [_digest(fields[n]) if n in fields else 0 for n in SAME_CALL[:-1]] + [0], dtype=torch.int64)
    mine = mine.to(device)
    if call is not None and call.inputs:
        mine[-1] = _values_digest(call.inputs.values(), device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    every = [t.tolist() for t in every]
    counts = [r[1] for r in every]
    if rows is not None and len(set(counts)) > 1:
        raise ValueError(f"attncc.distributed: a layout name needs the same rows on every rank, got {counts}; pass the "
                         f"Layout the tensors were sharded with (make_layout(name, n, world, ...))")
    _comm.raise_for_failed([r[0] for r in every], error, "this call")
    differ = [name for i, name in enumerate(SAME_CALL, 2) if len({r[i] for r in every}) > 1]
    if differ:
        shown = ", ".join(f"{n}={fields[n]!r}" for n in differ if n in fields)
        raise ValueError(f"attncc.distributed: every rank must make the same call, but the ranks' {', '.join(differ)} "
                         f"differ" + (f" (rank {dist.get_rank(group)} has {shown})" if shown else "")
                         + ("; inputs are passed whole and the same on every rank" if "input values" in differ else ""))


# What _check_same_call compares (_Prepared.fields, and the inputs' values last)
SAME_CALL = ("module", "layout", "shapes (B, Hq, Hkv, D, Dv)", "dtypes", "comm", "scale", "params", "inputs",
             "gradients", "return_lse", "input values")


def _values_digest(tensors, device) -> torch.Tensor:
    """An int64 digest (0-d, on ``device``) of the values of ``tensors``, computed where each lives
    (no copy of the values to the host): each tensor's bits as integers times odd weights that depend
    on the position, summed with wraparound, so exact and the same in any order of the sums."""
    total = torch.zeros((), dtype=torch.int64, device=device)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            continue
        x = t.detach()
        if x.dtype == torch.bool:
            x = x.to(torch.uint8)
        elif x.is_floating_point():
            x = x.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[x.element_size()])
        x = x.reshape(-1).to(torch.int64)
        weights = torch.arange(x.numel(), dtype=torch.int64, device=x.device) * _MIX + (2 * i + 1)
        total = total * _MIX + (x * (weights * 2 + 1)).sum().to(device)
    return total


_MIX = 0x2545F4914F6CDD1D  # an odd 63-bit multiplier (spreads the positions' weights over the bits)


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
