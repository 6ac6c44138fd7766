"""Plan -> the template variables of the decode kernels (templates/decode.py.j2).

Decoding runs a few query rows (``Nq`` <= 16) of every head of a GQA group in one program, so
the query head varies along the rows of a tile: ``h`` is the row vector ``h_row`` here, and
whatever the forward kernel hoists as a per-program scalar of ``(b, h)`` becomes a per-row
vector when it depends on ``h``. Positions are per batch row: key ``j`` is cache row ``j``,
query row ``t`` is ``i = kv_len[b] - Nq + t``, and ``n_q = n_k = kv_len[b]``.

Key blocks come from the forward's closed-form walk (a window reads only its own blocks, so
only its pages) at ``k_offset = 0``, ``N_K = kv_len``, when it does not depend on the query
head; it stays sound (if not always exact) when the call breaks its precondition, except for
params that break the bounds' monotonicity (a divisor or multiplier below 1, ``Walk.monotone``,
checked on the host: the ``CLOSED`` constexpr), where every key block below kv_len is visited,
masked. Otherwise
(block lists, data-dependent masks) every key block below ``kv_len`` is visited with the mask
evaluated. ``random_blocks`` patterns get no decode: their random key blocks depend on
the sequence length, which differs per batch row.
"""
from __future__ import annotations

from typing import List


from attncc.analysis.hoist import Hoister
from attncc.analysis.score import mask_hoister, score_terms
from attncc.codegen.helpers import helper_list
from attncc.codegen.names import param_arg, param_value, param_var
from attncc.codegen.printer import Temporaries, TritonPrinter
from attncc.codegen.softmax import Inputs, definitions, input_launch, param_launch, render_score, score_inputs
from attncc.codegen.tile_dots import DotCode
from attncc.codegen.walks import monotone_code, render_walk
from attncc.spec import symbols as S
from attncc.spec.builtins import RandomBlocks
from attncc.spec.ir import Pattern


def decode_context(pattern: Pattern, plan, ctx: dict) -> dict:
    """The ``decode`` variable of the templates (``ctx``: softmax_context's result, for the
    helpers the module already defines)."""
    if pattern.mask is not None and pattern.mask.atoms(RandomBlocks):
        return dict(supported=False, reason="random_blocks() depend on the sequence length, which differs per row")
    dots = plan.dots
    if any(S.h in dot.key.access.free_symbols for dot in dots):
        # the rows of a decode tile are query heads too: a key operand read by the head is no tile
        # product's, so there the dots are computed term by term, as written
        pattern, dots = plan.pattern, ()
    inputs = Inputs(pattern)  # gathers as the forward renders them
    hoist, mhoist = Hoister(), mask_hoister()
    mask, bias_j, mod, lse_row, simple_bias = score_terms(pattern, hoist, mhoist)

    # Hoisted values: per program when they involve neither i nor h, else per row (the mask's
    # printed in float64, as the mask).
    def split(h: Hoister):
        scalars = [(sym, e) for e, sym in h.scalars.items() if not e.has(S.h)]
        rows = [(sym, e) for e, sym in h.scalars.items() if e.has(S.h)] + [(sym, e) for e, sym in h.rows.items()]
        return scalars, rows

    (scalars, rows), (mscalars, mrows) = split(hoist), split(mhoist)
    temps = Temporaries()  # the decode kernels' named values

    def printer(i_text, h_text, row_suffix, float64=False):
        out = {S.b: "b", S.h: h_text, S.i: i_text, S.j: "offs_j[None, :]", S.n_q: "n_q", S.n_k: "n_k",
               S.n_heads: "H"}
        if not float64:
            out[S.s] = "s"
        out.update({p.symbol: param_value(p, float64) for p in pattern.params})
        out.update({sym: sym.name for sym, _ in (mscalars if float64 else scalars)})
        out.update({sym: sym.name + row_suffix for sym, _ in (mrows if float64 else rows)})
        pr = TritonPrinter(out, float64=float64, score=not float64, temps=temps)
        pr.gather = lambda e: inputs.gather(pr, e)
        return pr

    tile, row = printer("offs_i[:, None]", "h_row[:, None]", "[:, None]"), printer("offs_i", "h_row", "")
    mask_tile, mask_row = (printer("offs_i[:, None]", "h_row[:, None]", "[:, None]", True),
                           printer("offs_i", "h_row", "", True))

    dot_code = DotCode(pattern, dots, {**tile.names, S.h: "h_row[:, None]"}, inputs)
    score_lines = dot_code.products() + render_score(pattern, tile, bias_j, mod, simple_bias)
    mask_temps, mask_code = mask_tile.statement(mask) if mask is not None else ([], None)
    scalar_defs = (definitions(row, {e: sym for sym, e in scalars}, scalar=True)
                   + definitions(mask_row, {e: sym for sym, e in mscalars}, scalar=True))
    dot_defs = [(name, code) for name, code, _ in dot_code.resident()]
    row_defs = (definitions(row, {e: sym for sym, e in rows}, scalar=False)
                + definitions(mask_row, {e: sym for sym, e in mrows}, scalar=False) + dot_defs)
    scalars, rows = scalars + mscalars, rows + mrows
    lse_row_defs, lse_row_bias = row.statement(lse_row) if lse_row is not None else ([], None)
    if lse_row_bias is not None:
        row.helpers.add("_row_term_o")

    used_inputs = score_inputs(pattern, dots)
    input_args = [a for name in used_inputs for a in inputs.args(name)]
    ctx_args = ["b", "h_row", "H", "n_q", "n_k"] + [param_var(p.name) for p in pattern.params] + input_args
    ctx_args += [sym.name for sym, _ in scalars] + [sym.name for sym, _ in rows] + [name for name, _ in dot_defs]

    iteration, walk, note = _iteration(plan)
    closed_check = monotone_code(plan) if iteration == "segments" else "True"
    closed_check = None if closed_check == "True" else closed_check
    tile.helpers |= walk.get("helpers", set())

    helpers = helper_list(tile.helpers | row.helpers | mask_tile.helpers | mask_row.helpers | dot_code.helpers, pattern.rope,
                          have=ctx.get("helpers", ()))
    return dict(
        supported=True, reason="", helpers=helpers,
        ctx_args=ctx_args, score_lines=score_lines, mask_temps=mask_temps, mask_code=mask_code,
        scalar_defs=scalar_defs, row_defs=row_defs, lse_row_defs=lse_row_defs, lse_row_bias=lse_row_bias, iteration=iteration, note=note,
        steps=walk.get("steps", []), segments=walk.get("segments", 0), full_kb=walk.get("full_kb", ""),
        masked_kb=walk.get("masked_kb", ""), closed_check=closed_check, fallback=_fallback(walk),
        param_args=[param_arg(p) for p in pattern.params], input_args=input_args,
        param_launch=param_launch(pattern), input_launch=[a for n in used_inputs for a in input_launch(pattern, n, dots)],
        kv_len_input=any(d.name == "kv_len" for d in pattern.inputs),
    )


def _iteration(plan):
    """("segments", the rendered forward walk, note) from the closed form, or ("dense" | "all",
    {}, note) when every key block below kv_len is visited (full / masked)."""
    it = plan.forward.kind.value
    if it == "dense":
        return "dense", {}, "all below kv_len; only the ragged last one is masked"
    if it != "bands":
        return "all", {}, "all below kv_len, the mask evaluated on each (no closed form)"
    walk = render_walk(plan, transposed=False, names={"k_offset": "0"})
    if walk["per_head"]:
        return "all", {}, "all below kv_len, the mask evaluated on each (its walk depends on h)"
    return "segments", walk, "the forward's closed-form walk, for the rows kv_len - Nq .. kv_len - 1"


def _fallback(walk: dict):
    """The walk's outputs for a call whose params break the closed form's monotonicity (``CLOSED``
    false): every key block below kv_len, masked (one segment: ``[kv_lo, kv_hi)`` with no FULL
    range; two: no FULL piece and one masked piece from block 0)."""
    if not walk:
        return []
    every = "tl.cdiv(Nk, BLOCK_N)"
    out = walk["out"]
    return [(var, every if name in ("hi", "n_masked") else "0") for name, var in out.items()]
