"""Walk -> what the templates print for a loop over blocks (the Plan's walks, rendered as they are).

A kernel's loop over key blocks (forward, dQ) or query blocks (dK/dV) is one of

- DENSE: every block, the ragged last one masked;
- BANDS: the walk's steps as kernel lines, then branch-free loops: one segment walks a masked
  head, an unmasked middle and a masked tail; two segments walk the FULL pieces in one loop and
  the masked ones in another, each over a virtual index ``t`` mapped to its block with a few
  ``tl.where`` (no per-tile ``if``: the loop body is the tile alone, which Triton pipelines);
- BLOCK_LIST: the loops over the PARTIAL and the FULL lists.

A BANDS walk with a precondition keeps the list loops too, behind the ``LISTS`` constexpr: the
host checks the precondition per call (:func:`precondition_code`) and launches the list loops
(exact block lists) when it fails. Nothing here derives a fact about the mask: the bounds are
the analysis' steps, printed.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import sympy

from attncc.analysis import Iteration, Plan, Walk
from attncc.analysis.bands import FIRST, LAST
from attncc.analysis.walks import MASKED_PIECES
from attncc.codegen.names import param_var
from attncc.codegen.printer import PythonPrinter, TritonPrinter, record_definitions
from attncc.spec import symbols as S

# kernel variables of the walks' bound symbols (by name): the forward and dQ kernels walk key
# blocks of the query block [q_lo, q_hi]; the dK/dV kernel walks query blocks of the key block
# [k_lo, k_hi] (its "keys" are our queries). q_hi / k_hi: the block's last existing row.
FORWARD_NAMES = {"q_lo": "q_lo", "q_hi": "q_hi", "k_offset": "k_offset", "N_K": "Nk", "BLOCK_N": "BLOCK_N"}
TRANSPOSED_NAMES = {"q_lo": "k_lo", "q_hi": "k_hi", "k_offset": "q_offset", "N_K": "Nq", "BLOCK_N": "BLOCK_M"}


def symbol_names(plan: Plan, steps, transposed: bool, prefix: str,
                 override: Optional[Dict[str, str]] = None) -> Dict[sympy.Symbol, str]:
    """Kernel text of every symbol of a walk's ``steps``: the steps themselves (``prefix`` + their
    name), params, ``b``, ``h``, ``n_q``, ``n_k`` and the bound symbols (``override`` first)."""
    bound = dict(TRANSPOSED_NAMES if transposed else FORWARD_NAMES, **(override or {}))
    index = {S.b: "b", S.h: "h", S.n_q: "n_k" if transposed else "n_q", S.n_k: "n_q" if transposed else "n_k"}
    params = {p.symbol: param_var(p.name) for p in plan.pattern.params}
    names = {}
    for _, e in steps:
        for sym in e.free_symbols:
            if isinstance(sym, sympy.Dummy):
                names[sym] = prefix + sym.name
            elif sym in params:
                names[sym] = params[sym]
            elif sym in index:
                names[sym] = index[sym]
            else:
                names[sym] = bound[sym.name]
    names.update({sym: prefix + sym.name for sym, _ in steps})
    return names


class Heavy(NamedTuple):
    """A walk's heavy rows for the kernels' dispatch (templates/walks.j2): ``text`` for the comment,
    ``code`` the kernel expression."""

    text: str
    code: str


def render_walk(plan: Plan, transposed: bool, names: Optional[Dict[str, str]] = None) -> dict:
    """The template's view of the forward (``transposed=False``) or the dK/dV walk: ``kind``,
    ``lists`` (the list loops are compiled in), ``closed`` (the closed-form loops are),
    ``switch`` (both: ``LISTS`` picks), ``steps`` [(variable, code)], ``segments``, ``out``
    (the outputs' variables), ``full_kb`` / ``masked_kb`` (two segments: a block from ``t``),
    ``per_head`` (the steps read ``h``), ``helpers`` and ``note`` (comment lines). ``names``:
    kernel text for bound symbols other than :data:`FORWARD_NAMES` / :data:`TRANSPOSED_NAMES`."""
    walk = plan.transposed if transposed else plan.forward
    prefix = "qb_" if transposed else "kv_"
    out = dict(kind=walk.kind.value, lists=walk.kind is Iteration.BLOCK_LIST, closed=walk.kind is Iteration.BANDS,
               switch=False, steps=[], segments=walk.segments, out={}, full_kb="", masked_kb="", per_head=False,
               helpers=set(), note=walk_note(walk, transposed))
    out["heavy"] = None
    if walk.kind is not Iteration.BANDS:
        return out
    if walk.heavy_rows is not None:  # int params only: each as int64, the sum may pass 2**31
        wide = TritonPrinter({p.symbol: f"tl.cast({param_var(p.name)}, tl.int64)" for p in plan.pattern.params})
        out["heavy"] = Heavy(str(walk.heavy_rows), wide(walk.heavy_rows))
    names = symbol_names(plan, walk.steps, transposed, prefix, names)
    printer = TritonPrinter(names)
    record_definitions(walk.steps)  # their bounds, for the host's overflow guard (codegen.bounds)
    out["steps"] = [(names[sym], printer(e)) for sym, e in walk.steps]
    out["helpers"] = printer.helpers
    out["per_head"] = any(S.h in e.free_symbols for _, e in walk.steps)
    out["out"] = {name: prefix + name for name in walk.outputs}
    if walk.segments == 2:
        v = out["out"]
        out["full_kb"] = f"t + {v['f_base']} + tl.where(t >= {v['f_at2']}, {v['f_jump2']}, 0)"
        out["masked_kb"] = " + ".join([f"t + {v['m_base']}"] + [f"tl.where(t >= {v[f'm_at{p}']}, {v[f'm_jump{p}']}, 0)"
                                                               for p in range(2, MASKED_PIECES + 1)])
    if walk.precondition is not sympy.true:
        out["lists"] = out["switch"] = True
    return out


def walk_note(walk: Walk, transposed: bool = False):
    """How ``walk`` finds its blocks, as the lines of the generated module's note."""
    if walk.kind is Iteration.DENSE:
        return ["dense (every block; only a ragged last one is masked)"]
    if walk.kind is Iteration.BLOCK_LIST:
        return [f"block lists ({walk.reason})"]
    rows = "x: key position, j: query position" if transposed else "x: query position, j: key position"
    lines = [f"closed form, the mask as monotone bands ({rows})"] + [f"  {line}" for line in walk.cover.lines()]
    if walk.precondition is not sympy.true:
        lines.append("  calls that break the precondition take the exact block lists")
    if walk.heavy_rows is not None:
        lines.append(f"  longest first: the blocks of x <= {walk.heavy_rows} (every {'query' if transposed else 'key'}) "
                     f"run before the others, for every batch row and head")
    return lines


def precondition_code(plan: Plan, transposed: bool) -> str:
    """The walk's precondition as a Python expression of ``call`` (``True`` when it has none)."""
    walk = plan.transposed if transposed else plan.forward
    if walk.kind is not Iteration.BANDS or walk.precondition is sympy.true:
        return "True"
    first, rows, n_q, n_k = (("call.k_offset", "call.Nk", "call.n_k", "call.n_q") if transposed
                             else ("call.q_offset", "call.Nq", "call.n_q", "call.n_k"))
    names = {FIRST: first, LAST: f"({first} + {rows} - 1)", S.n_q: n_q, S.n_k: n_k}
    names.update({p.symbol: f"call.params[{p.name!r}]" for p in plan.pattern.params})
    return PythonPrinter(names)(walk.precondition)


def monotone_code(plan: Plan) -> str:
    """The forward walk's :attr:`~attncc.analysis.walks.Walk.monotone` as a Python expression of
    ``call.params`` (``True`` when it has none): decode, which has no block lists, walks the
    closed form only where it is sound."""
    walk = plan.forward
    if walk.kind is not Iteration.BANDS or walk.monotone is sympy.true:
        return "True"
    return PythonPrinter({p.symbol: f"call.params[{p.name!r}]" for p in plan.pattern.params})(walk.monotone)
