"""The allowed pairs of every tile of a static mask, exactly, with numpy (no torch).

:class:`TileCounter` gives ``count[qb, kb]``, the allowed pairs of each tile of one batch row
and head; ``attncc explain`` derives its numbers from it (a tile is visited when its count is
not 0, and all its pairs are allowed when the count is its area). It is exact and fast because:

- the mask is evaluated on numpy arrays by the reference's own evaluator
  (:class:`attncc.evaluator.Evaluator`, which the float64 reference runs on torch tensors): the
  same nodes, dtypes (int64, float64, bool), order of operations and Python semantics of ``//``
  and ``%``. What numpy may round otherwise than torch (``exp``, ``sin``, ``sigmoid``, a power
  but small integer ones and square roots) and what the reference refuses (a division by zero,
  an input, a number where a condition belongs) raise :class:`Unsupported`: the caller takes the
  reference;
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

from attncc.evaluator import NUMPY, Evaluator
from attncc.spec import symbols as S
from attncc.spec.builtins import RandomBlocks
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

def _evaluate(expr, env: Mapping[str, object]) -> np.ndarray:
    """``expr`` on numpy arrays that broadcast (``i [R, 1]``, ``j [1, C]``; the other names are
    numbers), by the reference's own evaluator; what the reference refuses and what numpy may
    round otherwise than torch raise :class:`Unsupported` (the caller takes the reference, which
    says why)."""
    try:
        with np.errstate(all="ignore"):
            return Evaluator(NUMPY, env)(expr)
    except (ValueError, TypeError, ZeroDivisionError, OverflowError, NotImplementedError) as e:
        raise Unsupported(str(e)) from e


def mask_values(pattern: Pattern, env: Mapping[str, object]) -> np.ndarray:
    """``pattern.mask`` on the pairs of ``env`` (``i``, ``j`` arrays that broadcast), as bool."""
    return _evaluate(pattern.mask, env).astype(_BOOL, copy=False)


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
    env = {**env, var.name: np.arange(n, dtype=np.int64)}
    code = None
    for sub, block_of in reads:
        x = _evaluate(sub, env)
        if block_of is not None:
            if x.dtype != _INT:
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
