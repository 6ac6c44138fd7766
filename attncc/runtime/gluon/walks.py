"""The pattern-specific fragments of the Gluon kernels: key-block walks, masks and score hooks.

Every kernel in this package takes them as `constexpr` arguments and inlines them, so a new pattern
is a new set of small `@gluon.jit` functions, never a new kernel. This file holds the built-in walks
(dense, causal); codegen renders the others from a Plan into `generated/<name>_gluon.py`
(attncc.codegen.gluon, docs/gluon.md "Rendered fragments").

Context. `ctx` is the tuple `(b, h, H, q_last) + pattern_args`: the tile's batch and query head, the
number of query heads, the call's last query position `q_offset + Nq - 1` (int32 scalars) and the
spec's params in the order the fragments file lists them (`PARAMS`), as the host passed them in the
kernel's `pattern_args` tuple. The built-in fragments ignore it (its default None lets older
callers leave it out), and the kernels then compute none of it.

Walk contract. `walk(q_lo, q_hi, Nk, k_offset, n_q, n_k, BLOCK_N, ctx)` receives the positions of
the first and last query row of a tile (`q_lo = q_offset + first row`, inclusive
`q_hi = q_lo + BLOCK_M - 1`, both int32 scalars; rows past `q_last` do not exist: an exact walk
takes `min(q_hi, q_last)`) and returns
`4 * SEGMENTS` key-block indices, `SEGMENTS` segments `(lo, full_lo, full_hi, hi)` in a flat
tuple (one segment: the four values alone). In each segment blocks `[lo, hi)` may hold allowed
pairs and blocks `[full_lo, full_hi)` are full (every pair allowed, every key `< Nk`); the rest of
`[lo, hi)` is evaluated with the mask. The non-empty segments are disjoint and in ascending order
(the load warp and the consumers walk them in that order, block after block). Key block `kb`
holds key positions `k_offset + kb*BLOCK_N + [0, BLOCK_N)`. The kernels clamp each segment to
`lo <= full_lo <= full_hi <= hi`, so a walk may be loose (a too-large full range would not be).

Block-list walks (patterns whose key blocks have no closed form, or depend on [inputs]). The walk
returns positions, not key blocks: one segment `(0, n_partial, n_partial + n_full, same)` of the
tile's list row (the host passes the lists of attncc.runtime.blocks in `pattern_args`, made for the
kernel's BLOCK_M x BLOCK_N tiles), and `block(t, qb, segs, ctx)` (the kernels' `BLOCK`) gives the key
block at position t of query block qb: the partial list's entry t, then the full list's entry
t - n_partial. The kernels load, mask and score `block(t, ...)` where a closed-form walk (`BLOCK`
None) uses t itself; positions past the walk (a ring's look-ahead) must still give a block index.

Key-block walk contract (the backward's dK/dV kernel, one program per key block).
`qwalk(k_lo, k_hi, Nq, q_offset, n_q, n_k, BLOCK_M, ctx)` is the walk of the transposed tile: it
receives the position of the key block's first key (`k_lo = k_offset + kb*BLOCK_N`) and of its last
existing key (inclusive `k_hi`, already clamped to the Nk keys by the kernel) and returns
`4 * QSEGMENTS` query-block indices, `QSEGMENTS` segments `(lo, full_lo, full_hi, hi)` as the walk's:
blocks `[lo, hi)` may hold allowed pairs with the block's keys, blocks `[full_lo, full_hi)` are full
(every row `< Nq`, every pair with an existing key allowed), the rest of `[lo, hi)` are evaluated
with the mask; the non-empty segments disjoint and ascending. Query block `qb` holds row positions
`q_offset + qb*BLOCK_M + [0, BLOCK_M)`. The kernel clamps each segment as above. Its `ctx` is that
of the first query head of the key block's GQA group: the steps walk every head of the group the
same way, so a qwalk may not depend on `h` (attncc.analysis.builtin keeps such Plans' backward on
`tl`).

Mask contract. `mask(i, j, n_q, n_k, ctx)` receives query positions `i` ([BLOCK_M, 1]) and key
positions `j` ([1, BLOCK_N]) in the slice layouts of the S accumulator and returns a boolean tensor
that broadcasts to [BLOCK_M, BLOCK_N]. The kernels add the key bound (`j < k_offset + Nk`)
themselves. The backward's dK/dV kernel holds its tiles transposed and passes the same mask `i`
[1, BLOCK_M] and `j` [BLOCK_N, 1] (and the step's query head in `ctx`), so a mask is an elementwise
expression of its arguments (built-in and rendered alike), and adds the row bound
(`i < q_offset + Nq`) where the query side is streamed.
`mask=None` means no mask beyond those bounds.

Score contract. `score(qk, i, j, n_q, n_k, qk_scale, ctx)` receives the S accumulator (fp32 Q K^T,
[BLOCK_M, BLOCK_N]; S^T in the dK/dV kernel, positions transposed as for the mask), the positions
as the mask does and `qk_scale = scale * log2(e)`, and returns the scores in log2 units (the
natural-log score times log2(e)); the kernels apply it to every block before the mask, and the
online softmax (the backward's P = exp2(score - lse2)) then takes them as they are. `score=None` is
the plain scaled dot product, whose scale the softmax folds into its exp2.

Score gradient contract (the backward). `score_grad(qk, s, i, j, n_q, n_k, qk_scale, ctx)` receives
the accumulator, the score hook's output `s` for it (log2 units, masked; the kernels use the factor
only where P > 0, so `s` is finite there) and the positions,
and returns d score / d (scale * qk + bias) in natural units: the factor the kernels multiply
dS = P (dP - delta) by before dQ += dS K and dK += dS^T Q (which they scale by `scale` once).
`score_grad=None`: the factor is 1 (no score hook, or a bias alone).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def dense_walk(q_lo, q_hi, Nk, k_offset, n_q, n_k, BLOCK_N: gl.constexpr, ctx=None):
    """Every key block; only the ragged last one is masked (by the key bound)."""
    hi = gl.cdiv(Nk, BLOCK_N)
    return 0, 0, Nk // BLOCK_N, hi


@gluon.jit
def causal_walk(q_lo, q_hi, Nk, k_offset, n_q, n_k, BLOCK_N: gl.constexpr, ctx=None):
    """Keys j <= i: blocks up to the one holding key q_hi; full while the block ends at or before q_lo.

    Block kb is needed when its first key k_offset + kb*BLOCK_N <= q_hi, full when its last key
    k_offset + kb*BLOCK_N + BLOCK_N - 1 <= q_lo (and it lies inside the Nk keys).
    """
    hi = gl.minimum(gl.cdiv(Nk, BLOCK_N), gl.maximum(0, q_hi + BLOCK_N - k_offset) // BLOCK_N)
    full_hi = gl.minimum(Nk // BLOCK_N, gl.maximum(0, q_lo + 1 - k_offset) // BLOCK_N)
    return 0, 0, full_hi, hi


@gluon.jit
def causal_mask(i, j, n_q, n_k, ctx=None):
    return j <= i


@gluon.jit
def dense_qwalk(k_lo, k_hi, Nq, q_offset, n_q, n_k, BLOCK_M: gl.constexpr, ctx=None):
    """Every query block; only the ragged last one is masked (by the row bound)."""
    return 0, 0, Nq // BLOCK_M, gl.cdiv(Nq, BLOCK_M)


@gluon.jit
def causal_qwalk(k_lo, k_hi, Nq, q_offset, n_q, n_k, BLOCK_M: gl.constexpr, ctx=None):
    """Rows i >= j: blocks from the one holding row position k_lo; full from the first block whose
    first row is at or after k_hi, up to the last block lying inside the Nq rows.

    Block qb is needed when its last row q_offset + qb*BLOCK_M + BLOCK_M - 1 >= k_lo, full when its
    first row q_offset + qb*BLOCK_M >= k_hi (and every row is < Nq). A key block past every row gets
    lo >= hi (nothing to do; the clamp empties it).
    """
    lo = gl.maximum(0, k_lo - q_offset) // BLOCK_M
    full_lo = gl.cdiv(gl.maximum(0, k_hi - q_offset), BLOCK_M)
    return lo, full_lo, Nq // BLOCK_M, gl.cdiv(Nq, BLOCK_M)


# The (walk, mask) pairs of the built-in patterns (one segment, no score hook); codegen renders others.
PATTERNS = {
    "dense": (dense_walk, None),
    "causal": (causal_walk, causal_mask),
}

# The key-block walks of the same patterns, for the backward's dK/dV kernel (same mask).
QWALKS = {
    "dense": dense_qwalk,
    "causal": causal_qwalk,
}
