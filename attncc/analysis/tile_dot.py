"""Dots of the score that the kernels compute as tile products (``tl.dot``), not term by term.

The parser writes ``dot(x[..., :], y[..., :])`` out as its ``R`` products (attncc.spec.expr), the
form the reference and every pass understand. In the kernels that form is ``R`` gathers and
products per pair of a tile, and ``2 R`` gradient terms in the backward: at MLA's ``R = 64`` Triton
took 13-20 minutes to compile the kernels on an H100 (its TTGIR passes), and they ran slowly. A dot of
a per-query vector and a per-key vector is a matrix product of two tiles:

    bias[i, j] += c * sum_t x[..., i, ..., t] * y[..., j, ..., t]  =  c * (X @ Y^T)[i, j]

with ``X [BLOCK_M, R]`` the query block's rows of ``x`` and ``Y [BLOCK_N, R]`` the key block's rows of
``y``; its gradients are ``dX = c * dS @ Y`` and ``dY = c * dS^T @ X`` (``dS`` the gradient by the
score after scale and bias; by the mod's output for a term of the mod). :func:`tile_dots` finds such
terms (:class:`TileDot`) and the bias and mod with each of them as one :class:`DotTile` value, which
the key loop's code prints as a name the tile product defines (attncc.codegen.tile_dots).

What is lowered: a term of the bias's top-level sum, or of the mod's (free of the score:
``score + rs * dot(...)``, as FlexAttention ports write it), that is a coefficient ``c`` (numbers,
params, ``b``, ``h``) times the sum, over every ``t`` of an axis declared with the number ``R`` on
both inputs, of ``x[..., t, ...] * y[..., t, ...]`` (float inputs), where ``x``'s other indices read
the query position ``i`` and not ``j``, and ``y``'s read ``j`` and not ``i`` (or the other way
round): ``dot(...)``, ``c * dot(...)``, ``dot(...) / c`` and ``sum(x[b, i, t] * y[b, j, t] for t in
range(R))`` alike. Everything else keeps the written-out form: a dot inside a function, a product
or another sum, one whose operands both read ``i`` (or neither), a partial sum of an axis, integer
inputs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import sympy
from sympy.core.function import AppliedUndef

from attncc.spec import symbols as S
from attncc.spec.builtins import Grouped
from attncc.spec.ir import Pattern

# the reduced axis's position in an operand's index (DotOperand.access)
AXIS = sympy.Symbol("dot_axis", integer=True, nonnegative=True)
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
MIN_WIDTH = 16  # tl.dot's smallest inner dimension


class DotTile(sympy.Function):
    """The value at the pair ``(i, j)`` of the tile product of :class:`TileDot` number ``k``:
    ``DotTile(k, i, j)``. Its arguments ``i`` and ``j`` keep every pass from taking it for a value of
    the row or of the program (the hoister, the split of terms constant along j)."""

    nargs = 3
    is_real = True

    def _sympystr(self, printer):
        return f"dot{self.args[0]}[i, j]"


@dataclass(frozen=True)
class DotOperand:
    """One side of a lowered dot: the input ``access`` with :data:`AXIS` at the reduced index
    (``axis``: its position), which reads one position (``side``: ``S.i`` for the query side,
    ``S.j`` for the key side) besides b, h, params and sizes."""

    access: AppliedUndef
    axis: int
    side: sympy.Symbol

    @property
    def name(self) -> str:
        return type(self.access).__name__

    @property
    def written(self) -> str:
        """As the spec writes it: ``q_rope[b, h, i, :]``."""
        return f"{self.name}[{', '.join(':' if n == self.axis else str(x) for n, x in enumerate(self.access.args))}]"


@dataclass(frozen=True)
class TileDot:
    """``coefficient * sum_t query[..., t] * key[..., t]`` over an axis of ``extent`` entries, computed
    as a tile product; ``value``: the :class:`DotTile` standing for the sum in the kernels' bias, or
    in their mod (``in_mod``: a term of the mod's top-level sum, free of the score: its gradient is by
    the mod's output). ``coefficient``: numbers, params, b and h.

    ``width``: the tiles' inner dimension, ``extent`` padded to a power of two >= :data:`MIN_WIDTH`
    (the loads mask the padding to 0, which adds 0 to every product)."""

    value: DotTile
    coefficient: sympy.Expr
    query: DotOperand
    key: DotOperand
    extent: int
    in_mod: bool = False

    @property
    def index(self) -> int:
        return int(self.value.args[0])

    @property
    def width(self) -> int:
        return max(MIN_WIDTH, 1 << (self.extent - 1).bit_length())

    def operands(self) -> Tuple[DotOperand, DotOperand]:
        return self.query, self.key

    @property
    def written(self) -> str:
        return f"dot({self.query.written}, {self.key.written})"


@dataclass(frozen=True)
class _Product:
    """A term ``coefficient * a * b`` of two float input reads."""

    coefficient: sympy.Expr
    a: AppliedUndef
    b: AppliedUndef
    term: sympy.Expr


@dataclass(frozen=True)
class Lowering:
    """What :func:`tile_dots` found: ``dots``, and ``bias`` / ``mod``, the pattern's with each of its
    dots as ``coefficient * value`` (``dots`` empty: the pattern's own)."""

    bias: Optional[sympy.Expr] = None
    mod: Optional[sympy.Expr] = None
    dots: Tuple[TileDot, ...] = ()


def tile_dots(pattern: Pattern) -> Lowering:
    """The dots of ``pattern``'s bias, and of its mod's terms free of the score, that the kernels
    compute as tile products (module docstring)."""
    if pattern.kind != "softmax":
        return Lowering(pattern.bias, pattern.mod)
    floats = {d.name: d for d in pattern.inputs if d.dtype in FLOAT_DTYPES}
    bias, dots = _lowered(pattern.bias, floats, (), in_mod=False)
    mod, dots = _lowered(pattern.mod, floats, dots, in_mod=True)
    return Lowering(bias, mod, dots)


def _lowered(e, floats, dots: Tuple[TileDot, ...], in_mod: bool):
    """(``e`` with the dots of its top-level sum as their values, ``dots`` and those)."""
    if e is None:
        return e, dots
    found: List[TileDot] = []
    kept, loose = [], []
    for term in sympy.Add.make_args(e):
        c, inner = _unwrapped(term)
        if c is None:  # a term of the score (the mod's s)
            kept.append(term)
        elif isinstance(inner, sympy.Add):  # c * (a sum as written): lowered when it is one dot whole
            products = [_product(u, floats) for u in inner.args]
            families = _families([p for p in products if p is not None], floats, len(dots) + len(found), in_mod)
            if None not in products and len(families) == 1 and len(families[0][1]) == len(products):
                found.append(_scaled(families[0][0], c))
            else:
                kept.append(term)
        else:
            product = _product(inner, floats)
            if product is None:
                kept.append(term)
            else:  # a dot's terms merged into the expression's own sum (dot(...) alone, dot(...) / 8)
                loose.append(_Product(c * product.coefficient, product.a, product.b, term))
    taken = set()
    for dot, terms in _families(loose, floats, len(dots) + len(found), in_mod):
        found.append(dot)
        taken |= terms
    if not found:
        return e, dots
    kept += [p.term for p in loose if p.term not in taken]
    return sympy.Add(*kept, *[d.coefficient * d.value for d in found]), dots + tuple(found)


def _scaled(dot: TileDot, c) -> TileDot:
    return dataclasses.replace(dot, coefficient=c * dot.coefficient)


def _constant(x) -> bool:
    """A factor the same for every pair of a program: numbers, params, b and h (what a dot's
    coefficient may be)."""
    return not (x.free_symbols & {S.i, S.j, S.s, AXIS} or x.atoms(AppliedUndef) or x.has(sympy.Piecewise)
                or x.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan))


def _unwrapped(term) -> Tuple[Optional[sympy.Expr], sympy.Expr]:
    """``(c, e)`` with ``term = c * e`` and ``c`` the factors :func:`_constant` takes, through the
    parser's grouping of float arithmetic (``Grouped(2 * Grouped(a + b))``: the same value), until
    one factor is left; ``(None, term)`` for a term that reads the score."""
    if S.s in term.free_symbols:
        return None, term
    c = sympy.Integer(1)
    while True:
        if isinstance(term, Grouped):
            term = term.args[0]
            continue
        factors = sympy.Mul.make_args(term)
        rest = [f for f in factors if not _constant(f)]
        if len(rest) != 1 or len(factors) == 1:
            return c, term
        c *= sympy.Mul(*[f for f in factors if _constant(f)])
        term = rest[0]


def _product(term, floats) -> Optional[_Product]:
    """``term`` as ``c * a * b`` of two different float input reads (``c``: :func:`_constant`), else None."""
    factors = sympy.Mul.make_args(term)
    reads = [f for f in factors if isinstance(f, AppliedUndef)]
    if len(reads) != 2 or not all(type(f).__name__ in floats for f in reads):
        return None
    c = sympy.Mul(*[f for f in factors if not isinstance(f, AppliedUndef)])
    if not _constant(c) or c == 0:
        return None
    return _Product(c, reads[0], reads[1], term)


def _families(products: List[_Product], floats, first: int, in_mod: bool) -> List[Tuple[TileDot, set]]:
    """The complete dots among ``products``: for an axis position in each read (a number ``t``,
    the same in both, over a dim declared with ``R`` in both), the products alike but for ``t``,
    with every ``t`` of ``range(R)`` once, one read on the query side and one on the key side.
    Each product goes to one dot at most; the dots are numbered from ``first``."""
    groups: Dict[tuple, Dict[int, _Product]] = {}
    for p in products:
        for ax in range(len(p.a.args)):
            for bx in range(len(p.b.args)):
                t = p.a.args[ax]
                if not (t.is_Integer and p.b.args[bx] == t):
                    continue
                ra, rb = floats[type(p.a).__name__].dims[ax], floats[type(p.b).__name__].dims[bx]
                if type(ra) is not int or ra != rb:
                    continue
                key = (p.coefficient, _with_axis(p.a, ax), ax, _with_axis(p.b, bx), bx, ra)
                groups.setdefault(key, {}).setdefault(int(t), p)
    out, used = [], set()
    for (c, a, ax, b, bx, extent), by_t in groups.items():
        if sorted(by_t) != list(range(extent)) or any(p.term in used for p in by_t.values()):
            continue
        sides = _sides((a, ax), (b, bx))
        if sides is None:
            continue
        value = DotTile(first + len(out), S.i, S.j)
        out.append((TileDot(value, c, *sides, extent, in_mod), {p.term for p in by_t.values()}))
        used |= {p.term for p in by_t.values()}
    return out


def _with_axis(access: AppliedUndef, axis: int) -> AppliedUndef:
    return access.func(*[AXIS if n == axis else x for n, x in enumerate(access.args)])


def _reads(access: AppliedUndef) -> set:
    """The positions and the score among what ``access``'s indices read."""
    return set().union(*[x.free_symbols for x in access.args]) & {S.i, S.j, S.s}


def _sides(a: tuple, b: tuple) -> Optional[Tuple[DotOperand, DotOperand]]:
    """(query operand, key operand) of two ``(access, axis)`` reads, or None unless one reads ``i``
    alone and the other ``j`` alone."""
    for (x, ax), (y, ay) in ((a, b), (b, a)):
        if _reads(x) == {S.i} and _reads(y) == {S.j}:
            return DotOperand(x, ax, S.i), DotOperand(y, ay, S.j)
    return None
