"""Plan -> the Gluon sm90 kernels' fragments of a pattern: ``generated/<name>_gluon.py``.

The Gluon kernels (``attncc.runtime.gluon``) are hand-written skeletons, the same for every
pattern; what a pattern adds is a few small ``@gluon.jit`` functions they take as ``constexpr``
arguments and inline (their contract: ``attncc.runtime.gluon.walks``):

- ``walk``: the Plan's key-block segments of a query tile (:func:`attncc.analysis.walks.sorted_segments`:
  the closed-form steps the ``tl`` kernels print, then the ones that sort them), printed line by
  line as the ``tl`` walk is (:func:`attncc.codegen.walks.symbol_names`, the same printer in Gluon's
  names: :class:`attncc.codegen.printer.GluonPrinter`);
- ``mask``: the mask as the Plan's bands, each solved for the key (:meth:`attncc.analysis.bands.Cover.predicate`:
  per-key values are not kept across the key loop, where a register-bound kernel would spill
  them), evaluated on the partial blocks only;
- ``score``: the bias, mod and softcap of the score in log2 units (None for the plain scaled dot
  product: the kernels then fold the scale into exp2, as before);
- the backward's (where :attr:`~attncc.analysis.builtin.GluonFit.backward`): ``qwalk``, the Plan's
  transposed walk as sorted segments of query blocks per key block (the same steps and printer as
  ``walk``), ``qmask``, the mask with each band solved for the query (the dK/dV kernel's
  transposed tiles), and ``score_grad``, d score / d (scale * qk + bias).

Walks without a closed form (BLOCK_LIST: strides, dilations, 2D neighborhoods, [inputs] such as
document ids) read the block lists the ``tl`` kernels walk (attncc.runtime.blocks, made for the Gluon
kernel's tiles): ``walk`` returns one segment of list positions (partial entries, then full ones)
and ``block`` the key block at a position (templates/gluon.py.j2; docs/gluon.md "Block lists and
[inputs]"). BigBird's random blocks read the seeded tables the ``tl`` kernels get. ``[inputs]`` are read in the
mask and score as the ``tl`` kernels read them (:class:`attncc.codegen.softmax.Inputs`: strides, a
bound on each position index, integers widened to int64, floats to float32), from pointers, strides
and sizes the host appends to ``pattern_args``.

The functions live in a file of their own, next to the module, which ``attncc.runtime.backend``
imports on the Gluon path only: the module itself is imported under ``TRITON_INTERPRET=1`` (whose
Triton cannot compile Gluon) and with Tritons that have no Gluon, and keeps needing
``attncc.runtime`` alone. Plain host functions beside them give the kernel's ``pattern_args`` (the
spec's params, in the order the fragments unpack them) and whether the closed form is exact for a
call (its precondition; otherwise the ``tl`` kernels run the call on exact block lists).

Names: the fragments' own arguments and ``b, h, H, q_last`` (the context tuple's first members),
``kv_<step>`` for the walk's steps, ``qb_<step>`` for the query-block walk's, ``prm_<param>`` for params (attncc.codegen.names: no spec name
can meet another), ``tmp<n>`` / ``bucket<n>`` for named subexpressions.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import sympy
from sympy.core.function import AppliedUndef

from attncc.analysis.builtin import gluon_fit
from attncc.analysis.derivative import BackwardUnsupported, score_derivative
from attncc.analysis.plan import SWAP
from attncc.analysis.walks import Iteration, sorted_segments
from attncc.codegen.helpers import GLUON, helper_args
from attncc.codegen.names import input_args, param_var
from attncc.codegen.printer import GluonPrinter, NotGluon, Temporaries, joined, record_definitions
from attncc.codegen.softmax import Inputs
from attncc.codegen.text import py_str
from attncc.codegen.walks import precondition_code, symbol_names, walk_note
from attncc.spec import symbols as S
from attncc.spec.builtins import Bucket, RandomBlocks
from attncc.spec.ir import Pattern

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
CONTEXT = ("b", "h", "H", "q_last")  # the ctx tuple's members before the params (runtime.gluon.common)
# A block-list walk's members of ctx after the params (attncc.runtime.blocks.BlockLists' fields, less
# the row stride, which is 1, then the first query position and the rows per tile the lists were
# made for): names the tl kernels give their list arguments (attncc.codegen.softmax.LIST_ARGS).
LIST_CONTEXT = ("full_count", "full_index", "partial_count", "partial_index", "list_stride_b", "list_stride_h",
                "list_width", "list_q_offset", "list_block_m")


def gluon_context(pattern: Pattern, plan) -> Optional[dict]:
    """The template variables of ``templates/gluon.py.j2`` for ``plan``, or None when its forward
    does not take rendered fragments (:func:`attncc.analysis.builtin.gluon_fit`). Raises
    :class:`NotGluon` for what the analysis let through and Gluon cannot print (a bug: the tests
    render every eligible spec and random ones)."""
    fit = gluon_fit(plan)
    if fit.kind != "rendered":
        return None
    params = [p for p in pattern.params]
    lists = plan.forward.kind is Iteration.BLOCK_LIST
    inputs = used_inputs(pattern)
    random = sorted(pattern.mask.atoms(RandomBlocks), key=sympy.default_sort_key) if pattern.mask is not None else []
    random_names = {rb: f"rb{n}" for n, rb in enumerate(random)}  # the tl kernels' names of BigBird's tables
    unpack = _wrapped("", list(CONTEXT) + [param_var(p.name) for p in params] + (list(LIST_CONTEXT) if lists else [])
                      + [a for name in inputs for a in input_args(name, len(pattern.input(name).dims))]
                      + [a for name in random_names.values() for a in (f"{name}_table", f"{name}_rows")], "")
    temps = Temporaries()
    helpers = set()

    # -- the score's derivative first: one Gluon cannot print keeps the backward on tl, not the forward
    base = {S.i: "i", S.j: "j", S.b: "b", S.h: "h", S.n_q: "n_q", S.n_k: "n_k", S.n_heads: "H"}
    grad_lines: List[str] = []
    if fit.backward:
        try:
            grad_lines = render_score_grad(pattern, base, temps, helpers)
        except (NotGluon, BackwardUnsupported, NotImplementedError) as e:  # (the tl backward says it too)
            fit = dataclasses.replace(fit, backward_reason=f"its score's derivative cannot be printed in Gluon ({e})")

    # -- the walks: the Plan's steps, then the sorted segments (the forward's, the dK/dV kernel's); a
    # forward walk without a closed form reads the block lists instead (templates/gluon.py.j2)
    walk_steps, walk_out, count = ([], [], 1) if lists else _segments(plan, False, helpers)
    qwalk_steps, qwalk_out, qcount = _segments(plan, True, helpers) if fit.backward else ([], [], 0)

    # -- the mask and the score, over the positions i [BLOCK_M, 1] and j [1, BLOCK_N] ------------------
    mask_lines: List[Tuple[str, str]] = []
    mask_code = mask_expr = None
    if plan.forward.kind is Iteration.BANDS:  # the mask as the Plan's bands, each solved for j
        printer = GluonPrinter({**base, **{p.symbol: param_var(p.name) for p in params}}, float64=True, temps=temps)
        mask_expr = plan.forward.cover.predicate(S.i, S.j)
        mask_lines, mask_code = printer.statement(mask_expr)
        helpers |= printer.helpers
    elif lists and pattern.mask is not None:  # no bands: the mask as the spec wrote it, on partial blocks
        printer = GluonPrinter({**base, **{p.symbol: param_var(p.name) for p in params}}, float64=True, temps=temps,
                               random_blocks=lambda e: _random_blocks(e, random_names[e]))
        printer.gather = _gather(pattern, printer)
        mask_expr = pattern.mask
        mask_lines, mask_code = printer.statement(mask_expr)
        helpers |= printer.helpers
    qmask_lines: List[Tuple[str, str]] = []
    qmask_code = None
    if fit.backward and plan.transposed.kind is Iteration.BANDS:  # for the dK/dV kernel: each band solved for i
        printer = GluonPrinter({**base, **{p.symbol: param_var(p.name) for p in params}}, float64=True, temps=temps)
        qmask_lines, qmask_code = printer.statement(plan.transposed.cover.predicate(S.i, S.j).xreplace(SWAP))
        helpers |= printer.helpers
    score_lines = render_score(pattern, base, temps, helpers, gather=True)
    per_pair = pair_work([e for e in (mask_expr, pattern.bias, pattern.mod) if e is not None])
    # the positions of a split call (attncc.analysis.residue) go through products with hidden params:
    # strided's columns apart spilled 248 bytes on 128-key blocks at D = 128
    per_pair = per_pair or any(p.hidden for p in params)

    bad = sorted(h for h in helpers if not (h in GLUON or h.startswith("_bucket_")))
    if bad:
        raise NotGluon(f"{pattern.source}: the Gluon fragments have no helper {', '.join(bad)}")
    note = walk_note(plan.forward)
    qnote = walk_note(plan.transposed, transposed=True)
    values = [f"{p.kind}(call.params[{py_str(p.name)}])" for p in params]
    if lists:
        values += [f"lists.{f}" for f in ("full_count", "full_index", "partial_count", "partial_index", "stride_b",
                                           "stride_h", "width")] + ["call.q_offset", "block_m"]
    values += [v for name in inputs for v in _input_values(pattern, name)]
    values += [f"*_rt.blocks.random_table(call.n_q, call.n_k, {rb.options[0]}, {rb.options[1]}, {rb.options[2]}, "
               f"str(call.q.device))" for rb in random]  # (table, rows), as the tl kernels get them
    return dict(
        segments=count, walk_steps=walk_steps, walk_out=walk_out, lists=lists, block_n=NARROW_BLOCK_N if per_pair else None,
        unpack=unpack, param_tuple=_tuple([py_str(p.name) for p in params]),
        param_values=_tuple(values[:len(params)]),  # the params alone; with more: the whole statement
        args_return=None if len(values) == len(params) else
        _wrapped("return ", values, "") + ("," if len(values) == 1 else ""),
        input_names=_tuple([py_str(n) for n in inputs]) if inputs else None, random_tables=bool(random),
        rotated=pattern.rope is not None,
        mask_lines=mask_lines, mask_code=mask_code, qmask_lines=qmask_lines, qmask_code=qmask_code,
        score_lines=score_lines, grad_lines=grad_lines,
        helpers=[helper_args(h) for h in sorted(helpers)], exact=precondition_code(plan, transposed=False),
        backward=fit.backward, backward_reason=fit.backward_reason, qsegments=qcount, qwalk_steps=qwalk_steps,
        qwalk_out=qwalk_out, backward_exact=precondition_code(plan, transposed=True) if fit.backward else None,
        walk_note=[f"{note[0]}; the kernels walk " + ("the block lists of their tiles, partial blocks first" if lists
                   else f"{count} sorted segment{'s' if count > 1 else ''} per query tile")]
        + note[1:] + ([f"the backward's dK/dV kernel: {qnote[0]}; {qcount} sorted segment{'s' if qcount > 1 else ''} "
                       f"of query blocks per key block"] + qnote[1:] if fit.backward else
                      [f"the Gluon backward does not take these fragments: {fit.backward_reason}"]))


def _segments(plan, transposed: bool, helpers: set):
    """(steps [(variable, code)], each segment's four variables as a line, the segment count) of the
    forward's walk (key blocks per query block, steps ``kv_*``) or, ``transposed``, the dK/dV
    kernel's (query blocks per key block, ``qb_*``): one vocabulary, printed alike."""
    segments = sorted_segments(plan.transposed if transposed else plan.forward)
    names = symbol_names(plan, segments.steps, transposed, "qb_" if transposed else "kv_", {"n_heads": "H"})
    printer = GluonPrinter(names)
    record_definitions(segments.steps)  # their bounds, for the host's overflow guard (codegen.bounds)
    steps = [(names[sym], printer(e)) for sym, e in segments.steps]
    helpers |= printer.helpers
    return steps, [", ".join(names[s] for s in seg) for seg in segments.segments], len(segments.segments)


# Per-pair integer work (a // or % of i - j, abs(i // w - j // w), T5 buckets of j - i and their table
# reads) on a [64, 128] tile in the consumer warpgroup, beside S, P and O at D = 128, spilled hundreds
# of bytes in the key loop (ptxas of Triton 3.6: dilated 264, neighborhood_2d 432, t5_bias 768); on
# 64-key blocks the first two spill none and T5 a few words (tests/test_gluon_lists.py bounds them).
NARROW_BLOCK_N = 64
PAIR_WORK = (sympy.Mod, sympy.floor, sympy.ceiling, sympy.Abs, sympy.Min, sympy.Max, Bucket, AppliedUndef)


def pair_work(exprs) -> bool:
    """Whether the mask or score computes more than sums and comparisons on values of both the
    query and the key position (which then take a register per pair of the tile)."""
    return any(isinstance(node, PAIR_WORK) and {S.i, S.j} <= node.free_symbols
               for e in exprs for node in sympy.preorder_traversal(e))


def _random_blocks(e: RandomBlocks, name: str) -> str:
    """BigBird's random key blocks of a query row as the tl kernels test them: the key's block among
    the ``r`` entries of the row's block in the seeded table (``rows`` rows, the last repeated)."""
    r, block, _ = e.options
    if r == 0:
        return "False"
    row = f"gl.minimum(i // {block}, {name}_rows - 1) * {r}"
    return joined("|", [f"(j // {block} == gl.load({name}_table + {row} + {t}))" for t in range(r)])


def used_inputs(pattern: Pattern) -> List[str]:
    """The [inputs] the mask, bias and mod read, in the order their arguments follow the params."""
    return sorted({type(a).__name__ for e in (pattern.mask, pattern.bias, pattern.mod) if e is not None
                   for a in e.atoms(AppliedUndef)})


def _gather(pattern: Pattern, printer: GluonPrinter):
    """The printer's input reads: the tl kernels' masked gathers (same index math and widening), in gl."""
    inputs = Inputs(pattern)
    return lambda e: inputs.gather(printer, e)


def _input_values(pattern: Pattern, name: str) -> List[str]:
    """Host code of an input's kernel arguments (:func:`attncc.codegen.names.input_args`' order): the
    tensor, its strides (as the tensor has them: a broadcast or sliced input is read in place), sizes."""
    rank, tensor = len(pattern.input(name).dims), f"call.inputs[{py_str(name)}]"
    return ([tensor] + [f"{tensor}.stride({d})" for d in range(rank)]
            + [f"{tensor}.shape[{d}]" for d in range(rank)])


def _wrapped(head: str, items: List[str], tail: str) -> str:
    """``head`` + the items as a tuple + ``tail``, a function body's statement: on one line (no
    parentheses) where it fits 120 columns, else in parentheses over lines of at most that."""
    line = f"    {head}{', '.join(items)}{tail}"
    if len(line) <= 120:
        return line.strip()
    lines, current, indent = [], f"{head}(", " " * (4 + len(head) + 1)
    for n, item in enumerate(items):
        text = item + (")" + tail if n == len(items) - 1 else ",")
        if len(current) + 1 + len(text) + 4 > 120 and not current.endswith("("):
            lines.append(current)
            current = indent[4:] + text
        else:
            current += ("" if current.endswith("(") else " ") + text
    return "\n    ".join(lines + [current])


def _tuple(items: List[str]) -> str:
    """A Python tuple literal of the items' code."""
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


def render_score(pattern: Pattern, base, temps: Temporaries, helpers: set, gather: bool = False) -> List[str]:
    """The body of the score hook (its last line a ``return``), or [] for the plain scaled dot
    product. The whole score is computed per pair, as the reference defines it: terms constant along
    the key (which the ``tl`` kernels move to the LSE) stay in it. ``gather``: [inputs] are read as
    the ``tl`` kernels read them (float tables as float32)."""
    if (pattern.bias is None or pattern.bias == 0) and pattern.mod is None and pattern.softcap is None:
        return []
    names = {**base, S.s: "s"}
    for p in pattern.params:  # float params are float32 in score code (a float64 scalar would widen the tile)
        names[p.symbol] = f"gl.cast({param_var(p.name)}, gl.float32)" if p.kind == "float" else param_var(p.name)
    printer = GluonPrinter(names, temps=temps)
    if gather:
        printer.gather = _gather(pattern, printer)
    lines: List[str] = []

    def code(e) -> str:
        defs, text = printer.statement(e)
        lines.extend(f"{name} = {value}" for name, value in defs)
        return text

    has_bias = pattern.bias is not None and pattern.bias != 0
    if pattern.mod is None and pattern.softcap is None:  # scale and bias folded into log2 units at once
        bias = code(pattern.bias)
        helpers |= printer.helpers
        return lines + [f"return qk * qk_scale + {bias} * {LOG2E!r}  # bias * log2(e)"]
    lines.append(f"s = qk * (qk_scale * {LN2!r})" + (f" + {code(pattern.bias)}" if has_bias else "")
                 + "  # scale * qk (+ bias)")
    if pattern.mod is not None and pattern.mod != S.s:
        text = code(pattern.mod)
        lines.append(f"s = {text}" if S.s in pattern.mod.free_symbols else f"s = gl.zeros_like(qk) + {text}")
    if pattern.softcap is not None:
        helpers.add("_tanh")
        cap = f"{pattern.softcap!r} * _tanh(s * {1.0 / pattern.softcap!r}, FAST_MATH)"
        lines.append(f"s = gl.where(s == float(\"-inf\"), s, {cap})  # -inf (a removed pair) stays -inf")
    helpers |= printer.helpers
    return lines + [f"return s * {LOG2E!r}  # to log2 units"]



def render_score_grad(pattern: Pattern, base, temps: Temporaries, helpers: set) -> List[str]:
    """The body of the score's backward hook (``score_grad``: d score / d (scale * qk + bias), from the
    accumulator ``qk`` and the score hook's output ``s`` of a pair with P > 0), or [] when that is 1 (no hook, or a
    bias alone). A softcap's ``1 - tanh^2`` reads tanh from ``s`` (``s * ln 2 / c``: no second tanh);
    a mod's derivative (``sympy.diff``, attncc.analysis.derivative) is evaluated at its input, the
    scaled score with its bias, recomputed from ``qk``."""
    if pattern.mod is None and pattern.softcap is None:
        return []
    names = {**base, S.s: "s_in"}
    for p in pattern.params:
        names[p.symbol] = f"gl.cast({param_var(p.name)}, gl.float32)" if p.kind == "float" else param_var(p.name)
    printer = GluonPrinter(names, temps=temps)
    lines: List[str] = []
    factors: List[str] = []
    if pattern.softcap is not None:
        lines.append(f"t = s * {LN2 / pattern.softcap!r}  # tanh(x / softcap), the softcap's output over softcap")
        factors.append("(1.0 - t * t)")
    if pattern.mod is not None and pattern.mod != S.s:
        dmod = score_derivative(pattern.mod)
        if dmod != 1:
            has_bias = pattern.bias is not None and pattern.bias != 0
            bias = ""
            if has_bias:
                defs, bias = printer.statement(pattern.bias)
                lines.extend(f"{name} = {value}" for name, value in defs)
                bias = f" + {bias}"
            lines.append(f"s_in = qk * (qk_scale * {LN2!r}){bias}  # the mod's input: scale * qk (+ bias)")
            defs, text = printer.statement(dmod)
            lines.extend(f"{name} = {value}" for name, value in defs)
            factors.append(f"({text})" if S.s in dmod.free_symbols else f"(gl.zeros_like(qk) + {text})")
    helpers |= printer.helpers
    if not factors:
        return []
    return lines + [f"return {' * '.join(factors)}"]
