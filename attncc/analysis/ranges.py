"""Closed-form key-block ranges of affine masks: where a mask becomes a loop bound.

For one DNF clause and a query block of positions ``[q_lo, q_hi]`` this derives

- ``[lo, hi)``: key blocks that may hold an allowed pair of the clause (a superset);
- ``[full_lo, full_hi) ⊆ [lo, hi)``: key blocks where every pair satisfies the clause
  and every key row exists (``< N_K``),

as sympy expressions in the symbols of :mod:`attncc.analysis.symbols` and the pattern's.

The derivation works one atom at a time, in block units. A key bound ``m*j >= y(i)``
(``m > 0``, ``y`` linear in ``i``) holds for some key of block ``kb`` when the block's
last key passes it at the row where ``y`` is smallest, and for every pair of the tile when
the block's first key passes it at the row where ``y`` is largest; ``m*j <= y(i)`` the
other way round. The clause needs all its atoms, so ``lo`` is the Max of the atoms' first
blocks (sound: the first allowed block of the clause is at least each atom's), ``hi``
the Min of their ends, and the full range is the intersection of the atoms' full ranges
(exact: "every pair satisfies every atom" splits atom by atom).

Every division is ``floor(x / d)`` with ``x >= 0`` by construction (a ``Max(x, 0)``
around the numerator, or ``x`` provably non-negative), because Triton's ``//``
truncates toward zero; the expressions use Add, Mul, Max, Min, floor, integers and
symbols only, so a code printer can render them as they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Tuple

import sympy

from attncc.analysis.normal_form import Clause, LinearAtom, OtherAtom
from attncc.analysis.symbols import BLOCK_N, N_K, k_offset, q_hi, q_lo
from attncc._lazy import lazy_module

torch = lazy_module("torch")  # on first use: `attncc build` never imports it

ZERO = sympy.Integer(0)


# Names of the bounds inside KeyRange.steps (each may use the ones before it).
LO, HI, FULL_LO = (sympy.Symbol(n, integer=True, nonnegative=True) for n in ("lo", "hi", "full_lo"))
STEP_NAMES = {LO: "lo", HI: "hi", FULL_LO: "full_lo"}  # by symbol: a param may be named "lo" too


@dataclass(frozen=True)
class KeyRange:
    """Key-block bounds of one DNF clause for the query block ``[q_lo, q_hi]``.

    ``lo``, ``hi``: the clause may allow a pair only in key blocks ``lo <= kb < hi``.
    ``full_lo``, ``full_hi``: every pair of key blocks ``full_lo <= kb < full_hi``
    satisfies the clause (and those blocks lie inside the ``N_K`` keys).
    Always ``0 <= lo <= full_lo <= full_hi <= hi <= ceil(N_K / BLOCK_N)``.
    ``q_hi`` may be ``q_lo + BLOCK_M - 1`` or the block's last existing row: both are sound,
    the second is exact for the last, short, query block.
    ``steps``: the same four bounds as assignments ``(name, expr)`` in the order lo, hi,
    full_lo, full_hi, where each expression may use the symbols ``lo``, ``hi``,
    ``full_lo`` assigned before it (:data:`LO`, :data:`HI`, :data:`FULL_LO`): the small
    form to print in a kernel.
    """

    lo: sympy.Expr
    hi: sympy.Expr
    full_lo: sympy.Expr
    full_hi: sympy.Expr
    steps: Tuple[Tuple[str, sympy.Expr], ...] = ()

    def items(self):
        return (("lo", self.lo), ("hi", self.hi), ("full_lo", self.full_lo), ("full_hi", self.full_hi))

    @classmethod
    def from_steps(cls, lo, hi, full_lo, full_hi) -> "KeyRange":
        """Build from the step forms (hi may use lo; full_lo lo and hi; full_hi all three)."""
        hi_x = hi.subs(LO, lo)
        full_lo_x = full_lo.subs({LO: lo, HI: hi_x})
        full_hi_x = full_hi.subs({LO: lo, HI: hi_x, FULL_LO: full_lo_x})
        steps = (("lo", lo), ("hi", hi), ("full_lo", full_lo), ("full_hi", full_hi))
        return cls(lo, hi_x, full_lo_x, full_hi_x, steps)


def _fdiv(x, d):
    """floor(x / d) for x >= 0 (the caller guarantees it)."""
    return sympy.floor(x / d)


def _cdiv(x, d):
    """ceil(x / d) for x >= 0, written with floor."""
    return sympy.floor((x + d - 1) / d)


def _pos(x):
    return sympy.Max(x, 0)


N_KEY_BLOCKS = _cdiv(N_K, BLOCK_N)  # ceil(N_K / BLOCK_N)
N_FULL_KEY_BLOCKS = _fdiv(N_K, BLOCK_N)  # key blocks with all BLOCK_N rows present


def everything() -> KeyRange:
    """Every key block, none known full: the bound of a clause nothing is known about."""
    return KeyRange.from_steps(ZERO, N_KEY_BLOCKS, ZERO, ZERO)


def never() -> KeyRange:
    """No key block: the bound of a mask that is never true."""
    return KeyRange.from_steps(ZERO, ZERO, ZERO, ZERO)


def clause_key_range(clause: Clause) -> KeyRange:
    """The key-block ranges of one clause (see the module docstring)."""
    linear = [a for a in clause if isinstance(a, LinearAtom)]
    has_other = any(isinstance(a, OtherAtom) for a in clause)
    keys = [a for a in linear if a.b != 0]
    rows = [a for a in linear if a.b == 0]

    # Rows the clause allows: [r_lo, r_hi] within the block; a guard (a == b == 0)
    # allows all rows or none. Each row atom also gets a "holds on every row" factor for
    # the full range: >= 1 when it holds on [q_lo, q_hi], <= 0 otherwise; times N_K it
    # leaves a Min of block counts alone or sends it to 0.
    r_lo, r_hi = [q_lo], [q_hi]
    any_guard, full_guards = [], []
    for atom in rows:
        a, c = atom.a, atom.c
        if a == 0:  # c <= 0, nothing about i or j
            g = _pos(1 - c) * N_K
            any_guard.append(g)
            full_guards.append(g)
        elif a > 0:  # i <= floor(-c / a); positions are >= 0, so a negative bound can be any negative
            bound = -c if a == 1 else _fdiv(_pos(a - c), a) - 1
            r_hi.append(bound)
            full_guards.append(_pos(bound - q_hi + 1) * N_K)
        else:  # i >= ceil(c / -a)
            bound = c if a == -1 else _cdiv(_pos(c), -a)
            r_lo.append(bound)
            full_guards.append(_pos(q_lo - bound + 1) * N_K)
    row_lo, row_hi = sympy.Max(*r_lo), sympy.Min(*r_hi)
    if rows and any(a.a != 0 for a in rows):
        any_guard.append(_pos(row_hi - row_lo + 1) * N_K)  # no row of the block allowed: nothing

    lo_parts, hi_parts, full_lo_parts, full_hi_parts = [], [], [], []
    for atom in keys:
        m = abs(atom.b)
        # upper: m*j <= y(i) = -a*i - c; lower: m*j >= y(i) = a*i + c
        upper = atom.b > 0
        slope, y0 = (-atom.a, -atom.c) if upper else (atom.a, atom.c)

        def y(at_lo, at_hi, largest):
            if slope == 0:
                return y0
            return slope * (at_hi if (slope > 0) == largest else at_lo) + y0

        if upper:
            # some key of block kb: m*(k_offset + kb*BN) <= max y
            hi_parts.append(_fdiv(_pos(y(row_lo, row_hi, True) - m * k_offset + m * BLOCK_N), m * BLOCK_N))
            # every key: m*(k_offset + kb*BN + BN - 1) <= min y over the whole block
            full_hi_parts.append(_fdiv(_pos(y(q_lo, q_hi, False) - m * k_offset + m), m * BLOCK_N))
        else:
            # some key: m*(k_offset + kb*BN + BN - 1) >= min y
            lo_parts.append(_fdiv(_pos(y(row_lo, row_hi, False) - m * k_offset + m - 1), m * BLOCK_N))
            # every key: m*(k_offset + kb*BN) >= max y over the whole block
            full_lo_parts.append(_cdiv(_pos(y(q_lo, q_hi, True) - m * k_offset), m * BLOCK_N))

    lo = sympy.Min(N_KEY_BLOCKS, sympy.Max(*lo_parts)) if lo_parts else ZERO
    hi = sympy.Min(N_KEY_BLOCKS, *hi_parts, *any_guard)
    if lo != 0:
        hi = sympy.Max(LO, hi)
    if has_other:
        return KeyRange.from_steps(lo, hi, LO, FULL_LO)
    if not full_lo_parts:
        full_lo = LO  # no key lower bound: lo == 0
    elif not rows:
        # each atom's full start is at or past its start, so the Max is >= lo
        full_lo = sympy.Min(sympy.Max(*full_lo_parts), HI)
    else:  # rows may be cut by the row atoms: clamp explicitly
        full_lo = sympy.Max(LO, sympy.Min(sympy.Max(*full_lo_parts), HI))
    # <= hi: each atom's full end is at most its end when the row atoms hold on the
    # whole block, and a failed row atom makes it 0
    full_hi = sympy.Min(N_FULL_KEY_BLOCKS, *full_hi_parts, *full_guards)
    if full_lo != LO or lo != 0:
        full_hi = sympy.Max(FULL_LO, full_hi)
    return KeyRange.from_steps(lo, hi, full_lo, full_hi)


# ---------------------------------------------------------------------------
# Numbers from the expressions
# ---------------------------------------------------------------------------

def _nonnegative(x) -> bool:
    """Is ``x >= 0`` provable from the symbols' assumptions (BLOCK_N >= 1)?"""
    if x.is_nonnegative:
        return True
    if isinstance(x, sympy.Max) and any(_nonnegative(a) for a in x.args):
        return True
    if isinstance(x, sympy.Min) and all(_nonnegative(a) for a in x.args):
        return True
    if isinstance(x, (sympy.Add, sympy.Mul)):
        shifted = x.subs(BLOCK_N, sympy.Dummy("bn", integer=True, nonnegative=True) + 1)
        if shifted.is_nonnegative:
            return True
        if isinstance(x, sympy.Add):
            return all(_nonnegative(t) for t in x.args) if not shifted.is_negative else False
        coeff, rest = x.as_coeff_Mul()
        return coeff >= 0 and all(_nonnegative(t) for t in sympy.Mul.make_args(rest))
    return False


def check_bound(expr) -> None:
    """Raise ValueError unless ``expr`` uses only Add, Mul, Max, Min, floor, integers and
    symbols, with every floor's numerator provably >= 0 and a positive denominator."""
    if expr.is_Integer or expr.is_Symbol:
        return
    if isinstance(expr, sympy.floor):
        num, den = sympy.fraction(expr.args[0])
        if not _nonnegative(num):
            raise ValueError(f"floor of a numerator that may be negative: {expr}")
        if not (den.is_positive and (den.is_Integer or den.is_Symbol or den.is_Mul)):
            raise ValueError(f"floor with a denominator that is not positive: {expr}")
        check_bound(num)
        check_bound(den)
        return
    if isinstance(expr, (sympy.Add, sympy.Mul, sympy.Max, sympy.Min)):
        for a in expr.args:
            check_bound(a)
        return
    raise ValueError(f"a bound may use Add, Mul, Max, Min, floor, integers and symbols; got {type(expr).__name__}: {expr}")


def evaluate_bound(expr, env: Mapping[str, object]):
    """Evaluate a bound expression on int64 tensors / ints, dividing like Triton
    (truncation) and checking that every numerator is >= 0 so truncation is floor."""
    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        if expr.name not in env:
            raise KeyError(f"no value for symbol '{expr.name}' of a key-range bound")
        return env[expr.name]
    args = [evaluate_bound(a, env) for a in expr.args] if not isinstance(expr, sympy.floor) else None
    if isinstance(expr, sympy.Add):
        return sum(args[1:], args[0])
    if isinstance(expr, sympy.Mul):
        out = args[0]
        for a in args[1:]:
            out = out * a
        return out
    if isinstance(expr, (sympy.Max, sympy.Min)):
        pick = torch.maximum if isinstance(expr, sympy.Max) else torch.minimum
        out = args[0]
        for a in args[1:]:
            if isinstance(out, torch.Tensor) or isinstance(a, torch.Tensor):
                ref = out if isinstance(out, torch.Tensor) else a
                out = pick(torch.as_tensor(out, device=ref.device), torch.as_tensor(a, device=ref.device))
            else:
                out = max(out, a) if isinstance(expr, sympy.Max) else min(out, a)
        return out
    if isinstance(expr, sympy.floor):
        num, den = sympy.fraction(expr.args[0])
        n, d = evaluate_bound(num, env), evaluate_bound(den, env)
        if bool(torch.as_tensor(d <= 0).any()) or bool(torch.as_tensor(n < 0).any()):
            raise ValueError(f"{expr}: numerator {n} / denominator {d} would not divide like floor in Triton")
        return torch.div(n, d, rounding_mode="trunc") if isinstance(n, torch.Tensor) else int(n) // int(d)
    raise ValueError(f"unsupported node in a key-range bound: {expr}")


def key_range_grid(key_ranges: Iterable[KeyRange], env: Mapping[str, object], q_lo_values: torch.Tensor,
                   q_hi_values: torch.Tensor, n_key_blocks: int) -> torch.Tensor:
    """Tile classes ``[n_query_blocks, n_key_blocks]`` (int8) from the ranges: FULL inside
    some clause's full range, else PARTIAL inside some clause's [lo, hi), else EMPTY."""
    env = dict(env, q_lo=q_lo_values, q_hi=q_hi_values)
    kb = torch.arange(n_key_blocks, dtype=torch.int64).view(1, -1)
    nqb = q_lo_values.shape[0]
    visited = torch.zeros(nqb, n_key_blocks, dtype=torch.bool)
    full = torch.zeros_like(visited)
    for kr in key_ranges:
        lo, hi, flo, fhi = (torch.as_tensor(evaluate_bound(e, env), dtype=torch.int64).reshape(-1, 1).expand(nqb, 1)
                            for _, e in kr.items())
        if not bool(((0 <= lo) & (lo <= flo) & (flo <= fhi) & (fhi <= hi) & (hi <= n_key_blocks)).all()):
            raise AssertionError(f"key range out of order: lo={lo.flatten().tolist()} full_lo={flo.flatten().tolist()} "
                                 f"full_hi={fhi.flatten().tolist()} hi={hi.flatten().tolist()}")
        visited |= (lo <= kb) & (kb < hi)
        full |= (flo <= kb) & (kb < fhi)
    grid = torch.where(full, 2, torch.where(visited, 1, 0))
    return grid.to(torch.int8)


def describe(key_range: KeyRange) -> Tuple[str, ...]:
    """The bounds as lines ``name = expr`` in step form."""
    return tuple(f"{name:7s} = {e}" for name, e in key_range.steps)
