"""The Pattern IR: what a spec means, as small frozen dataclasses holding sympy trees.

Every expression is a sympy tree over the symbols of :mod:`attncc.spec.symbols`.
Inputs appear as applications of undefined sympy functions named after the input
(``doc[b, i]`` is ``Function('doc')(b, i)``); built-ins are the classes of
:mod:`attncc.spec.builtins`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import sympy
from sympy.core.function import AppliedUndef
from sympy.printing.precedence import PRECEDENCE

from attncc.core.shapes import Shapes
from attncc.spec import symbols as S

Dim = Union[str, int]  # "b" (batch), "h" (query head), "n" (position), or a fixed size
INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8")
_CALL_PRECEDENCE = PRECEDENCE["Func"]  # an input read's, in sympy's printers (InputDecl.symbol)
DTYPE_BYTES = {"bool": 1, "int8": 1, "uint8": 1, "int16": 2, "float16": 2, "bfloat16": 2, "int32": 4, "float32": 4,
               "int64": 8, "float64": 8}  # bytes of one element of an input of each dtype


@dataclass(frozen=True)
class InputDecl:
    """A runtime tensor the expressions may index.

    ``dims``: one entry per tensor dimension: ``"b"`` (size B), ``"h"`` (size Hq),
    ``"n"`` (indexed by global positions: size >= the last query and key position, or only the
    query's (key's) where every read indexes it with ``i`` (``j``) itself, :meth:`Pattern.position_axes`)
    or a fixed int.
    ``dtype``: a torch dtype name (``"int32"``, ``"float32"``, ...).
    ``grad``: gradients flow into this tensor (backward pass).
    """

    name: str
    dims: Tuple[Dim, ...]
    dtype: str
    grad: bool = False

    @property
    def symbol(self) -> sympy.FunctionClass:
        # integer dtypes make integer accesses: sympy then knows doc[b, i] // 4 is a floor
        # division of integers (exact in the kernels, attncc.analysis.integer); real: sympy would
        # otherwise take a float input's value for a complex number (abs(exp(x[h])) became
        # exp(re(x[h])), which no printer renders)
        kind = {"integer": True} if self.dtype in INTEGER_DTYPES else {"real": True}
        # The function class is named after the input, and sympy's printers look up an
        # expression's precedence by the names of its classes: an input named Integer, Float,
        # Rational, FracElement or PolyElement had a number's precedence computed from its read
        # (AttributeError: 'Integer' object has no attribute 'p', in every header and message
        # that prints it), one named Add or Or another operator's. A read binds as a call does.
        return sympy.Function(self.name, **kind, __dict__={"precedence": _CALL_PRECEDENCE})


@dataclass(frozen=True)
class Param:
    """A named constant; a call may override it by keyword. ``kind`` is "int" or "float".
    ``count``: an int param used as a reduction's count (``range(K)``): the kernels unroll to
    its value here, and a call may pass at most that."""

    name: str
    value: Union[int, float]
    kind: str
    count: bool = False
    # set by the compiler for its own params (attncc.analysis.residue), never by a spec: a call
    # cannot pass it, the generated docs do not list it
    hidden: bool = False

    @property
    def symbol(self) -> sympy.Symbol:
        return sympy.Symbol(self.name, integer=True) if self.kind == "int" else sympy.Symbol(self.name, real=True)


@dataclass(frozen=True)
class Rope:
    """Rotary embedding of q and k inside the kernel."""

    theta: float = 10000.0
    style: str = "neox"  # "neox" (rotate halves) or "gptj" (rotate interleaved pairs)
    rotary_dim: Optional[int] = None  # None: the head dim


# The taylor feature map has 1 + D + D^2 features; its kernels (and specs) take head dims up to this.
TAYLOR_MAX_HEAD_DIM = 32


@dataclass(frozen=True)
class FeatureMap:
    """Linear attention's feature map and options."""

    name: str = "elu+1"  # "elu+1", "relu", "identity", "performer", "cosformer", "taylor"
    features: Optional[int] = None  # performer: number of random features
    seed: int = 0
    causal: bool = True
    normalize: bool = True


@dataclass(frozen=True)
class Pattern(Shapes):
    """One attention pattern, validated: its :class:`~attncc.core.shapes.Shapes` (kind, head
    dims, dtypes, head counts) and what it computes.

    mask: boolean sympy expression over b, h, i, j, n_q, n_k, params and inputs (never the
          score ``s``); ``None`` means every pair is allowed. The conjuncts free of ``s`` of a
          top-level ``where(c, e, -inf)`` of ``[score].mod`` have already been folded in here
          (and removed from ``mod``; a condition on ``s`` stays in ``mod``).
    bias: additive score term (sympy), or None.
    mod:  score transform, an expression in ``s`` and the variables, or None.
    scale: None means 1/sqrt(head_dim) at call time.
    """

    name: str
    params: Tuple[Param, ...] = ()
    inputs: Tuple[InputDecl, ...] = ()
    mask: Optional[sympy.Basic] = None
    scale: Optional[float] = None
    bias: Optional[sympy.Expr] = None
    softcap: Optional[float] = None
    mod: Optional[sympy.Expr] = None
    mod_mask: Optional[sympy.Basic] = None  # the s-free part of c of a top-level where(c, e, -inf) in mod (in mask)
    dropout: float = 0.0
    rope: Optional[Rope] = None
    feature_map: Optional[FeatureMap] = None
    source: str = "<string>"  # the spec file's path as given
    source_hash: str = ""  # sha256 of the spec text, hex, first 16 digits

    # -- conveniences -------------------------------------------------------
    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def input(self, name: str) -> InputDecl:
        for d in self.inputs:
            if d.name == name:
                return d
        raise KeyError(name)

    def position_axes(self, name: str) -> Tuple[str, ...]:
        """Per dim of input ``name``: for an ``"n"`` dim that every read indexes with the query
        position itself, ``"i"``; with the key position itself, ``"j"``; else (other indices, or
        no read) ``""``, as for every other dim. An ``"i"`` axis need only cover the call's query
        positions, a ``"j"`` one its key positions (a Flex bias ``[q_idx, kv_idx]`` of Nq x Nk);
        any other must cover both."""
        decl = self.input(name)
        reads = [a.args for e in (self.mask, self.bias, self.mod, self.mod_mask) if e is not None
                 for a in e.atoms(AppliedUndef) if a.func.__name__ == name and len(a.args) == len(decl.dims)]
        out = []
        for axis, dim in enumerate(decl.dims):
            used = {args[axis] for args in reads}
            out.append("i" if dim == "n" and used == {S.i} else "j" if dim == "n" and used == {S.j} else "")
        return tuple(out)

    @property
    def param_values(self) -> dict:
        return {p.name: p.value for p in self.params}

    def replace(self, **changes) -> "Pattern":
        return dataclasses.replace(self, **changes)
