"""The pattern-specific fragments of the Gluon kernels: key-block walks and masks.

These are the pieces codegen will render from a Plan (after issue 17): every kernel in this package
takes them as `constexpr` arguments and inlines them, so a new pattern is a new pair of small
`@gluon.jit` functions, never a new kernel.

Walk contract. `walk(q_lo, q_hi, Nk, k_offset, n_q, n_k, BLOCK_N)` receives the positions of the
first and last query row of a tile (`q_lo = q_offset + first row`, inclusive `q_hi`, both int32
scalars) and returns four key-block indices `(lo, full_lo, full_hi, hi)`: blocks `[lo, hi)` may hold
allowed pairs, blocks `[full_lo, full_hi)` are full (every pair allowed, every key `< Nk`), the rest
of `[lo, hi)` are evaluated with the mask. Key block `kb` holds key positions
`k_offset + kb*BLOCK_N + [0, BLOCK_N)`. The kernels clamp the result to
`lo <= full_lo <= full_hi <= hi`, so a walk may be loose (a too-large full range would not be).

Key-block walk contract (the backward's dK/dV kernel, one program per key block).
`qwalk(k_lo, k_hi, Nq, q_offset, n_q, n_k, BLOCK_M)` receives the position of the key block's first
key (`k_lo = k_offset + kb*BLOCK_N`) and of its last existing key (inclusive `k_hi`, clamped to the
Nk keys) and returns four query-block indices `(lo, full_lo, full_hi, hi)`: blocks `[lo, hi)` may hold
allowed pairs with the block's keys, blocks `[full_lo, full_hi)` are full (every row `< Nq`, every pair
with an existing key allowed), the rest of `[lo, hi)` are evaluated with the mask. Query block `qb`
holds row positions `q_offset + qb*BLOCK_M + [0, BLOCK_M)`. The kernel clamps as above.

Mask contract. `mask(i, j, n_q, n_k)` receives query positions `i` ([BLOCK_M, 1]) and key positions
`j` ([1, BLOCK_N]) and returns a boolean tensor that broadcasts to [BLOCK_M, BLOCK_N]; the backward's
dK/dV kernel holds its tiles transposed and passes `i` [1, BLOCK_M] and `j` [BLOCK_N, 1], so a mask is
an elementwise expression of its arguments. The kernels add the key bound (`j < k_offset + Nk`; the
row bound `i < q_offset + Nq` where the query side is streamed) themselves. `mask=None` means no mask
beyond those bounds.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def dense_walk(q_lo, q_hi, Nk, k_offset, n_q, n_k, BLOCK_N: gl.constexpr):
    """Every key block; only the ragged last one is masked (by the key bound)."""
    hi = gl.cdiv(Nk, BLOCK_N)
    return 0, 0, Nk // BLOCK_N, hi


@gluon.jit
def causal_walk(q_lo, q_hi, Nk, k_offset, n_q, n_k, BLOCK_N: gl.constexpr):
    """Keys j <= i: blocks up to the one holding key q_hi; full while the block ends at or before q_lo.

    Block kb is needed when its first key k_offset + kb*BLOCK_N <= q_hi, full when its last key
    k_offset + kb*BLOCK_N + BLOCK_N - 1 <= q_lo (and it lies inside the Nk keys).
    """
    hi = gl.minimum(gl.cdiv(Nk, BLOCK_N), gl.maximum(0, q_hi + BLOCK_N - k_offset) // BLOCK_N)
    full_hi = gl.minimum(Nk // BLOCK_N, gl.maximum(0, q_lo + 1 - k_offset) // BLOCK_N)
    return 0, 0, full_hi, hi


@gluon.jit
def causal_mask(i, j, n_q, n_k):
    return j <= i


@gluon.jit
def dense_qwalk(k_lo, k_hi, Nq, q_offset, n_q, n_k, BLOCK_M: gl.constexpr):
    """Every query block; only the ragged last one is masked (by the row bound)."""
    return 0, 0, Nq // BLOCK_M, gl.cdiv(Nq, BLOCK_M)


@gluon.jit
def causal_qwalk(k_lo, k_hi, Nq, q_offset, n_q, n_k, BLOCK_M: gl.constexpr):
    """Rows i >= j: blocks from the one holding row position k_lo; full from the first block whose
    first row is at or after k_hi, up to the last block lying inside the Nq rows.

    Block qb is needed when its last row q_offset + qb*BLOCK_M + BLOCK_M - 1 >= k_lo, full when its
    first row q_offset + qb*BLOCK_M >= k_hi (and every row is < Nq). A key block past every row gets
    lo >= hi (nothing to do; the clamp empties it).
    """
    lo = gl.maximum(0, k_lo - q_offset) // BLOCK_M
    full_lo = gl.cdiv(gl.maximum(0, k_hi - q_offset), BLOCK_M)
    return lo, full_lo, Nq // BLOCK_M, gl.cdiv(Nq, BLOCK_M)


# The (walk, mask) pairs of the patterns this package ships; codegen will render others.
PATTERNS = {
    "dense": (dense_walk, None),
    "causal": (causal_walk, causal_mask),
}

# The key-block walks of the same patterns, for the backward's dK/dV kernel (same mask).
QWALKS = {
    "dense": dense_qwalk,
    "causal": causal_qwalk,
}
