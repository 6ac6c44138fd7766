"""Dots of the bias that the kernels compute as tile products (``tl.dot``), not term by term.

The parser writes ``dot(x[..., :], y[..., :])`` out as its ``R`` products (attncc.spec.expr), the
form the reference and every pass understand. In the kernels that form is ``R`` gathers and
products per pair of a tile, and ``2 R`` gradient terms in the backward: at MLA's ``R = 64`` Triton
took 13-20 minutes to compile the kernels on an H100 (its TTGIR passes), and they ran slowly. A dot of
a per-query vector and a per-key vector is a matrix product of two tiles:

    bias[i, j] += c * sum_t x[..., i, ..., t] * y[..., j, ..., t]  =  c * (X @ Y^T)[i, j]

with ``X [BLOCK_M, R]`` the query block's rows of ``x`` and ``Y [BLOCK_N, R]`` the key block's rows of
``y``; its gradients are ``dX = c * dS @ Y`` and ``dY = c * dS^T @ X`` (``dS`` the gradient by the
score after scale and bias). :func:`tile_dots` finds such terms (:class:`TileDot`) and the bias with
each of them as one :class:`DotTile` value, which the key loop's code prints as a name the tile
product defines (attncc.codegen.tile_dots).

What is lowered: a term of the bias's top-level sum that is a number ``c`` times the sum, over every
``t`` of an axis declared with the number ``R`` on both inputs, of ``x[..., t, ...] * y[..., t, ...]``
(float inputs), where ``x``'s other indices read the query position ``i`` and not ``j``, and ``y``'s
read ``j`` and not ``i`` (or the other way round), both free of the score: ``dot(...)``,
``c * dot(...)``, ``dot(...) / c`` and ``sum(x[b, i, t] * y[b, j, t] for t in range(R))`` alike.
Everything else keeps the written-out form: a dot inside the mod, a function or a product, one whose
operands both read ``i`` (or neither), a partial sum of an axis, integer inputs.
"""
from __future__ import annotations

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

    def element(self, t) -> AppliedUndef:
        """The access of entry ``t`` of the axis."""
        return self.access.xreplace({AXIS: t})


@dataclass(frozen=True)
class TileDot:
    """``coefficient * sum_t query[..., t] * key[..., t]`` over an axis of ``extent`` entries, computed
    as a tile product; ``value``: the :class:`DotTile` standing for the sum in the kernels' bias.

    ``width``: the tiles' inner dimension, ``extent`` padded to a power of two >= :data:`MIN_WIDTH`
    (the loads mask the padding to 0, which adds 0 to every product)."""

    value: DotTile
    coefficient: sympy.Number
    query: DotOperand
    key: DotOperand
    extent: int

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

    coefficient: sympy.Number
    a: AppliedUndef
    b: AppliedUndef
    term: sympy.Expr


def tile_dots(pattern: Pattern) -> Tuple[Optional[sympy.Expr], Tuple[TileDot, ...]]:
    """(the bias with each lowered dot as its DotTile value, the lowered dots); ``(None, ())`` when
    none is lowered (module docstring)."""
    if pattern.kind != "softmax" or pattern.bias is None:
        return None, ()
    floats = {d.name: d for d in pattern.inputs if d.dtype in FLOAT_DTYPES}
    dots: List[TileDot] = []
    kept, loose = [], []
    for term in sympy.Add.make_args(pattern.bias):
        c, inner = _unwrapped(term)
        if isinstance(inner, sympy.Add):  # c * (a sum as written): lowered when it is one dot whole
            products = [_product(u, floats) for u in inner.args]
            found = _families([p for p in products if p is not None], floats, len(dots))
            if None not in products and len(found) == 1 and len(found[0][1]) == len(products):
                dots.append(_scaled(found[0][0], c))
            else:
                kept.append(term)
            continue
        product = _product(inner, floats)
        if product is None:
            kept.append(term)
        else:  # a dot's terms merged into the bias's own sum (dot(...) alone, dot(...) / 8)
            loose.append(_Product(c * product.coefficient, product.a, product.b, term))
    taken = set()
    for dot, terms in _families(loose, floats, len(dots)):
        dots.append(dot)
        taken |= terms
    kept += [p.term for p in loose if p.term not in taken]
    if not dots:
        return None, ()
    return sympy.Add(*kept, *[d.coefficient * d.value for d in dots]), tuple(dots)


def _unwrapped(term) -> Tuple[sympy.Number, sympy.Expr]:
    """``(c, e)`` with ``term = c * e`` for a number ``c``, through the parser's grouping of float
    arithmetic (``Grouped(2 * Grouped(a + b))``: the same value)."""
    c = sympy.Integer(1)
    while True:
        k, term = term.as_coeff_Mul()
        c *= k
        if not isinstance(term, Grouped):
            return c, term
        term = term.args[0]


def _scaled(dot: TileDot, c) -> TileDot:
    return TileDot(dot.value, c * dot.coefficient, dot.query, dot.key, dot.extent)


def _product(term, floats) -> Optional[_Product]:
    """``term`` as ``c * a * b`` of two different float input reads, else None."""
    c, factors = term.as_coeff_mul()
    if len(factors) != 2 or not all(isinstance(f, AppliedUndef) and type(f).__name__ in floats for f in factors):
        return None
    if not (c.is_Number and c.is_finite and c != 0):
        return None
    return _Product(c, factors[0], factors[1], term)


def _families(products: List[_Product], floats, first: int) -> List[Tuple[TileDot, set]]:
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
        out.append((TileDot(value, c, *sides, extent), {p.term for p in by_t.values()}))
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
