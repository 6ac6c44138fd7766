"""What a pattern declares of its calls: its kind and the tensors it takes. One dataclass for both
forms of a pattern, the spec's :class:`attncc.spec.ir.Pattern` (sympy trees) and the runtime's
:class:`attncc.runtime.spec_info.SpecInfo` (plain data in a generated module), so that the two
cannot disagree on a field or a default."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True, kw_only=True)
class Shapes:
    """``kind``: "softmax" or "linear". ``head_dims``: the head dims of q and k the kernels are
    built for; ``value_dim``: v's, when it is not the head dim (None). ``dtypes``: the operand
    dtypes (torch dtype names). ``heads_q``, ``heads_kv``: head counts the pattern fixes (None:
    any; the query heads a multiple of the key/value heads)."""

    kind: str = "softmax"
    head_dims: Tuple[int, ...] = (128,)
    value_dim: Optional[int] = None
    dtypes: Tuple[str, ...] = ("bfloat16", "float16")
    heads_q: Optional[int] = None
    heads_kv: Optional[int] = None
