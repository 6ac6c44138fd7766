"""Layouts and the per-tile math shared by the Gluon attention kernels (sm90, wgmma)."""
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

LN2 = gl.constexpr(0.6931471805599453)


@gluon.constexpr_function
def mma_layout(num_warps, n):
    """wgmma accumulator layout of a [rows, n] fp32 tile: warps stacked along the rows (16 each), one
    instruction spanning all n columns (n <= 256), so one wgmma per 64 rows and k-step."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@gluon.constexpr_function
def mma_layout_split_n(num_warps, n):
    """wgmma accumulator layout of a [64, n] fp32 tile computed by num_warps // 4 warpgroups: each
    warpgroup takes the 64 rows and n / (num_warps // 4) of the columns (the fused backward's dQ
    partial of a 64-row query step, whose 8 warps would otherwise need 128 rows)."""
    groups = num_warps // 4
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, groups], instr_shape=[16, n // groups, 16])


@gluon.constexpr_function
def smem_layout(shape, dtype):
    """The default NVMMA shared layout of a tile (what the host gives a TMA descriptor of that box)."""
    return gl.NVMMASharedLayout.get_default_for(shape, dtype)


@gluon.constexpr_function
def lhs_layout(acc_layout):
    """Register layout of a 16-bit A operand feeding a wgmma whose accumulator is `acc_layout`.

    A [rows, BLOCK_N] accumulator of S = Q K^T holds, per thread, the same (row, column) pairs as this
    layout of P with P V's accumulator as parent: converting P is a register-only repack (FA3's
    "P from registers"), no shared-memory round trip."""
    return gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)


@gluon.jit
def pattern_context(b, h, H, q_last, pattern_args):
    """The `ctx` tuple the fragments receive (walks.py): batch, query head, query heads, the call's last
    query position, then the spec's params as the host passed them (H as a tensor: an int argument
    equal to 1 is a constexpr). Built-in fragments ignore it, and so the kernels compute none of it."""
    return (b, h, gl.to_tensor(H), q_last) + pattern_args


@gluon.jit
def block_scores(s, kb, rows_i, Nk, k_offset, n_q, n_k, ctx, qk_scale, MASK: gl.constexpr, SCORE: gl.constexpr,
                 MASKED: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    """S of key block kb as the online softmax takes it: through the pattern's SCORE hook (log2 units)
    when it has one, then, on a MASKED block, -inf outside the Nk keys and where the mask is false.
    Without a hook and on a full block this is S unchanged (the positions are not even computed)."""
    i = gl.expand_dims(rows_i, 1)
    j = gl.expand_dims(k_offset + kb * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout)), 0)
    s = scored(s, i, j, n_q, n_k, qk_scale, ctx, SCORE)
    if MASKED:
        s = masked(s, i, j, j < k_offset + Nk, n_q, n_k, ctx, MASK)
    return s


@gluon.jit
def scored(qk, i, j, n_q, n_k, qk_scale, ctx, SCORE: gl.constexpr):
    """The pattern's scores of a tile (log2 units) from its fp32 accumulator, or the accumulator as it
    is without a SCORE hook. i, j: the positions of its pairs in either orientation (the forward's
    and dQ's [M, 1] x [1, N], the dK/dV kernel's transposed [1, M] x [N, 1])."""
    if SCORE is not None:
        return SCORE(qk, i, j, n_q, n_k, qk_scale, ctx)
    else:
        return qk


@gluon.jit
def masked(s, i, j, inside, n_q, n_k, ctx, MASK: gl.constexpr):
    """s with -inf where a pair lies outside the call (`inside`: the bound of the streamed side, keys
    < k_offset + Nk or rows < q_offset + Nq) or the pattern's mask removes it; either orientation."""
    keep = inside
    if MASK is not None:
        keep = keep & MASK(i, j, n_q, n_k, ctx)
    return gl.where(keep, s, float("-inf"))


@gluon.jit
def score_chain(p, s, qk, i, j, n_q, n_k, qk_scale, ctx, SCORE_GRAD: gl.constexpr):
    """P times d score / d (scale * qk + bias) (the SCORE_GRAD fragment, from the accumulator qk and
    the scores s that P was computed from, log2 units, masked), so that P (dP - delta) is dS with
    respect to scale * qk + bias; P itself without one (the plain score, or a bias alone).

    Where P = 0 (a removed pair, s = -inf, or one that underflowed) dS is 0 whatever the factor,
    which is not looked at there (1 - inf would make 0 * inf); elsewhere s is finite. Computed as
    P is, element by element, so that no second score tile stays alive (a softcap's derivative is a
    function of its output); only a fragment that reads qk keeps the accumulator."""
    if SCORE_GRAD is not None:
        return gl.where(p > 0.0, p * SCORE_GRAD(qk, s, i, j, n_q, n_k, qk_scale, ctx), 0.0)
    else:
        return p


@gluon.jit
def exp2_scale(qk_scale, SCORE: gl.constexpr):
    """The factor the online softmax applies to S inside exp2: qk_scale = scale * log2(e) for the plain
    score; 1 after a SCORE hook, whose scores are in log2 units already."""
    if SCORE is None:
        return qk_scale
    else:
        return 1.0


@gluon.jit
def softmax_update(s, m_i, l_i, qk_scale, p_layout: gl.constexpr, dtype: gl.constexpr):
    """One online-softmax step in the log2 domain (qk_scale = scale * log2(e) > 0 is folded into exp2).

    Returns the new running max and sum, P (in `p_layout`, ready to feed P V from registers) and the
    factor alpha that rescales what was accumulated under the old max. A row whose scores are all
    -inf so far keeps m = -inf; it uses 0 as its reference so no inf - inf appears (p = alpha = 0).
    """
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_ref, 1))
    alpha = gl.exp2(m_i - m_ref)
    l_i = l_i * alpha + gl.sum(p, 1)
    return m_new, l_i, gl.convert_layout(p.to(dtype), p_layout), alpha


@gluon.jit
def rescale(acc, alpha, o_layout: gl.constexpr):
    """acc * alpha per row; alpha comes in the row layout of S's accumulator (same rows per thread)."""
    return acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)


@gluon.jit
def finish_rows(acc, m_i, l_i, o_layout: gl.constexpr):
    """O = acc / l, the natural-log LSE and the LSE in log2 units as the key loop has it (m + log2(l):
    the backward's, exact where the natural LSE taken back to log2 units rounds twice more); rows that
    saw no allowed key give O = 0, both LSEs -inf."""
    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    o = acc / gl.expand_dims(gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout)), 1)
    lse2 = gl.where(l_i == 0.0, float("-inf"), m_i + gl.log2(l_safe))
    return o, lse2 * LN2, lse2


@gluon.jit
def tile_walk(qb, q_offset, Nk, k_offset, n_q, n_k, ctx, WALK: gl.constexpr, SEGMENTS: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """The key-block segments of query block qb (walks.py's contract), each clamped: a flat tuple of
    SEGMENTS x (lo, full_lo, full_hi, hi)."""
    q_lo = q_offset + qb * BLOCK_M
    q_hi = q_lo + BLOCK_M - 1
    return clamp_segments(WALK(q_lo, q_hi, Nk, k_offset, n_q, n_k, BLOCK_N, ctx), SEGMENTS)


@gluon.jit
def key_tile_walk(kb, k_offset, Nq, Nk, q_offset, n_q, n_k, ctx, QWALK: gl.constexpr, SEGMENTS: gl.constexpr,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """The query-block segments of key block kb (the transposed walk, walks.py's qwalk contract: its
    last key clamped to the Nk keys), each clamped, as tile_walk gives a query block's."""
    k_lo = k_offset + kb * BLOCK_N
    k_hi = gl.minimum(k_lo + BLOCK_N, k_offset + Nk) - 1  # the block's last existing key
    return clamp_segments(QWALK(k_lo, k_hi, Nq, q_offset, n_q, n_k, BLOCK_M, ctx), SEGMENTS)


@gluon.jit
def clamp_segments(segs, SEGMENTS: gl.constexpr):
    """A walk's flat tuple of SEGMENTS x (lo, full_lo, full_hi, hi), each segment clamped (clamp_walk)."""
    out = ()
    for s in gl.static_range(SEGMENTS):
        out = out + clamp_walk(segs[4 * s], segs[4 * s + 1], segs[4 * s + 2], segs[4 * s + 3])
    return out


@gluon.jit
def walk_start(segs, SEGMENTS: gl.constexpr):
    """(first block, whether there is one) of a tile's clamped segments: the lowest `lo` of a non-empty
    segment (one segment: its `lo`, as the single-range kernels had it)."""
    first = segs[0]
    some = segs[3] > segs[0]
    for s in gl.static_range(1, SEGMENTS):
        lo = segs[4 * s]
        live = segs[4 * s + 3] > lo
        first = gl.where(live & (~some | (lo < first)), lo, first)
        some = some | live
    return first, some


@gluon.jit
def segment_start(lo, first, SEGMENTS: gl.constexpr):
    """Where the key loop starts in a segment whose first block may have gone to the prologue (the
    walk's `first` block): after it in its own segment; later segments start at their `lo`."""
    if SEGMENTS == 1:
        return lo + 1
    else:
        return gl.maximum(lo, first + 1)


@gluon.jit
def key_block(t, qb, segs, ctx, BLOCK: gl.constexpr):
    """The key block at position t of query block qb's walk: t itself for a closed-form walk, whose
    positions are key blocks; a block-list walk's BLOCK fragment reads it from the lists (walks.py)."""
    if BLOCK is None:
        return t
    else:
        return BLOCK(t, qb, segs, ctx)


@gluon.jit
def nth_block(segs, t, SEGMENTS: gl.constexpr):
    """The t-th block of a tile's walk (0 <= t < its number of blocks), counting through the
    segments in order: t past the blocks of the segments before its own, from that one's `lo`."""
    kb = t + segs[0]
    before = segs[3] - segs[0]
    for s in gl.static_range(1, SEGMENTS):
        kb = gl.where(t >= before, t - before + segs[4 * s], kb)
        before += segs[4 * s + 3] - segs[4 * s]
    return kb


@gluon.jit
def walk_blocks(segs, SEGMENTS: gl.constexpr):
    """How many blocks a tile's clamped segments hold."""
    count = segs[3] - segs[0]
    for s in gl.static_range(1, SEGMENTS):
        count += segs[4 * s + 3] - segs[4 * s]
    return count


@gluon.jit
def is_full(segs, kb, SEGMENTS: gl.constexpr):
    """Whether block kb is in a full range of one of the segments."""
    full = (segs[1] <= kb) & (kb < segs[2])
    for s in gl.static_range(1, SEGMENTS):
        full = full | ((segs[4 * s + 1] <= kb) & (kb < segs[4 * s + 2]))
    return full


@gluon.jit
def clamp_walk(lo, full_lo, full_hi, hi):
    """Enforce lo <= full_lo <= full_hi <= hi whatever the rendered walk returned at the edges.

    Walks may return Python constants (a dense walk starts at 0): they become int32 scalars here."""
    lo = gl.to_tensor(lo)
    full_lo = gl.to_tensor(full_lo)
    full_hi = gl.to_tensor(full_hi)
    hi = gl.to_tensor(hi)
    hi = gl.maximum(hi, lo)
    full_lo = gl.minimum(gl.maximum(full_lo, lo), hi)
    full_hi = gl.minimum(gl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@gluon.jit
def issue_kv(k_desc, v_desc, k_smem, v_smem, bars, b, hk, kb, slot, pred):
    """TMA loads of key block kb of (batch b, KV head hk) into ring slot `slot` of K and V, both
    completing on that slot's mbarrier (expecting their bytes); nothing where `pred` is false."""
    bar = bars.index(slot)
    mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(k_desc, [b, hk, kb * k_desc.block_type.shape[2], 0], bar, k_smem.index(slot),
                                    pred=pred)
    tma.async_copy_global_to_shared(v_desc, [b, hk, kb * v_desc.block_type.shape[2], 0], bar, v_smem.index(slot),
                                    pred=pred)


@builtin
def tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """TMA reduce-add of shared-memory tile `src` into the box of `tensor_desc` at `coord`
    (`cp.reduce.async.bulk.tensor ... .add`: the TMA unit adds the tile into global memory, each
    element atomically; completion is waited for as a store's, `tma.store_wait`). Gluon 3.6's
    builder has the op (`create_async_tma_reduce`, ttng.async_tma_reduce) but `hopper.tma` does not
    wrap it; this is that wrapper, the twin of `tma.async_copy_shared_to_global`."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


# --------------------------------------------------------------------------------------------
# The backward's key-block programs (bwd.py's dK/dV kernel, bwd_fused.py's fused kernel): one
# program per key block, the query blocks of its walk streaming through a ring, tiles transposed.


@gluon.jit
def key_block_buffers(q_desc, k_desc, v_desc, do_desc, lse_desc, delta_desc, STAGES: gl.constexpr):
    """Shared memory and barriers of a key-block program: K and V of the block (one mbarrier), and a
    STAGES-deep ring of (Q, dO, lse2, delta) query steps (one mbarrier per slot), initialized."""
    dtype: gl.constexpr = q_desc.dtype
    k_smem = gl.allocate_shared_memory(dtype, k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, v_desc.block_type.shape, v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES] + lse_desc.block_type.shape, lse_desc.layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES] + delta_desc.block_type.shape, delta_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    return k_smem, v_smem, (q_smem, do_smem, lse_smem, delta_smem), kv_bar, bars


@gluon.jit
def issue_query_step(descs, smem, bars, b, hk, GROUP, segs, n_blocks, t, pred, SEGMENTS: gl.constexpr):
    """TMA loads of step t of a key-block program into ring slot t % STAGES: query head
    hk * GROUP + t // n_blocks, query block t % n_blocks of the walk's segments (Q, dO, lse2, delta)."""
    q_desc, do_desc, lse_desc, delta_desc = descs
    q_smem, do_smem, lse_smem, delta_smem = smem
    STAGES: gl.constexpr = q_smem.shape[0]
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
    n = gl.maximum(n_blocks, 1)  # no division by zero when the program has nothing to do (pred is false)
    h = hk * GROUP + t // n
    row = nth_block(segs, t % n, SEGMENTS) * BLOCK_M
    slot = t % STAGES
    bar = bars.index(slot)
    mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes + lse_desc.block_type.nbytes +
                    delta_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(q_desc, [b, h, row, 0], bar, q_smem.index(slot), pred=pred)
    tma.async_copy_global_to_shared(do_desc, [b, h, row, 0], bar, do_smem.index(slot), pred=pred)
    tma.async_copy_global_to_shared(lse_desc, [b, h, row], bar, lse_smem.index(slot), pred=pred)
    tma.async_copy_global_to_shared(delta_desc, [b, h, row], bar, delta_smem.index(slot), pred=pred)


@gluon.jit
def start_key_block(q_desc, k_desc, v_desc, do_desc, lse_desc, delta_desc, H, GROUP, Nq, Nk, q_offset, k_offset, n_q,
                    n_k, pattern_args, QWALK: gl.constexpr, QSEGMENTS: gl.constexpr, STAGES: gl.constexpr):
    """A key-block program up to its first step: its key block and (batch, kv head) from the grid, its
    shared memory and barriers (`key_block_buffers`), the clamped query-block segments of the key
    block (walks.py's key-block contract: QSEGMENTS segments), the TMA loads of its K and V and of
    the ring's first STAGES - 1 steps (GROUP x the walk's blocks), and the wait for K and V.

    The walk is the same for every query head of the group (walks.py): it takes the first head's
    context. Returns (prog, descs, smem, segs, n_blocks, total): prog = (kb, b, hk, k_smem, v_smem,
    kv_bar, bars), the program's block, coordinates and buffers (for `transposed_step` and
    `finish_key_block`); the ring's descriptors and buffers; the walk, its number of blocks and the
    program's number of steps."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
    kb = gl.program_id(0)  # causal-like walks: the first key blocks see the most query blocks and start first
    bhk = gl.program_id(1)
    H_KV = H // GROUP
    b = bhk // H_KV
    hk = bhk % H_KV
    k_smem, v_smem, smem, kv_bar, bars = key_block_buffers(q_desc, k_desc, v_desc, do_desc, lse_desc, delta_desc,
                                                           STAGES)
    descs = (q_desc, do_desc, lse_desc, delta_desc)

    walk_ctx = pattern_context(b, hk * GROUP, H, q_offset + Nq - 1, pattern_args)
    segs = key_tile_walk(kb, k_offset, Nq, Nk, q_offset, n_q, n_k, walk_ctx, QWALK, QSEGMENTS, BLOCK_M, BLOCK_N)
    n_blocks = walk_blocks(segs, QSEGMENTS)
    total = GROUP * n_blocks  # steps: every query block of the walk, for each head of the group

    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [b, hk, kb * BLOCK_N, 0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [b, hk, kb * BLOCK_N, 0], kv_bar, v_smem)
    for i in gl.static_range(STAGES - 1):
        issue_query_step(descs, smem, bars, b, hk, GROUP, segs, n_blocks, i, i < total, QSEGMENTS)
    mbarrier.wait(kv_bar, 0)
    return (kb, b, hk, k_smem, v_smem, kv_bar, bars), descs, smem, segs, n_blocks, total


@gluon.jit
def next_query_step(t, descs, smem, bars, b, hk, GROUP, segs, n_blocks, total, SEGMENTS: gl.constexpr):
    """Step t's turn of the ring: refill the slot that held step t - 1 (after a CTA barrier: every
    warp has finished its wgmmas and loads on it) with step t + STAGES - 1, wait for step t's slot.
    Returns (slot, h, qb): the slot and the step's query head and block."""
    STAGES: gl.constexpr = smem[0].shape[0]
    gl.thread_barrier()
    ahead = t + STAGES - 1
    issue_query_step(descs, smem, bars, b, hk, GROUP, segs, n_blocks, ahead, ahead < total, SEGMENTS)
    slot = t % STAGES
    mbarrier.wait(bars.index(slot), (t // STAGES) & 1)
    return slot, hk * GROUP + t // n_blocks, nth_block(segs, t % n_blocks, SEGMENTS)


@gluon.jit
def transposed_step(t, prog, descs, smem, segs, n_blocks, total, H, GROUP, Nq, Nk, q_offset, k_offset, n_q, n_k,
                    qk_scale, pattern_args, dv, MASK: gl.constexpr, SCORE: gl.constexpr, SCORE_GRAD: gl.constexpr,
                    QSEGMENTS: gl.constexpr, KEY_BOUND: gl.constexpr, num_warps: gl.constexpr):
    """Step t of a key-block program, up to dS^T (the caller issues dK += dS^T Q and waits).

    Refills the slot of step t - 1 (after a CTA barrier: every warp is done with it) with step
    t + STAGES - 1, waits for step t's slot, then computes its tile (`transposed_tile`).

    Returns (dv, pt_a, dst, q, h, qb): dV in flight and its register operand (for
    `warpgroup_mma_wait`'s deps), dS^T in q's dtype in the S^T layout, the step's Q tile (shared
    memory) and its query head and block."""
    kb, b, hk, k_smem, v_smem, kv_bar, bars = prog
    BLOCK_N: gl.constexpr = k_smem.shape[2]
    HEAD_DIM: gl.constexpr = k_smem.shape[3]
    slot, h, qb = next_query_step(t, descs, smem, bars, b, hk, GROUP, segs, n_blocks, total, QSEGMENTS)
    dv_tok, pt_a, dst, q = transposed_tile(slot, h, qb, kb, b, k_smem.reshape([BLOCK_N, HEAD_DIM]),
                                           v_smem.reshape([BLOCK_N, HEAD_DIM]), smem, segs, H, Nq, Nk, q_offset,
                                           k_offset, n_q, n_k, qk_scale, pattern_args, dv, MASK, SCORE, SCORE_GRAD,
                                           QSEGMENTS, KEY_BOUND, False, num_warps)
    return dv_tok, pt_a, dst, q, h, qb


@gluon.jit
def transposed_tile(slot, h, qb, kb, b, k, v, smem, segs, H, Nq, Nk, q_offset, k_offset, n_q, n_k, qk_scale,
                    pattern_args, dv, MASK: gl.constexpr, SCORE: gl.constexpr, SCORE_GRAD: gl.constexpr,
                    QSEGMENTS: gl.constexpr, KEY_BOUND: gl.constexpr, DV_LAST: gl.constexpr, num_warps: gl.constexpr):
    """The tile of one step of a key-block program whose ring slot `slot` (query head h, query block
    qb) has landed, up to dS^T: keys k, v ([BLOCK_N, D] shared memory, the keys of block kb of
    BLOCK_N keys: key positions k_offset + kb * BLOCK_N + r) against the slot's Q, dO, lse2, delta.

    With the tiles transposed (keys on the rows; the fragments take the positions transposed,
    walks.py, and the step's query head in their ctx): S^T = K Q^T and dP^T = V dO^T from shared
    memory, issued together; the scores through SCORE, masked on a partial block (row bound, MASK);
    P^T = exp2(S^T - lse2); dV += P^T dO issued with P^T from registers; dS^T = P^T SCORE_GRAD
    (dP^T - delta), with KEY_BOUND 0 on the key rows past Nk (their dK and dV are clipped by the TMA
    store, but the fused kernels' dQ = dS K reads them: there P^T is exp2 of a score of a zero K
    row, which a score hook growing with the key, or a row whose LSE is far below 0, overflows;
    times K's zero rows that is NaN). DV_LAST: dV issued after dS^T is computed (P^T's 16-bit copy not
    live beside P^T, dP^T and delta: 16 registers fewer at the peak; bwd_ws.py) instead of while
    dP^T completes. num_warps: the warps computing the tile (16 key rows each).

    Returns (dv, pt_a, dst, q): dV in flight and its register operand, dS^T in q's dtype in the S^T
    layout, the step's Q tile (shared memory)."""
    q_smem, do_smem, lse_smem, delta_smem = smem
    dtype: gl.constexpr = q_smem.dtype
    BLOCK_M: gl.constexpr = q_smem.shape[3]
    HEAD_DIM: gl.constexpr = q_smem.shape[4]
    BLOCK_N: gl.constexpr = k.shape[0]
    st_layout: gl.constexpr = mma_layout(num_warps, BLOCK_M)  # S^T, P^T, dP^T, dS^T: [BLOCK_N, BLOCK_M]
    acc_layout: gl.constexpr = mma_layout(num_warps, HEAD_DIM)  # dK, dV: [BLOCK_N, HEAD_DIM]
    a_layout: gl.constexpr = lhs_layout(acc_layout)  # P^T as the A operand of dV += P^T dO
    col_layout: gl.constexpr = gl.SliceLayout(0, st_layout)  # one value per query row (a column of S^T)

    ctx = pattern_context(b, h, H, q_offset + Nq - 1, pattern_args)
    q = q_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
    do = do_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
    # S^T and dP^T are independent: both on the tensor cores at once, P^T computed while dP^T runs.
    st_tok = warpgroup_mma(k, q.permute((1, 0)), gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout), use_acc=False,
                           is_async=True)
    dpt_tok = warpgroup_mma(v, do.permute((1, 0)), gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout),
                            use_acc=False, is_async=True)
    lse2 = lse_smem.index(slot).reshape([BLOCK_M]).load(col_layout)
    qkt = warpgroup_mma_wait(1, deps=(st_tok, ))
    # the positions of the transposed tile: query rows along its columns, keys along its rows
    i_pos = gl.expand_dims(q_offset + qb * BLOCK_M + gl.arange(0, BLOCK_M, col_layout), 0)  # [1, BLOCK_M]
    j_pos = gl.expand_dims(k_offset + kb * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(1, st_layout)), 1)  # [N, 1]
    st = scored(qkt, i_pos, j_pos, n_q, n_k, qk_scale, ctx, SCORE)
    if ~is_full(segs, qb, QSEGMENTS):
        st = masked(st, i_pos, j_pos, i_pos < q_offset + Nq, n_q, n_k, ctx, MASK)
    # lse2 = +inf on rows without an allowed key and 0 past Nq (masked there): p = 0, never NaN.
    pt = gl.exp2(st * exp2_scale(qk_scale, SCORE) - gl.expand_dims(lse2, 0))
    # dV takes P^T; dS^T takes it through the score's derivative (a softcap's; 1 without)
    if DV_LAST:
        dst = score_chain(pt, st, qkt, i_pos, j_pos, n_q, n_k, qk_scale, ctx, SCORE_GRAD)
        delta = delta_smem.index(slot).reshape([BLOCK_M]).load(col_layout)
        dpt = warpgroup_mma_wait(0, deps=(dpt_tok, ))
        dst = dst * (dpt - gl.expand_dims(delta, 0))
        pt_a = gl.convert_layout(pt.to(dtype), a_layout)
        dv_tok = warpgroup_mma(pt_a, do, dv, is_async=True)
    else:
        pt_a = gl.convert_layout(pt.to(dtype), a_layout)
        pt = score_chain(pt, st, qkt, i_pos, j_pos, n_q, n_k, qk_scale, ctx, SCORE_GRAD)
        dv_tok = warpgroup_mma(pt_a, do, dv, is_async=True)
        delta = delta_smem.index(slot).reshape([BLOCK_M]).load(col_layout)
        dpt = warpgroup_mma_wait(1, deps=(dpt_tok, ))
        dst = pt * (dpt - gl.expand_dims(delta, 0))
    if KEY_BOUND:
        dst = gl.where(j_pos < k_offset + Nk, dst, 0.0)
    return dv_tok, pt_a, dst.to(dtype), q


@gluon.jit
def finish_key_block(prog, dk, dv, dk_desc, dv_desc, sm_scale):
    """dK * sm_scale and dV of program `prog` (start_key_block's) out through K's and V's buffers by
    TMA (every wgmma on them has completed in every warp: the CTA barrier), then the barriers
    invalidated."""
    kb, b, hk, k_smem, v_smem, kv_bar, bars = prog
    dtype: gl.constexpr = dk_desc.dtype
    BLOCK_N: gl.constexpr = k_smem.shape[2]
    HEAD_DIM: gl.constexpr = k_smem.shape[3]
    STAGES: gl.constexpr = bars.shape[0]
    gl.thread_barrier()
    k_smem.reshape([BLOCK_N, HEAD_DIM]).store((dk * sm_scale).to(dtype))
    v_smem.reshape([BLOCK_N, HEAD_DIM]).store(dv.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dk_desc, [b, hk, kb * BLOCK_N, 0], k_smem)
    tma.async_copy_shared_to_global(dv_desc, [b, hk, kb * BLOCK_N, 0], v_smem)
    tma.store_wait(0)
    mbarrier.invalidate(kv_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
