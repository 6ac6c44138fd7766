"""Evaluate expressions the way generated kernels print them, in the Triton interpreter.

:func:`run_printed` hoists each sympy expression (over ``i``, ``j``, ``b``, ``h``, ``n_q``,
``n_k`` and params) as the kernels do, prints the hoisted values and the expressions with
:class:`attncc.codegen.printer.TritonPrinter` (score mode, or the float64 mode of mask code),
writes a one-dimensional kernel (pair ``n`` is ``(offs_i[n], offs_j[n])``) and runs it:
a check of the printed text itself, cheaper than a whole attention kernel.
"""
from __future__ import annotations

import importlib.util
import itertools
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from attncc.codegen.helpers import render_helper
from attncc.analysis.hoist import Hoister
from attncc.codegen.names import param_arg, param_value, param_var
from attncc.codegen.printer import TritonPrinter
from attncc.spec import symbols as S
from attncc.spec.ir import Param

_COUNTER = itertools.count()


def kernel_source(exprs: Sequence, params: Sequence[Param], float64: bool, inner=S.j, outer=S.i,
                  wide: bool = False) -> str:
    kw = dict(inner=inner, outer=outer)  # the hoister of the forward's kernels, or the dK/dV kernel's (inner i)
    hoist = Hoister(scalar_prefix="mc", row_prefix="mrow", float32=False, **kw) if float64 else Hoister(**kw)
    hoisted = [hoist(e) for e in exprs]
    base = {S.i: "offs_i", S.j: "offs_j", S.b: "b", S.h: "h", S.n_q: "n_q", S.n_k: "n_k", S.n_heads: "H"}
    base.update({p.symbol: param_value(p, float64) for p in params})
    scalars = {sym: sym.name for sym in hoist.scalars.values()}
    rows = {sym: sym.name for sym in hoist.rows.values()}
    pr = TritonPrinter({**base, **scalars, **rows}, float64=float64)
    # WIDE (int64 positions): int params in int64 from the start, as the generated kernels make them
    body = [f"    {param_var(p.name)} = tl.cast({param_var(p.name)}, tl.int64)" for p in params if wide and p.kind == "int"]
    body += [f"    {sym.name} = {pr(e)}" for table in (hoist.scalars, hoist.rows) for e, sym in table.items()]
    body += [f"    tl.store(OUT + {k} * N + o, {pr(e)}, mask=ok)" for k, e in enumerate(hoisted)]
    helpers = "\n\n\n".join(render_helper(h) for h in sorted(pr.helpers))
    args = ", ".join(["OUT", "I", "J", "N", "n_q", "n_k", "H"] + [param_arg(p) for p in params])
    return f'''import torch
import triton
import triton.language as tl

import attncc.runtime as _rt


{helpers}


@triton.jit
def printed_kernel({args}, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = o < N
    offs_i = tl.load(I + o, mask=ok, other=0)
    offs_j = tl.load(J + o, mask=ok, other=0)
    b = offs_i * 0
    h = offs_i * 0
{chr(10).join(body)}
'''


def run_printed(exprs: Sequence, params: Sequence[Param], values: Dict[str, object], i: torch.Tensor,
                j: torch.Tensor, *, float64: bool, n_q: int = 1, n_k: int = 1, out_dtype=torch.float64,
                block: int = None, inner=S.j, outer=S.i) -> List[torch.Tensor]:
    """Each expression's printed value at the pairs ``(i[n], j[n])`` (int32 or int64 tensors: WIDE),
    with params ``values`` (by name; defaults from ``params``); ``inner``, ``outer``: the hoister's
    positions (the key loop's and the row's, or the dK/dV kernel's swapped ones). ``block``: pairs
    per program, by default all of them up to 4096 (the interpreter's time goes to each program's
    operations, whatever their size)."""
    src = kernel_source(exprs, params, float64, inner, outer, wide=i.dtype == torch.int64)
    path = Path(tempfile.mkdtemp(prefix="attncc_printed_")) / f"printed_{next(_COUNTER)}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    n = i.numel()
    block = block or min(4096, max(16, 1 << (n - 1).bit_length()))
    out = torch.zeros(len(exprs), n, dtype=out_dtype)
    args = [values.get(p.name, p.value) for p in params]
    mod.printed_kernel[(max(1, -(-n // block)),)](out, i.contiguous(), j.contiguous(), n, n_q, n_k, 1, *args,
                                                 BLOCK=block)
    return list(out)
