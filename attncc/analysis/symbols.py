"""The symbols of the loop bounds: what a kernel knows about the query block it runs.

The steps of a closed-form walk (:mod:`attncc.analysis.walks`) are sympy expressions over these
and the pattern's own symbols (int params, ``n_q``, ``n_k``, ``h``, ``b``). Positions are
global: a query block holds the positions ``[q_lo, q_hi]`` (``q_hi`` its last existing row),
key block ``kb`` the positions ``[k_offset + kb*BLOCK_N, k_offset + kb*BLOCK_N + BLOCK_N - 1]``.
The dK/dV walk reads them transposed (its "query block" is a key block).
"""
import sympy

q_lo = sympy.Symbol("q_lo", integer=True, nonnegative=True)  # first query position of the block
q_hi = sympy.Symbol("q_hi", integer=True, nonnegative=True)  # last existing row: min(q_lo + BLOCK_M - 1, last row)
BLOCK_M = sympy.Symbol("BLOCK_M", integer=True, positive=True)  # query rows per block
BLOCK_N = sympy.Symbol("BLOCK_N", integer=True, positive=True)  # key rows per block
k_offset = sympy.Symbol("k_offset", integer=True, nonnegative=True)  # position of key row 0
N_K = sympy.Symbol("N_K", integer=True, nonnegative=True)  # key rows of this call (k.shape[-2])

BOUND_SYMBOLS = {s.name: s for s in (q_lo, q_hi, BLOCK_M, BLOCK_N, k_offset, N_K)}
