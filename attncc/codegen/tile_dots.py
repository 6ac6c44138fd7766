"""The Plan's lowered dots (:mod:`attncc.analysis.tile_dot`) in a kernel: the operands' tiles, their
product per tile, and the gradients of learned operands.

A kernel holds the operand of its fixed position resident (the query operand's rows of the query
block in the forward, dQ and decode kernels; the key operand's rows of the key block in dK/dV), loads
the other one per tile of its loop, and computes the dot's value on the tile as one product of the
two, in the tile's layout (``[outer, inner]``: ``tl.dot(resident, tl.trans(streamed))``); the score
code names it (``dot<k>``: attncc.codegen.names.dot_value). Two 16-bit operands of one dtype enter the
product as they are (their products are exact in float32, the sums float32, as the written-out
terms); any other pair, and the gradients' products of float32 dS, as float32 at :data:`PRECISION`.
The padding of the axis to :attr:`TileDot.width` is loaded as 0 on both sides.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import sympy

from attncc.analysis.tile_dot import AXIS, DotOperand, TileDot
from attncc.codegen.names import dot_operand, dot_value
from attncc.codegen.printer import TritonPrinter, conjunction
from attncc.spec import symbols as S
from attncc.spec.ir import Pattern

SIXTEEN_BIT = ("bfloat16", "float16")
# Float32 tile products: three tf32 products (the operands split into high and low parts), about
# float32's precision on tensor cores. "ieee" is float32 exactly but lowers to scalar FMAs: the dQ
# kernel's two gradient products of MLA's 64-wide dot (a 128 x 32 tile) took Triton's LLVM stages a
# minute on 2 cores, and would run off the tensor cores.
PRECISION = "tf32x3"


@dataclass
class DotCode:
    """The code of ``dots`` in one kernel. ``names``: the kernel's text of b, h, the params and sizes
    (as its score code's printer has them); ``i_text`` / ``j_text``: its query / key positions as
    vectors (the tiles' rows); ``outer``: the position fixed per program (``S.i``, or ``S.j`` in
    dK/dV); ``inputs``: the kernel's :class:`attncc.codegen.softmax.Inputs`."""

    pattern: Pattern
    dots: Tuple[TileDot, ...]
    names: Dict[sympy.Symbol, str]
    inputs: object
    outer: sympy.Symbol = S.i
    i_text: str = "offs_i"
    j_text: str = "offs_j"
    helpers: set = field(default_factory=set)

    def _printer(self, dot: TileDot) -> TritonPrinter:
        """Index code of the operands' tiles: a position is a column ``[rows, 1]``, the axis a row
        ``[1, width]``."""
        names = {**self.names, S.i: f"{self.i_text}[:, None]", S.j: f"{self.j_text}[:, None]",
                 AXIS: f"tl.arange(0, {dot.width})[None, :]"}
        pr = TritonPrinter(names, score=True, helpers=self.helpers)
        pr.gather = lambda e: self.inputs.gather(pr, e)
        return pr

    def _native(self, dot: TileDot) -> bool:
        """Whether the product takes the operands as stored: two 16-bit ones of one dtype."""
        a, b = (self.pattern.input(o.name).dtype for o in dot.operands())
        return a == b and a in SIXTEEN_BIT

    def _indices(self, dot: TileDot, operand: DotOperand, pr: TritonPrinter = None) -> List[str]:
        pr = pr or self._printer(dot)
        return [pr(a) for a in operand.access.args]

    def tile(self, dot: TileDot, operand: DotOperand) -> str:
        """The load of ``operand``'s ``[rows, width]`` tile (rows: its side's positions), 0 past the
        axis and outside the input; float32 unless the product takes it as stored."""
        pr = self._printer(dot)
        pr.gather = lambda e: self.inputs.gather(pr, e, convert=not self._native(dot))
        return pr(operand.access)

    def _side(self, dot: TileDot, resident: bool) -> DotOperand:
        query_resident = self.outer is S.i
        return dot.query if query_resident == resident else dot.key

    def resident(self) -> List[Tuple[str, str, bool]]:
        """``(name, load, per_head)`` of each dot's resident tile (its operand on the kernel's fixed
        position; ``per_head``: it reads the query head)."""
        out = []
        for dot in self.dots:
            operand = self._side(dot, resident=True)
            out.append((dot_operand(dot.index, operand.side is S.i), self.tile(dot, operand), S.h in operand.access.free_symbols))
        return out

    def products(self) -> List[str]:
        """The lines of a tile that load each dot's streamed operand and name its value on the tile."""
        lines = []
        for dot in self.dots:
            streamed, resident = self._side(dot, resident=False), self._side(dot, resident=True)
            name = dot_operand(dot.index, streamed.side is S.i)
            precision = "" if self._native(dot) else f', input_precision="{PRECISION}"'
            lines += [f"{name} = {self.tile(dot, streamed)}",
                      f"{dot_value(dot.index)} = tl.dot({dot_operand(dot.index, resident.side is S.i)}, tl.trans({name}){precision})"
                      f"  # {dot.written}"]
        return lines

    def learned(self, dot: TileDot) -> List[DotOperand]:
        """The operands of ``dot`` declared ``grad = true``."""
        return [o for o in dot.operands() if self.pattern.input(o.name).grad]

    def gradients(self, ds: str, ds_t: str) -> List[str]:
        """The dQ tile's lines that add ``c * dS @ Y`` and ``c * dS^T @ X`` into the fp32 gradient
        buffers of the learned operands, with atomics as every learned input's
        (attncc.codegen.backward). ``ds``: the tile's dS by the score after scale and bias (a dot of
        the bias), ``ds_t``: by the mod's output (a dot of the mod), the pairs without weight zeroed.
        Products of float32 operands (:data:`PRECISION`): dS is not rounded to a 16-bit type."""
        lines = []
        for dot in self.dots:
            learned = self.learned(dot)
            if not learned:
                continue
            g = f"g{dot_value(dot.index)}"
            pr = self._printer(dot)
            lines.append(f"{g} = {ds_t if dot.in_mod else ds}" + ("" if dot.coefficient == 1 else f" * {pr(dot.coefficient)}")
                         + f"  # dLoss / d({dot_value(dot.index)}), per pair")
            for operand in learned:
                other = dot.key if operand is dot.query else dot.query
                weights = g if operand is dot.query else f"tl.trans({g})"
                tile = dot_operand(dot.index, other.side is S.i)
                if self._native(dot):
                    tile += ".to(tl.float32)"
                address, guards = self.inputs.address(operand.name, self._indices(dot, operand, pr),
                                                      args=operand.access.args, grad=True)
                lines.append(f"tl.atomic_add({address}, tl.dot({weights}, {tile}, input_precision=\"{PRECISION}\"), "
                             f"mask={conjunction(guards)})  # dLoss / d{operand.written}")
        return lines
