"""Forward attention for sm90 in Gluon, the plain version: one instruction stream, no warp specialization.

Every warp runs the same program (FlashAttention-2's structure on Hopper instructions): Q is loaded
once by TMA; K and V blocks stream through a STAGES-deep shared-memory ring filled by TMA
(`STAGES - 1` blocks ahead, completion on one mbarrier per slot); S = Q K^T and O += P V are wgmma
with register accumulators, P fed from registers. BLOCK_M = 16 * num_warps rows (64 per
warpgroup). It is the A side of the A/B against `fwd_ws.py` and the fallback if warp
specialization misbehaves; it is not expected to beat the `tl` kernels by much (docs/gluon.md).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma

from attncc.runtime.gluon.common import (block_scores, exp2_scale, finish_rows, is_full, issue_kv, key_block,
                                         lhs_layout, mma_layout, nth_block, pattern_context, rescale, softmax_update, tile_walk,
                                         walk_blocks)


@gluon.jit
def attn_fwd_pipelined(q_desc, k_desc, v_desc, o_desc, lse_ptr, lse_raw_ptr, lse_stride: gl.int64,
                       H, GROUP, Nq, Nk, q_offset, k_offset, n_q, n_k, qk_scale, pattern_args,
                       WALK: gl.constexpr, MASK: gl.constexpr, SCORE: gl.constexpr, SEGMENTS: gl.constexpr,
                       RETURN_LSE: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
                       BLOCK: gl.constexpr = None, STORE_RAW: gl.constexpr = False):
    """One program per (query block, batch x head); descriptors are 4-d over [B, H, N, D] tensors, so
    batch and head offsets are TMA coordinates (no int32 address arithmetic) and rows past N read as
    zeros and are never written. LSE row (b, h) starts at lse_ptr + (b * H + h) * lse_stride (an
    int64: B * H * Nq may pass 2**31). WALK, MASK, SCORE, SEGMENTS and the `pattern_args` tuple: the
    pattern's fragments (walks.py), BLOCK a block-list walk's (fwd_ws.py); the key loop runs over the walk's blocks by their index in it, so
    that the ring is filled ahead across segment boundaries."""
    dtype: gl.constexpr = q_desc.dtype
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    s_layout: gl.constexpr = mma_layout(num_warps, BLOCK_N)
    o_layout: gl.constexpr = mma_layout(num_warps, HEAD_DIM)
    p_layout: gl.constexpr = lhs_layout(o_layout)
    gl.static_assert(BLOCK_M == 16 * num_warps, "BLOCK_M is 16 rows per warp")

    # Heaviest query blocks first: with causal-like walks the last rows see the most keys.
    qb = gl.num_programs(0) - 1 - gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP

    q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_bars.index(i), count=1)

    q_lo = q_offset + qb * BLOCK_M
    ctx = pattern_context(b, h, H, q_offset + Nq - 1, pattern_args)
    segs = tile_walk(qb, q_offset, Nk, k_offset, n_q, n_k, ctx, WALK, SEGMENTS, BLOCK_M, BLOCK_N)
    n_blocks = walk_blocks(segs, SEGMENTS)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [b, h, qb * BLOCK_M, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES - 1):
        issue_kv(k_desc, v_desc, k_smem, v_smem, kv_bars, b, hk,
                 key_block(nth_block(segs, i, SEGMENTS), qb, segs, ctx, BLOCK), i, i < n_blocks)

    rows_i = q_lo + gl.arange(0, BLOCK_M, gl.SliceLayout(1, s_layout))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    q = q_smem.reshape([BLOCK_M, HEAD_DIM])
    mbarrier.wait(q_bar, 0)

    for it in range(0, n_blocks):
        t_kb = nth_block(segs, it, SEGMENTS)  # the walk position (a key block, or a block list's entry)
        kb = key_block(t_kb, qb, segs, ctx, BLOCK)
        # Refill the slot that held the previous block: every warp has finished its wgmmas on it.
        gl.thread_barrier()
        ahead = it + STAGES - 1
        issue_kv(k_desc, v_desc, k_smem, v_smem, kv_bars, b, hk,
                 key_block(nth_block(segs, ahead, SEGMENTS), qb, segs, ctx, BLOCK),
                  (it + STAGES - 1) % STAGES, ahead < n_blocks)
        slot = it % STAGES
        mbarrier.wait(kv_bars.index(slot), (it // STAGES) & 1)
        k = k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM])
        v = v_smem.index(slot).reshape([BLOCK_N, HEAD_DIM])
        s = warpgroup_mma(q, k.permute((1, 0)), s_zero, use_acc=False)
        s = block_scores(s, kb, rows_i, Nk, k_offset, n_q, n_k, ctx, qk_scale, MASK, SCORE, False, BLOCK_N, s_layout)
        if ~is_full(segs, t_kb, SEGMENTS):
            s = block_scores(s, kb, rows_i, Nk, k_offset, n_q, n_k, ctx, qk_scale, MASK, None, True, BLOCK_N,
                             s_layout)
        m_i, l_i, p, alpha = softmax_update(s, m_i, l_i, exp2_scale(qk_scale, SCORE), p_layout, dtype)
        acc = warpgroup_mma(p, v, rescale(acc, alpha, o_layout))

    o, lse, lse2 = finish_rows(acc, m_i, l_i, o_layout)
    if RETURN_LSE:
        rows = qb * BLOCK_M + gl.arange(0, BLOCK_M, gl.SliceLayout(1, s_layout))
        gl.store(lse_ptr + bh * lse_stride + rows, lse, mask=rows < Nq)
        if STORE_RAW:  # the backward's LSE (log2 units), at the same offsets
            gl.store(lse_raw_ptr + bh * lse_stride + rows, lse2, mask=rows < Nq)
    # Q's buffer is free (every wgmma on it has completed): stage O there for the TMA store.
    gl.thread_barrier()
    q.store(o.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [b, h, qb * BLOCK_M, 0], q_smem)
    tma.store_wait(0)
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(kv_bars.index(i))
