"""Layouts and the per-tile math shared by the Gluon attention kernels (sm90, wgmma)."""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

LN2 = gl.constexpr(0.6931471805599453)


@gluon.constexpr_function
def mma_layout(num_warps, n):
    """wgmma accumulator layout of a [rows, n] fp32 tile: warps stacked along the rows (16 each), one
    instruction spanning all n columns (n <= 256), so one wgmma per 64 rows and k-step."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


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
    if SCORE is not None:
        s = SCORE(s, i, j, n_q, n_k, qk_scale, ctx)
    if MASKED:
        keep = j < k_offset + Nk
        if MASK is not None:
            keep = keep & MASK(i, j, n_q, n_k, ctx)
        s = gl.where(keep, s, float("-inf"))
    return s


@gluon.jit
def mask_scores(s, kb, rows_i, Nk, k_offset, n_q, n_k,
                MASK: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    """Scores of a partial key block: -inf outside the Nk keys and where the pattern's mask is false
    (a built-in mask: no context, no score hook)."""
    return block_scores(s, kb, rows_i, Nk, k_offset, n_q, n_k, None, 1.0, MASK, None, True, BLOCK_N, s_layout)


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
    """O = acc / l and the natural-log LSE; rows that saw no allowed key give O = 0, LSE = -inf."""
    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    o = acc / gl.expand_dims(gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout)), 1)
    lse = gl.where(l_i == 0.0, float("-inf"), (m_i + gl.log2(l_safe)) * LN2)
    return o, lse


@gluon.jit
def tile_walk(qb, q_offset, Nk, k_offset, n_q, n_k, ctx, WALK: gl.constexpr, SEGMENTS: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """The key-block segments of query block qb (walks.py's contract), each clamped: a flat tuple of
    SEGMENTS x (lo, full_lo, full_hi, hi)."""
    q_lo = q_offset + qb * BLOCK_M
    q_hi = q_lo + BLOCK_M - 1
    segs = WALK(q_lo, q_hi, Nk, k_offset, n_q, n_k, BLOCK_N, ctx)
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
