"""Plan -> the template variables of a softmax forward kernel (templates/softmax.py.j2)."""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

import sympy
from sympy.core.function import AppliedUndef

from attncc.analysis.bands import X
from attncc.analysis.builtin import gluon_fit
from attncc.analysis.hoist import Hoister
from attncc.analysis.score import mask_hoister, score_terms
from attncc.analysis.walks import Iteration
from attncc.codegen.helpers import helper_list
from attncc.codegen.names import (grad_ptr, grad_stride, input_args, input_ptr, input_size, input_stride, param_arg,
                                  param_value, param_var)
from attncc.codegen.printer import Temporaries, TritonPrinter, conjunction, joined
from attncc.codegen.tile_dots import DotCode
from attncc.codegen.tile_kernel import render_tile_kernel
from attncc.codegen.walks import precondition_code, render_walk, walk_note
from attncc.spec import symbols as S
from attncc.spec.builtins import RandomBlocks
from attncc.spec.ir import DTYPE_BYTES, INTEGER_DTYPES, Pattern

INDEX_NAMES = {S.b: "b", S.h: "h", S.n_q: "n_q", S.n_k: "n_k", S.n_heads: "H", S.s: "s"}
# the list parameters of a kernel that walks block lists: attncc.runtime.blocks.BlockLists' fields in
# order (the host passes them as ``*lists``; tests/test_block_lists.py checks the names), the ints
# named apart from the kernel's own strides. Not imported from there: building imports no torch.
LIST_ARGS = ["full_count", "full_index", "partial_count", "partial_index", "list_stride_b", "list_stride_h",
             "list_stride_row", "list_width"]


class Inputs:
    """Renders input accesses (``doc[b, i]``) as masked gathers (kernel names: :mod:`attncc.codegen.names`)."""

    def __init__(self, pattern: Pattern):
        self.pattern = pattern

    def args(self, name: str) -> List[str]:
        return input_args(name, len(self.pattern.input(name).dims))

    def gather(self, printer: TritonPrinter, e: AppliedUndef, convert: bool = True) -> str:
        """The load of one element per pair (or row), converted to the type arithmetic on it runs in
        (``convert``; else as stored: a 16-bit tile product's operand, attncc.codegen.tile_dots):

        - 16-bit floats to float32, so that no arithmetic on them runs in bfloat16 / float16
          (Triton keeps a tensor's dtype in ``x * 1.44`` and ``x - y``); float64 ones to float32
          in score code (scores are float32 by contract: a float64 score would reach
          ``p.to(bfloat16)``), kept in mask code (float64 there, as the reference);
        - integers to int64, the reference's integer type: ``d[b, i] + 1``, ``i - start[b]``,
          ``d[b, j] * w`` cannot overflow a narrower type, and no bound on the values is needed
          (the host bounds only arithmetic of positions, params and sizes: codegen/bounds.py)."""
        name = type(e).__name__
        decl = self.pattern.input(name)
        address, guards = self.address(name, [printer.p(a) for a in e.args], args=e.args)
        lang = printer.lang  # tl, or gl for the Gluon fragments (attncc.codegen.gluon): the same reads
        if not convert:
            widen = ""
        elif decl.dtype in ("bfloat16", "float16") or (decl.dtype == "float64" and not printer.float64):
            widen = f".to({lang}.float32)"
        elif decl.dtype in INTEGER_DTYPES:
            widen = f".to({lang}.int64)"
        else:
            widen = ""
        if not guards:
            return f"{lang}.load({address}){widen}"
        return f"{lang}.load({address}, mask={conjunction(guards)}, other=0){widen}"

    def address(self, name: str, idx: List[str], *, args, grad: bool = False, skip=()) -> Tuple[str, List[str]]:
        """(the address of input ``name``'s element at the printed indices ``idx``, or of its gradient
        buffer's with ``grad``; the bounds checks of the indices). ``args``: the indices as written
        (before hoisting): a "b" or "h" dim read at ``b`` or ``h`` itself needs no check (the host
        checks those dims' sizes), one read at anything else does (``t[h + 1, j]``: 0 past the last
        head, as every read outside an input's extent); ``skip``: dims the caller checks itself."""
        ptr, stride = (grad_ptr, grad_stride) if grad else (input_ptr, input_stride)
        offset = "".join(f" + {x} * {stride(name, d)}" for d, x in enumerate(idx))  # none: a 0-d input
        dims = self.pattern.input(name).dims
        own = {"b": S.b, "h": S.h}
        guards = [f"({x} >= 0) & ({x} < {input_size(name, d)})" for d, x in enumerate(idx)
                  if d not in skip and not (dims[d] in own and args[d] == own[dims[d]])]
        return ptr(name) + offset, guards


def loop_gathers(pattern: Pattern, dots=()) -> Tuple[int, int]:
    """(bytes per pair, bytes per position) that the kernels' loops over one side (keys; queries in
    dK/dV) gather from inputs: an access of the mask, bias or mod that reads both positions
    (``rel_bias[h, bucket(j - i)]``) is loaded per pair of each tile, one that reads one position
    (``doc[b, j]``) at most per position of the tile, the others once per program; a lowered dot
    (``dots``: the Plan's) loads a row of its streamed operand per position, ``width`` entries as the
    tile product takes them (attncc.codegen.tile_dots). Triton pipelines those loads through shared
    memory, a buffer per stage but one (attncc.runtime.configs.shared_bytes)."""
    pair = 0
    position = sum(dot.width * max(DTYPE_BYTES[pattern.input(o.name).dtype] for o in dot.operands()) for dot in dots)
    accesses = set().union(*[e.atoms(AppliedUndef) for e in (pattern.mask, pattern.bias, pattern.mod) if e is not None])
    for e in accesses:
        reads = e.free_symbols & {S.i, S.j}
        size = DTYPE_BYTES[pattern.input(type(e).__name__).dtype]
        if len(reads) == 2:
            pair += size
        elif reads:
            position += size
    return pair, position


def _names(pattern: Pattern, i_text: str, j_text: str, extra: Dict[sympy.Symbol, str], float64: bool = False):
    """Kernel text of each symbol; ``float64``: for mask code (float params as they are, and no
    score: a mask never sees it)."""
    names = dict(INDEX_NAMES)
    if float64:
        del names[S.s]
    names[S.i] = i_text
    names[S.j] = j_text
    for p in pattern.params:
        names[p.symbol] = param_value(p, float64)
    names.update(extra)
    return names


def softmax_context(pattern: Pattern, plan, split: bool = False) -> dict:
    """The forward's template context; ``split``: the kernels walk a residue or column split's rewrite
    (attncc.analysis.residue), which sets the tile hint."""
    inputs = Inputs(pattern)
    hoist, mhoist = Hoister(), mask_hoister()

    # -- what enters the score ----------------------------------------------
    mask, bias_j, mod, lse_row, simple_bias = score_terms(pattern, hoist, mhoist)

    random_blocks = sorted((mask.atoms(RandomBlocks) if mask is not None else set()), key=sympy.default_sort_key)
    rb_names = {rb: f"rb{n}" for n, rb in enumerate(random_blocks)}

    def render_rb(e: RandomBlocks) -> str:
        r, block, _ = e.options
        name = rb_names[e]
        if r == 0:
            return "False"
        hits = [f"(offs_j[None, :] // {block} == {name}_{t}[:, None])" for t in range(r)]
        return joined("|", hits)

    printers = []
    temps = Temporaries()  # the forward's kernels: one set of names for the values they name

    def printer(i_text, j_text, hoisted: Hoister, row_suffix, float64=False, **kw):
        names = {**{sym: sym.name for sym in hoisted.scalars.values()},
                 **{sym: sym.name + row_suffix for sym in hoisted.rows.values()}}
        pr = TritonPrinter(_names(pattern, i_text, j_text, names, float64), float64=float64, score=not float64,
                           temps=temps, **kw)
        pr.gather = lambda e: inputs.gather(pr, e)
        printers.append(pr)
        return pr

    tile = printer("offs_i[:, None]", "offs_j[None, :]", hoist, "[:, None]")
    row = printer("offs_i", "offs_j", hoist, "")
    mask_tile = printer("offs_i[:, None]", "offs_j[None, :]", mhoist, "[:, None]", float64=True,
                        random_blocks=render_rb)
    mask_row = printer("offs_i", "offs_j", mhoist, "", float64=True)

    dots = DotCode(pattern, plan.dots, _names(pattern, "offs_i", "offs_j", {}), inputs)
    score_lines = dots.products() + render_score(pattern, tile, bias_j, mod, simple_bias)
    mask_temps, mask_code = mask_tile.statement(mask) if mask is not None else ([], None)

    # the values the mask code reads (its hoister's and the random blocks' rows): all that the
    # exact tile kernel computes besides the mask; the score's are for the attention kernels only
    mask_defs = definitions(mask_row, mhoist.scalars, scalar=True) + definitions(mask_row, mhoist.rows, scalar=False)
    for rb, name in rb_names.items():
        r, block, _ = rb.options
        for t in range(r):
            mask_defs.append((f"{name}_{t}", f"tl.load({name}_table + tl.minimum(offs_i // {block}, {name}_rows - 1) * {r} + {t})"))
    # (a hoisted part of a mask that simplified away after hoisting, `(w >= h) | (j != 0.5)`: True)
    mask_defs = live_definitions(mask_defs, [mask_code or ""] + [code for _, code in mask_temps])
    scalar_defs = definitions(row, hoist.scalars, scalar=True)
    dot_defs = [(name, code) for name, code, _ in dots.resident()]
    row_defs = definitions(row, hoist.rows, scalar=False) + mask_defs + dot_defs
    lse_row_defs, lse_row_bias = row.statement(lse_row) if lse_row is not None else ([], None)
    if lse_row_bias is not None:
        row.helpers.add("_row_term_o")

    used_inputs = score_inputs(pattern, plan.dots)
    input_args = [a for name in used_inputs for a in inputs.args(name)]
    rb_args = [a for name in rb_names.values() for a in (f"{name}_table", f"{name}_rows")]
    ctx_args = ["b", "h", "H", "n_q", "n_k"] + [param_var(p.name) for p in pattern.params] + input_args + rb_args
    ctx_args += [sym.name for h in (hoist, mhoist) for sym in h.scalars.values()]
    ctx_args += [sym.name for h in (hoist, mhoist) for sym in h.rows.values()]
    ctx_args += [name for name, _ in dot_defs]
    ctx_args += [f"{name}_{t}" for rb, name in rb_names.items() for t in range(rb.options[0])]

    # -- the walks (the Plan's, rendered) ------------------------------------------
    walk = render_walk(plan, transposed=False)
    printers[0].helpers |= walk["helpers"]
    note = [f"Key blocks per query block (forward, dQ): {walk['note'][0]}"] + walk["note"][1:]
    dkdv_note = walk_note(plan.transposed, transposed=True)
    note += [f"Query blocks per key block (dK/dV): {dkdv_note[0]}"] + dkdv_note[1:]
    checks = (precondition_code(plan, transposed=False), precondition_code(plan, transposed=True))
    mask_free = pattern.mask.free_symbols if pattern.mask is not None else set()

    helpers = helper_list(set().union(dots.helpers, *[pr.helpers for pr in printers]), pattern.rope)

    given = [f"{p.name}={p.value!r}" for p in pattern.params if not p.hidden]  # (a call cannot pass hidden ones)
    param_doc = ", ".join(given)
    input_doc = ", ".join(f"{d.name} ({', '.join(map(str, d.dims))}; {d.dtype})" for d in pattern.inputs)
    call_example = ", ".join([f"{d.name}=..." for d in pattern.inputs] + given)
    fit = gluon_fit(plan)  # (not cached: each call redoes its analysis of the Plan)
    return dict(
        walk=walk, iteration_note=note, random_blocks=bool(rb_names),
        dynamic=plan.dynamic, **_program_context(plan), exact_lists=plan.needs_exact_lists,
        mask_bh=bool({S.b, S.h} & mask_free), closed_form_check=checks if checks != ("True", "True") else None,
        list_args=LIST_ARGS, list_params=" ".join(LIST_ARGS), score_lines=score_lines, mask_temps=mask_temps,
        mask_code=mask_code, scalar_defs=scalar_defs, row_defs=row_defs, mask_defs=mask_defs,
        lse_row_defs=lse_row_defs, lse_row_bias=lse_row_bias, ctx_args=ctx_args,
        param_args=[param_arg(p) for p in pattern.params], input_args=input_args + rb_args,
        param_launch=param_launch(pattern), input_ptrs=[input_ptr(d.name) for d in pattern.inputs],
        input_launch=[a for n in used_inputs for a in input_launch(pattern, n, plan.dots)]
        + [(f"{name}_table {name}_rows", f"*_random_table(call, {rb.options[0]}, {rb.options[1]}, {rb.options[2]})")
           for rb, name in rb_names.items()],
        helpers=helpers, rope=pattern.rope, tile_hint=_tile_hint(plan, split), gluon=fit.kind,
        gluon_reason=fit.reason, gluon_backward=fit.backward, gluon_auto=fit.auto, gluon_backward_auto=fit.backward_auto,
        loop_gathers=loop_gathers(pattern, plan.dots),
        rotary_dim_arg=("0" if pattern.rope is None else
                        str(pattern.rope.rotary_dim) if pattern.rope.rotary_dim else "call.D"), param_doc=param_doc, input_doc=input_doc, call_example=call_example,
    )


def score_inputs(pattern: Pattern, dots=()) -> List[str]:
    """The inputs the kernels read (sorted): those of the mask, bias and mod, and the operands of the
    lowered dots (``dots``: the Plan's; ``pattern``: its kernel pattern, whose bias has them as tile
    products)."""
    return sorted({type(a).__name__ for e in (pattern.mask, pattern.bias, pattern.mod) if e is not None
                   for a in e.atoms(AppliedUndef)} | {o.name for dot in dots for o in dot.operands()})


def param_launch(pattern: Pattern) -> List[Tuple[str, str]]:
    """(kernel parameter, host value) of each param, for ``sig.launch`` (attncc.codegen.params)."""
    return [(param_var(p.name), f"call.params[{p.name!r}]") for p in pattern.params]


def input_launch(pattern: Pattern, name: str, dots=()) -> List[Tuple[str, str]]:
    """(kernel parameters, host value) of an input's pointer, strides and sizes, for ``sig.launch``;
    a bfloat16 operand of a lowered dot (``dots``: the Plan's) as ``_rt.dot_operand`` hands it over."""
    decl = pattern.input(name)
    rank, given = len(decl.dims), f"call.inputs[{name!r}]"
    read = given
    if decl.dtype == "bfloat16" and any(o.name == name for dot in dots for o in dot.operands()):
        read = f"_rt.dot_operand({given})"
    out = [(input_ptr(name), read)]
    if rank:
        out.append((" ".join(input_stride(name, d) for d in range(rank)), f"*{read}.stride()"))
    return out + [(input_size(name, d), f"{given}.shape[{d}]") for d in range(rank)]


def definitions(printer: TritonPrinter, table: Dict[sympy.Basic, sympy.Symbol], *, scalar: bool) -> List[Tuple[str, str]]:
    """``(name, code)`` of a hoister's table (``{expression: name}``: its ``scalars``, or its
    ``rows``), each preceded by the values its code names (:meth:`TritonPrinter.definition`)."""
    out = []
    for e, sym in table.items():
        temps, code = printer.definition(e, scalar)
        out += temps + [(sym.name, code)]
    return out


def live_definitions(defs: List[Tuple[str, str]], code: List[str]) -> List[Tuple[str, str]]:
    """The ``(name, code)`` definitions of ``defs`` (in order: each may read those before it) that
    ``code`` reads, directly or through another kept one."""
    words = set(re.findall(r"[A-Za-z_]\w*", " ".join(code)))
    kept = []
    for name, value in reversed(defs):
        if name in words:
            kept.append((name, value))
            words.update(re.findall(r"[A-Za-z_]\w*", value))
    return kept[::-1]


def printed(lines: List[str], printer: TritonPrinter, e) -> str:
    """``e``'s code, the definitions of the values it names appended to ``lines`` first."""
    temps, code = printer.statement(e)
    lines += [f"{name} = {value}" for name, value in temps]
    return code


def render_score(pattern: Pattern, tile: TritonPrinter, bias_j, mod, simple_bias: bool) -> List[str]:
    """The lines that turn a tile's ``qk`` into its scores ``s`` in log2 units; none when the
    score is the scaled dot product alone (the tile then folds the scale into the exponent)."""
    if pattern.bias is None and pattern.mod is None and pattern.softcap is None:
        return []
    lines: List[str] = []
    bias = f" + {printed(lines, tile, bias_j)}" if bias_j is not None else ""
    if simple_bias:
        return lines + [f"s = qk * qk_scale{bias} * 1.4426950408889634  # bias * log2(e)" if bias else "s = qk * qk_scale"]
    lines.append(f"s = qk * sm_scale{bias}")
    if mod is not None:
        lines.append(f"s = {mod_text(tile, mod, lines)}")
    if pattern.softcap is not None:
        tile.helpers.add("_tanh")
        cap = f"{pattern.softcap!r} * _tanh(s * {1.0 / pattern.softcap!r}, FAST_MATH)"
        lines.append(f"s = tl.where(s == float(\"-inf\"), s, {cap})  # -inf (a removed pair) stays -inf")
    lines.append("s = s * 1.4426950408889634  # to log2 units")
    return lines


def mod_text(tile: TritonPrinter, mod, lines: List[str]) -> str:
    """The transform of a tile's scores ``s`` (the values it names defined in ``lines``); one that
    ignores them (``-inf`` everywhere: no pair is allowed; ``0.1 * i``) is broadcast to the tile,
    ``qk``'s shape, whatever ``qk`` holds."""
    text = printed(lines, tile, mod)
    return text if S.s in mod.free_symbols else f"tl.zeros_like(qk) + {text}"


def _tile_hint(plan, split: bool = False) -> str:
    """"narrow" when each query block meets only a narrow region of keys whose edges move with
    it: a window (the band's lower bound moves with the rows; global rows and columns beside it
    too) or data-dependent regions such as documents. Smaller tiles waste less on ragged edges there
    (on the H100 and H200, 64x64 against 128x128: sliding window and documents, then sink + window
    0.918 -> 0.795 ms and Longformer 0.797 -> 0.574 ms at 16K, docs/performance.md).
    "thin" for a static mask without closed form (exact block lists) other than random blocks: its
    tiles are partial and sparse (a 2D neighborhood's rows see a few runs of keys), where 64x32
    wasted least (0.808 ms against 1.066 at 128x128 and 1.029 at 64x64). Not for a split (``split``):
    its kernels walk residue classes (or summary columns) whose tiles are as dense as a window's,
    through positions the closed forms cannot follow (dilated and strided were measured at the
    default tiles)."""
    if plan.dynamic:
        return "narrow"
    walk = plan.forward
    if walk.kind is Iteration.BLOCK_LIST:
        mask = plan.pattern.mask
        return "default" if split or (mask is not None and mask.has(RandomBlocks)) else "thin"
    if walk.kind is not Iteration.BANDS:
        return "default"
    c = walk.cover
    moves = c.band is not None and any(p.has(X) for g in c.band.lower for p in g)
    return "narrow" if moves else "default"


def _program_context(plan) -> dict:
    program = getattr(plan, "classifier", None)
    if not plan.dynamic or program is None:
        return dict(program_leaves=[], program_steps=[], program_result="", tile_kernel=None, list_kernel_arg="")
    tile_kernel = render_tile_kernel(program, plan.pattern, program_name="MASK_TILES") if plan.dynamic else None
    return dict(program_leaves=[repr(leaf) for leaf in program.leaves],
                program_steps=[repr(step) for step in program.steps], program_result=program.result,
                tile_kernel=tile_kernel, list_kernel_arg=", kernel=_tile_lists" if tile_kernel else "")
