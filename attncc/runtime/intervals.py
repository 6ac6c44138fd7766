"""Bounds of a generated kernel's integer arithmetic at one call's numbers (the overflow guard).

Kernels compute integer expressions of positions, params and sizes (a mask's ``(i + j) // 2``
or ``i * j < c``, a bias's ``w * w``, an input index ``i * 100000 + j``) in int32, the fast
width, unless the host turns their WIDE switch on: then positions, int params and the head
count are int64 from the start of the kernel, and so is everything computed from them. The
reference computes in int64; positions and int params stay below 2**62.

Every generated module renders ``_int_reach(x)``: each integer expression its printers wrote
into a kernel, as interval arithmetic over ``x``, a :class:`CallNumbers` (the call's largest
position, batch and head counts, ``n_q``, ``n_k`` and int params). It returns the largest
magnitude that any value or intermediate value can take in the call; past int32 the call runs
WIDE (:func:`cached_reach` keeps it per call signature). ``_int_divisors(x)`` checks, on every
call, the divisors that depend on params and sizes only: a kernel cannot raise, so a divisor of
0 is a ``ValueError`` before any launch. (Integer arithmetic on an input's values needs no
bound: kernels compute it in int64 in every call.)

The bounds are exact integer interval arithmetic, safe for any order of evaluation: the bound
of a sum covers every partial sum, that of a product every partial product.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

from attncc.core.semantics import shift

INT32_MAX = 2**31 - 1
# Rows a kernel computes past the last position (ragged last tiles: a few blocks of <= 256 rows)
POSITION_PAD = 4096
MAX_BLOCK = 1024  # the largest tile side a kernel's bound steps may multiply (BLOCK_M, BLOCK_N)
UNBOUNDED = 2**64  # the reach of a value no rule bounds (WIDE, to be safe)


class Interval:
    """Every value of an integer expression lies in ``[lo, hi]``; ``reach``: the largest magnitude
    of the value and of every intermediate value that computes it. (A plain class: thousands are
    made per evaluation.)"""

    __slots__ = ("lo", "hi", "reach")

    def __init__(self, lo: int, hi: int, reach: int):
        self.lo, self.hi, self.reach = lo, hi, reach

    def __repr__(self) -> str:
        return f"Interval(lo={self.lo}, hi={self.hi}, reach={self.reach})"


def point(v: int) -> Interval:
    return Interval(v, v, abs(v))


def _iv(lo: int, hi: int, *parts: Interval) -> Interval:
    reach = max(abs(lo), abs(hi))
    for p in parts:
        if p.reach > reach:
            reach = p.reach
    return Interval(lo, hi, reach)


def _as_interval(x) -> Interval:
    if isinstance(x, Interval):
        return x
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"an integer interval or an int, got {x!r}")
    return point(x)


def _floor_div(a: int, b: int) -> int:
    return a // b


def _residues(m: Interval):
    """``(lo, hi)`` of Python's ``a % m`` for any ``a``: the sign of ``m``, magnitude below ``|m|``."""
    lo = min(m.lo + 1, 0) if m.lo < 0 else 0
    hi = max(m.hi - 1, 0) if m.hi > 0 else 0
    return lo, hi


class CallNumbers:
    """A call's numbers, as intervals, and the operations of the printed integer arithmetic.

    ``positions``: the largest position of the call (``max(q_offset + Nq, k_offset + Nk, n_q,
    n_k)``, or a decode cache's capacity); positions, the kernels' tile bounds and their offsets
    lie in ``[0, positions + POSITION_PAD]``. ``who`` names the call in error messages."""

    def __init__(self, who: str, *, positions: int, batch: int, heads: int, n_q, n_k,
                 params: Optional[Dict[str, object]] = None):
        self.who = who
        reach = positions + POSITION_PAD
        self.position = Interval(0, reach, reach)
        self.i = self.j = self.position
        self.b = Interval(0, max(batch - 1, 0), max(batch - 1, 0))
        self.h = Interval(0, max(heads - 1, 0), max(heads - 1, 0))
        self.n_heads = point(heads)
        self.n_q, self.n_k = (point(n) if isinstance(n, int) else Interval(n[0], n[1], max(map(abs, n)))
                              for n in (n_q, n_k))
        self.block = Interval(1, MAX_BLOCK, MAX_BLOCK)
        self.params = dict(params or {})

    # -- leaves ----------------------------------------------------------------------
    def param(self, name: str) -> Interval:
        return point(int(self.params[name]))

    def unbounded(self) -> Interval:
        """A value no rule here bounds: the call runs WIDE."""
        return Interval(-UNBOUNDED, UNBOUNDED, UNBOUNDED)

    # -- operations ------------------------------------------------------------------
    def add(self, *xs) -> Interval:
        xs = [_as_interval(x) for x in xs]
        down = sum(min(x.lo, 0) for x in xs)  # every partial sum, in any order, lies in [down, up]
        up = sum(max(x.hi, 0) for x in xs)
        out = _iv(sum(x.lo for x in xs), sum(x.hi for x in xs), *xs)
        return Interval(out.lo, out.hi, max(out.reach, -down, up))

    def neg(self, x) -> Interval:
        x = _as_interval(x)
        return _iv(-x.hi, -x.lo, x)

    def mul(self, *xs) -> Interval:
        xs = [_as_interval(x) for x in xs]
        lo = hi = 1
        partial = 1  # every partial product, in any order, is at most this in magnitude
        for x in xs:
            corners = (lo * x.lo, lo * x.hi, hi * x.lo, hi * x.hi)
            lo, hi = min(corners), max(corners)
            partial *= max(abs(x.lo), abs(x.hi), 1)
        out = _iv(lo, hi, *xs)
        return Interval(lo, hi, max(out.reach, partial))

    def pow(self, x, k: int) -> Interval:
        return self.mul(*([_as_interval(x)] * k))

    def floordiv(self, a, d) -> Interval:
        """Python's ``a // d``; ``d`` is never 0 (a divisor that may be is refused: checks below)."""
        a, d = _as_interval(a), _as_interval(d)
        values = []
        for lo, hi in ((d.lo, min(d.hi, -1)), (max(d.lo, 1), d.hi)):  # d without 0: its negative, positive parts
            if lo <= hi:
                values += [_floor_div(x, y) for x in (a.lo, a.hi) for y in (lo, hi)]
        if not values:  # d is 0: the call was refused before
            return _iv(0, 0, a, d)
        return _iv(min(values), max(values), a, d)

    def floormod(self, a, m) -> Interval:
        """Python's ``a % m``: the sign of ``m``, magnitude below ``|m|``."""
        a, m = _as_interval(a), _as_interval(m)
        if m.lo > 0 and a.lo >= 0 and a.hi < m.lo:
            return _iv(a.lo, a.hi, a, m)
        return _iv(*_residues(m), a, m)

    def mod_sum(self, x, y, m) -> Interval:
        """``(x + y) % m`` of residues ``x``, ``y`` modulo ``m``, as the kernels' ``_mod_sum`` computes
        it: ``x - (m - y)`` or ``x + y`` where each is a residue; ``m - y``, ``m - y + 1`` and ``-y``
        on the way (attncc.analysis.separable)."""
        x, y, m = (_as_interval(v) for v in (x, y, m))
        return _iv(*_residues(m), x, y, m, *self._wrap_test(y, m))

    def sum_carry(self, x, y, m) -> Interval:
        """``(x + y) // m`` of residues ``x``, ``y`` modulo ``m``: 0 or 1 (``_mod_wraps``)."""
        x, y, m = (_as_interval(v) for v in (x, y, m))
        return _iv(0, 1, x, y, m, *self._wrap_test(y, m))

    def _wrap_test(self, y: Interval, m: Interval):
        """The values ``_mod_wraps`` and ``_mod_sum`` compute from a column's residue ``y``."""
        t = self.add(m, self.neg(y))
        return t, self.add(t, Interval(0, 1, 1)), self.neg(y)

    def abs(self, x) -> Interval:
        x = _as_interval(x)
        if x.lo >= 0:
            return x
        if x.hi <= 0:
            return self.neg(x)
        return _iv(0, max(-x.lo, x.hi), x)

    def min(self, *xs) -> Interval:
        xs = [_as_interval(x) for x in xs]
        return _iv(min(x.lo for x in xs), min(x.hi for x in xs), *xs)

    def max(self, *xs) -> Interval:
        xs = [_as_interval(x) for x in xs]
        return _iv(max(x.lo for x in xs), max(x.hi for x in xs), *xs)

    def select(self, *xs) -> Interval:
        """One of ``xs`` (a ``where``)."""
        xs = [_as_interval(x) for x in xs]
        return _iv(min(x.lo for x in xs), max(x.hi for x in xs), *xs)

    def cases(self, *branches) -> Interval:
        """A ``where`` written as ``(value, condition)`` branches, the first whose condition holds
        taken: the values of the branches that may be taken (a condition ``True``, ``False`` or
        ``None``, unknown: :meth:`compare`), so that ``where(w > 0, w, 1)`` at ``w = -5`` is 1, not
        ``[-5, 1]``. The reach covers every branch (the kernels compute each)."""
        taken = []
        for value, cond in branches:
            if cond is False:
                continue
            taken.append(_as_interval(value))
            if cond is True:
                break
        every = [_as_interval(value) for value, _ in branches]
        out = self.select(*(taken or every))
        return Interval(out.lo, out.hi, max(out.reach, self.reach(*every)))

    @staticmethod
    def compare(op: str, a, b) -> Optional[bool]:
        """``a <op> b`` where the intervals decide it, else None."""
        a, b = _as_interval(a), _as_interval(b)
        if op in (">", ">="):
            op, a, b = {">": "<", ">=": "<="}[op], b, a
        if op == "<":
            return True if a.hi < b.lo else False if a.lo >= b.hi else None
        if op == "<=":
            return True if a.hi <= b.lo else False if a.lo > b.hi else None
        point_equal = a.lo == a.hi == b.lo == b.hi
        apart = a.hi < b.lo or b.hi < a.lo
        equal = True if point_equal else False if apart else None
        return equal if op == "==" else (None if equal is None else not equal)

    @staticmethod
    def negated(c: Optional[bool]) -> Optional[bool]:
        return None if c is None else not c

    @staticmethod
    def all_of(*cs: Optional[bool]) -> Optional[bool]:
        return False if any(c is False for c in cs) else True if all(c is True for c in cs) else None

    @staticmethod
    def any_of(*cs: Optional[bool]) -> Optional[bool]:
        return True if any(c is True for c in cs) else False if all(c is False for c in cs) else None

    def shift(self, x, n) -> Interval:
        """``Shift(x, n) = floor(x * 2**n)``, ``n`` clamped to [-63, 63] (attncc.core.semantics.shift):
        monotone in ``x``, and in ``n`` for either sign of ``x``, so the corners bound it."""
        x, n = _as_interval(x), _as_interval(n)
        corners = [shift(v, m) for v in (x.lo, x.hi) for m in (n.lo, n.hi)]
        return _iv(min(corners), max(corners), x, n)

    def bitwise(self, op: str, *xs) -> Interval:
        """``&``, ``|``, ``^`` (``op``) of ints: exact of points; else every int of at most the operands'
        bits in two's complement (non-negative where every operand is)."""
        xs = [_as_interval(x) for x in xs]
        if all(x.lo == x.hi for x in xs):
            value = xs[0].lo
            for x in xs[1:]:
                value = {"and": value & x.lo, "or": value | x.lo, "xor": value ^ x.lo}[op]
            return _iv(value, value, *xs)
        top = 1 << max(max(abs(x.lo), abs(x.hi)).bit_length() for x in xs)
        return _iv(0 if all(x.lo >= 0 for x in xs) else -top, top - 1, *xs)

    def bucket(self, d, num_buckets: int) -> Interval:
        """T5's bucket of the distance ``d``: in ``[0, num_buckets)``; its helper negates ``d``."""
        d = _as_interval(d)
        return _iv(0, num_buckets, d, self.neg(d))

    # -- results ---------------------------------------------------------------------
    def nonzero(self, divisor, names: str, expr: str) -> None:
        """A divisor of params and sizes only: 0 is refused (``names``: the params it depends on)."""
        d = _as_interval(divisor)
        if d.lo <= 0 <= d.hi:
            values = ", ".join(f"{n} = {self._value(n)}" for n in names.split(", ") if n)
            raise ValueError(f"{self.who}: division by zero: the divisor of {expr} "
                             + ("is 0" if d.lo == d.hi else "may be 0")
                             + (f" with {values}" if values else "") + " (a kernel cannot raise; pass a non-zero value)")

    def _value(self, name: str):
        if name in self.params:
            return self.params[name]
        sizes = {"n_q": self.n_q, "n_k": self.n_k, "n_heads": self.n_heads}
        if name in sizes:
            x = sizes[name]
            return x.lo if x.lo == x.hi else f"{x.lo}..{x.hi}"
        return "?"

    @staticmethod
    def reach(*xs) -> int:
        """The largest magnitude among the values and intermediate values of ``xs``."""
        return max((_as_interval(x).reach for x in xs), default=0)


# Per call signature: the reach of a module's arithmetic (see cached_reach).
_REACH: Dict[tuple, int] = {}
_REACH_ENTRIES = 4096


def _up(n: int) -> int:
    """The power of two at or above ``n`` (0 for 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cached_reach(reach: Callable[[CallNumbers], int], *, positions: int, batch: int, heads: int,
                 params: Dict[str, object]) -> int:
    """``reach`` (a module's ``_int_reach``) at a call's numbers, cached per call signature.

    A bound only grows with the positions and the batch, so they are rounded up to powers of two
    (a call is WIDE at most one power of two before it must be, and a run of chunks at advancing
    offsets reuses a few entries); ``n_q`` and ``n_k``, at most the largest position, range over
    ``[0, positions]``. An evaluation takes about a millisecond, a cache hit a dictionary lookup."""
    positions, batch = _up(positions), _up(batch)
    key = (reach, positions, batch, heads, tuple(sorted(params.items())))
    out = _REACH.get(key)
    if out is None:
        if len(_REACH) >= _REACH_ENTRIES:
            _REACH.clear()
        out = _REACH[key] = reach(CallNumbers("", positions=positions, batch=batch, heads=heads, n_q=(0, positions),
                                              n_k=(0, positions), params=params))
    return out
