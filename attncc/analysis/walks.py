"""Walks: how each kernel loop finds its blocks, as typed data codegen renders.

A softmax pattern's kernels have two walks: the forward and the dQ kernel give each query block
its key blocks; the dK/dV kernel gives each key block its query blocks, the same thing for the
transposed mask (``i <-> j``, ``n_q <-> n_k``). A :class:`Walk` is one of

- DENSE: every block, FULL but a ragged last one;
- BANDS: closed forms from a :class:`~attncc.analysis.bands.Cover`, computed per outer block by
  :attr:`Walk.steps`, a straight-line program of integer sympy expressions over the symbols of
  :mod:`attncc.analysis.symbols` (``q_lo`` the block's first row, ``q_hi`` its last *existing*
  row, ``k_offset``, ``N_K``, ``BLOCK_N``), the pattern's params, ``n_q``, ``n_k``, ``b``, ``h``
  and the earlier steps. The kernel prints it line by line; the analysis evaluates it (same
  expressions, :func:`evaluate_steps`). Its outputs:

  * one key interval per block (``segments == 1``): ``lo <= full_lo <= full_hi <= hi``: a
    masked head ``[lo, full_lo)``, an unmasked middle, a masked tail ``[full_hi, hi)``;
  * two (a column and a band): the FULL blocks as ``FULL_PIECES`` sorted disjoint ranges and the
    others visited as ``MASKED_PIECES`` disjoint ranges, each walked by one branch-free loop
    over a virtual index ``t``: ``kb = t + base + sum(where(t >= at_p, jump_p, 0))``;

  exact when ``precondition`` (host side: params, lengths and the call's first / last row as
  :data:`~attncc.analysis.bands.FIRST` / ``LAST``) holds; otherwise the call takes the exact
  block lists;
- BLOCK_LIST: per outer block the lists of its FULL and PARTIAL blocks, made at run time: from
  an exact classification of every tile (every pair evaluated; static patterns: once per
  shape, cached) or, with ``[inputs]``, from the interval classifier on every call.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Dict, List, Mapping, Optional, Tuple

import sympy
from sympy.core.function import AppliedUndef

from attncc.analysis.bands import FIRST, LAST, Band, Cover
from attncc.analysis.intexpr import Unsupported, int_value
from attncc.analysis.symbols import BLOCK_N, BOUND_SYMBOLS, N_K, k_offset, q_hi, q_lo
from attncc.core.lazy import lazy_module
from attncc.spec import symbols as S
from attncc.spec.builtins import SHIFT_LIMIT, BitAnd, BitOr, BitXor, FloatDiv, Shift, Sigmoid, ToFloat, quotient

torch = lazy_module("torch")  # on first use: `attncc build` never imports it

FULL_PIECES, MASKED_PIECES = 2, 6  # ranges of a two-interval walk (see _two_intervals)


class Iteration(str, Enum):
    """How a walk finds its blocks (module docstring)."""

    DENSE = "dense"
    BANDS = "bands"
    BLOCK_LIST = "block_list"
    AFFINE = "bands"  # the former name of BANDS (an alias)


@dataclass(frozen=True)
class Walk:
    """How one loop finds its blocks (module docstring). ``cover``, ``steps``, ``segments``,
    ``precondition``: BANDS only. ``reason``: why there is no closed form (BLOCK_LIST), or why
    the closed form may not apply (its precondition), as a sentence for ``attncc explain``.
    ``heavy_rows``: the last row of the leading rows that see every key (global rows: a full-row
    band ``x <= r``), an expression of the int params alone, or None: the kernels dispatch the
    blocks holding those rows first (:func:`heavy_rows`)."""

    kind: Iteration
    cover: Optional[Cover] = None
    steps: Tuple[Tuple[sympy.Dummy, sympy.Expr], ...] = ()
    segments: int = 0
    precondition: sympy.Basic = sympy.true
    reason: str = ""
    heavy_rows: Optional[sympy.Expr] = None

    @property
    def monotone(self) -> sympy.Basic:
        """The part of the precondition a BANDS walk needs to be sound (:attr:`Cover.monotone`)."""
        return self.cover.monotone if self.cover is not None else sympy.true

    @property
    def outputs(self) -> Tuple[str, ...]:
        if self.segments == 1:
            return ("lo", "hi", "full_lo", "full_hi")
        names = ["n_full", "f_base", "f_at2", "f_jump2", "n_masked", "m_base"]
        return tuple(names + [f"m_{k}{p}" for p in range(2, MASKED_PIECES + 1) for k in ("at", "jump")])


def bands_walk(cover: Cover) -> Walk:
    """The BANDS walk of a cover."""
    b = _Builder()
    if cover.intervals <= 1:
        _one_interval(b, cover)
        segments = 1
    else:
        _two_intervals(b, cover)
        segments = 2
    return Walk(Iteration.BANDS, cover, tuple(b.steps), segments, cover.precondition,
                "" if cover.precondition is sympy.true else f"closed form exact when {cover.precondition}",
                heavy_rows(cover))


def heavy_rows(cover: Cover) -> Optional[sympy.Expr]:
    """The last row position of the cover's leading full-row bands (``x <= r``: rows that see every
    key, so their blocks walk every key block where the others walk a few), as an expression of
    int params only (the same in every program: no ``b``, ``h``, lengths or inputs), a guard of
    int params taken into it; None when there is none. Only a schedule: the kernels run the
    blocks holding those rows first, for every batch row and head, so that the longest programs
    do not start last (any value, clamped, gives the same results)."""
    ends = []
    for band in cover.rows:
        if band.row_lo is not None or band.row_hi is None:
            continue
        if not all(_int_params_only(e) for e in (band.row_hi, band.guard)):
            continue
        ends.append(_where(band.guard, band.row_hi, -1))
    return _max(*ends) if ends else None


# what differs between the programs of one launch or between calls of one signature: no heavy rows
_CALL_SYMBOLS = frozenset(S.INDEX_VARS.values()) | {S.n_heads, FIRST, LAST} | frozenset(BOUND_SYMBOLS.values())


def _int_params_only(e) -> bool:
    """Whether ``e`` reads int params only (no position, length, batch row, head or input)."""
    return (not e.atoms(AppliedUndef)
            and all(isinstance(s, sympy.Symbol) and not isinstance(s, sympy.Dummy) and s.is_integer
                    and s not in _CALL_SYMBOLS for s in e.free_symbols))


# ---------------------------------------------------------------------------------------------
# the program
# ---------------------------------------------------------------------------------------------

class _Builder:
    def __init__(self):
        self.steps: List[Tuple[str, sympy.Expr]] = []

    def let(self, name: str, expr, boolean: bool = False, position: bool = False):
        # a Dummy: never equal to a param of the same name. position: a row position (>= 0, so
        # that a kernel divides it with //)
        if boolean:
            sym = sympy.Dummy(name)
        else:
            sym = sympy.Dummy(name, integer=True, nonnegative=True) if position else sympy.Dummy(name, integer=True)
        self.steps.append((sym, expr))
        return sym


def _max(*args):
    return sympy.Max(*args, evaluate=False) if len(args) > 1 else args[0]


def _min(*args):
    return sympy.Min(*args, evaluate=False) if len(args) > 1 else args[0]


def _rel(kind, a, b):
    return kind(a, b, evaluate=False)


K1 = k_offset + N_K - 1  # the last key position of the call
N_KEY_BLOCKS = sympy.floor((N_K + BLOCK_N - 1) / BLOCK_N, evaluate=False)


def _where(cond, a, b):
    if cond is sympy.true:
        return a
    if cond is sympy.false:
        return b
    return sympy.Piecewise((a, cond), (b, True))


def _intervals(b: _Builder, cover: Cover):
    """Per block: the visited and the full key intervals ``[(x, y, on)]`` of the columns and the
    band (``x``/``y`` None: unbounded), and the conditions that every row / some row of the
    block is covered by a full-row band."""
    a, z = q_lo, q_hi
    some_covered = all_covered = sympy.false
    ua, ub = a, z  # the rows no full-row band covers
    if cover.rows:
        prefix = [_where(r.guard, z if r.row_hi is None else _min(r.row_hi, z), a - 1)
                  for r in cover.rows if r.row_lo is None]
        suffix = [_where(r.guard, _max(r.row_lo, a), z + 1) for r in cover.rows if r.row_lo is not None]
        conds = []
        if prefix:
            p = b.let("rows_hi", _max(*prefix) if len(prefix) > 1 else prefix[0])
            ua = b.let("free_lo", _max(a, p + 1), position=True)
            conds.append(_rel(sympy.Ge, p, a))
        if suffix:
            s = b.let("rows_lo", _min(*suffix) if len(suffix) > 1 else suffix[0])
            ub = b.let("free_hi", _min(z, s - 1))
            conds.append(_rel(sympy.Le, s, z))
        some_covered = b.let("some_rows", sympy.Or(*conds), boolean=True)
        all_covered = _rel(sympy.Gt, ua, ub)
    visited, full = [], []
    for c in cover.columns:
        visited.append((c.lower_at(0), c.upper_at(0), c.guard))
        full.append((c.lower_at(0), c.upper_at(0), c.guard))
    band = cover.band
    if band is not None:
        ra = a if band.row_lo is None else b.let("band_lo", _max(a, band.row_lo), position=True)
        rb = z if band.row_hi is None else _min(z, band.row_hi)
        on = sympy.And(band.guard, _rel(sympy.Le, ra, rb)) if band.row_lo is not None or band.row_hi is not None else band.guard
        if band.row_lo is not None or band.row_hi is not None:
            rb = b.let("band_hi", _max(ra, rb), position=True)  # >= ra: evaluated (and unused) when empty
        visited.append((band.lower_at(ra), band.upper_at(rb), on))
        inside = [band.guard]
        if band.row_lo is not None:
            inside.append(_rel(sympy.Le, band.row_lo, ua))
        if band.row_hi is not None:
            inside.append(_rel(sympy.Le, ub, band.row_hi))
        fb = ub if ub is z else _max(ua, ub)
        full.append((band.lower_at(fb), band.upper_at(ua), sympy.And(*inside)))
    return visited, full, some_covered, all_covered


def _clipped(b: _Builder, name: str, iv, everything):
    """An interval clipped to the call's keys ``[k_offset, K1]``: ``(x, y, on)`` as steps."""
    x, y, on = iv
    x = k_offset if x is None else _max(x, k_offset)
    y = K1 if y is None else _min(y, K1)
    if everything is not sympy.false:
        x, y = _where(everything, k_offset, x), _where(everything, K1, y)
        on = sympy.Or(everything, on)
    xs = b.let(f"{name}_x", x)
    ys = b.let(f"{name}_y", y)
    ons = b.let(f"{name}_on", sympy.And(on, _rel(sympy.Le, xs, ys)), boolean=True)
    return xs, ys, ons


def _floor(x):
    return sympy.floor(x, evaluate=False)


def _first_block(x):  # the block holding key position x >= k_offset
    return _floor(_max(0, x - k_offset) / BLOCK_N)


def _first_whole_block(x):  # the first block starting at or after x
    return _floor((_max(0, x - k_offset) + BLOCK_N - 1) / BLOCK_N)


def _blocks_through(y):  # blocks [0, n) end at or before key y (n whole blocks up to y)
    return _floor(_max(0, y - k_offset + 1) / BLOCK_N)


def _one_interval(b: _Builder, cover: Cover) -> None:
    visited, full, some_covered, all_covered = _intervals(b, cover)
    if not visited:  # full rows only
        visited, full = [(None, None, sympy.false)], [(None, None, sympy.false)]
    vx, vy, von = _clipped(b, "v", visited[0], some_covered)
    lo = b.let("lo", _where(von, _first_block(vx), 0))
    hi = b.let("hi", _where(von, _first_block(vy) + 1, 0))
    fx, fy, fon = _clipped(b, "f", full[0], all_covered)
    # FULL blocks lie inside the visited ones; the clamps keep lo <= full_lo <= full_hi <= hi
    flo = b.let("full_lo", _where(fon, _min(_max(_first_whole_block(fx), lo), hi), lo))
    b.let("full_hi", _max(flo, _where(fon, _min(_blocks_through(fy), hi), flo)))


def _two_intervals(b: _Builder, cover: Cover) -> None:
    """Visited block ranges V1, V2 (sorted, merged), FULL ranges F1, F2 (merged where their keys
    touch, then sorted), and the masked pieces ``V_s ∩ (complement of F)``: six disjoint ranges."""
    visited, full, some_covered, all_covered = _intervals(b, cover)
    nkb = b.let("n_blocks", N_KEY_BLOCKS)
    v = []
    for k, iv in enumerate(visited, 1):
        x, y, on = _clipped(b, f"v{k}", iv, some_covered)
        v.append((b.let(f"v{k}_lo", _where(on, _first_block(x), nkb)), b.let(f"v{k}_hi", _where(on, _first_block(y) + 1, nkb))))
    swap = b.let("v_swap", _rel(sympy.Lt, v[1][0], v[0][0]), boolean=True)
    s1lo, s1hi = b.let("s1_lo", _where(swap, v[1][0], v[0][0])), b.let("s1_hi", _where(swap, v[1][1], v[0][1]))
    s2lo, s2hi = b.let("s2_lo", _where(swap, v[0][0], v[1][0])), b.let("s2_hi", _where(swap, v[0][1], v[1][1]))
    join = b.let("v_join", _rel(sympy.Le, s2lo, s1hi), boolean=True)
    spans = [(s1lo, b.let("s1_end", _where(join, _max(s1hi, s2hi), s1hi))),
             (b.let("s2_start", _where(join, nkb, s2lo)), b.let("s2_end", _where(join, nkb, s2hi)))]
    # FULL key intervals: empty ones as (K1 + 1, K1), sorted by start, merged when they touch
    f = []
    for k, iv in enumerate(full, 1):
        x, y, on = _clipped(b, f"f{k}", iv, all_covered)
        f.append((b.let(f"f{k}_a", _where(on, x, K1 + 1)), b.let(f"f{k}_b", _where(on, y, K1))))
    fswap = b.let("f_swap", _rel(sympy.Lt, f[1][0], f[0][0]), boolean=True)
    a1, b1 = _where(fswap, f[1][0], f[0][0]), _where(fswap, f[1][1], f[0][1])
    a2, b2 = _where(fswap, f[0][0], f[1][0]), _where(fswap, f[0][1], f[1][1])
    a1, b1, a2, b2 = (b.let(n, e) for n, e in (("g1_a", a1), ("g1_b", b1), ("g2_a", a2), ("g2_b", b2)))
    touch = b.let("f_join", _rel(sympy.Le, a2, b1 + 1), boolean=True)
    b1 = b.let("g1_end", _where(touch, _max(b1, b2), b1))
    a2, b2 = b.let("g2_start", _where(touch, K1 + 1, a2)), b.let("g2_end", _where(touch, K1, b2))
    blocks = []
    for k, (x, y) in enumerate(((a1, b1), (a2, b2)), 1):
        lo_ = b.let(f"h{k}_lo", _first_whole_block(x))
        hi_ = b.let(f"h{k}_hi", _blocks_through(y))
        some = _rel(sympy.Lt, lo_, hi_)
        blocks.append((b.let(f"h{k}_start", _where(some, lo_, nkb)), b.let(f"h{k}_stop", _where(some, hi_, nkb))))
    bswap = b.let("h_swap", _rel(sympy.Lt, blocks[1][0], blocks[0][0]), boolean=True)
    f1lo = b.let("full1_lo", _where(bswap, blocks[1][0], blocks[0][0]))
    f1hi = b.let("full1_hi", _where(bswap, blocks[1][1], blocks[0][1]))
    f2lo = b.let("full2_lo", _where(bswap, blocks[0][0], blocks[1][0]))
    f2hi = b.let("full2_hi", _where(bswap, blocks[0][1], blocks[1][1]))
    c1 = b.let("n_full1", f1hi - f1lo)
    b.let("n_full", c1 + f2hi - f2lo)
    b.let("f_base", f1lo)
    b.let("f_at2", c1)
    b.let("f_jump2", f2lo - f1hi)
    complement = [(0, f1lo), (f1hi, f2lo), (f2hi, nkb)]
    starts, counts = [], []
    for vlo, vhi in spans:
        for clo, chi in complement:
            p = len(starts) + 1
            start = b.let(f"m{p}_start", _max(vlo, clo))
            counts.append(b.let(f"m{p}_count", _max(0, _min(vhi, chi) - start)))
            starts.append(start)
    b.let("n_masked", sympy.Add(*counts))
    b.let("m_base", starts[0])
    at = counts[0]
    for p in range(2, MASKED_PIECES + 1):
        b.let(f"m_at{p}", at)
        b.let(f"m_jump{p}", starts[p - 1] - starts[p - 2] - counts[p - 2])
        at = at + counts[p - 1]


# ---------------------------------------------------------------------------------------------
# the walk as sorted segments (kernels that walk head, middle and tail per segment)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Segments:
    """A forward walk as ``len(segments)`` key-block segments per query block, each
    ``(lo, full_lo, full_hi, hi)`` with ``lo <= full_lo <= full_hi <= hi``: a masked head, an
    unmasked middle, a masked tail. The non-empty segments are disjoint and in ascending order;
    together their ``[lo, hi)`` are the walk's visited blocks and their ``[full_lo, full_hi)`` its
    FULL ones, so the segments are exact where the walk is (its precondition). ``steps``: a
    straight-line program as :attr:`Walk.steps` (the walk's steps the segments need, then those
    that sort them); ``segments``: the steps holding each segment's four values. The Gluon kernels
    walk them (attncc.runtime.gluon.walks, rendered by attncc.codegen.gluon)."""

    steps: Tuple[Tuple[sympy.Dummy, sympy.Expr], ...]
    segments: Tuple[Tuple[sympy.Dummy, sympy.Dummy, sympy.Dummy, sympy.Dummy], ...]


def sorted_segments(walk: Walk) -> Segments:
    """The :class:`Segments` of a DENSE or BANDS walk.

    DENSE: one segment, every block, FULL but a ragged last one. BANDS with one key interval: its
    ``(lo, full_lo, full_hi, hi)``. With two: the visited spans ``s1 < s2`` (one span when they
    touch) and the FULL ranges ``full1 < full2`` of :func:`_two_intervals`, each FULL range inside
    one span. Two spans: a segment each, holding the FULL range inside it (``full1`` is in the
    first span or, when it is not, the only FULL range and in the second). One span: it is cut at
    the end of ``full1``: ``[s1, full1]`` then ``(full1, full2, rest)``."""
    b = _Builder()
    if walk.kind is Iteration.DENSE:
        lo = b.let("lo", sympy.Integer(0))
        full_hi = b.let("full_hi", _floor(N_K / BLOCK_N))
        hi = b.let("hi", N_KEY_BLOCKS)
        return Segments(tuple(b.steps), ((lo, lo, full_hi, hi),))
    if walk.kind is not Iteration.BANDS:
        raise ValueError(f"a {walk.kind.value} walk has no closed-form segments")
    step = {sym.name: sym for sym, _ in walk.steps}
    if len(step) != len(walk.steps):
        raise AssertionError("a walk's steps have one name each")
    if walk.segments == 1:
        return Segments(walk.steps, ((step["lo"], step["full_lo"], step["full_hi"], step["hi"]),))
    s1_lo, s1_end, s2_start, s2_end, join = (step[n] for n in ("s1_lo", "s1_end", "s2_start", "s2_end", "v_join"))
    f1_lo, f1_hi, f2_lo, f2_hi = (step[n] for n in ("full1_lo", "full1_hi", "full2_lo", "full2_hi"))
    first = b.let("first_full", _rel(sympy.Lt, f1_lo, s1_end), boolean=True)  # full1 lies in the first span
    flo1 = b.let("seg1_full_lo", _where(first, f1_lo, s1_end))
    fhi1 = b.let("seg1_full_hi", _where(first, f1_hi, s1_end))
    hi1 = b.let("seg1_hi", _where(join, fhi1, s1_end))
    lo2 = b.let("seg2_lo", _where(join, fhi1, s2_start))
    hi2 = b.let("seg2_hi", _where(join, s1_end, s2_end))
    # the other FULL range (an empty one sits at the last block: clipped to the segment's end)
    flo2 = b.let("seg2_full_lo", _min(_where(first, f2_lo, f1_lo), hi2))
    fhi2 = b.let("seg2_full_hi", _min(_where(first, f2_hi, f1_hi), hi2))
    steps = _needed(walk.steps, {s1_lo, s1_end, s2_start, s2_end, join, f1_lo, f1_hi, f2_lo, f2_hi}) + tuple(b.steps)
    return Segments(steps, ((s1_lo, flo1, fhi1, hi1), (lo2, flo2, fhi2, hi2)))


def _needed(steps, wanted) -> tuple:
    """The steps that ``wanted`` (step symbols) read, directly or through other steps, in order."""
    keep = set(wanted)
    for sym, expr in reversed(steps):
        if sym in keep:
            keep |= {s for s in expr.free_symbols if isinstance(s, sympy.Dummy)}
    return tuple((sym, expr) for sym, expr in steps if sym in keep)


# ---------------------------------------------------------------------------------------------
# evaluation (the analysis' own view of what the kernel computes)
# ---------------------------------------------------------------------------------------------

# float functions of one argument a row guard may hold, by their torch names (as the reference's evaluator)
_UNARY = {sympy.exp: "exp", sympy.log: "log", sympy.sin: "sin", sympy.cos: "cos", sympy.tan: "tan",
          sympy.tanh: "tanh", sympy.erf: "erf", Sigmoid: "sigmoid"}
_BITWISE = {BitAnd: "bitwise_and", BitOr: "bitwise_or", BitXor: "bitwise_xor"}
_RELATIONS = {sympy.LessThan: "le", sympy.StrictLessThan: "lt", sympy.GreaterThan: "ge", sympy.StrictGreaterThan: "gt",
              sympy.Equality: "eq", sympy.Unequality: "ne"}


def _tensor(x):
    """A step's value as a tensor: Python floats as float64 (torch would make them float32)."""
    if isinstance(x, float):
        return torch.tensor(x, dtype=torch.float64)
    return torch.as_tensor(x)


def _float(x):
    return _tensor(x).to(torch.float64)


def _divides(factor) -> bool:
    """A factor that makes a product a quotient: 1/3, or a power with a negative exponent."""
    return (factor.is_Rational and not factor.is_Integer) or (factor.is_Pow and factor.exp.is_negative is True)


def _fold(op, values):
    out = values[0]
    for v in values[1:]:
        out = op(out, v)
    return out


def _value(expr, env):  # noqa: C901 - one flat dispatch, as the reference's evaluator
    """An integer / boolean sympy expression on ints and int64 / bool tensors, with Python's
    floor division (the kernels' // sees non-negative numerators only). A row guard (a condition
    on ``b``, ``h``, ``n_q``, ``n_k`` and params: ``h * 0.5 < 3``, ``sqrt(n_k) <= w / 2.5``) may
    hold any node of the language: its float arithmetic is float64 with the reference's meaning
    (attncc.evaluator: ToFloat / Grouped convert their operand once, FloatDiv and a ratio are one
    division, ``%`` has the divisor's sign), so a tile map agrees with brute force but where the
    kernels' float32 guard rounds otherwise (docs: float boundaries)."""
    if expr is sympy.true or expr is sympy.false:
        return bool(expr)
    if expr.is_Integer:
        return int(expr)
    if expr.is_Rational:  # one division, as the evaluator's (not a product with 1/q)
        return int(expr.p) / int(expr.q)
    if expr.is_Number or (expr.is_number and not expr.free_symbols and not expr.is_Boolean
                          and not isinstance(expr, sympy.core.relational.Relational)):
        return float(expr)  # a float constant of a row guard (h * 0.5 < 3), pi, E
    if expr.is_Symbol:
        if expr in env:  # steps (Dummies) and FIRST / LAST by symbol, the others by name
            return env[expr]
        if expr.name not in env:
            raise KeyError(f"no value for symbol '{expr.name}' of a walk")
        return env[expr.name]
    if isinstance(expr, sympy.Piecewise):
        out = None
        for value, cond in reversed(expr.args):
            v = _value(value, env)
            out = v if out is None else torch.where(_tensor(_value(cond, env)), _tensor(v), _tensor(out))
        return out
    if isinstance(expr, (sympy.floor, sympy.ceiling)):
        num, den = quotient(expr.args[0])
        n, d = _tensor(_value(num, env)), _tensor(_value(den, env))
        if isinstance(expr, sympy.ceiling):
            return -torch.div(-n, d, rounding_mode="floor")
        return torch.div(n, d, rounding_mode="floor")
    if isinstance(expr, ToFloat):  # Grouped too: its operand's own arithmetic, then one conversion
        return _float(_value(expr.args[0], env))
    if isinstance(expr, FloatDiv):
        return _float(_value(expr.args[0], env)) / _float(_value(expr.args[1], env))
    if type(expr) in _UNARY:
        return getattr(torch, _UNARY[type(expr)])(_float(_value(expr.args[0], env)))
    if isinstance(expr, sympy.Mul) and any(_divides(a) for a in expr.args):  # a / c: one division
        num, den = sympy.fraction(expr)
        return _float(_value(num, env)) / _float(_value(den, env))
    tensors = [_tensor(_value(a, env)) for a in expr.args]
    # the other nodes a row guard may hold (h ** 2 < 5, abs(w), h | 1): the kernels print them all
    if isinstance(expr, sympy.Pow):
        base, k = tensors[0], expr.exp
        if k == sympy.Rational(1, 2):
            return torch.sqrt(base.double())
        if k.is_Integer and k >= 0 and not base.is_floating_point():
            return base ** int(k)
        # a float power; an exponent of params (2 ** w, an int param: a float power) takes its value
        return base.double() ** (float(k) if k.is_number else tensors[1].double())
    if isinstance(expr, sympy.Abs):
        return torch.abs(tensors[0])
    if isinstance(expr, sympy.Mod):  # Python's %: the sign of the divisor, ints and floats alike
        a, m = tensors
        if a.is_floating_point() or m.is_floating_point():
            a, m = a.double(), m.double()
        return torch.remainder(a, m)
    if type(expr) in _BITWISE:
        return getattr(torch, _BITWISE[type(expr)])(tensors[0].long(), tensors[1].long())
    if isinstance(expr, Shift):  # floor(x * 2**n), n clamped (the evaluator's)
        x, n = (t.long() for t in tensors)
        n = torch.clamp(n, -SHIFT_LIMIT, SHIFT_LIMIT)
        return torch.where(n >= 0, x << torch.clamp(n, min=0), x >> torch.clamp(-n, min=0))
    if isinstance(expr, sympy.Add):
        return _fold(torch.add, tensors)
    if isinstance(expr, sympy.Mul):
        return _fold(torch.mul, tensors)
    if isinstance(expr, sympy.Max):
        return _fold(torch.maximum, tensors)
    if isinstance(expr, sympy.Min):
        return _fold(torch.minimum, tensors)
    if isinstance(expr, sympy.And):
        return _fold(torch.logical_and, tensors)
    if isinstance(expr, sympy.Or):
        return _fold(torch.logical_or, tensors)
    if isinstance(expr, sympy.Xor):
        return _fold(torch.logical_xor, tensors)
    if isinstance(expr, sympy.Not):
        return ~tensors[0]
    if isinstance(expr, sympy.ITE):
        return torch.where(*tensors)
    if type(expr) in _RELATIONS:
        return getattr(torch, _RELATIONS[type(expr)])(tensors[0], tensors[1])
    raise ValueError(f"a walk step may not use {type(expr).__name__}: {expr}")


def evaluate_steps(walk: Walk, env: Mapping[object, object]) -> Dict[str, object]:
    """Run the walk's program with ``env`` (values of the bound symbols, params, n_q, n_k, b, h;
    ``q_lo`` / ``q_hi`` as int64 vectors over the outer blocks); returns every step's value by
    its name."""
    values: Dict[object, object] = dict(env)
    for sym, expr in walk.steps:
        values[sym] = _value(expr, values)
    return {sym.name: values[sym] for sym, _ in walk.steps}


def precondition_holds(walk: Walk, env: Mapping[str, object]) -> bool:
    """The walk's precondition for one call (``env``: params, n_q, n_k, ``first_row``, ``last_row``)."""
    if walk.precondition is sympy.true:
        return True
    try:
        return bool(int_value(walk.precondition, env))  # scalars: no tensors (explain imports no torch)
    except Unsupported:  # a node past integer arithmetic (w & 3, 2 ** w, a quotient by d + 1): as a row guard's
        return bool(_value(walk.precondition, env))


def bands_grid(walk: Walk, env: Mapping[str, object], n_outer: int, n_inner: int) -> torch.Tensor:
    """The int8 classes ``[n_outer, n_inner]`` a BANDS walk gives (0 EMPTY, 1 PARTIAL, 2 FULL),
    checking that it visits no block twice."""
    values = evaluate_steps(walk, env)
    kb = torch.arange(n_inner, dtype=torch.int64).view(1, -1)
    col = lambda name: torch.as_tensor(values[name], dtype=torch.int64).reshape(-1, 1).expand(n_outer, 1)  # noqa: E731
    if walk.segments == 1:
        lo, hi, flo, fhi = (col(n) for n in ("lo", "hi", "full_lo", "full_hi"))
        if not bool(((0 <= lo) & (lo <= flo) & (flo <= fhi) & (fhi <= hi) & (hi <= n_inner)).all()):
            raise AssertionError(f"walk out of order: lo={lo.flatten().tolist()} full_lo={flo.flatten().tolist()} "
                                 f"full_hi={fhi.flatten().tolist()} hi={hi.flatten().tolist()}")
        full = (flo <= kb) & (kb < fhi)
        visited = (lo <= kb) & (kb < hi)
        return torch.where(full, 2, torch.where(visited, 1, 0)).to(torch.int8)
    grid = torch.zeros(n_outer, n_inner, dtype=torch.int8)
    seen = torch.zeros(n_outer, n_inner, dtype=torch.int32)
    for kind, count, base, pieces, cls in (("full", "n_full", "f_base", FULL_PIECES, 2),
                                           ("masked", "n_masked", "m_base", MASKED_PIECES, 1)):
        n = col(count)
        t = torch.arange(max(int(n.max()), 0) if n.numel() else 0, dtype=torch.int64).view(1, -1)
        k = t + col(base)
        prefix = "f" if kind == "full" else "m"
        for p in range(2, pieces + 1):
            k = k + torch.where(t >= col(f"{prefix}_at{p}"), col(f"{prefix}_jump{p}"), 0)
        live = t < n
        if bool(((k < 0) | (k >= n_inner))[live].any()):
            raise AssertionError(f"{kind} walk leaves the grid: {k[live].tolist()}")
        rows = torch.arange(n_outer).view(-1, 1).expand_as(k)
        seen.index_put_((rows[live], k[live]), torch.ones_like(k[live], dtype=torch.int32), accumulate=True)
        grid[rows[live], k[live]] = cls
    if bool((seen > 1).any()):
        raise AssertionError("a block is walked twice")
    return grid


def segments_grid(segments: Segments, env: Mapping[object, object], n_outer: int, n_inner: int) -> torch.Tensor:
    """The int8 classes ``[n_outer, n_inner]`` (0 EMPTY, 1 PARTIAL, 2 FULL) that walking ``segments``
    gives, checking their contract: each segment ordered, the non-empty ones disjoint and ascending."""
    values = evaluate_steps(Walk(Iteration.BANDS, steps=segments.steps), env)
    kb = torch.arange(n_inner, dtype=torch.int64).view(1, -1)
    grid = torch.zeros(n_outer, n_inner, dtype=torch.int8)
    end = torch.zeros(n_outer, 1, dtype=torch.int64)  # where the previous non-empty segment ended
    for seg in segments.segments:
        lo, flo, fhi, hi = (torch.as_tensor(values[s.name], dtype=torch.int64).reshape(-1, 1).expand(n_outer, 1)
                            for s in seg)
        if not bool(((0 <= lo) & (lo <= flo) & (flo <= fhi) & (fhi <= hi) & (hi <= n_inner)).all()):
            raise AssertionError(f"segment out of order: lo={lo.flatten().tolist()} full_lo={flo.flatten().tolist()} "
                                 f"full_hi={fhi.flatten().tolist()} hi={hi.flatten().tolist()}")
        live = hi > lo
        if bool((live & (lo < end)).any()):
            raise AssertionError("segments overlap or are out of order")
        end = torch.where(live, hi, end)
        visited = (lo <= kb) & (kb < hi)
        grid = torch.where(visited, torch.where((flo <= kb) & (kb < fhi), 2, 1).to(torch.int8), grid)
    return grid
