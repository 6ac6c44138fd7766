"""Triton helper functions a kernel may call; each is rendered only when used."""
from __future__ import annotations

from attncc.core import semantics

FLOORDIV = '''@triton.jit
def _floordiv(a, b):
    """Python's a // b (Triton's // truncates toward zero)."""
    q = a // b
    return tl.where((a % b != 0) & ((a < 0) != (b < 0)), q - 1, q)'''

FLOORMOD = '''@triton.jit
def _floormod(a, b):
    """Python's a % b: the sign follows the divisor."""
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)'''

IPOW = '''@triton.jit
def _ipow(x, K: tl.constexpr):
    """x ** K of an integer x (K > 0 a constant): K exact products, as the reference's integer power."""
    out = x
    for _ in tl.static_range(K - 1):
        out = out * x
    return out'''

ROW_TERM_O = '''@triton.jit
def _row_term_o(o, l_i, row_bias):
    """o of rows whose every score also holds row_bias, the terms the key loop leaves to the LSE (a
    finite one cancels in the softmax): -inf removes every pair of its row (o = 0), +inf or NaN makes
    the row NaN, as the scores holding it would; a row without an allowed key stays o = 0."""
    finite = tl.abs(row_bias) < float("inf")  # False for NaN
    removed = tl.where(row_bias == float("-inf"), 0.0, float("nan"))
    return tl.where((finite | (l_i == 0.0))[:, None], o, removed[:, None])'''

SHIFT = '''@triton.jit
def _shift(x, n):
    """floor(x * 2**n): x << n, and x >> -n for a negative n (flooring, as Python's), in int64;
    the amount is clamped to [-63, 63] (attncc.spec.builtins.Shift)."""
    x = x.to(tl.int64)
    n = tl.minimum(tl.maximum(n, -63), 63).to(tl.int64)
    return tl.where(n >= 0, x << tl.maximum(n, 0), x >> tl.maximum(-n, 0))'''

# float64 versions for mask code (attncc.codegen.printer, float64 mode)
SQRT64 = '''# tl.sqrt of a float64 is not correctly rounded on NVIDIA GPUs; PTX's sqrt.rn.f64 is (the
# interpreter's numpy sqrt is too)
_SQRT64_PTX = tl.constexpr(not _rt.interpreting() and torch.version.hip is None)


@triton.jit
def _sqrt64(x):
    """sqrt of a float64, correctly rounded (as the reference's torch.sqrt)."""
    if _SQRT64_PTX:
        return tl.inline_asm_elementwise("sqrt.rn.f64 $0, $1;", "=d,d", [x], dtype=tl.float64, is_pure=True, pack=1)
    else:
        return tl.sqrt(x)'''

FLOORMOD64 = '''@triton.jit
def _floormod64(a, m):
    """Python's a % m of float64s (torch.remainder): fmod (Triton's %), then the sign of the divisor."""
    r = a % m
    return tl.where((r != 0.0) & ((r < 0.0) != (m < 0.0)), r + m, r)'''

FLOORDIV64 = '''@triton.jit
def _floordiv64(a, b):
    """Python's a // b of float64s (torch.div's "floor"): the floor of the exact quotient, from fmod
    (Triton's %), which is exact: floor(a / b) rounds the quotient first (1 // 0.1 is 9.0, not 10.0)."""
    m = a % b
    d = (a - m) / b  # an integer up to rounding: the truncated quotient
    d = tl.where((m != 0.0) & ((m < 0.0) != (b < 0.0)), d - 1.0, d)
    f = tl.floor(d)
    return tl.where(d - f > 0.5, f + 1.0, f)'''

TANH64 = '''@triton.jit
def _tanh64(x):
    """tanh of a float64: 1 - 2 / (e^(2x) + 1) saturates to +-1 without overflow."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)'''

ALIBI_SLOPE64 = '''@triton.jit
def _alibi_slope64(h, n_heads):
    """_alibi_slope in float64 (mask code)."""
    p = tl.exp2(tl.floor(tl.log2(n_heads.to(tl.float64))))
    hf = h.to(tl.float64)
    return tl.where(hf < p, tl.exp2(-8.0 * (hf + 1.0) / p), tl.exp2(-4.0 * (2.0 * (hf - p) + 1.0) / p))'''

TANH = '''@triton.jit
def _tanh(x, FAST_MATH: tl.constexpr):
    if FAST_MATH:
        # one MUFU instruction on NVIDIA GPUs (max relative error about 2^-11; 16-bit inputs only)
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        # tanh(x) = 1 - 2 / (2^(2x log2 e) + 1): saturates to +-1 without overflow
        return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)'''

def _sincos(fn: str) -> str:
    return f'''@triton.jit
def _{fn}(x, FAST_MATH: tl.constexpr):
    if FAST_MATH:
        # one MUFU instruction after reducing x to [-pi, pi] (max absolute error about 2^-20; 16-bit inputs only)
        x = x - 6.283185307179586 * tl.floor(x * 0.15915494309189535 + 0.5)
        return tl.inline_asm_elementwise("{fn}.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.{fn}(x)'''


ALIBI_SLOPE = '''@triton.jit
def _alibi_slope(h, n_heads):
    """ALiBi's slope of head h: 2^(-8(h+1)/P) for the first P (the largest power of two
    <= n_heads) heads, then the odd steps of the 2P-head sequence."""
    p = tl.exp2(tl.floor(tl.log2(n_heads.to(tl.float32))))
    hf = h.to(tl.float32)
    return tl.where(hf < p, tl.exp2(-8.0 * (hf + 1.0) / p), tl.exp2(-4.0 * (2.0 * (hf - p) + 1.0) / p))'''


def bucket_helper(num_buckets: int, max_distance: int, bidirectional: bool) -> str:
    """T5's bucket as integer comparisons against thresholds precomputed in float64."""
    max_exact, thresholds = semantics.bucket_thresholds(num_buckets, max_distance, bidirectional)
    name = f"_bucket_{num_buckets}_{max_distance}_{int(bidirectional)}"
    lines = ["@triton.jit", f"def {name}(d):",
             f'    """T5 bucket of d = j - i ({num_buckets} buckets, max distance {max_distance},'
             f' {"bidirectional" if bidirectional else "causal"})."""',
             "    n = -d"]
    if bidirectional:
        lines += [f"    offset = tl.where(n < 0, {num_buckets // 2}, 0)", "    n = tl.abs(n)"]
    else:
        lines += ["    offset = 0", "    n = tl.maximum(n, 0)"]
    steps = "".join(f" + (n >= {t}).to(tl.int32)" for t in thresholds)
    lines += [f"    # log-spaced buckets past {max_exact}: thresholds from attncc.runtime.semantics",
              f"    large = {max_exact}{steps}",
              f"    return offset + tl.where(n < {max_exact}, n, large)"]
    return "\n".join(lines)


def rope_helpers(style: str, theta: float) -> str:
    import math

    log2_theta = math.log2(theta)
    if style == "neox":
        partner = "tl.where(cols < ROTARY_DIM, tl.where(cols < ROTARY_DIM // 2, cols + ROTARY_DIM // 2, cols - ROTARY_DIM // 2), cols)"
        freq = "cols % (ROTARY_DIM // 2)"
        sign = "tl.where(cols < ROTARY_DIM // 2, -1.0, 1.0)"
        doc = "neox: column d pairs with d +- ROTARY_DIM/2"
    else:
        partner = "tl.where(cols < ROTARY_DIM, cols ^ 1, cols)"
        freq = "cols // 2"
        sign = "tl.where(cols % 2 == 0, -1.0, 1.0)"
        doc = "gptj: column d pairs with d ^ 1"
    return f'''ROPE_LOG2_THETA = tl.constexpr({log2_theta!r})


@triton.jit
def _rope_partner(cols, ROTARY_DIM: tl.constexpr):
    """The column each column rotates with ({doc})."""
    return {partner}


@triton.jit
def _rope(x, x_partner, pos, cols, ROTARY_DIM: tl.constexpr):
    """Rotate rows of x at positions pos by theta^(-2m/ROTARY_DIM) per column pair m.

    The angle pos * inv_freq is a float64 product (in float32 it is off by ~0.06 rad at position
    1e6), reduced to [-pi, pi] in float64 (2 pi in two parts, the first product exact in an fma);
    sin and cos of the reduced angle are float32."""
    inv_freq = tl.exp2(-(2.0 * ({freq}).to(tl.float64) / ROTARY_DIM) * ROPE_LOG2_THETA)
    angle = pos[:, None].to(tl.float64) * inv_freq[None, :]
    turns = tl.floor(angle * 0.15915494309189535 + 0.5)
    angle = tl.fma(turns, -6.283185307179586, angle) - turns * 2.4492935982947064e-16
    cos = tl.cos(angle.to(tl.float32))
    sin = tl.sin(angle.to(tl.float32))
    sign = {sign}
    xf = x.to(tl.float32)
    rotated = xf * cos + sign[None, :] * x_partner.to(tl.float32) * sin
    return tl.where(cols[None, :] < ROTARY_DIM, rotated, xf).to(x.dtype)'''


FIXED = {"_floordiv": FLOORDIV, "_floormod": FLOORMOD, "_ipow": IPOW, "_shift": SHIFT, "_row_term_o": ROW_TERM_O,
         "_tanh": TANH, "_alibi_slope": ALIBI_SLOPE,
         "_sin": _sincos("sin"), "_cos": _sincos("cos"), "_sqrt64": SQRT64, "_floormod64": FLOORMOD64, "_floordiv64": FLOORDIV64,
         "_tanh64": TANH64, "_alibi_slope64": ALIBI_SLOPE64}


def render_helper(name: str) -> str:
    if name in FIXED:
        return FIXED[name]
    if name.startswith("_bucket_"):
        nb, md, bd = name[len("_bucket_"):].split("_")
        return bucket_helper(int(nb), int(md), bool(int(bd)))
    raise KeyError(name)
