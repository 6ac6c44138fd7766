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

Mask contract. `mask(i, j, n_q, n_k, ctx)` receives query positions `i` ([BLOCK_M, 1]) and key
positions `j` ([1, BLOCK_N]) in the slice layouts of the S accumulator and returns a boolean tensor
that broadcasts to [BLOCK_M, BLOCK_N]. The kernels add the key bound (`j < k_offset + Nk`)
themselves. `mask=None` means no mask beyond that bound.

Score contract. `score(qk, i, j, n_q, n_k, qk_scale, ctx)` receives the S accumulator (fp32 Q K^T,
[BLOCK_M, BLOCK_N]), the positions as the mask does and `qk_scale = scale * log2(e)`, and returns
the scores in log2 units (the natural-log score times log2(e)); the kernels apply it to every
block before the mask, and the online softmax then takes them as they are. `score=None` is the
plain scaled dot product, whose scale the softmax folds into its exp2.
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


# The (walk, mask) pairs of the built-in patterns (one segment, no score hook); codegen renders others.
PATTERNS = {
    "dense": (dense_walk, None),
    "causal": (causal_walk, causal_mask),
}
