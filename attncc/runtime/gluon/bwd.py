"""Backward attention for sm90 in Gluon: dK/dV and dQ as two kernels, one instruction stream each.

Both take P from the forward's LSE (P = exp2(S * qk_scale - lse2), lse2 = LSE * log2(e), +inf on rows
without an allowed key) and delta = rowsum(dO * O) - dLSE, written by `preprocess.bwd_preprocess`:

- `attn_bwd_dkdv`: one program per (key block, batch x kv head). K and V stay in shared memory; the
  query blocks of the key block's walk, for every query head of the GQA group in turn, stream
  through a STAGES-deep TMA ring (Q, dO and the lse2 / delta rows of each block under one mbarrier).
  The tiles are held transposed (keys on the rows, 64 per warpgroup): S^T = K Q^T and dP^T = V dO^T
  are wgmma with both operands in shared memory, P^T and dS^T = P^T (dP^T - delta) feed
  dV += P^T dO and dK += dS^T Q from registers, as P feeds P V in the forward. dK and dV are fp32
  register accumulators over the whole group (no atomics, no partial sums), scaled and stored once
  by TMA through K's and V's buffers.
- `attn_bwd_dq`: one program per (query block, batch x query head), the forward's structure: Q and
  dO loaded once, K and V blocks of the forward's walk through the ring, S = Q K^T and dP = dO V^T
  from shared memory, dQ += dS K with dS from registers; dQ is stored through Q's buffer.

Why two kernels: every output element is written once by one program, deterministically (no
atomics), which makes this the default and the reproducible backward. The price is S and dP
computed twice (7 GEMMs per tile pair); bwd_fused.py is FlashAttention-3's single kernel (5 GEMMs,
dQ added into an fp32 buffer by TMA reduce-adds, not bitwise repeatable). docs/gluon.md has the
accounting. The dK/dV program's frame and step live in common.py, shared with the fused kernel.

Rows past Nq and keys past Nk read as zeros (TMA); what they produce stays in rows that are never
stored (dK/dV rows past Nk, dQ rows past Nq) or is masked: the walks make every block with such a
row or key a partial one, and partial blocks apply the row / key bound.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from attncc.runtime.gluon.common import (block_scores, exp2_scale, finish_key_block, is_full, issue_kv, lhs_layout,
                                         mma_layout, nth_block, pattern_context, score_chain, start_key_block, tile_walk,
                                         transposed_step, walk_blocks)


@gluon.jit
def attn_bwd_dkdv(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, lse_desc, delta_desc,
                  H, GROUP, Nq, Nk, q_offset, k_offset, n_q, n_k, qk_scale, sm_scale, pattern_args,
                  QWALK: gl.constexpr, MASK: gl.constexpr, SCORE: gl.constexpr, SCORE_GRAD: gl.constexpr,
                  QSEGMENTS: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """dK, dV of one key block of BLOCK_N = 16 * num_warps keys (64 per warpgroup) of one
    (batch, kv head), summed over the GROUP query heads that share it.

    Descriptors are 4-d over [B, H, N, D] (Q, dO: blocks of BLOCK_M rows; K, V, dK, dV: BLOCK_N
    rows) and 3-d over the [B, Hq, Nq] lse2 / delta rows (blocks of BLOCK_M; their row stride is
    padded to 16 bytes by the host): batch and head are TMA coordinates, no int32 address arithmetic.
    QWALK (QSEGMENTS segments of query blocks per key block), MASK, SCORE, SCORE_GRAD and the
    `pattern_args` tuple: the pattern's fragments (walks.py), applied to the transposed tiles.
    The step (common.transposed_step) and the program's frame are shared with bwd_fused.py's kernel.
    """
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    acc_layout: gl.constexpr = mma_layout(num_warps, HEAD_DIM)  # dK, dV: [BLOCK_N, HEAD_DIM]
    a_layout: gl.constexpr = lhs_layout(acc_layout)  # dS^T as the A operand of dK += dS^T Q
    gl.static_assert(BLOCK_N == 16 * num_warps, "BLOCK_N is 16 keys per warp")

    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, acc_layout)
    prog, descs, smem, segs, n_blocks, total = start_key_block(q_desc, k_desc, v_desc, do_desc, lse_desc, delta_desc,
                                                               H, GROUP, Nq, Nk, q_offset, k_offset, n_q, n_k,
                                                               pattern_args, QWALK, QSEGMENTS, STAGES)
    for t in range(0, total):
        dv_tok, pt_a, dst, q, h, qb = transposed_step(t, prog, descs, smem, segs, n_blocks, total, H, GROUP, Nq, Nk,
                                                      q_offset, k_offset, n_q, n_k, qk_scale, pattern_args, dv, MASK,
                                                      SCORE, SCORE_GRAD, QSEGMENTS, False, num_warps)
        dst_a = gl.convert_layout(dst, a_layout)
        dk_tok = warpgroup_mma(dst_a, q, dk, is_async=True)
        # Both must complete before the slot is refilled (next step) and before dV, dK are reused.
        dv, dk, pt_a, dst_a = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, pt_a, dst_a))

    finish_key_block(prog, dk, dv, dk_desc, dv_desc, sm_scale)


@gluon.jit
def attn_bwd_dq(q_desc, k_desc, v_desc, do_desc, dq_desc, lse2_ptr, delta_ptr, lse_stride: gl.int64,
                H, GROUP, Nq, Nk, q_offset, k_offset, n_q, n_k, qk_scale, sm_scale, pattern_args,
                WALK: gl.constexpr, MASK: gl.constexpr, SCORE: gl.constexpr, SCORE_GRAD: gl.constexpr,
                SEGMENTS: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """dQ of one query block of BLOCK_M = 16 * num_warps rows of one (batch, query head), over the
    key blocks of the forward's walk (WALK, SEGMENTS, MASK, SCORE as the forward takes them, and
    SCORE_GRAD). lse2 / delta row (b, h) starts at ptr + (b * H + h) * lse_stride (int64)."""
    dtype: gl.constexpr = q_desc.dtype
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    s_layout: gl.constexpr = mma_layout(num_warps, BLOCK_N)  # S, P, dP, dS: [BLOCK_M, BLOCK_N]
    acc_layout: gl.constexpr = mma_layout(num_warps, HEAD_DIM)  # dQ
    a_layout: gl.constexpr = lhs_layout(acc_layout)  # dS as the A operand of dQ += dS K
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    gl.static_assert(BLOCK_M == 16 * num_warps, "BLOCK_M is 16 rows per warp")

    qb = gl.num_programs(0) - 1 - gl.program_id(0)  # heaviest query blocks first, as in the forward
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP

    q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_bars.index(i), count=1)

    ctx = pattern_context(b, h, H, q_offset + Nq - 1, pattern_args)
    segs = tile_walk(qb, q_offset, Nk, k_offset, n_q, n_k, ctx, WALK, SEGMENTS, BLOCK_M, BLOCK_N)
    n_blocks = walk_blocks(segs, SEGMENTS)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [b, h, qb * BLOCK_M, 0], q_bar, q_smem)
    tma.async_copy_global_to_shared(do_desc, [b, h, qb * BLOCK_M, 0], q_bar, do_smem)
    for i in gl.static_range(STAGES - 1):
        issue_kv(k_desc, v_desc, k_smem, v_smem, kv_bars, b, hk, nth_block(segs, i, SEGMENTS), i, i < n_blocks)

    rows = qb * BLOCK_M + gl.arange(0, BLOCK_M, row_layout)
    # rows past Nq: lse2 = +inf (p = 0) and delta = 0; rows without an allowed key have lse2 = +inf too
    lse2 = gl.load(lse2_ptr + bh * lse_stride + rows, mask=rows < Nq, other=float("inf"))
    delta = gl.load(delta_ptr + bh * lse_stride + rows, mask=rows < Nq, other=0.0)
    rows_i = q_offset + rows
    dq = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, acc_layout)
    q = q_smem.reshape([BLOCK_M, HEAD_DIM])
    do = do_smem.reshape([BLOCK_M, HEAD_DIM])
    mbarrier.wait(q_bar, 0)

    for it in range(0, n_blocks):
        kb = nth_block(segs, it, SEGMENTS)
        # Refill the slot that held the previous block: every warp has finished its wgmmas on it.
        gl.thread_barrier()
        ahead = it + STAGES - 1
        issue_kv(k_desc, v_desc, k_smem, v_smem, kv_bars, b, hk, nth_block(segs, ahead, SEGMENTS),
                 (it + STAGES - 1) % STAGES, ahead < n_blocks)
        slot = it % STAGES
        mbarrier.wait(kv_bars.index(slot), (it // STAGES) & 1)
        k = k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM])
        v = v_smem.index(slot).reshape([BLOCK_N, HEAD_DIM])
        s_tok = warpgroup_mma(q, k.permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout),
                              use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(do, v.permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout),
                               use_acc=False, is_async=True)
        qk = warpgroup_mma_wait(1, deps=(s_tok, ))
        s = block_scores(qk, kb, rows_i, Nk, k_offset, n_q, n_k, ctx, qk_scale, MASK, SCORE, False, BLOCK_N, s_layout)
        if ~is_full(segs, kb, SEGMENTS):
            s = block_scores(s, kb, rows_i, Nk, k_offset, n_q, n_k, ctx, qk_scale, MASK, None, True, BLOCK_N, s_layout)
        p = gl.exp2(s * exp2_scale(qk_scale, SCORE) - gl.expand_dims(lse2, 1))
        if SCORE_GRAD is not None:  # dS with respect to scale * qk + bias: through the score's derivative
            j = gl.expand_dims(k_offset + kb * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout)), 0)
            p = score_chain(p, s, qk, gl.expand_dims(rows_i, 1), j, n_q, n_k, qk_scale, ctx, SCORE_GRAD)
        dp = warpgroup_mma_wait(0, deps=(dp_tok, ))
        ds = p * (dp - gl.expand_dims(delta, 1))
        dq = warpgroup_mma(gl.convert_layout(ds.to(dtype), a_layout), k, dq)

    # dQ goes out through Q's buffer: every wgmma on it has completed in every warp.
    gl.thread_barrier()
    q.store((dq * sm_scale).to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dq_desc, [b, h, qb * BLOCK_M, 0], q_smem)
    tma.store_wait(0)
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(kv_bars.index(i))
