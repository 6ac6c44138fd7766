"""The backward's preprocess (and the fused backward's postprocess) for the Gluon sm90 kernels, `tl`
kernels (they run under Triton's CPU interpreter, so CI executes them; tests/test_gluon_bwd.py).

It differs from a generated module's `_bwd_preprocess` in where it writes: the Gluon dK/dV kernel
reads the lse2 and delta rows by TMA, whose row strides must be multiples of 16 bytes, so row
(b, h) of both starts at `(b * H + h) * row_stride` with `row_stride` the host's padded length.
"""
import triton
import triton.language as tl


@triton.jit
def bwd_preprocess(O, DO, LSE, DLSE, LSE_RAW, DELTA, LSE2,
                   stride_ob, stride_oh, stride_om, stride_od,
                   stride_dob, stride_doh, stride_dom, stride_dod,
                   H, Nq, row_stride,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr, RAW_LSE: tl.constexpr):
    """delta = rowsum(dO * O) - dLSE (fp32; HAS_DLSE: the LSE has a gradient) and lse2 = LSE * log2(e)
    (RAW_LSE: LSE_RAW, the forward's own LSE in log2 units, taken as it is), +inf on rows without an
    allowed key (LSE = -inf), so that exp2(s - lse2) = 0 there, never NaN.

    O, DO [B, H, Nq, HEAD_DIM] (any strides); LSE, DLSE, LSE_RAW contiguous [B, H, Nq]; one program per
    (query block, batch x head). Offsets are int64: B * H * Nq * HEAD_DIM may pass 2**31."""
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, HEAD_DIM).to(tl.int64)
    inside = rows[:, None] < Nq
    o = tl.load(O + b * stride_ob + h * stride_oh + rows64[:, None] * stride_om + cols[None, :] * stride_od,
                mask=inside, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows64[:, None] * stride_dom + cols[None, :] * stride_dod,
                 mask=inside, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    in_rows = rows < Nq
    lse = tl.load(LSE + bh * Nq + rows64, mask=in_rows, other=float("-inf"))
    if HAS_DLSE:
        # dLSE_i / ds_ij = p_ij adds dLSE_i * p_ij to dS_ij = p_ij * (dP_ij - delta_i): one term of delta.
        # A row without an allowed key has no score to pass it to (its gradients stay 0).
        dlse = tl.load(DLSE + bh * Nq + rows64, mask=in_rows, other=0.0)
        delta = delta - tl.where(lse == float("-inf"), 0.0, dlse)
    if RAW_LSE:
        lse2 = tl.load(LSE_RAW + bh * Nq + rows64, mask=in_rows, other=float("-inf"))
    else:
        lse2 = lse * 1.4426950408889634
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse2)
    tl.store(DELTA + bh * row_stride + rows64, delta, mask=in_rows)
    tl.store(LSE2 + bh * row_stride + rows64, lse2, mask=in_rows)


@triton.jit
def bwd_postprocess(DQ_ACC, DQ, scale, n_elements, BLOCK: tl.constexpr):
    """The fused backward's last step: dQ = DQ_ACC * scale in DQ's dtype (DQ_ACC: the fp32
    accumulator the fused kernel's TMA reduce-adds filled; both contiguous, n_elements long).
    int64 offsets: B * Hq * Nq * D may pass 2**31."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_elements
    acc = tl.load(DQ_ACC + offs, mask=inside, other=0.0)
    tl.store(DQ + offs, (acc * scale).to(DQ.dtype.element_ty), mask=inside)
