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

Mask contract. `mask(i, j, n_q, n_k)` receives query positions `i` ([BLOCK_M, 1]) and key positions
`j` ([1, BLOCK_N]) and returns a boolean tensor that broadcasts to [BLOCK_M, BLOCK_N]. The kernels
add the key bound (`j < k_offset + Nk`) themselves. `mask=None` means no mask beyond that bound.
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


# The (walk, mask) pairs of the patterns this package ships; codegen will render others.
PATTERNS = {
    "dense": (dense_walk, None),
    "causal": (causal_walk, causal_mask),
}
