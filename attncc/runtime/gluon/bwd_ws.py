"""Backward attention for sm90 in Gluon, warp-specialized: bwd_fused.py's 5 GEMMs per tile pair with
FlashAttention-3's partitions (the forward's fwd_ws.py structure, applied to the backward).

One program per (key block of 128 keys, batch x kv head), as bwd_fused.py's, in four partitions:

- a producer warp (1 warp, WORKER_REGS registers) issues every TMA load: K and V of the block once,
  then the (Q, dO, lse2, delta) query steps of its walk (every query head of the GQA group) into a
  STAGES-deep ring with `full` / `empty` mbarriers per slot;
- a dQ writer warp (1 warp, WORKER_REGS) waits for each step's fp32 dQ partial in shared memory
  (`dq_staged`), adds it into the dQ accumulator by a TMA reduce-add (`common.tma_reduce_add`),
  waits until the TMA unit has read the tile and frees it (`dq_free`);
- two consumer warpgroups (the default partition and one worker, 4 warps and CONSUMER_REGS each)
  own 64 keys of the block each and run bwd_fused's step on them (`common.transposed_tile`: S^T,
  dP^T, P^T, dS^T, then dV += P^T dO), write their half of dS^T to shared memory (two buffers,
  by step parity), issue dK += dS^T Q on it, and, once the other warpgroup's half is there too
  (`ds_ready`), dQ_partial = dS K over the block's 128 keys for their half of the head dim, which
  they stage (fp32) for the writer.

So the ring refills, the TMA issue and the reduce's waits leave the consumers' instruction streams
(bwd_fused.py has them all in one stream, with CTA-wide barriers), and the registers the two 1-warp
workers do not need go to the consumers (setmaxnreg; the kernel is launched with maxnreg MAXNREG so
that 3 warpgroups fit the register file before the reallocation).

Barriers (one arrive per partition: Gluon syncs a partition's threads before its one arrive):

| barrier | count | arrived by | waited by |
|---|---|---|---|
| `kv_bar` | 1 (+ TMA bytes) | TMA | both consumers, once |
| `full[s]` | 1 (+ TMA bytes) | TMA | both consumers, phase = (t // STAGES) & 1 |
| `empty[s]` | 2 | each consumer once dV and dK of the step (the slot's last readers) completed | producer, phase ^ 1 |
| `ds_ready` | 2 | each consumer after storing its half of dS^T | both consumers before dQ = dS K, phase = t & 1 |
| `ds_free[t % 2]` | 2 | each consumer once its dQ wgmma of step t (the last reader of dS^T buffer t % 2, and of K) completed | both consumers before storing dS^T of step t + 2, phase = ((t // 2) & 1) ^ 1 (and, the last step's, before dK goes out through K's buffer) |
| `dq_staged` | 2 | each consumer after storing its half of the dQ partial | the dQ writer, phase = t & 1 |
| `dq_free` | 1 | the dQ writer after `tma.store_wait(0)` (the reduce has read the tile) | both consumers before storing the next partial, phase ^ 1 |

Each consumer waits for the other's dS^T half before its dQ and for the other's dQ of the step
before the last before overwriting its half, so `ds_ready` never runs two phases ahead of a waiter;
the writer and the producer are bounded by `dq_staged` / `dq_free` and the ring.

Registers (Triton 3.6, docs/gluon.md "bwd_ws.py"): a consumer holds dK and dV (64 keys x D fp32: 128
registers at D = 128) across the loop, S^T / P^T and dP^T (32 each) and lse2, delta (16 each) at the
step's peak, within 240. The shared-memory descriptors of wgmma operands that do not change from step
to step (K, V, K's columns for dQ: 24 of 64 bits at D = 128) were hoisted out of the loop by LLVM and
spilled (176-296 bytes of stack); the consumers take K and V through `opaque_zero`, an index the
compiler cannot see is 0, so that they are rebuilt in the loop from the buffer's address (a few
integer adds per step): 24 bytes of stack remain (loop-invariant scalars, one LDL per step). dS^T's
two buffers (t % 2) keep its descriptors in the loop the same way, and let a warpgroup store step
t + 1's half while the other's dQ of step t still reads; `DV_LAST` issues dV after dS^T is
computed (P^T's 16-bit copy not live beside P^T, dP^T and delta).

Every partition walks the same steps (the key block's query-block walk, `common.key_tile_walk`,
for each query head of the group), so the ring positions agree without communication.
tests/test_gluon_bwd.py's `ws_protocol` models these waits and arrives (keep it in step with the
kernel) and runs them under random interleavings: no deadlock, no parity aliasing, no buffer
overwritten while read.

Not deterministic in dQ (as bwd_fused.py): partials of every key block that sees a query block are
added into the same fp32 rows in an order the scheduler decides. Rows past Nq are clipped by the
reduce; keys past Nk have dS^T zeroed (KEY_BOUND, as bwd_fused.py).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from attncc.runtime.gluon.common import (issue_query_step, key_tile_walk, mma_layout, nth_block, pattern_context,
                                         tma_reduce_add, transposed_tile, walk_blocks)

CONSUMER_WARPS = gl.constexpr(4)
# setmaxnreg budgets (registers per thread) and the launch cap: 2 x 128 x 240 + 128 x 24 = 64512 and
# 3 x 128 x 168 = 64512, both within the 65536 of an SM.
CONSUMER_REGS = 240
WORKER_REGS = 24
MAXNREG = 168
DV_LAST = gl.constexpr(True)  # common.transposed_tile's: 24 bytes of stack at D = 128, 32 with False


@gluon.jit
def program_walk(H, GROUP, Nq, Nk, q_offset, k_offset, n_q, n_k, pattern_args, QWALK: gl.constexpr,
                 QSEGMENTS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEADS_FIRST: gl.constexpr):
    """The program's key block, batch and kv head (from the grid: [key blocks, B x kv heads], or with
    HEADS_FIRST [B x kv heads, key blocks], so that the SMs take key block 0 of every head first, the
    longest programs of a causal walk: launch.bwd_heads_first), and its walk: the clamped query-block
    segments of the key block (the first head's context: walks.py), their number of blocks and the
    program's steps (GROUP x blocks). Every partition computes the same."""
    if HEADS_FIRST:
        kb = gl.program_id(1)
        bhk = gl.program_id(0)
    else:
        kb = gl.program_id(0)
        bhk = gl.program_id(1)
    H_KV = H // GROUP
    b = bhk // H_KV
    hk = bhk % H_KV
    walk_ctx = pattern_context(b, hk * GROUP, H, q_offset + Nq - 1, pattern_args)
    segs = key_tile_walk(kb, k_offset, Nq, Nk, q_offset, n_q, n_k, walk_ctx, QWALK, QSEGMENTS, BLOCK_M, BLOCK_N)
    n_blocks = walk_blocks(segs, QSEGMENTS)
    return kb, b, hk, segs, n_blocks, GROUP * n_blocks


@gluon.jit
def opaque_zero(t):
    """0, as an inline-asm result the compiler cannot fold nor hoist out of the loop (not pure), t its
    loop-variant operand: indexing K's and V's one-entry buffers with it keeps their wgmma descriptors
    in the loop instead of 24 hoisted 64-bit values (module docstring)."""
    return gl.inline_asm_elementwise("mov.b32 $0, 0;", "=r,r", [t], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def step_of(t, hk, GROUP, segs, n_blocks, SEGMENTS: gl.constexpr):
    """Query head and query block of step t (t < GROUP * n_blocks, so n_blocks >= 1)."""
    return hk * GROUP + t // n_blocks, nth_block(segs, t % n_blocks, SEGMENTS)


@gluon.jit
def producer_partition(descs, k_desc, v_desc, smem, k_smem, v_smem, bars, H, GROUP, Nq, Nk, q_offset, k_offset,
                       n_q, n_k, pattern_args, QWALK: gl.constexpr, QSEGMENTS: gl.constexpr,
                       HEADS_FIRST: gl.constexpr):
    """K and V of the block (two 64-key boxes each, one per consumer), then every step's Q, dO, lse2,
    delta into the ring, a slot refilled once both consumers have freed it."""
    kv_bar, full, empty, ds_ready, ds_free, dq_staged, dq_free = bars
    BLOCK_M: gl.constexpr = descs[0].block_type.shape[2]
    KEYS: gl.constexpr = k_desc.block_type.shape[2]  # one consumer's keys
    STAGES: gl.constexpr = smem[0].shape[0]
    kb, b, hk, segs, n_blocks, total = program_walk(H, GROUP, Nq, Nk, q_offset, k_offset, n_q, n_k, pattern_args,
                                                    QWALK, QSEGMENTS, BLOCK_M, 2 * KEYS, HEADS_FIRST)
    mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
    for wg in gl.static_range(2):
        tma.async_copy_global_to_shared(k_desc, [b, hk, (2 * kb + wg) * KEYS, 0], kv_bar,
                                        k_smem.index(0).slice(wg * KEYS, KEYS, dim=2))
        tma.async_copy_global_to_shared(v_desc, [b, hk, (2 * kb + wg) * KEYS, 0], kv_bar,
                                        v_smem.index(0).slice(wg * KEYS, KEYS, dim=2))
    for t in range(0, total):
        # A fresh mbarrier counts as having completed the phase before 0: the first round passes.
        mbarrier.wait(empty.index(t % STAGES), ((t // STAGES) & 1) ^ 1)
        issue_query_step(descs, smem, full, b, hk, GROUP, segs, n_blocks, t, True, QSEGMENTS)


@gluon.jit
def dq_writer_partition(dq_acc_desc, dq_smem, bars, H, GROUP, Nq, Nk, q_offset, k_offset, n_q, n_k, pattern_args,
                        QWALK: gl.constexpr, QSEGMENTS: gl.constexpr, BLOCK_N: gl.constexpr,
                        HEADS_FIRST: gl.constexpr):
    """Each step's dQ partial, staged by both consumers, added into dq_acc[b, h, rows] by one TMA
    reduce-add; the tile is freed once the TMA unit has read it."""
    kv_bar, full, empty, ds_ready, ds_free, dq_staged, dq_free = bars
    BLOCK_M: gl.constexpr = dq_acc_desc.block_type.shape[2]
    kb, b, hk, segs, n_blocks, total = program_walk(H, GROUP, Nq, Nk, q_offset, k_offset, n_q, n_k, pattern_args,
                                                    QWALK, QSEGMENTS, BLOCK_M, BLOCK_N, HEADS_FIRST)
    for t in range(0, total):
        h, qb = step_of(t, hk, GROUP, segs, n_blocks, QSEGMENTS)
        mbarrier.wait(dq_staged, t & 1)
        tma_reduce_add(dq_acc_desc, [b, h, qb * BLOCK_M, 0], dq_smem)
        tma.store_wait(0)
        mbarrier.arrive(dq_free)


@gluon.jit
def consumer_partition(descs, smem, k_smem, v_smem, ds_smem, dq_smem, bars, dk_desc, dv_desc, H, GROUP, Nq, Nk,
                       q_offset, k_offset, n_q, n_k, qk_scale, sm_scale, pattern_args, QWALK: gl.constexpr,
                       MASK: gl.constexpr, SCORE: gl.constexpr, SCORE_GRAD: gl.constexpr, QSEGMENTS: gl.constexpr,
                       WG: gl.constexpr, HEADS_FIRST: gl.constexpr):
    """Consumer warpgroup WG: dK, dV of keys [64 WG, 64 WG + 64) of the block, and its half of the
    head dim of every step's dQ partial."""
    kv_bar, full, empty, ds_ready, ds_free, dq_staged, dq_free = bars
    q_smem = smem[0]
    dtype: gl.constexpr = q_smem.dtype
    STAGES: gl.constexpr = q_smem.shape[0]
    BLOCK_M: gl.constexpr = q_smem.shape[3]
    HEAD_DIM: gl.constexpr = q_smem.shape[4]
    KEYS: gl.constexpr = k_smem.shape[3] // 2  # this warpgroup's keys
    HALF: gl.constexpr = HEAD_DIM // 2  # this warpgroup's columns of the dQ partial
    acc_layout: gl.constexpr = mma_layout(CONSUMER_WARPS, HEAD_DIM)  # dK, dV: [KEYS, HEAD_DIM]
    dq_layout: gl.constexpr = mma_layout(CONSUMER_WARPS, HALF)  # its half of the dQ partial: [BLOCK_M, HALF]

    kb, b, hk, segs, n_blocks, total = program_walk(H, GROUP, Nq, Nk, q_offset, k_offset, n_q, n_k, pattern_args,
                                                    QWALK, QSEGMENTS, BLOCK_M, 2 * KEYS, HEADS_FIRST)
    dq_half = dq_smem.reshape([BLOCK_M, HEAD_DIM]).slice(WG * HALF, HALF, dim=1)
    dk = gl.zeros([KEYS, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([KEYS, HEAD_DIM], gl.float32, acc_layout)
    mbarrier.wait(kv_bar, 0)
    for t in range(0, total):
        slot = t % STAGES
        mbarrier.wait(full.index(slot), (t // STAGES) & 1)
        h, qb = step_of(t, hk, GROUP, segs, n_blocks, QSEGMENTS)
        z = opaque_zero(t)
        k_block = k_smem.index(z).reshape([2 * KEYS, HEAD_DIM])
        k = k_block.slice(WG * KEYS, KEYS, dim=0)
        v = v_smem.index(z).reshape([2 * KEYS, HEAD_DIM]).slice(WG * KEYS, KEYS, dim=0)
        # dQ_partial = dS K reads all of the block's keys: K of both warpgroups, this one's columns
        k_cols = k_block.slice(WG * HALF, HALF, dim=1)
        # (KEY_BOUND: dS^T 0 on the key rows past Nk, which dQ = dS K reads)
        dv_tok, pt_a, dst, q = transposed_tile(slot, h, qb, 2 * kb + WG, b, k, v, smem, segs, H, Nq, Nk, q_offset,
                                               k_offset, n_q, n_k, qk_scale, pattern_args, dv, MASK, SCORE,
                                               SCORE_GRAD, QSEGMENTS, True, DV_LAST, CONSUMER_WARPS)
        # dS^T in buffer t % 2, once both warpgroups' dQ wgmmas of step t - 2 have read it (a fresh
        # barrier passes)
        ds = ds_smem.index(t % 2)
        ds_half = ds.slice(WG * KEYS, KEYS, dim=0)  # this warpgroup's rows: [KEYS, BLOCK_M]
        mbarrier.wait(ds_free.index(t % 2), ((t // 2) & 1) ^ 1)
        ds_half.store(dst)
        fence_async_shared()
        mbarrier.arrive(ds_ready)  # (after the warpgroup's sync: all its rows are stored)
        dk_tok = warpgroup_mma(ds_half, q, dk, is_async=True)
        mbarrier.wait(ds_ready, t & 1)  # the other warpgroup's rows too
        dq_tok = warpgroup_mma(ds.permute((1, 0)), k_cols, gl.zeros([BLOCK_M, HALF], gl.float32, dq_layout),
                               use_acc=False, is_async=True)
        dv, dk, pt_a = warpgroup_mma_wait(1, deps=(dv_tok, dk_tok, pt_a))
        mbarrier.arrive(empty.index(slot))  # Q and dO read: the producer may refill the slot
        dq = warpgroup_mma_wait(0, deps=(dq_tok, ))
        mbarrier.arrive(ds_free.index(t % 2))
        # The writer's reduce of the previous partial has read the tile (a fresh barrier passes).
        mbarrier.wait(dq_free, (t & 1) ^ 1)
        dq_half.store(dq)
        fence_async_shared()
        mbarrier.arrive(dq_staged)

    # dK and dV go out through this warpgroup's K and V boxes, once the other warpgroup's last dQ
    # (which reads all of K) has completed.
    if total > 0:
        last = total - 1
        mbarrier.wait(ds_free.index(last % 2), (last // 2) & 1)
    k_smem.index(0).reshape([2 * KEYS, HEAD_DIM]).slice(WG * KEYS, KEYS, dim=0).store((dk * sm_scale).to(dtype))
    v_smem.index(0).reshape([2 * KEYS, HEAD_DIM]).slice(WG * KEYS, KEYS, dim=0).store(dv.to(dtype))
    fence_async_shared()
    key_row = (2 * kb + WG) * KEYS
    tma.async_copy_shared_to_global(dk_desc, [b, hk, key_row, 0], k_smem.index(0).slice(WG * KEYS, KEYS, dim=2))
    tma.async_copy_shared_to_global(dv_desc, [b, hk, key_row, 0], v_smem.index(0).slice(WG * KEYS, KEYS, dim=2))
    tma.store_wait(0)


@gluon.jit
def attn_bwd_ws(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, dq_acc_desc, lse_desc, delta_desc,
                H, GROUP, Nq, Nk, q_offset, k_offset, n_q, n_k, qk_scale, sm_scale, pattern_args,
                QWALK: gl.constexpr, MASK: gl.constexpr, SCORE: gl.constexpr, SCORE_GRAD: gl.constexpr,
                QSEGMENTS: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                WORKER_REGS: gl.constexpr, HEADS_FIRST: gl.constexpr = False):
    """dK, dV of one key block of 2 x 64 keys of one (batch, kv head), summed over the GROUP query
    heads that share it, and its dQ partials added into dq_acc (fp32 [B, Hq, Nq, D], zeroed by the
    host). Launch with num_warps=4 (the default partition is consumer warpgroup 0) and maxnreg
    MAXNREG.

    Descriptors as bwd_fused.attn_bwd_fused's, except K, V, dK and dV: boxes of one consumer's 64
    keys ([1, 1, 64, D]; the block's keys are two of them). The fragments (QWALK, QSEGMENTS, MASK,
    SCORE, SCORE_GRAD, pattern_args) are the dK/dV kernel's. HEADS_FIRST: the grid is [B x kv heads,
    key blocks] (program_walk)."""
    dtype: gl.constexpr = q_desc.dtype
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
    KEYS: gl.constexpr = k_desc.block_type.shape[2]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
    gl.static_assert(KEYS == 16 * CONSUMER_WARPS, "each consumer warpgroup holds 64 keys")
    gl.static_assert(BLOCK_M == 64, "the dQ partial is one wgmma M of 64 rows, its columns split by warpgroup")

    # K and V of the block: [1, 1, 2 x 64, D], each consumer's 64 keys a box of k_desc / v_desc
    k_smem = gl.allocate_shared_memory(dtype, [1, 1, 1, 2 * KEYS, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [1, 1, 1, 2 * KEYS, HEAD_DIM], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES] + lse_desc.block_type.shape, lse_desc.layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES] + delta_desc.block_type.shape, delta_desc.layout)
    # dS^T of the step ([keys, rows]: the A operand of dK += dS^T Q, and through its transposed view
    # of dQ_partial = dS K) and the fp32 staging tile of the dQ partial's TMA reduce.
    ds_smem = gl.allocate_shared_memory(dtype, [2, 2 * KEYS, BLOCK_M], gl.NVMMASharedLayout.get_default_for(
        [2 * KEYS, BLOCK_M], dtype))
    dq_smem = gl.allocate_shared_memory(gl.float32, dq_acc_desc.block_type.shape, dq_acc_desc.layout)

    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ds_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    dq_staged = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    dq_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both consumers read every slot
    mbarrier.init(ds_ready, count=2)
    for i in gl.static_range(2):
        mbarrier.init(ds_free.index(i), count=2)
    mbarrier.init(dq_staged, count=2)
    mbarrier.init(dq_free, count=1)

    descs = (q_desc, do_desc, lse_desc, delta_desc)
    smem = (q_smem, do_smem, lse_smem, delta_smem)
    bars = (kv_bar, full, empty, ds_ready, ds_free, dq_staged, dq_free)
    # The tuples stay literals: an assignment would try to turn the rendered functions into tensors.
    gl.warp_specialize([
        (consumer_partition, (descs, smem, k_smem, v_smem, ds_smem, dq_smem, bars, dk_desc, dv_desc, H, GROUP, Nq,
                              Nk, q_offset, k_offset, n_q, n_k, qk_scale, sm_scale, pattern_args, QWALK, MASK, SCORE,
                              SCORE_GRAD, QSEGMENTS, 0, HEADS_FIRST)),
        (consumer_partition, (descs, smem, k_smem, v_smem, ds_smem, dq_smem, bars, dk_desc, dv_desc, H, GROUP, Nq,
                              Nk, q_offset, k_offset, n_q, n_k, qk_scale, sm_scale, pattern_args, QWALK, MASK, SCORE,
                              SCORE_GRAD, QSEGMENTS, 1, HEADS_FIRST)),
        (producer_partition, (descs, k_desc, v_desc, smem, k_smem, v_smem, bars, H, GROUP, Nq, Nk, q_offset,
                              k_offset, n_q, n_k, pattern_args, QWALK, QSEGMENTS, HEADS_FIRST)),
        (dq_writer_partition, (dq_acc_desc, dq_smem, bars, H, GROUP, Nq, Nk, q_offset, k_offset, n_q, n_k,
                               pattern_args, QWALK, QSEGMENTS, 2 * KEYS, HEADS_FIRST)),
    ], [CONSUMER_WARPS, 1, 1], [CONSUMER_REGS, WORKER_REGS, WORKER_REGS])
