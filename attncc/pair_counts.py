"""The allowed pairs of every tile of a static mask, exactly, with numpy (no torch).

:class:`TileCounter` gives ``count[qb, kb]``, the allowed pairs of each tile of one batch row
and head; ``attncc explain`` derives its numbers from it (a tile is visited when its count is
not 0, and all its pairs are allowed when the count is its area). It is exact and fast because:

- the mask is evaluated with numpy node by node as the float64 reference evaluates it
  (:func:`attncc._reference.evaluate`, whose dispatch :class:`_Evaluator` follows line by line
  but shares no code with, so that the tests checking one against the other mean something):
  the same dtypes (int64, float64, bool), the same order of operations, Python's floor
  semantics for integer ``//`` and ``%``. What numpy may round otherwise than torch (``exp``,
  ``sin``, ``sigmoid``, a float ``%``, a power but small integer ones and square roots) and
  what the reference refuses (a division by zero, an input, a number where a condition
  belongs) raise :class:`Unsupported`: the caller takes the reference;
- classes: the mask reads ``i`` through its largest sub-expressions without ``j`` (``i // 64``,
  ``i < 64``; a ``random_blocks()`` through ``i // block``) only, so rows where those have the
  same values have the same mask, and likewise keys: the mask is evaluated on one row and one
  key of each class, and each pair counts as many pairs as its classes hold in a tile;
- translation: a mask of exact integer arithmetic (no int64 overflow at these sizes) that is
  the same expression after ``i -> i + T, j -> j + T`` (params substituted, relations moved to
  one side; sympy's own simplification decides), ``T`` a multiple of both tile sides and of
  every divisor in the mask, gives a whole tile the count of the tile ``T`` rows up and ``T``
  keys left: only the tiles within ``T`` of the first row or key and the ragged last ones are
  evaluated.

tests/test_pair_counts.py checks the counts against brute force (the reference on every pair)
for seeded random static masks at odd sizes and tile shapes, each way of counting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import sympy
from sympy.core.function import AppliedUndef

from attncc.core import semantics
from attncc.spec import symbols as S
from attncc.spec.builtins import (SHIFT_LIMIT, AlibiSlope, BitAnd, BitOr, BitXor, Bucket, FloatDiv, RandomBlocks, Shift,
                                  ToFloat)
from attncc.spec.ir import Pattern

CHUNK_PAIRS = 1 << 21  # pairs evaluated at once (bounds the memory of one mask evaluation)
MAX_TRANSLATION_NODES = 2000  # larger masks (unrolled reductions) skip the symbolic translation test
EXACT_INT = 1 << 62  # translation needs every integer the mask computes below this: no int64 overflow

_INT, _FLOAT, _BOOL = np.dtype(np.int64), np.dtype(np.float64), np.dtype(np.bool_)


class Unsupported(Exception):
    """The mask holds something numpy may evaluate otherwise than the reference, or that the
    reference refuses: take the reference."""


# ---------------------------------------------------------------------------------------------
# the mask in numpy, as the reference evaluates it
# ---------------------------------------------------------------------------------------------

def _is_int(x) -> bool:
    return x.dtype == _INT


def _common(*xs):
    """One dtype, as the reference's: float64 if any is, else int64 if any is not bool."""
    if any(x.dtype == _FLOAT for x in xs):
        return [x.astype(_FLOAT, copy=False) for x in xs]
    if any(x.dtype != _BOOL for x in xs):
        return [x.astype(_INT, copy=False) for x in xs]
    return list(xs)


def _lookup(x, fn, dtype):
    """``fn`` of every entry of an integer array, through a table over its distinct values."""
    values, inverse = np.unique(x, return_inverse=True)
    table = np.array([fn(int(v)) for v in values.tolist()], dtype=dtype)
    return table[inverse].reshape(np.shape(x))


_RELATIONS = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal, "==": np.equal,
              "!=": np.not_equal}
_BITWISE = {BitAnd: np.bitwise_and, BitOr: np.bitwise_or, BitXor: np.bitwise_xor}


class _Evaluator:
    """:func:`attncc._reference.evaluate` on numpy arrays that broadcast (``i [R, 1]``, ``j [1, C]``;
    the other names are numbers). Results are int64, float64 or bool arrays, as the reference's."""

    def __init__(self, env: Mapping[str, object]):
        self.env = env

    @staticmethod
    def const(value, dtype):
        return np.asarray(value, dtype=dtype)

    def value(self, name):
        if name not in self.env:
            raise Unsupported(f"no value for '{name}'")
        v = self.env[name]
        if isinstance(v, np.ndarray):
            return v
        if isinstance(v, bool):
            return self.const(v, _BOOL)
        if isinstance(v, int):
            return self.const(v, _INT)
        return self.const(float(v), _FLOAT)

    def float_(self, e):
        return self(e).astype(_FLOAT, copy=False)

    def bool_(self, e):
        x = self(e)
        if x.dtype != _BOOL:
            raise Unsupported(f"expected a condition, got a number: {e}")
        return x

    def integers(self, e):
        args = [self(a) for a in e.args]
        if not all(_is_int(x) for x in args):
            raise Unsupported(f"{type(e).__name__} of a non-integer: {e}")
        return np.broadcast_arrays(*args)

    def fold(self, op, args):
        out = self.bool_(args[0])
        for a in args[1:]:
            out = op(out, self.bool_(a))
        return out

    def __call__(self, e):  # noqa: C901 - the reference's dispatch, in its order
        if e is sympy.true or e is sympy.false:
            return self.const(bool(e), _BOOL)
        if e.is_Integer:
            return self.const(int(e), _INT)
        if e.is_Rational:
            return self.const(int(e.p) / int(e.q), _FLOAT)
        if e.is_Float:
            return self.const(float(e), _FLOAT)
        if e in (sympy.oo, -sympy.oo, sympy.zoo, sympy.nan):
            return self.const(float(e) if e is not sympy.zoo else math.inf, _FLOAT)
        if e.is_Symbol:
            return self.value(e.name)
        if isinstance(e, AppliedUndef):
            raise Unsupported(f"an input: {e}")
        if isinstance(e, Bucket):
            d = self(e.args[0])
            if not _is_int(d):
                raise Unsupported(f"bucket() of a non-integer: {e}")
            nb, md, bidir = e.options
            return _lookup(d, lambda v: semantics.t5_bucket(v, nb, md, bidir), _INT)
        if isinstance(e, AlibiSlope):
            hh, nh = self(e.args[0]), self(e.args[1])
            if not (_is_int(hh) and _is_int(nh) and nh.size == 1):
                raise Unsupported(f"alibi_slope() of non-integers: {e}")
            return _lookup(hh, lambda v: semantics.alibi_slope(v, int(nh)), _FLOAT)
        if isinstance(e, RandomBlocks):
            return self.random_blocks(e)
        if isinstance(e, ToFloat):  # its own arithmetic (exact in integers), then one conversion
            return self.float_(e.args[0])
        if isinstance(e, FloatDiv):
            return self.float_(e.args[0]) / self.float_(e.args[1])
        if isinstance(e, tuple(_BITWISE)):
            return _BITWISE[type(e)](*self.integers(e))
        if isinstance(e, Shift):  # floor(x * 2**n), n clamped to [-SHIFT_LIMIT, SHIFT_LIMIT]
            x, n = self.integers(e)
            n = np.clip(n, -SHIFT_LIMIT, SHIFT_LIMIT)
            return np.where(n >= 0, np.left_shift(x, np.maximum(n, 0)), np.right_shift(x, np.maximum(-n, 0)))
        if e.is_Add:
            terms = _common(*[self(a) for a in e.args])
            out = terms[0]
            for t in terms[1:]:
                out = out + t
            return out
        if e.is_Mul:
            num, den = sympy.fraction(e)
            if den != 1:
                return self.float_(num) / self.float_(den)
            factors = _common(*[self(a) for a in e.args])
            out = factors[0]
            for f in factors[1:]:
                out = out * f
            return out
        if e.is_Pow:
            return self.power(e)
        if isinstance(e, (sympy.floor, sympy.ceiling)):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            n, d = self(num), self(den)
            up = isinstance(e, sympy.ceiling)
            if _is_int(n) and _is_int(d):
                if np.any(d == 0):
                    raise Unsupported(f"integer division by zero in {e}")
                return -np.floor_divide(-n, d) if up else np.floor_divide(n, d)
            if n.dtype == _BOOL or d.dtype == _BOOL:
                raise Unsupported(f"a condition divided: {e}")
            q = n.astype(_FLOAT, copy=False) / d.astype(_FLOAT, copy=False)
            return np.ceil(q) if up else np.floor(q)
        if isinstance(e, sympy.Mod):
            a, m = _common(self(e.args[0]), self(e.args[1]))
            if not _is_int(a):  # torch.remainder and numpy round a float remainder their own ways
                raise Unsupported(f"% of non-integers: {e}")
            if np.any(m == 0):
                raise Unsupported(f"integer division by zero in {e}")
            return np.remainder(a, m)
        if isinstance(e, sympy.Abs):
            x = self(e.args[0])
            if x.dtype == _BOOL:
                raise Unsupported(f"abs() of a condition: {e}")
            return np.abs(x)
        if isinstance(e, (sympy.Min, sympy.Max)):
            args = _common(*[self(a) for a in e.args])
            pick = np.minimum if isinstance(e, sympy.Min) else np.maximum
            out = args[0]
            for a in args[1:]:
                out = pick(out, a)
            return out
        if isinstance(e, sympy.Piecewise):
            out = None
            for value, cond in reversed(e.args):
                v = self(value)
                if out is None:
                    nan = self.const(math.nan, _FLOAT)
                    out = v if cond is sympy.true else np.where(self.bool_(cond), *_common(v, nan))
                else:
                    out = np.where(self.bool_(cond), *_common(v, out))
            return out
        if isinstance(e, sympy.core.relational.Relational):
            a, c = _common(self(e.lhs), self(e.rhs))
            return _RELATIONS[e.rel_op](a, c)
        if isinstance(e, sympy.And):
            return self.fold(np.logical_and, e.args)
        if isinstance(e, sympy.Or):
            return self.fold(np.logical_or, e.args)
        if isinstance(e, sympy.Xor):
            return self.fold(np.logical_xor, e.args)
        if isinstance(e, sympy.Not):
            return np.logical_not(self.bool_(e.args[0]))
        if isinstance(e, sympy.ITE):
            c, a, d = e.args
            return np.where(self.bool_(c), self.bool_(a), self.bool_(d))
        if e.is_number and not e.free_symbols and not e.atoms(sympy.Function):  # pi, E
            return self.const(float(e), _FLOAT)
        raise Unsupported(f"{type(e).__name__} may round otherwise in numpy: {e}")

    def power(self, e):
        base, ex = e.args
        if ex.is_Integer and ex < 0:
            return 1.0 / self.float_(base**-ex)
        x = self(base)
        if _is_int(x) and ex.is_Integer:
            return np.power(x, int(ex))
        k = float(ex) if ex.is_number and ex.is_real else None
        if x.dtype == _BOOL:
            raise Unsupported(f"a power of a condition: {e}")
        if k in (1.0, 2.0, 3.0, 4.0):  # the reference's products, correctly rounded each
            x = x.astype(_FLOAT, copy=False)
            out = x
            for _ in range(int(k) - 1):
                out = out * x
            return out
        if k in (0.5, -0.5):
            root = np.sqrt(x.astype(_FLOAT, copy=False))
            return root if k > 0 else 1.0 / root
        raise Unsupported(f"a power numpy may round otherwise: {e}")

    def random_blocks(self, e):
        ii, jj, nk = self(e.args[0]), self(e.args[1]), self(e.args[2])
        if not (_is_int(ii) and _is_int(jj) and _is_int(nk) and nk.size == 1):
            raise Unsupported(f"random_blocks() of non-integers: {e}")
        r, block, seed = e.options
        qb, kb = np.floor_divide(ii, block), np.floor_divide(jj, block)
        if np.any(qb < 0) or np.any(kb < 0):
            raise Unsupported(f"random_blocks() at a negative position: {e}")
        n_kb = -(-int(nk) // block)
        rows, inverse = np.unique(qb, return_inverse=True)
        table = np.zeros((max(len(rows), 1), n_kb + 1), dtype=_BOOL)  # column n_kb: every block past n_k
        for q, row in enumerate(rows.tolist()):
            chosen = semantics.random_block_set(row, n_kb, r, seed)
            if chosen:
                table[q, list(chosen)] = True
        return table[inverse.reshape(qb.shape), np.minimum(kb, n_kb)]


def mask_values(pattern: Pattern, env: Mapping[str, object]) -> np.ndarray:
    """``pattern.mask`` on the pairs of ``env`` (``i``, ``j`` arrays that broadcast), as bool."""
    with np.errstate(all="ignore"):
        return _Evaluator(env)(pattern.mask).astype(_BOOL, copy=False)


def param_values(pattern: Pattern, overrides: Optional[Mapping[str, object]]) -> Dict[str, object]:
    """The params as the reference takes them (an int param an int, a float param a float);
    an override the reference would refuse raises :class:`Unsupported` (the reference says why)."""
    values = dict(pattern.param_values)
    for name, v in (overrides or {}).items():
        p = next((p for p in pattern.params if p.name == name), None)
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if p is None or not number or (p.kind == "int" and not isinstance(v, int)):
            raise Unsupported(f"param {name}={v!r}")
        if p.count and v > p.value:
            raise Unsupported(f"param {name}={v!r} past its count")
        values[name] = v if p.kind == "int" else float(v)
    return values


# ---------------------------------------------------------------------------------------------
# classes: rows (keys) the mask cannot tell apart
# ---------------------------------------------------------------------------------------------

def _reads(expr, var, other) -> List[Tuple[sympy.Basic, Optional[int]]]:
    """What ``expr`` reads of position ``var``: its largest sub-expressions free of ``other``
    (block None), and the position arguments of a ``random_blocks()``, which reads them through
    ``// block``. Equal values of these at two positions give them equal masks."""
    out: Dict[Tuple[sympy.Basic, Optional[int]], None] = {}

    def visit(e):
        free = e.free_symbols
        if var not in free:
            return
        if isinstance(e, sympy.functions.elementary.piecewise.ExprCondPair):  # a pair, not a value
            visit(e.expr)
            visit(e.cond)
            return
        if other not in free:
            out[(e, None)] = None
            return
        if isinstance(e, RandomBlocks):
            _, block, _ = e.options
            for a in e.args:
                if var in a.free_symbols and other not in a.free_symbols and a in (e.args[0], e.args[1]):
                    out[(a, block)] = None
                else:
                    visit(a)
            return
        for a in e.args:
            visit(a)

    visit(expr)
    return list(out)


def _key(x: np.ndarray) -> np.ndarray:
    """int64 that are equal exactly when the values are (floats bit for bit: -0.0 is not 0.0)."""
    if x.dtype == _FLOAT:
        return x.view(np.int64)
    return x.astype(np.int64, copy=False)


@dataclass(frozen=True, eq=False)
class _Axis:
    """Positions ``[0, n)`` in blocks of ``block``: ``cls[p]``, the class of position p, and
    ``reps[c]``, a position of class c (None and None: every position a class of its own)."""

    n: int
    block: int
    cls: Optional[np.ndarray] = None
    reps: Optional[np.ndarray] = None

    @property
    def classes(self) -> int:
        return self.n if self.reps is None else len(self.reps)

    def part(self, lo: int, hi: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """(positions to evaluate, the index into them of each position of ``[lo, hi)``; None:
        the positions themselves)."""
        if self.cls is None:
            return np.arange(lo, hi, dtype=np.int64), None
        used, local = np.unique(self.cls[lo:hi], return_inverse=True)
        return self.reps[used], local


def _axis(pattern: Pattern, env: Mapping[str, object], var, other, n: int, block: int) -> _Axis:
    """Positions ``[0, n)`` of ``var`` grouped by what the mask reads of them (:func:`_reads`)."""
    reads = _reads(pattern.mask, var, other)
    if not reads:
        return _Axis(n, block, np.zeros(n, dtype=np.int64), np.zeros(1, dtype=np.int64))
    ev = _Evaluator({**env, var.name: np.arange(n, dtype=np.int64)})
    code = None
    with np.errstate(all="ignore"):
        for sub, block_of in reads:
            x = ev(sub)
            if block_of is not None:
                if not _is_int(x):
                    raise Unsupported(f"random_blocks() of a non-integer: {sub}")
                x = np.floor_divide(x, block_of)
            _, inverse = np.unique(_key(np.broadcast_to(x, (n,))), return_inverse=True)
            code = inverse if code is None else np.unique(code * (int(inverse.max()) + 1) + inverse,
                                                          return_inverse=True)[1]
    _, first, cls = np.unique(code, return_index=True, return_inverse=True)
    if len(first) == n:
        return _Axis(n, block)
    return _Axis(n, block, cls.astype(np.int64), first.astype(np.int64))


def _block_sums(x: np.ndarray, index: Optional[np.ndarray], block: int, axis: int) -> np.ndarray:
    """Sums over blocks of ``block`` positions along ``axis``, position p standing for entry
    ``index[p]`` of ``x`` (None: entry p; the last block may be short)."""
    if index is None:
        if x.dtype == _BOOL:
            x = x.view(np.uint8)
        return np.add.reduceat(x, np.arange(0, x.shape[axis], block), axis=axis, dtype=np.int64)
    classes = x.shape[axis]
    key = np.arange(len(index), dtype=np.int64) // block * classes + index
    entries, mult = np.unique(key, return_counts=True)  # (block, class) pairs, sorted by block
    blocks, cls = np.divmod(entries, classes)
    shape = [1, 1]
    shape[axis] = len(entries)
    taken = np.take(x, cls, axis=axis).astype(np.int64) * mult.reshape(shape)
    starts = np.searchsorted(blocks, np.arange(-(-len(index) // block)))
    return np.add.reduceat(taken, starts, axis=axis)


# ---------------------------------------------------------------------------------------------
# translation: a whole tile has the count of the tile T rows up and T keys left
# ---------------------------------------------------------------------------------------------

def _int_bound(e, bounds: Mapping[sympy.Symbol, int]) -> Optional[int]:
    """A bound of ``|e|`` (1 for a condition) when the reference computes ``e`` and each of its
    sub-expressions in int64 (or bool), below :data:`EXACT_INT`: exact integer arithmetic.
    None otherwise (a float, a division or modulus that varies per pair, anything else)."""
    def sub(a):
        v = _int_bound(a, bounds)
        if v is None:
            raise Unsupported(str(a))
        return v

    def free_of_positions(a):
        return not (a.free_symbols & {S.i, S.j})

    try:
        if e is sympy.true or e is sympy.false:
            v = 1
        elif e.is_Integer:
            v = abs(int(e))
        elif e.is_Symbol:
            v = bounds.get(e)
        elif isinstance(e, (sympy.Add, sympy.Min, sympy.Max)):
            parts = [sub(a) for a in e.args]
            v = sum(parts) if isinstance(e, sympy.Add) else max(parts)
        elif e.is_Mul:
            if sympy.fraction(e)[1] != 1:
                return None  # the reference divides in float64
            v = math.prod(sub(a) for a in e.args)
        elif e.is_Pow:
            base, ex = e.args
            v = sub(base) ** int(ex) if ex.is_Integer and 0 <= ex <= 64 else None
        elif isinstance(e, (sympy.floor, sympy.ceiling)):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            sub(den)
            v = sub(num) if free_of_positions(den) else None  # |floor(n / d)| <= |n| for an integer d != 0
        elif isinstance(e, sympy.Mod):
            v = max(sub(e.args[0]), sub(e.args[1])) if free_of_positions(e.args[1]) else None
        elif isinstance(e, sympy.Abs):
            v = sub(e.args[0])
        elif isinstance(e, sympy.Piecewise):
            if e.args[-1].cond is not sympy.true:
                return None  # no default: nan, a float
            v = max(max(sub(p.expr), sub(p.cond)) for p in e.args)
        elif isinstance(e, (sympy.core.relational.Relational, sympy.And, sympy.Or, sympy.Xor, sympy.Not, sympy.ITE)):
            v = max(sub(a) for a in e.args) and 1
        else:
            v = None
    except Unsupported:
        return None
    return v if v is not None and v < EXACT_INT else None


def _canonical(e):
    """``e`` with each relation as ``lhs - rhs`` against 0 (so that a shift of both sides cancels)."""
    if isinstance(e, sympy.core.relational.Relational):
        return type(e)(_canonical(e.lhs) - _canonical(e.rhs), 0)
    if e.args and not e.is_Atom:
        return e.func(*[_canonical(a) for a in e.args])
    return e


def _period(mask, period: int, top: int) -> Optional[int]:
    """``period`` times the mask's divisors (integers once params are substituted), when the
    mask is the same expression after ``i, j -> i + T, j + T`` and T is below ``top``."""
    for e in sympy.preorder_traversal(mask):
        divisor = None
        if isinstance(e, sympy.Mod):
            divisor = e.args[1]
        elif isinstance(e, (sympy.floor, sympy.ceiling)):
            divisor = sympy.fraction(sympy.together(e.args[0]))[1]
        if divisor is not None:
            if not divisor.is_Integer or divisor == 0:
                return None
            period = math.lcm(period, abs(int(divisor)))
    if period >= top:
        return None
    shifted = mask.xreplace({S.i: S.i + period, S.j: S.j + period})
    return period if _canonical(shifted) == _canonical(mask) else None


def translation_period(pattern: Pattern, params: Mapping[str, object], *, n_q: int, n_k: int, block_m: int,
                       block_n: int, batch: int, heads: int) -> Optional[int]:
    """T, a multiple of both tile sides, with ``mask(i + T, j + T) == mask(i, j)`` for every pair
    of positions in ``[0, n_q) x [0, n_k)`` (and the reference's exact integer arithmetic there),
    or None when the mask is not shown to be so."""
    mask = pattern.mask
    if mask is None or sum(1 for _ in sympy.preorder_traversal(mask)) > MAX_TRANSLATION_NODES:
        return None
    top = max(n_q, n_k)
    bounds = {S.i: top, S.j: top, S.b: batch, S.h: heads, S.n_q: n_q, S.n_k: n_k, S.n_heads: heads}
    values = {}
    for p in pattern.params:
        v = params[p.name]
        if isinstance(v, int) and not isinstance(v, bool):
            bounds[p.symbol] = abs(v)
            values[p.symbol] = sympy.Integer(v)
    if _int_bound(mask, bounds) is None:
        return None
    try:
        return _period(mask.xreplace(values), math.lcm(block_m, block_n), top)
    except (TypeError, ValueError, ZeroDivisionError):  # a divisor 0 (the reference says so), relations
        return None  # of conditions (sympy cannot move them to one side)


# ---------------------------------------------------------------------------------------------
# the counts
# ---------------------------------------------------------------------------------------------

class TileCounter:
    """Allowed pairs per tile of one static mask at one size: :meth:`counts` per batch row and
    head. Rows and keys are positions from 0 (``n_q``, ``n_k`` of them)."""

    def __init__(self, pattern: Pattern, *, n_q: int, n_k: int, block_m: int, block_n: int,
                 params: Optional[Mapping[str, object]] = None, batch: int = 1, heads: int = 1):
        self.pattern = pattern
        self.n_q, self.n_k, self.block_m, self.block_n = n_q, n_k, block_m, block_n
        self.params = param_values(pattern, params)
        self.heads = heads
        self.period = translation_period(pattern, self.params, n_q=n_q, n_k=n_k, block_m=block_m, block_n=block_n,
                                         batch=batch, heads=heads)
        self.evaluated = 0  # pairs the mask was evaluated on so far (the work; tests bound it)

    def counts(self, b: int = 0, h: int = 0, *, translate: Optional[bool] = None) -> np.ndarray:
        """int64 ``[query blocks, key blocks]``: the allowed pairs of each tile at batch row
        ``b``, head ``h``. ``translate``: by translation (True; the mask must have a
        :attr:`period`), by classes of rows and keys only (False), or whichever evaluates fewer
        pairs (None)."""
        if translate and self.period is None:
            raise ValueError(f"translate=True: the mask of {self.pattern.name} is not shown invariant by a translation")
        n_q, n_k, bm, bn = self.n_q, self.n_k, self.block_m, self.block_n
        if self.pattern.mask is None:
            rows = np.minimum(n_q - np.arange(0, n_q, bm), bm)
            cols = np.minimum(n_k - np.arange(0, n_k, bn), bn)
            return rows[:, None] * cols[None, :]
        env = {**self.params, "b": np.asarray(b, dtype=np.int64), "h": np.asarray(h, dtype=np.int64),
               "n_q": n_q, "n_k": n_k, "n_heads": self.heads}
        rows = _axis(self.pattern, env, S.i, S.j, n_q, bm)
        keys = _axis(self.pattern, env, S.j, S.i, n_k, bn)
        t = self.period
        if translate is None:
            pairs = rows.classes * keys.classes  # evaluated without translation
            translate = t is not None and (t + bm) * keys.classes + rows.classes * (t + bn) < pairs
        if translate:
            return self._translated(env, rows, keys, t)
        return self._region(env, rows, keys, 0, n_q, 0, n_k)

    def _region(self, env, rows: _Axis, keys: _Axis, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """The counts of the tiles of rows ``[r0, r1)`` x keys ``[c0, c1)`` (both starting a block)."""
        row_at, row_index = rows.part(r0, r1)
        key_at, key_index = keys.part(c0, c1)
        per_key_block = np.empty((len(row_at), -(-(c1 - c0) // self.block_n)), dtype=np.int64)
        step = max(1, CHUNK_PAIRS // max(len(key_at), 1))
        for a in range(0, len(row_at), step):
            rows_here = row_at[a:a + step]
            m = mask_values(self.pattern, {**env, "i": rows_here[:, None], "j": key_at[None, :]})
            m = np.broadcast_to(m, (len(rows_here), len(key_at)))
            self.evaluated += m.size
            per_key_block[a:a + step] = _block_sums(m, key_index, self.block_n, axis=1)
        return _block_sums(per_key_block, row_index, self.block_m, axis=0)

    def _translated(self, env, rows: _Axis, keys: _Axis, t: int) -> np.ndarray:
        """The counts from the tiles within ``t`` of the first row or key and the ragged last ones;
        every other tile is one of those moved by a multiple of ``t`` along the diagonal."""
        n_q, n_k, bm, bn = self.n_q, self.n_k, self.block_m, self.block_n
        nqb, nkb = -(-n_q // bm), -(-n_k // bn)
        a, c = t // bm, t // bn  # blocks per period
        r_a, k_c = min(a * bm, n_q), min(c * bn, n_k)  # the first rows and keys
        whole_q, whole_k = n_q // bm, n_k // bn
        counts = np.zeros((nqb, nkb), dtype=np.int64)
        counts[:a] = self._region(env, rows, keys, 0, r_a, 0, n_k)
        if r_a < n_q:
            counts[a:, :c] = self._region(env, rows, keys, r_a, n_q, 0, k_c)
            if whole_q < nqb and k_c < n_k:  # the short last query block
                counts[whole_q:, c:] = self._region(env, rows, keys, whole_q * bm, n_q, k_c, n_k)
            if whole_k < nkb and k_c < n_k:  # the short last key block
                counts[a:, whole_k:] = self._region(env, rows, keys, r_a, n_q, whole_k * bn, n_k)
        if a < whole_q and c < whole_k:
            qb = np.arange(a, whole_q)[:, None]
            kb = np.arange(c, whole_k)[None, :]
            steps = np.minimum(qb // a, kb // c)
            counts[a:whole_q, c:whole_k] = counts[qb - steps * a, kb - steps * c]
        return counts
