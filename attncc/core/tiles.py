"""Tile classes and the tile classifier: interval arithmetic over a grid of tiles.

A *tile* is one query block (``BLOCK_M`` rows) times one key block (``BLOCK_N`` rows).
The analysis turns a mask into an :class:`IntervalProgram`: a straight-line program whose
steps are calls of the functions below. Run over the grid of tiles, where ``i`` and ``j``
are the intervals of positions each tile covers, it says per tile whether the mask holds
for every pair (FULL), for none (EMPTY), or maybe some (PARTIAL).

Values the program handles:

- an *interval* is a pair ``(lo, hi)``: float64 tensors that broadcast over the grid
  ``[B or 1, H or 1, n_query_blocks or 1, n_key_blocks or 1]``, or Python numbers;
  ``±inf`` stands for "unbounded". A bare Python number is the point interval ``(x, x)``.
- a *tri-state* is a pair ``(may_be_true, may_be_false)`` of bool tensors (or Python bools):
  ``(True, False)`` is "true on the whole tile", ``(False, True)`` "false on the whole tile",
  ``(True, True)`` "don't know".

Every function is sound: the true set of values over a tile lies inside the interval it
returns. float64 holds positions exactly (up to 2**53), so the comparisons that decide
EMPTY and FULL are exact for the index arithmetic of masks (integer ``//`` and ``%`` of
integers below 2**53 included: the floor of a correctly rounded quotient of two such
integers is their exact floor quotient). Past 2**53 (offsets reach 2**62, input values int64) the
position intervals are rounded outward and every arithmetic step moves its ends outward
(:func:`_rounded_out`), so tiles stay sound there, no longer exact. Float arithmetic is rounded differently here than
in the kernels and the reference: the analysis passes every float-valued sub-expression
through :func:`widen`, so a tile is only EMPTY or FULL when no rounding can change it.

The analysis builds programs and runs them on tile grids, the runtime runs them per call
(generated modules import this module as ``attncc.runtime.tiles``). It imports only torch
(on first use) and the standard library, and of attncc the core's pure-Python numbers
(:mod:`attncc.core.semantics`).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Dict, Mapping, Optional, Tuple

from attncc.core import semantics
from attncc.core.lazy import is_tensor, lazy_module

# torch on first use: the compiler (attncc build) evaluates programs on Python numbers only
torch = lazy_module("torch")

EMPTY, PARTIAL, FULL = 0, 1, 2


class TileClass(IntEnum):
    """What a tile needs: skip it, evaluate the mask on it, or no mask code at all."""

    EMPTY = EMPTY  # no pair of the tile is allowed
    PARTIAL = PARTIAL  # some pairs may be allowed: evaluate the mask per pair
    FULL = FULL  # every pair is allowed and every key row exists


INF = float("inf")


# ---------------------------------------------------------------------------
# The program and its inputs (plain data: hashable, printable)
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockStat:
    """One read of an ``[inputs]`` tensor by the classifier, reduced per tile.

    ``input``: the input's name.
    ``axis_var``: ``"i"`` or ``"j"`` when the read goes along positions: the classifier
    then uses the min and max of the input over each query block (``block="m"``,
    ``BLOCK_M`` rows) or key block (``block="n"``, ``BLOCK_N`` rows); ``"ij"`` / ``"mn"``
    when both index it (min and max over the tile). ``None`` / ``None`` for a read
    indexed by ``b``, ``h`` and constants only: a point gathered per grid cell.
    ``index``: one entry per tensor dimension, the index used in the mask: ``"b"``,
    ``"h"``, ``"i"``, ``"j"`` (the bare variable) or an int.
    """

    input: str
    axis_var: Optional[str] = None
    block: Optional[str] = None
    index: Tuple[object, ...] = ()


@dataclass(frozen=True)
class IntervalProgram:
    """A mask compiled to interval arithmetic, in SSA form.

    ``leaves``: ``(name, kind, detail)`` per value the caller provides before the steps run:
      kind ``"i"`` / ``"j"``: the tile's query / key position interval; ``"b"`` / ``"h"``:
      the batch row / query head (point intervals); ``"n_q"`` / ``"n_k"``: the sequence
      lengths (numbers); ``"param"``: detail ``(param_name, default)``, a number;
      ``"input"``: detail ``(BlockStat,)``, an interval built by :func:`input_interval`.
    ``steps``: ``(dest, op, args)``; ``op`` names a function of this module, each arg is
      a ``str`` (a leaf or an earlier ``dest``) or a literal ``int``/``float``/``bool``.
      Printed as Python: ``dest = tiles.op(arg, ...)``.
    ``result``: the name of the tri-state of the whole mask.
    """

    leaves: Tuple[Tuple[str, str, tuple], ...]
    steps: Tuple[Tuple[str, str, tuple], ...]
    result: str

    def lines(self) -> Tuple[str, ...]:
        """The steps as Python source lines (``dest = tiles.op(args)``)."""
        return tuple(f"{d} = tiles.{op}({', '.join(a if isinstance(a, str) else repr(a) for a in args)})"
                     for d, op, args in self.steps)

    @property
    def block_stats(self) -> Tuple[BlockStat, ...]:
        return tuple(detail[0] for _, kind, detail in self.leaves if kind == "input")


# ---------------------------------------------------------------------------
# Helpers on "tensor or Python number"
# ---------------------------------------------------------------------------

def _is_t(x) -> bool:
    return is_tensor(x)


def _ref(*xs):
    for x in xs:
        if _is_t(x):
            return x
    return None


def _tensor(x, ref):
    return x if _is_t(x) else torch.full((), x, dtype=torch.float64 if not isinstance(x, bool) else torch.bool, device=ref.device)


def _minimum(a, b):
    if _is_t(a) and _is_t(b):
        return torch.minimum(a, b)
    if _is_t(a) or _is_t(b):  # a clamp takes the number as it is: no tensor to make
        t, v = (a, b) if _is_t(a) else (b, a)
        return t if math.isinf(v) and v > 0 else torch.clamp(t, max=v)
    return min(a, b)


def _maximum(a, b):
    if _is_t(a) and _is_t(b):
        return torch.maximum(a, b)
    if _is_t(a) or _is_t(b):
        t, v = (a, b) if _is_t(a) else (b, a)
        return t if math.isinf(v) and v < 0 else torch.clamp(t, min=v)
    return max(a, b)


def _where(c, a, b):
    if isinstance(c, bool):
        return a if c else b
    if not _is_t(a) and not _is_t(b):
        a = torch.full((), a, dtype=torch.float64, device=c.device)
    return torch.where(c, a, b)


def _not(x):
    return (not x) if isinstance(x, bool) else ~x


def _floor(x):
    if _is_t(x):
        return torch.floor(x)
    return x if math.isinf(x) or math.isnan(x) else math.floor(x)


def _nan_to(x, value):
    if _is_t(x):
        return torch.where(torch.isnan(x), torch.full((), value, dtype=x.dtype, device=x.device), x)
    return value if isinstance(x, float) and math.isnan(x) else x


def _div(a, b):
    """a / b; for Python numbers, division by 0 gives nan (a tensor gives inf or nan)."""
    if not _is_t(a) and not _is_t(b) and b == 0:
        return math.nan
    return a / b


def as_interval(x):
    """``x`` as an interval: a number is the point ``(x, x)``."""
    return x if isinstance(x, tuple) else (x, x)


def point_value(x):
    """The number of a point interval given as a Python number, else None."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x
    if isinstance(x, tuple) and not _is_t(x[0]) and not _is_t(x[1]) and x[0] == x[1]:
        return x[0]
    return None


def _hull(values):
    lo = hi = None
    for v in values:
        lo = v if lo is None else _minimum(lo, v)
        hi = v if hi is None else _maximum(hi, v)
    return lo, hi


# Python ints are the exact integer arithmetic of params, literals and sizes, which the kernels
# compute in int32 / int64 and the reference in int64: past int64 both wrap (two's complement,
# docs/spec-language.md, "Positions"), and so do the functions below. (Tensors hold positions and
# input values in float64, exact up to 2**53: their arithmetic is not wrapped.)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _ints(*xs) -> bool:
    return all(type(x) is int for x in xs)


def _int64(x):
    """An interval of Python ints as int64 holds it: a point past int64 wraps; an interval that
    reaches past it is every int64 (its wrapped values are no interval). Others unchanged."""
    lo, hi = x
    if not _ints(lo, hi) or (INT64_MIN <= lo and hi <= INT64_MAX):
        return x
    if lo == hi:
        v = (lo - INT64_MIN) % 2**64 + INT64_MIN
        return (v, v)
    return (INT64_MIN, INT64_MAX)


def _floor_quotient(p, q):
    """``floor(p / q)``: of Python ints exactly (a float division rounds past 2**53), nan for q = 0."""
    if _ints(p, q):
        return p // q if q else math.nan
    return _floor(_div(p, q))


# ---------------------------------------------------------------------------
# Interval arithmetic
# ---------------------------------------------------------------------------

# float64 holds every integer below 2**53; past it, an operation rounds its result (and torch rounds a
# Python int operand) to a neighbour, possibly on the wrong side of a bound. Each arithmetic step
# moves its ends outward there (_rounded_out), so the intervals stay sound at any position
# (offsets up to 2**62 reach the tiles) and for any input value; below 2**53 nothing moves.
_EXACT = 2.0**53
_OUT = 2.0**-51  # 4 units of the last place of the largest magnitude: more than the rounding of one step


def _magnitude_of(v, ref):
    """|v| where finite, else 0 (a tensor like ``ref``)."""
    t = _tensor(v, ref) if not isinstance(v, bool) else _tensor(float(v), ref)
    t = t.to(torch.float64)
    return torch.where(torch.isfinite(t), t.abs(), torch.zeros((), dtype=torch.float64, device=t.device))


def _rounded_out(out, *operands):
    """``out``, an interval computed in float64 from the intervals ``operands``, widened where the
    integers involved pass 2**53: each end moves out by ``2**-51`` of the largest finite magnitude
    among the operands' ends and its own (one float64 step of the result, plus the rounding of a
    Python int operand taken to float64: within two units of that magnitude's last place; for a
    floor quotient, more than the one unit by which a floor of a rounded quotient can be off). Python
    numbers alone are exact (ints) or widened by the analysis (floats): unchanged."""
    ends = [e for x in operands for e in as_interval(x)] + list(out)
    ref = _ref(*ends)
    if ref is None:
        return out
    scale = None
    for e in ends:
        m = _magnitude_of(e, ref)
        scale = m if scale is None else torch.maximum(scale, m)
    step = torch.where(scale >= _EXACT, scale * _OUT, torch.zeros((), dtype=torch.float64, device=ref.device))
    lo, hi = out
    return (_tensor(lo, ref) - step, _tensor(hi, ref) + step)


def float_bounds(x):
    """The interval ``x`` as float64 numbers, a Python int end past 2**53 rounded outward (a float
    end as it is). What the tile kernel takes a host value as, and the comparisons below a Python
    int compared with a tensor (torch would take it to the nearest float64, possibly past a
    position it bounds)."""
    a, b = as_interval(x)
    if type(a) is int:
        f = float(a)
        a = f if int(f) <= a else math.nextafter(f, -INF)
    if type(b) is int:
        f = float(b)
        b = f if int(f) >= b else math.nextafter(f, INF)
    return (float(a), float(b))


def _float_ends(x, other):
    """``x``, to be compared with ``other``: :func:`float_bounds` where ``other`` holds tensors, else
    as it is (Python compares numbers exactly)."""
    return float_bounds(x) if _ref(*as_interval(other)) is not None and _ref(*as_interval(x)) is None else as_interval(x)



def const(value):
    """The point interval of a literal number."""
    return (value, value)


def span(lo, hi):
    """The interval ``[lo, hi]`` of two literal numbers."""
    return (lo, hi)


def unbounded():
    """An expression the analysis cannot bound: every value possible."""
    return (-INF, INF)


def add(x, y):
    (a, b), (c, d) = as_interval(x), as_interval(y)
    return _rounded_out(_int64((a + c, b + d)), x, y)


def sub(x, y):
    (a, b), (c, d) = as_interval(x), as_interval(y)
    return _rounded_out(_int64((a - d, b - c)), x, y)


def neg(x):
    a, b = as_interval(x)
    return _int64((-b, -a))


def mul(x, y):
    c = point_value(y)
    if c is None and point_value(x) is not None:
        x, y, c = y, x, point_value(x)
    a, b = as_interval(x)
    if c is not None:  # scaling by a constant: no 0 * inf, one product per end
        if c == 0:
            return (0, 0)
        return _rounded_out(_int64((a * c, b * c) if c > 0 else (b * c, a * c)), x, y)
    c, d = as_interval(y)
    # 0 * inf is nan; in interval arithmetic the product with an exact 0 is 0
    return _rounded_out(_int64(_hull([_nan_to(p, 0.0) for p in (a * c, a * d, b * c, b * d)])), x, y)


def reciprocal(x):
    """``1 / x``; unbounded where x may be 0."""
    a, b = as_interval(x)
    ok = (a > 0) | (b < 0)
    if isinstance(ok, bool):
        return (_div(1.0, b), _div(1.0, a)) if ok else unbounded()
    inv_b = 1.0 / (b if _is_t(b) else _tensor(b, ok))
    inv_a = 1.0 / (a if _is_t(a) else _tensor(a, ok))
    return (_where(ok, inv_b, -INF), _where(ok, inv_a, INF))


def div(x, y):
    """True division ``x / y``. By a constant, each end is one correctly rounded
    quotient, so comparing it with a representable number is exact."""
    c = point_value(y)
    if c is not None:
        if c == 0:
            return unbounded()
        a, b = as_interval(x)
        return (a / c, b / c) if c > 0 else (b / c, a / c)
    return mul(x, reciprocal(y))


def floordiv(x, y):
    """``floor(x / y)`` (Python's ``//``)."""
    a, b = as_interval(x)
    c = point_value(y)
    if c is not None:
        if c == 0:
            return unbounded()
        lo, hi = _floor_quotient(a, c), _floor_quotient(b, c)
        return _rounded_out(_int64((lo, hi) if c > 0 else (hi, lo)), x, y)  # INT64_MIN // -1 wraps
    c, d = as_interval(y)
    # floor(x / y) is monotone in x and in y on either side of 0: the corners bound it
    corners = [_floor_quotient(p, q) for p, q in ((a, c), (a, d), (b, c), (b, d))]
    lo = _hull([_nan_to(p, -INF) for p in corners])[0]
    hi = _hull([_nan_to(p, INF) for p in corners])[1]
    no_zero = (c > 0) | (d < 0)
    return _rounded_out(_int64((_where(no_zero, lo, -INF), _where(no_zero, hi, INF))), x, y)


def mod(x, y, integer):
    """``x mod y`` with Python's sign convention (the result has the sign of y).

    ``integer``: x and y are integer-valued, so a positive modulus ``m`` gives at most ``m - 1``."""
    a, b = as_interval(x)
    one = 1 if integer else 0
    c = point_value(y)
    if c is not None:
        if c == 0:
            return unbounded()
        whole = (0, c - one) if c > 0 else (c + one, 0)
        qa, qb = _floor_quotient(a, c), _floor_quotient(b, c)
        # no multiple of c strictly inside the interval: x mod c is increasing on it
        same = qa == qb
        if isinstance(same, bool):
            return (a - c * qa, b - c * qb) if same and not math.isinf(qa) else whole
        # past 2**53, a - c * qa is rounded: the whole range of residues there
        same = same & torch.isfinite(qa) & (_magnitude_of(a, _ref(a, b)) < _EXACT) & (_magnitude_of(b, _ref(a, b)) < _EXACT)
        r_lo, r_hi = _nan_to(a - c * qa, 0.0), _nan_to(b - c * qb, 0.0)
        return (_where(same, r_lo, whole[0]), _where(same, r_hi, whole[1]))
    c, d = as_interval(y)
    inside = (a >= 0) & (b < c)  # 0 <= x < y: x mod y is x
    pos, negm = c > 0, d < 0
    lo = _where(pos, _where(inside, a, 0), _where(negm, c + one, -INF))
    hi = _where(pos, _where(inside, b, d - one), _where(negm, 0, INF))
    ref = _ref(a, b, c, d)
    if ref is None:
        return (lo, hi)
    # x and y each one number (per tile): x mod y is that one number, not a hull (fmod is exact)
    x0, y0 = (torch.as_tensor(v, dtype=torch.float64, device=ref.device) for v in (a, c))
    point = (a == b) & (c == d) & (y0 != 0) & (x0.abs() < _EXACT) & (y0.abs() < _EXACT)  # exact below 2**53
    value = torch.remainder(x0, torch.where(point, y0, torch.ones_like(y0)))
    return (_where(point, value, lo), _where(point, value, hi))


# Relative (and absolute, near 0) half-width widen() adds: far more than the float64 rounding
# of the few operations of a mask expression (2^-53 each), far less than any integer step below 2^40.
WIDEN = 2.0 ** -40


def _widen_end(v, sign):
    if _is_t(v):
        return torch.where(torch.isfinite(v), v + sign * ((torch.abs(v) + 1.0) * WIDEN), v)
    return v if math.isinf(v) or math.isnan(v) else v + sign * ((abs(v) + 1.0) * WIDEN)


def widen(x):
    """``x`` with each end moved out by ``(|end| + 1) * 2^-40``. The analysis widens every
    float-valued (non-integer) sub-expression: the kernels and the reference compute it in
    float64 in their own order of operations, and the interval must hold their rounded values,
    not only the exact one, so that a pair on a float boundary is never in an EMPTY or FULL
    tile it does not belong to. Integer arithmetic is exact and never widened."""
    a, b = as_interval(x)
    return (_widen_end(a, -1.0), _widen_end(b, 1.0))


def floor_(x):
    a, b = as_interval(x)
    return (_floor(a), _floor(b))


def abs_(x):
    a, b = as_interval(x)
    return _int64((_where(a >= 0, a, _where(b <= 0, -b, 0)), _maximum(-a, b)))  # abs(INT64_MIN) wraps


def _endwise(pick, xs):
    """min or max of intervals: the pick of the lower ends and of the upper ends."""
    lo, hi = as_interval(xs[0])
    for x in xs[1:]:
        a, b = as_interval(x)
        lo, hi = pick(lo, a), pick(hi, b)
    return (lo, hi)


def min_(*xs):
    return _endwise(_minimum, xs)


def max_(*xs):
    return _endwise(_maximum, xs)


def pow_int(x, n):
    """``x ** n`` for an integer literal n."""
    if n == 0:
        return (1, 1)
    if n < 0:
        return reciprocal(pow_int(x, -n))
    a, b = as_interval(x)
    if n % 2:  # odd powers are increasing
        return _rounded_out(_int64((a**n, b**n)), x)
    m_lo, m_hi = abs_(x)
    return _rounded_out(_int64((m_lo**n, m_hi**n)), x)


def _monotone(x, fn_t, fn_py, domain_lo=None):
    a, b = as_interval(x)
    if domain_lo is not None:
        a, b = _maximum(a, domain_lo), _maximum(b, domain_lo)
    return tuple(fn_t(v) if _is_t(v) else fn_py(v) for v in (a, b))


def _py_exp(v):
    try:
        return math.exp(v)
    except OverflowError:
        return INF


def _py_log(v):
    return -INF if v == 0 else math.log(v)


def pow_frac(x, p):
    """``x ** p`` for a positive non-integer literal p (real only for x >= 0)."""
    return _monotone(x, lambda t: torch.pow(t, p), lambda v: v**p, domain_lo=0.0)


def pow_base(c, x):
    """``c ** x`` for a positive literal base c."""
    if c == 1:
        return (1, 1)
    lo, hi = exp_(mul(x, math.log(c)))
    return (lo, hi)


def exp_(x):
    return _monotone(x, torch.exp, _py_exp)


def log_(x):
    return _monotone(x, torch.log, _py_log, domain_lo=0.0)


def tanh_(x):
    return _monotone(x, torch.tanh, math.tanh)


def sigmoid_(x):
    return _monotone(x, torch.sigmoid, lambda v: 0.5 * (1.0 + math.tanh(0.5 * v)))


def erf_(x):
    return _monotone(x, torch.erf, math.erf)


# -- integer bitwise operators (Python's semantics: two's complement of infinite precision) --

def _pow2_above(v):
    """A power of two ``>= v`` (``v >= 0``; inf stays inf): frexp's exponent, exact at any size."""
    if _is_t(v):
        e = torch.frexp(torch.where(torch.isfinite(v), v, torch.zeros_like(v))).exponent
        return torch.where(torch.isfinite(v), torch.exp2(e.to(torch.float64)), v)
    return v if math.isinf(v) else 2.0 ** math.frexp(v)[1]


def _magnitude(x, y):
    """``B``, a power of two with every value of the intervals x and y in ``[-B, B - 1]``."""
    (a, b), (c, d) = as_interval(x), as_interval(y)
    v = _maximum(_maximum(_maximum(-a, b + 1), -c), d + 1)
    return _pow2_above(_maximum(v, 1))


_EXACT_INT = 2.0**53  # integers below are exact in float64


def _one_sign(a, b):
    """``[a, b]`` holds integers of one sign, exact in float64 (false for NaN and inf ends) or
    Python ints (exact at any size)."""
    if _ints(a, b):
        return a >= 0 or b < 0
    return ((a >= 0) | (b < 0)) & (a > -_EXACT_INT) & (b < _EXACT_INT)


def _high_bits(op, x, y, bounds):
    """``bounds`` of ``x op y`` narrowed by the bits the intervals fix: for integers of one sign
    (two's complement orders each sign like the unsigned numbers), every x of ``[a, b]`` is
    ``hx + (x & low)`` where ``low = 2**e - 1`` covers the highest bit in which a and b (or c
    and d) differ, so ``x op y = (hx op hy) + (lx op ly)`` lies in ``[hx op hy, (hx op hy) + low]``
    (a Morton code's high bits over an aligned tile). Two points give ``low = 0``: their exact
    value, whatever their signs (a one-pair tile is classified exactly: ``exact_tiles``)."""
    (a, b), (c, d) = as_interval(x), as_interval(y)
    lo, hi = bounds
    if _ref(a, b, c, d) is None:
        if not (_one_sign(a, b) and _one_sign(c, d)):
            return bounds
        a, b, c, d = (int(v) for v in (a, b, c, d))
        low = (1 << ((a ^ b) | (c ^ d)).bit_length()) - 1
        base = op(a & ~low, c & ~low)
        return (max(lo, base), min(hi, base + low))
    r = _ref(a, b, c, d)
    a, b, c, d = (_tensor(v, r) for v in (a, b, c, d))
    ok = _one_sign(a, b) & _one_sign(c, d)
    a, b, c, d = (torch.where(ok, v, torch.zeros_like(v)).to(torch.int64) for v in (a, b, c, d))
    diff = ((a ^ b) | (c ^ d)).to(torch.float64)
    low = (torch.exp2(torch.frexp(diff).exponent.to(torch.float64)) - 1).to(torch.int64)  # 2**bit_length(diff) - 1
    base = op(a & ~low, c & ~low)
    lo = _where(ok, _maximum(_tensor(lo, r), base.to(torch.float64)), lo)
    hi = _where(ok, _minimum(_tensor(hi, r), (base + low).to(torch.float64)), hi)
    return (lo, hi)


def bitand(x, y):
    """``x & y``: within ``[0, min(hi)]`` when both are non-negative; at most the non-negative one's
    upper end (its bits are a subset), at most ``max(x, y)`` in general, ``min(x, y)`` for two negatives;
    narrowed by the bits the intervals fix (:func:`_high_bits`)."""
    (a, b), (c, d) = as_interval(x), as_interval(y)
    big = _magnitude(x, y)
    px, py, nx, ny = a >= 0, c >= 0, b < 0, d < 0
    lo = _where(px | py, 0, -big)
    hi = _where(px & py, _minimum(b, d), _where(px, b, _where(py, d, _where(nx & ny, _minimum(b, d), _maximum(b, d)))))
    return _high_bits(lambda u, v: u & v, x, y, (lo, hi))


def bitor(x, y):
    """``x | y``: at least each operand unless a non-negative one meets a negative one; negative
    (at most -1) when one operand is; within ``[-B, B - 1]`` of the operands' magnitude."""
    (a, b), (c, d) = as_interval(x), as_interval(y)
    big = _magnitude(x, y)
    px, py, nx, ny = a >= 0, c >= 0, b < 0, d < 0
    lo = _where((px & py) | (nx & ny), _maximum(a, c), _where(nx & py, a, _where(ny & px, c, -big)))
    hi = _where(nx | ny, -1, big - 1)
    return _high_bits(lambda u, v: u | v, x, y, (lo, hi))


def bitxor(x, y):
    """``x ^ y``: non-negative when the operands have one sign, negative when they surely differ."""
    (a, b), (c, d) = as_interval(x), as_interval(y)
    big = _magnitude(x, y)
    px, py, nx, ny = a >= 0, c >= 0, b < 0, d < 0
    same, differ = (px & py) | (nx & ny), (px & ny) | (nx & py)
    return _high_bits(lambda u, v: u ^ v, x, y, (_where(same, 0, -big), _where(differ, -1, big - 1)))


def shift_(x, n):
    """``Shift(x, n) = floor(x * 2**n)`` with n clamped to [-63, 63] (attncc.spec.builtins):
    monotone in x, and in n for either sign of x, so the corners bound it."""
    (a, b), (c, d) = as_interval(x), as_interval(n)
    c, d = _minimum(_maximum(c, -63), 63), _minimum(_maximum(d, -63), 63)
    corners = []
    for v in (a, b):
        for m in (c, d):
            if _ints(v, m):  # exactly, at any size (then wrapped below)
                corners.append(v << m if m >= 0 else v >> -m)
                continue
            scale = torch.exp2(m) if _is_t(m) else 2.0 ** m
            corners.append(_floor(_nan_to(v * scale, 0.0)))
    return _int64(_hull(corners))


def select(cond, x, y):
    """``where(cond, x, y)``: x's interval where cond is surely true, y's where surely
    false, their hull where it is unknown."""
    mt, mf = cond
    (a, b), (c, d) = as_interval(x), as_interval(y)
    both = mt & mf
    lo = _where(both, _minimum(a, c), _where(mt, a, c))
    hi = _where(both, _maximum(b, d), _where(mt, b, d))
    return (lo, hi)


def bucket(x, num_buckets, max_distance, bidirectional):
    """T5's relative position bucket of ``d = j - i`` over an interval of d."""
    max_exact, thresholds = semantics.bucket_thresholds(num_buckets, max_distance, bool(bidirectional))
    half = num_buckets // 2 if bidirectional else num_buckets
    d_lo, d_hi = as_interval(x)
    r = _ref(d_lo, d_hi)
    if r is None:
        r = torch.zeros((), dtype=torch.float64)
    d_lo, d_hi = _tensor(d_lo, r), _tensor(d_hi, r)
    table = torch.tensor(thresholds, dtype=torch.float64, device=r.device)

    def f(n):  # bucket of a distance n >= 0 (nondecreasing in n)
        if max_exact < 1:
            return torch.zeros_like(n)
        big = max_exact + torch.searchsorted(table, n.contiguous(), right=True).to(torch.float64)
        return torch.where(n < max_exact, n, big)

    # d <= 0 (key at or before the query): distance n = -d, values f(n)
    has_neg = d_lo <= 0
    n_small, n_big = torch.clamp(-d_hi, min=0), -d_lo
    neg_lo, neg_hi = f(n_small), f(torch.clamp(n_big, min=0))
    # d > 0: bidirectional buckets are half + f(d); one-directional ones are 0
    has_pos = d_hi >= 1
    if bidirectional:
        pos_lo, pos_hi = half + f(torch.clamp(d_lo, min=1)), half + f(torch.clamp(d_hi, min=1))
    else:
        pos_lo = pos_hi = torch.zeros_like(d_lo)
    lo = torch.where(has_neg, torch.where(has_pos, torch.minimum(neg_lo, pos_lo), neg_lo), pos_lo)
    hi = torch.where(has_neg, torch.where(has_pos, torch.maximum(neg_hi, pos_hi), neg_hi), pos_hi)
    return (lo, hi)


# ---------------------------------------------------------------------------
# Comparisons and logic: tri-states. Written as "not surely false" so that a NaN
# bound (which should not arise) can only make the answer "don't know".
# ---------------------------------------------------------------------------

def tri(may_be_true, may_be_false):
    """A constant tri-state."""
    return (may_be_true, may_be_false)


def le(x, y):
    (a, b), (c, d) = _float_ends(x, y), _float_ends(y, x)
    return (_not(a > d), _not(b <= c))


def lt(x, y):
    (a, b), (c, d) = _float_ends(x, y), _float_ends(y, x)
    return (_not(a >= d), _not(b < c))


def eq(x, y):
    (a, b), (c, d) = _float_ends(x, y), _float_ends(y, x)
    disjoint = (a > d) | (c > b)
    same_point = (a == b) & (c == d) & (a == c)
    return (_not(disjoint), _not(same_point))


def ne(x, y):
    t, f = eq(x, y)
    return (f, t)


def and_(*xs):
    mt, mf = xs[0]
    for t, f in xs[1:]:
        mt, mf = mt & t, mf | f
    return (mt, mf)


def or_(*xs):
    mt, mf = xs[0]
    for t, f in xs[1:]:
        mt, mf = mt | t, mf & f
    return (mt, mf)


def not_(x):
    return (x[1], x[0])


def xor_(*xs):
    """Exclusive or: true where an odd number of the operands are."""
    mt, mf = xs[0]
    for t, f in xs[1:]:
        mt, mf = (mt & f) | (mf & t), (mt & t) | (mf & f)
    return (mt, mf)


# ---------------------------------------------------------------------------
# BigBird random blocks
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _random_block_table(n_query_rblocks: int, n_cols: int, n_key_rblocks: int, r: int, seed: int, device: str):
    """Summed-area table of the random-block relation: ``table[qr, kr]`` is true when
    key random-block ``kr`` is among the random blocks of query random-block ``qr``;
    columns ``>= n_key_rblocks`` (positions past ``n_k``) are never chosen."""
    t = torch.zeros(n_query_rblocks, n_cols, dtype=torch.int32)
    for qr in range(n_query_rblocks):
        chosen = [k for k in semantics.random_block_set(qr, n_key_rblocks, r, seed) if k < n_cols]
        if chosen:
            t[qr, chosen] = 1
    sat = torch.zeros(n_query_rblocks + 1, n_cols + 1, dtype=torch.int32)
    sat[1:, 1:] = t.cumsum(0).cumsum(1)
    return t.bool().to(device), sat.to(device)


def random_blocks(i, j, n_k, r, block, seed):
    """``RandomBlocks(i, j, n_k, r, block, seed)`` over tiles: may be true when some key
    random-block of the tile's ``j`` range is chosen by some query random-block of its
    ``i`` range; surely true only inside one chosen (query, key) random-block cell."""
    i_lo, i_hi = as_interval(i)
    j_lo, j_hi = as_interval(j)
    r_ = _ref(i_lo, i_hi, j_lo, j_hi)
    i_lo, i_hi, j_lo, j_hi = (_tensor(v, r_).to(torch.int64) for v in (i_lo, i_hi, j_lo, j_hi))
    n_k = int(point_value(n_k))
    qa, qb = torch.div(i_lo, block, rounding_mode="floor"), torch.div(i_hi, block, rounding_mode="floor")
    ka, kb = torch.div(j_lo, block, rounding_mode="floor"), torch.div(j_hi, block, rounding_mode="floor")
    n_rows = int(qb.max().item()) + 1 if qb.numel() else 1
    n_cols = int(kb.max().item()) + 1 if kb.numel() else 1
    table, sat = _random_block_table(n_rows, n_cols, -(-n_k // block), r, seed, str(r_.device))
    count = sat[qb + 1, kb + 1] - sat[qa, kb + 1] - sat[qb + 1, ka] + sat[qa, ka]
    single = (qa == qb) & (ka == kb)
    return (count > 0, ~(single & table[qa, ka]))


OPS = frozenset({
    "const", "span", "unbounded", "add", "sub", "neg", "mul", "reciprocal", "div", "floordiv", "mod", "widen",
    "floor_", "abs_", "min_", "max_", "pow_int", "pow_frac", "pow_base", "exp_", "log_", "tanh_", "sigmoid_",
    "erf_", "bitand", "bitor", "bitxor", "shift_",
    "select", "bucket", "tri", "le", "lt", "eq", "ne", "and_", "or_", "not_", "xor_", "random_blocks",
})


def run_interval_program(program: IntervalProgram, env: Mapping[str, object]):
    """Execute ``program`` with the leaf values of ``env``; returns the mask's tri-state."""
    values: Dict[str, object] = dict(env)
    g = globals()
    for dest, op, args in program.steps:
        if op not in OPS:
            raise ValueError(f"interval program step {dest!r}: unknown op {op!r}")
        values[dest] = g[op](*[values[a] if isinstance(a, str) else a for a in args])
    return values[program.result]


# ---------------------------------------------------------------------------
# The grid of tiles
# ---------------------------------------------------------------------------

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=128)
def _row_intervals(offset: int, rows: int, block: int, device):
    """Exact position intervals of the blocks of ``rows`` rows starting at ``offset``
    (the last block may be short). Cached: calls of one shape reuse them."""
    start = torch.arange(_cdiv(rows, block), dtype=torch.int64) * block
    lo, hi = offset + start, offset + torch.clamp(start + block, max=rows) - 1
    return _as_f64(lo, -1.0).to(device), _as_f64(hi, 1.0).to(device)  # past 2**53: rounded outward


_GRID_AXIS = {"b": 0, "h": 1, "i": 2, "j": 3}


def _block_reduce(x, dim, offset, rows, block):
    """Min and max of ``x`` along ``dim`` over blocks of ``block`` rows of the positions
    ``[offset, offset + rows)``."""
    t = _window(x, dim, offset, rows)
    nb = _cdiv(rows, block)
    pad = nb * block - rows
    if pad:  # repeat the last row: leaves the min and max unchanged
        last = t.narrow(dim, rows - 1, 1)
        t = torch.cat([t, last.expand(*[pad if d == dim else -1 for d in range(t.dim())])], dim)
    shape = list(t.shape)
    return torch.aminmax(t.reshape(shape[:dim] + [nb, block] + shape[dim + 1:]), dim=dim + 1)


def _window(x: torch.Tensor, dim: int, offset: int, rows: int) -> torch.Tensor:
    """The entries of ``x`` at positions ``[offset, offset + rows)`` along ``dim``, 0 past its
    extent (as the kernels read them), made at the window's size: a table of fixed extent read at
    ``i`` or ``j`` far into a sequence (``q_offset = 2**40``) is not extended up to the offset."""
    start = min(offset, x.shape[dim])
    return _zero_extend(x.narrow(dim, start, min(offset + rows, x.shape[dim]) - start), dim, rows)


def _zero_extend(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``x`` with zeros appended along ``dim`` up to ``size`` entries: the value the kernels read
    at an index past an input's extent (docs/spec-language.md, [inputs])."""
    if x.shape[dim] >= size:
        return x
    shape = list(x.shape)
    shape[dim] = size - x.shape[dim]
    return torch.cat([x, torch.zeros(shape, dtype=x.dtype, device=x.device)], dim)


def input_interval(stat: BlockStat, tensor: torch.Tensor, *, q_offset: int, k_offset: int, q_rows: int,
                   k_rows: int, block_m: int, block_n: int, batch: int, heads: int):
    """The interval of an input read over each tile, shaped for the grid
    ``[B|1, H|1, n_query_blocks|1, n_key_blocks|1]`` (float64)."""
    x = torch.as_tensor(tensor)
    if x.dim() != len(stat.index):
        raise ValueError(f"input '{stat.input}': expected {len(stat.index)} dims, got shape {tuple(x.shape)}")
    for d in reversed(range(len(stat.index))):
        c = stat.index[d]
        if isinstance(c, int):
            if not 0 <= c < x.shape[d]:  # reads 0, as in the kernels
                x = x.new_zeros(x.shape[:d] + x.shape[d + 1:])
            else:
                x = x.select(d, c)
    named = [v for v in stat.index if not isinstance(v, int)]
    order = sorted(range(len(named)), key=lambda k: _GRID_AXIS[named[k]])
    x = x.permute(order) if named else x
    present = [named[k] for k in order]
    sizes = iter(x.shape)
    shape = [next(sizes) if ax in present else 1 for ax in "bhij"]
    x = x.reshape(shape)
    for ax, count in (("b", batch), ("h", heads)):
        d = _GRID_AXIS[ax]
        if ax in present:  # a batch row or head past the input's extent reads 0, as in the kernels
            x = _zero_extend(x, d, count).narrow(d, 0, count)
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    if "i" in present and "j" in present:  # min and max over the whole tile
        lo, hi = _block_reduce(x, 2, q_offset, q_rows, block_m)
        lo, hi = _block_reduce(lo, 3, k_offset, k_rows, block_n)[0], _block_reduce(hi, 3, k_offset, k_rows, block_n)[1]
    elif "i" in present:
        lo, hi = _block_reduce(x, 2, q_offset, q_rows, block_m)
    elif "j" in present:
        lo, hi = _block_reduce(x, 3, k_offset, k_rows, block_n)
    else:  # a point per grid cell
        lo = hi = x
    return _as_f64(lo, -1.0), _as_f64(hi, 1.0)


def _as_f64(x: torch.Tensor, direction: float) -> torch.Tensor:
    """``x`` as float64 bounds. An int64 value past 2**53 rounds to a neighbour, possibly on the
    wrong side: it is moved outward by at least one float64 step (``direction`` -1 for a lower
    bound, +1 for an upper one), so that the interval still holds it (doc ids 2**60 and
    2**60 + 1 stay different documents, their tiles PARTIAL)."""
    y = x.to(torch.float64)
    if x.dtype == torch.int64:
        y = torch.where(y.abs() >= _EXACT, y + direction * y.abs() * 2.0**-52, y)
    return y


def leaf_values(program: IntervalProgram, *, i, j, n_q, n_k, params: Mapping[str, object],
                inputs: Mapping[str, torch.Tensor], batch: int, heads: int, device, input_interval,
                who: str = "") -> Dict[str, object]:
    """The environment of :func:`run_interval_program`: each leaf's value over the tiles (or
    chunks) of a grid. ``i``, ``j``: ``(lo, hi)`` of the rows and keys, shaped to broadcast as
    ``[1, 1, rows, 1]`` and ``[1, 1, 1, keys]``; ``input_interval(stat, tensor)``: an input
    leaf's bounds there; ``who`` prefixes the error for a missing input."""
    env: Dict[str, object] = {}
    for name, kind, detail in program.leaves:
        if kind in ("i", "j"):
            env[name] = i if kind == "i" else j
        elif kind in ("b", "h"):
            v = torch.arange(batch if kind == "b" else heads, dtype=torch.float64, device=device)
            v = v.view(-1, 1, 1, 1) if kind == "b" else v.view(1, -1, 1, 1)
            env[name] = (v, v)
        elif kind in ("n_q", "n_k"):
            env[name] = n_q if kind == "n_q" else n_k
        elif kind == "param":
            pname, default = detail
            env[name] = params.get(pname, default)
        elif kind == "input":
            (stat,) = detail
            if stat.input not in inputs:
                raise ValueError(f"{who}the mask reads input '{stat.input}', which was not given")
            env[name] = input_interval(stat, inputs[stat.input])
        else:
            raise ValueError(f"interval program leaf {name!r}: unknown kind {kind!r}")
    return env


def classify_grid(program: Optional[IntervalProgram], *, q_offset: int, k_offset: int, q_rows: int, k_rows: int,
                  block_m: int, block_n: int, n_q: int, n_k: int, params: Mapping[str, object],
                  inputs: Mapping[str, torch.Tensor], batch: int, heads: int, device, who: str = "") -> torch.Tensor:
    """Classify every tile: int8 tensor ``[B|1, H|1, n_query_blocks, n_key_blocks]`` of
    EMPTY / PARTIAL / FULL (a size-1 leading dim when the mask does not depend on b / h).

    Query block ``qb`` covers positions ``q_offset + [qb*block_m, min((qb+1)*block_m, q_rows))``,
    key block ``kb`` likewise with ``k_offset``, ``block_n`` and ``k_rows``. The last key
    block, when short, is never FULL (the kernel masks the key tail there).
    ``program=None`` (no mask) classifies every tile FULL.
    ``params``: values overriding the program's defaults; ``inputs``: the input tensors.
    ``who``: what the errors name first (the caller).
    """
    device = torch.device(device)
    nqb, nkb = _cdiv(q_rows, block_m), _cdiv(k_rows, block_n)
    if program is None:
        may_true, may_false = True, False
    else:
        i = _row_intervals(q_offset, q_rows, block_m, device)
        j = _row_intervals(k_offset, k_rows, block_n, device)
        env = leaf_values(program, i=(i[0].view(1, 1, -1, 1), i[1].view(1, 1, -1, 1)),
                          j=(j[0].view(1, 1, 1, -1), j[1].view(1, 1, 1, -1)), n_q=n_q, n_k=n_k,
                          params=params, inputs=inputs, batch=batch, heads=heads, device=device, who=who,
                          input_interval=lambda stat, t: input_interval(
                              stat, t, q_offset=q_offset, k_offset=k_offset, q_rows=q_rows, k_rows=k_rows,
                              block_m=block_m, block_n=block_n, batch=batch, heads=heads))
        may_true, may_false = run_interval_program(program, env)
    mt = torch.as_tensor(may_true, device=device)
    mf = torch.as_tensor(may_false, device=device)
    if k_rows % block_n and nkb:  # the key tail is masked in the kernel: never FULL
        mf = mf | _tail_column(nkb, str(device))
    shape = torch.broadcast_shapes(mt.shape, mf.shape, (1, 1, nqb, nkb))
    # EMPTY = 0 where surely false; else FULL = 2 where surely true, PARTIAL = 1 otherwise
    grid = torch.where(mt, torch.where(mf, PARTIAL, FULL), EMPTY).to(torch.int8)
    return grid.expand(shape).contiguous()


@functools.lru_cache(maxsize=64)
def _tail_column(n_key_blocks: int, device: str) -> torch.Tensor:
    tail = torch.zeros(n_key_blocks, dtype=torch.bool)
    tail[-1] = True
    return tail.to(device)


@functools.lru_cache(maxsize=16)
def _classes(device: str) -> torch.Tensor:
    return torch.tensor([FULL, PARTIAL], dtype=torch.int8).view(2, 1).to(device)


def to_block_lists(grid: torch.Tensor):
    """Per row of tile classes (last dim), the FULL and the PARTIAL column indices.

    ``grid``: int8 ``[..., n_rows, n_cols]`` of EMPTY / PARTIAL / FULL (pass
    ``grid.transpose(-1, -2)`` for the backward pass: per key block, its query blocks).
    Returns ``(full_count, full_idx, partial_count, partial_idx)``, int32:
    counts ``[..., n_rows]``; indices ``[..., n_rows, n_cols]``, per row the columns in
    increasing order, entries past the count set to 0; all contiguous. Vectorized: no
    host sync.
    """
    n_cols = grid.shape[-1]
    # both classes at once: hit[0] marks the FULL tiles, hit[1] the PARTIAL ones
    classes = _classes(str(grid.device)).view(2, *([1] * grid.dim()))
    hit = grid.unsqueeze(0) == classes
    rank = torch.cumsum(hit, dim=-1, dtype=torch.int32)  # 1-based slot of each hit in its row
    # every miss goes to an extra last slot, dropped below: no sort, no host sync
    slot = torch.where(hit, rank - 1, n_cols).to(torch.int64)
    idx = torch.zeros(*hit.shape[:-1], n_cols + 1, dtype=torch.int32, device=grid.device)
    cols = torch.arange(n_cols, dtype=torch.int32, device=grid.device).expand(hit.shape)
    idx.scatter_(-1, slot, cols)
    count = rank[..., -1] if n_cols else rank.sum(-1)
    # contiguous: kernels index them as [..., row] and [..., row * n_cols + k]
    return (count[0].contiguous(), idx[0, ..., :n_cols].contiguous(), count[1].contiguous(),
            idx[1, ..., :n_cols].contiguous())
