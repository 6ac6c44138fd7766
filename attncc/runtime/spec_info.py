"""What a generated module tells the runtime about its pattern (plain data, no sympy)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple, Union

from attncc.core.shapes import Shapes


@dataclass(frozen=True)
class ParamInfo:
    name: str
    default: Union[int, float]
    kind: str  # "int" or "float"
    maximum: Optional[int] = None  # a reduction's count (range(K)): the kernels unroll to it
    hidden: bool = False  # the compiler's own (attncc.analysis.residue): always its default in a bound call


@dataclass(frozen=True)
class InputInfo:
    """``dims``: "b" (batch), "h" (query head), "n" (position, size >= the last position read) or a size.
    ``positions``: per dim, "i" for an "n" dim read at the query positions only, "j" at the key
    positions only, else "" (attncc.spec.Pattern.position_axes; empty in modules built before it:
    every "n" dim covers both)."""

    name: str
    dims: Tuple[Union[str, int], ...]
    dtype: str
    grad: bool = False
    positions: Tuple[str, ...] = ()


@dataclass(frozen=True)
class SpecInfo(Shapes):
    """A generated module's pattern: its :class:`Shapes` (kind, head dims, dtypes, head counts)
    and what its calls check and its kernels need."""

    name: str
    source: str
    spec_hash: str
    params: Tuple[ParamInfo, ...] = ()
    inputs: Tuple[InputInfo, ...] = ()
    scale: Optional[float] = None
    dropout: float = 0.0
    softcap: Optional[float] = None  # [score].softcap as written (the transformers integration checks a model's)
    decode: bool = True  # whether the module's decode() runs (random_blocks(): it raises NotImplementedError)
    rope: bool = False
    rotary_dim: Optional[int] = None  # [rope].rotary_dim when the spec fixes it (None: the call's head dim)
    tile_hint: str = "default"  # "narrow": windows, documents; "thin": sparse exact block lists: smaller tiles pay
    # Bytes the kernels' loops gather from inputs per pair of a tile (a table indexed by i and j)
    # and per position (an input indexed by i or j): shared memory per pipeline stage
    # (attncc.runtime.configs.shared_bytes).
    pair_bytes: int = 0
    position_bytes: int = 0
    # How the Gluon sm90 forward (attncc.runtime.gluon) computes this pattern (attncc.analysis.builtin):
    # "dense" or "causal" (a built-in walk), "rendered" (the fragments of gluon_fragments, an
    # attncc.runtime.gluon.fragments.FragmentFile), or None: the tl kernels only, for gluon_reason.
    gluon: Optional[str] = None
    gluon_reason: str = ""
    # Whether ATTNCC_BACKEND=auto takes that Gluon forward on sm90 (attncc.analysis.builtin.GluonFit.auto;
    # False in modules built before it existed: auto keeps their tl forward).
    gluon_auto: bool = False
    # Whether ATTNCC_BACKEND=auto takes the Gluon split backward on sm90 (GluonFit.backward_auto).
    gluon_backward_auto: bool = False
    gluon_fragments: Optional[object] = field(default=None, compare=False, repr=False)
    # The module's _int_reach(x) and _int_divisors(x) (attncc.runtime.intervals): the largest magnitude
    # of its kernels' integer arithmetic at a call's numbers (None: positions and params stand in), and
    # the checks of its divisors of params and sizes (None: none).
    int_reach: Optional[Callable] = field(default=None, compare=False, repr=False)
    int_divisors: Optional[Callable] = field(default=None, compare=False, repr=False)
