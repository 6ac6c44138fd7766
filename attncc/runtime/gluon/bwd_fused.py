"""Backward attention for sm90 in Gluon with dQ fused into the dK/dV program: FlashAttention-3's
5 GEMMs per tile pair instead of bwd.py's 7.

`attn_bwd_fused` is bwd.py's dK/dV program (one per key block and batch x kv head, the query blocks
of the key block's walk for every head of the GQA group through a TMA ring, tiles transposed: the
frame and the step are `common.start_key_block`, `transposed_step` and `finish_key_block`) with one
more GEMM per step: dS^T goes to shared memory, where dK += dS^T Q reads it as its A operand and
dQ_partial = dS K through its transposed view (B = K; [BLOCK_M, D] fp32 split by columns between
the two warpgroups, at D = 128 in two column halves: `DQ_PIECES`), and the partial is added into an
fp32 dQ accumulator in global memory by a TMA reduce-add (`common.tma_reduce_add`:
`cp.reduce.async.bulk.tensor ... .add.f32`) through an fp32 staging tile. `preprocess.bwd_postprocess`
then writes dQ = dQ_acc * sm_scale in q's dtype.

**Not deterministic.** Every key-block program that sees a query block adds its partial into the same
rows; the order of those fp32 additions depends on scheduling, so dQ can differ in its last bits
from run to run (dK and dV are summed inside one program and are bitwise repeatable). bwd.py's two
kernels (the `split` backward, the default) are the deterministic path: every gradient element is
written once, by one program.

Why TMA reduce and not `gl.atomic_add` from registers: one bulk instruction per step, issued by one
thread, the additions done by the TMA unit at L2, asynchronously (the staging tile is reused one
step later, after `tma.store_wait`); atomics from the wgmma layout would be BLOCK_M x D / 256
`red.global.add` per thread per step (32 at D = 128), each a separate L2 transaction, in the
consumers' instruction stream. FlashAttention-3 does the same (a bulk reduce-add by a dedicated
warp, then a convert kernel).

The fragments are the dK/dV kernel's (the built-in walks' and a generated module's rendered ones:
the transposed walk's segments, qmask, score and score_grad, shared through `transposed_step`): a
query block's dQ gathers the partials of every key block whose transposed walk lists it, which the
qwalk contract makes every key block holding an allowed pair with it, so the fused kernel needs no
forward walk (the split dQ kernel's).

Rows past Nq: the TMA reduce clips at the accumulator's shape (rows past Nq are never added), and
their dS is zero anyway (P^T is masked by the row bound on partial blocks). Keys past Nk: K's rows
there are zeros, but dS^T's are not (P^T of a zero K row's score, which a score hook growing with
the key, a linear bias of j say, or a row whose LSE is far below 0 overflows in fp16 or fp32:
inf * 0 = NaN in dQ), so the step zeroes them (`transposed_step`'s KEY_BOUND).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, tma, warpgroup_mma, warpgroup_mma_wait

from attncc.runtime.gluon.common import (finish_key_block, mma_layout, mma_layout_split_n, smem_layout, start_key_block,
                                         tma_reduce_add, transposed_step)


@gluon.jit
def attn_bwd_fused(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, dq_acc_desc, lse_desc, delta_desc,
                   H, GROUP, Nq, Nk, q_offset, k_offset, n_q, n_k, qk_scale, sm_scale, pattern_args,
                   QWALK: gl.constexpr, MASK: gl.constexpr, SCORE: gl.constexpr, SCORE_GRAD: gl.constexpr,
                   QSEGMENTS: gl.constexpr, STAGES: gl.constexpr, DQ_PIECES: gl.constexpr, num_warps: gl.constexpr):
    """dK, dV of one key block of BLOCK_N = 16 * num_warps keys of one (batch, kv head), summed over
    the GROUP query heads that share it, and its dQ partials added into dq_acc (fp32 [B, Hq, Nq, D],
    zeroed by the host; blocks of BLOCK_M rows).

    Descriptors and the fragments (QWALK, QSEGMENTS, MASK, SCORE, SCORE_GRAD, pattern_args) as
    bwd.attn_bwd_dkdv's, plus dq_acc_desc (4-d, fp32, box [1, 1, BLOCK_M, D]). The dQ partial is
    dS = dS^T of the step transposed, the score's derivative (SCORE_GRAD) already in it.
    DQ_PIECES: 1, the dQ partial's wgmma in flight with dV's and dK's; 2 (or more), computed in that
    many column slices after them, for registers."""
    dtype: gl.constexpr = q_desc.dtype
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    acc_layout: gl.constexpr = mma_layout(num_warps, HEAD_DIM)  # dK, dV: [BLOCK_N, HEAD_DIM]
    PIECE: gl.constexpr = HEAD_DIM // DQ_PIECES
    dq_layout: gl.constexpr = mma_layout_split_n(num_warps, PIECE)  # a slice of the dQ partial: [BLOCK_M, PIECE]
    gl.static_assert(BLOCK_N == 16 * num_warps, "BLOCK_N is 16 keys per warp")
    gl.static_assert(BLOCK_M == 64, "the dQ partial is one wgmma M of 64 rows, its columns split by warpgroup")

    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, acc_layout)
    prog, descs, smem, segs, n_blocks, total = start_key_block(q_desc, k_desc, v_desc, do_desc, lse_desc, delta_desc,
                                                               H, GROUP, Nq, Nk, q_offset, k_offset, n_q, n_k,
                                                               pattern_args, QWALK, QSEGMENTS, STAGES)
    b = prog[1]
    k = prog[3].reshape([BLOCK_N, HEAD_DIM])
    # dS^T of the step ([keys, rows]: the A operand of dK += dS^T Q, and through its transposed view
    # of dQ_partial = dS K) and the fp32 staging tile of the dQ partial's TMA reduce.
    ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], smem_layout([BLOCK_N, BLOCK_M], dtype))
    dq_smem = gl.allocate_shared_memory(gl.float32, dq_acc_desc.block_type.shape, dq_acc_desc.layout)
    dq_tile = dq_smem.reshape([BLOCK_M, HEAD_DIM])

    for t in range(0, total):
        # (KEY_BOUND: dS^T 0 on the key rows past Nk, which dQ = dS K reads)
        dv_tok, pt_a, dst, q, h, qb = transposed_step(t, prog, descs, smem, segs, n_blocks, total, H, GROUP, Nq, Nk,
                                                      q_offset, k_offset, n_q, n_k, qk_scale, pattern_args, dv, MASK,
                                                      SCORE, SCORE_GRAD, QSEGMENTS, True, num_warps)
        # dS^T goes to shared memory (while dV runs), where both of its GEMMs read it: dK += dS^T Q and,
        # through the transposed view, dQ_partial = dS K. No register copy of it as an A operand stays
        # live next to dK, dV and the dQ partial (registers: docs/gluon.md). The previous step's dQ
        # wgmma, its last reader, completed before that step ended.
        ds_smem.store(dst)
        fence_async_shared()
        gl.thread_barrier()
        dk_tok = warpgroup_mma(ds_smem, q, dk, is_async=True)
        if DQ_PIECES == 1:
            # dQ_partial issued behind dV and dK, all three waited together.
            dq_tok = warpgroup_mma(ds_smem.permute((1, 0)), k, gl.zeros([BLOCK_M, PIECE], gl.float32, dq_layout),
                                   use_acc=False, is_async=True)
            dv, dk, dq, pt_a = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, dq_tok, pt_a))
            # The staging tile's previous reduce has read it (issued a whole step ago: no wait in practice).
            tma.store_wait(0)
            gl.thread_barrier()
            dq_tile.store(dq)
        else:
            # dQ_partial in DQ_PIECES column slices, one after the other once dV and dK are done: one
            # slice's accumulator live at a time (at D = 128 this halves the spills: docs/gluon.md).
            dv, dk, pt_a = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, pt_a))
            tma.store_wait(0)
            gl.thread_barrier()
            for piece in gl.static_range(DQ_PIECES):
                dq = warpgroup_mma(ds_smem.permute((1, 0)), k.slice(piece * PIECE, PIECE, dim=1),
                                   gl.zeros([BLOCK_M, PIECE], gl.float32, dq_layout), use_acc=False)
                dq_tile.slice(piece * PIECE, PIECE, dim=1).store(dq)
        fence_async_shared()
        gl.thread_barrier()
        tma_reduce_add(dq_acc_desc, [b, h, qb * BLOCK_M, 0], dq_smem)

    tma.store_wait(0)  # the last reduce has read the staging tile before the CTA may exit
    finish_key_block(prog, dk, dv, dk_desc, dv_desc, sm_scale)
