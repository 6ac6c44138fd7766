"""A torch emulation of the Gluon sm90 backward kernels' tile loops (attncc/runtime/gluon/bwd.py,
bwd_fused.py and bwd_ws.py), for the CPU: Gluon has no interpreter, so this is what checks their numerics before a
GPU does.

:class:`EmulatedKernel` stands in for ``attn_bwd_dkdv.run`` / ``attn_bwd_dq.run`` /
``attn_bwd_fused.run`` / ``attn_bwd_ws.run``: it receives
exactly what ``launch.attention_backward`` launches (TMA descriptors over the host's tensors, the
scalars, the constexpr fragments, the grid) and runs every program of the grid the way the kernel
does, step for step:

- TMA boxes read the descriptor's tensor at the kernel's coordinates, zeros outside its shape
  (what TMA does past N, and past Nq in the 16-byte padded lse2 / delta rows), and stores write
  only the part inside it;
- the fragments (built-in walks.py ones or a generated module's rendered ones: walk, qwalk, mask,
  score, score_grad) and the kernels' own per-tile functions of `common.py` (key_tile_walk,
  tile_walk, nth_block, is_full, scored, masked, block_scores, exp2_scale, score_chain) run as the
  Python functions they are, on torch (tests/gluon_host.py); full blocks go unmasked, partial ones
  get the row / key bound and the mask, as in the kernels, on the same (transposed in dK/dV) tiles;
- the dK/dV program's step t is query head hk * GROUP + t // n_blocks and the (t % n_blocks)-th
  block of its walk's segments;
- GEMMs take the 16-bit operands the kernel has (P^T, dS^T, dS rounded to q's dtype before their
  wgmma), accumulate in float32; P = exp2(S * qk_scale - lse2); dK and dQ scaled by sm_scale once;
- the fused kernel is the dK/dV program plus, per step, dQ_partial = dS K (dS^T as rounded for dK)
  added in float32 into its dq_acc descriptor's box by the TMA reduce (the part inside the shape),
  across the key-block programs of the grid, one after another (on a GPU their order varies: the
  sums are the same up to fp32 rounding); the host's ``tl`` postprocess then scales and converts;
- the ws kernel is the fused one's algorithm on the same 128-key block, its K, V, dK, dV boxes one
  consumer warpgroup's 64 keys each (two per block); its partitions, barriers and the split of the dQ
  partial by columns between the warpgroups are not emulated (the same sums, in another fp32 order).

It is a transcription, so it proves nothing about the Gluon code itself (the compiler checks its
structure, tests/test_gluon_compile.py; the GPU tests its results): it catches algorithm bugs
(walks that skip a block or call a partial block full, masks, the exp2 / log2 scaling, padding
conventions, the GQA reduction, the host's buffers and arguments) that a compiler cannot.
"""
from __future__ import annotations

import inspect
import math

import torch

from gluon_host import C, _t, as_python, ctx_of


def host(jit_fn):
    """A @gluon.jit fragment as the Python function it is, on torch tensors (tests/gluon_host.py)."""
    return as_python(jit_fn)


def tma_box(desc, coords):
    """(tensor, inside, box_part): the descriptor's tensor, the index of the part of the box at
    `coords` that lies inside its shape, and that part's index within the box; None when none does
    (TMA reads zeros there, and clips stores and reduces to it)."""
    t = torch.as_strided(desc.base, desc.shape, desc.strides)
    inside, part = [], []
    for c, n, size in zip(coords, desc.shape, desc.block_shape):
        lo, hi = max(c, 0), min(c + size, n)
        if hi <= lo:
            return None
        inside.append(slice(lo, hi))
        part.append(slice(lo - c, hi - c))
    return t, tuple(inside), tuple(part)


def tma_load(desc, coords):
    """The box of `desc` at `coords` as float32 (zeros outside the descriptor's shape)."""
    box = torch.zeros(list(desc.block_shape), dtype=torch.float32)
    clipped = tma_box(desc, coords)
    if clipped is not None:
        t, inside, part = clipped
        box[part] = t[inside].float()
    return box


def tma_store(desc, coords, value, add=False):
    """Write `value` (a box) at `coords`, only the part inside the descriptor's shape (TMA clips);
    with `add`, add it (float32) into what is there: the TMA reduce-add, clipped as a store is."""
    clipped = tma_box(desc, coords)
    if clipped is None:
        return
    t, inside, part = clipped
    value = value.reshape(list(desc.block_shape))[part].to(t.dtype)
    if add:
        t[inside] += value
    else:
        t[inside] = value


def mm(a, b):
    return a.float() @ b.float()


def rounded(x, dtype):
    """What the kernel feeds a wgmma from registers: x converted to the operand dtype."""
    return x.to(dtype).float()


def program_dkdv(a, kb, bhk, fused=False, boxes=1):
    """One program of attn_bwd_dkdv, or with `fused` of attn_bwd_fused, or with `fused` and 2 `boxes` of
    K, V, dK, dV per key block of attn_bwd_ws (`a`: its bound arguments)."""
    q_desc, k_desc = a["q_desc"], a["k_desc"]
    dtype = q_desc.base.dtype
    BLOCK_M, HEAD_DIM = q_desc.block_shape[2], q_desc.block_shape[3]
    box = k_desc.block_shape[2]
    assert box == 16 * a["num_warps"]  # (ws: one consumer warpgroup's keys, its default partition's warps)
    BLOCK_N = box * boxes
    H, GROUP, Nq, Nk = a["H"], a["GROUP"], a["Nq"], a["Nk"]
    q_offset, k_offset, n_q, n_k = a["q_offset"], a["k_offset"], a["n_q"], a["n_k"]
    qwalk, mask, score, score_grad = (host(a[n]) for n in ("QWALK", "MASK", "SCORE", "SCORE_GRAD"))
    SEGMENTS, args, qk_scale = a["QSEGMENTS"], a["pattern_args"], a["qk_scale"]
    H_KV = H // GROUP
    b, hk = bhk // H_KV, bhk % H_KV

    q_last = q_offset + Nq - 1
    segs = C.key_tile_walk(_t(kb), _t(k_offset), _t(Nq), _t(Nk), _t(q_offset), _t(n_q), _t(n_k),
                           ctx_of(b, hk * GROUP, H, q_last, args), qwalk, SEGMENTS, BLOCK_M, BLOCK_N)
    n_blocks = int(C.walk_blocks(segs, SEGMENTS))
    total = GROUP * n_blocks
    k, v = (torch.cat([tma_load(desc, [b, hk, kb * BLOCK_N + i * box, 0]).reshape(box, HEAD_DIM)
                       for i in range(boxes)]) for desc in (k_desc, a["v_desc"]))
    dk = torch.zeros(BLOCK_N, HEAD_DIM)
    dv = torch.zeros(BLOCK_N, HEAD_DIM)
    j_pos = (k_offset + kb * BLOCK_N + torch.arange(BLOCK_N))[:, None]
    for t in range(total):
        n = max(n_blocks, 1)
        h = hk * GROUP + t // n
        qb = int(C.nth_block(segs, _t(t % n), SEGMENTS))
        ctx = ctx_of(b, h, H, q_last, args)
        row = qb * BLOCK_M
        q = tma_load(q_desc, [b, h, row, 0]).reshape(BLOCK_M, HEAD_DIM)
        do = tma_load(a["do_desc"], [b, h, row, 0]).reshape(BLOCK_M, HEAD_DIM)
        lse2 = tma_load(a["lse_desc"], [b, h, row]).reshape(BLOCK_M)
        delta = tma_load(a["delta_desc"], [b, h, row]).reshape(BLOCK_M)
        qkt = mm(k, q.T)
        i_pos = (q_offset + qb * BLOCK_M + torch.arange(BLOCK_M))[None, :]
        st = C.scored(qkt, i_pos, j_pos, _t(n_q), _t(n_k), qk_scale, ctx, score)
        if not bool(C.is_full(segs, _t(qb), SEGMENTS)):
            st = C.masked(st, i_pos, j_pos, i_pos < q_offset + Nq, _t(n_q), _t(n_k), ctx, mask)
        pt = torch.exp2(st * C.exp2_scale(qk_scale, score) - lse2[None, :]).float()
        dv = dv + mm(rounded(pt, dtype), do)
        pt = C.score_chain(pt, st, qkt, i_pos, j_pos, _t(n_q), _t(n_k), qk_scale, ctx, score_grad).float()
        dpt = mm(v, do.T)
        dst = pt * (dpt - delta[None, :])
        if fused:  # KEY_BOUND: dQ = dS K reads dS^T's rows past Nk (K's zero rows)
            dst = torch.where(j_pos < k_offset + Nk, dst, 0.0)
        dst = rounded(dst, dtype)
        dk = dk + mm(dst, q)
        if fused:  # dQ_partial = dS K, both GEMMs reading the one rounded dS^T
            tma_store(a["dq_acc_desc"], [b, h, row, 0], mm(dst.T, k), add=True)
    for i in range(boxes):
        rows = slice(i * box, (i + 1) * box)
        tma_store(a["dk_desc"], [b, hk, kb * BLOCK_N + i * box, 0], rounded(dk[rows] * a["sm_scale"], dtype))
        tma_store(a["dv_desc"], [b, hk, kb * BLOCK_N + i * box, 0], rounded(dv[rows], dtype))
    return total


def program_dq(a, pid, bh, num_programs):
    """One program of attn_bwd_dq (`a`: its bound arguments)."""
    q_desc, k_desc = a["q_desc"], a["k_desc"]
    dtype = q_desc.base.dtype
    BLOCK_M, HEAD_DIM = q_desc.block_shape[2], q_desc.block_shape[3]
    BLOCK_N = k_desc.block_shape[2]
    assert BLOCK_M == 16 * a["num_warps"]
    H, GROUP, Nq, Nk = a["H"], a["GROUP"], a["Nq"], a["Nk"]
    q_offset, k_offset, n_q, n_k = a["q_offset"], a["k_offset"], a["n_q"], a["n_k"]
    walk, mask, score, score_grad = (host(a[n]) for n in ("WALK", "MASK", "SCORE", "SCORE_GRAD"))
    SEGMENTS, qk_scale = a["SEGMENTS"], a["qk_scale"]
    qb = num_programs - 1 - pid
    b, h = bh // H, bh % H
    hk = h // GROUP

    ctx = ctx_of(b, h, H, q_offset + Nq - 1, a["pattern_args"])
    segs = C.tile_walk(_t(qb), _t(q_offset), _t(Nk), _t(k_offset), _t(n_q), _t(n_k), ctx, walk, SEGMENTS, BLOCK_M,
                       BLOCK_N)
    n_blocks = int(C.walk_blocks(segs, SEGMENTS))
    q = tma_load(q_desc, [b, h, qb * BLOCK_M, 0]).reshape(BLOCK_M, HEAD_DIM)
    do = tma_load(a["do_desc"], [b, h, qb * BLOCK_M, 0]).reshape(BLOCK_M, HEAD_DIM)
    rows = qb * BLOCK_M + torch.arange(BLOCK_M)
    inside = rows < Nq
    row0 = bh * a["lse_stride"]
    lse2 = torch.where(inside, _read_rows(a["lse2_ptr"], row0, rows, inside), math.inf)
    delta = torch.where(inside, _read_rows(a["delta_ptr"], row0, rows, inside), 0.0)
    rows_i = q_offset + rows
    dq = torch.zeros(BLOCK_M, HEAD_DIM)
    for it in range(n_blocks):
        kb = int(C.nth_block(segs, _t(it), SEGMENTS))
        k = tma_load(k_desc, [b, hk, kb * BLOCK_N, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = tma_load(a["v_desc"], [b, hk, kb * BLOCK_N, 0]).reshape(BLOCK_N, HEAD_DIM)
        qk = mm(q, k.T)
        args = (_t(kb), rows_i, _t(Nk), _t(k_offset), _t(n_q), _t(n_k), ctx, qk_scale, mask)
        s = C.block_scores(qk, *args, score, False, BLOCK_N, None)
        if not bool(C.is_full(segs, _t(kb), SEGMENTS)):
            s = C.block_scores(s, *args, None, True, BLOCK_N, None)
        p = torch.exp2(s * C.exp2_scale(qk_scale, score) - lse2[:, None]).float()
        j = (k_offset + kb * BLOCK_N + torch.arange(BLOCK_N))[None, :]
        p = C.score_chain(p, s, qk, rows_i[:, None], j, _t(n_q), _t(n_k), qk_scale, ctx, score_grad).float()
        dp = mm(do, v.T)
        ds = p * (dp - delta[:, None])
        dq = dq + mm(rounded(ds, dtype), k)
    tma_store(a["dq_desc"], [b, h, qb * BLOCK_M, 0], rounded(dq * a["sm_scale"], dtype))
    return n_blocks


def _read_rows(ptr, row0, rows, inside):
    """gl.load(ptr + row0 + rows, mask=inside) on a pointer argument (a tensor or a view): the flat
    memory from the pointer on, as the kernel addresses it; 0 where masked."""
    flat = torch.as_strided(ptr, (ptr.untyped_storage().nbytes() // ptr.element_size() - ptr.storage_offset(),),
                            (1,), ptr.storage_offset())
    return torch.where(inside, flat[(row0 + torch.where(inside, rows, 0)).long()], 0.0)


class EmulatedKernel:
    """Stands in for a Gluon backward kernel's ``run``: records each launch and runs the grid's
    programs with :func:`program_dkdv` (the fused and ws kernels' too) / :func:`program_dq`."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []
        self.steps = []

    def __call__(self, *args, grid, warmup, **kwargs):
        self.launches.append((args, kwargs, grid))
        bound = inspect.signature(self.kernel.fn).bind(*args, **{k: v for k, v in kwargs.items()
                                                                  if k in self.kernel.arg_names})
        a = dict(bound.arguments)
        a["num_warps"] = kwargs["num_warps"]
        grid = tuple(grid) + (1,) * (3 - len(grid))
        name = self.kernel.fn.__name__
        for pid0 in range(grid[0]):
            for pid1 in range(grid[1]):
                if name in ("attn_bwd_dkdv", "attn_bwd_fused", "attn_bwd_ws"):
                    kb, bhk = (pid1, pid0) if a.get("HEADS_FIRST") else (pid0, pid1)  # bwd_ws.program_walk
                    self.steps.append(program_dkdv(a, kb, bhk, fused=name != "attn_bwd_dkdv",
                                                   boxes=2 if name == "attn_bwd_ws" else 1))
                else:
                    self.steps.append(program_dq(a, pid0, pid1, grid[0]))


def emulate_sm90(stubs: dict) -> None:
    """Make this CPU an sm90 GPU for the Gluon path: its device checks pass, the device is a stub
    H100 (132 SMs), and each Gluon kernel's ``run`` is its emulation (the forwards
    :class:`gluon_host.EmulatedForward`, the backwards :class:`EmulatedKernel`), put in ``stubs``
    by name ("ws", "pipelined", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_fused", "attn_bwd_ws") to read their
    launches. ``ATTNCC_BACKEND`` is the caller's."""
    import types

    from attncc.runtime import backend
    from attncc.runtime.gluon import bwd, bwd_fused, bwd_ws, fwd_pipelined, fwd_ws, launch
    from gluon_host import EmulatedForward

    backend.device_problem = lambda device: None
    backend.interpreting = lambda: False
    launch.check_devices = lambda q, k, v: None
    torch.cuda.get_device_properties = lambda device: types.SimpleNamespace(multi_processor_count=132,
                                                                            name="stub H100")
    for name, kernel in (("ws", fwd_ws.attn_fwd_ws), ("pipelined", fwd_pipelined.attn_fwd_pipelined)):
        stubs[name] = kernel.run = EmulatedForward(kernel, name)
    for kernel in (bwd.attn_bwd_dkdv, bwd.attn_bwd_dq, bwd_fused.attn_bwd_fused, bwd_ws.attn_bwd_ws):
        stubs[kernel.fn.__name__] = kernel.run = EmulatedKernel(kernel)
