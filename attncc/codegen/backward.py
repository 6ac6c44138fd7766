"""Plan -> the template variables of the backward kernels (templates/softmax_backward.py.j2).

Two kernels per softmax pattern, both rendered from the forward's Plan and expressions, launched
dQ first:

- ``_bwd_dq_kernel``: one program per (query block, b, h) walking the forward's key blocks. It
  first computes its rows' ``delta = rowsum(dO * O) - dLSE`` (the LSE's gradient, when the loss
  uses it: ``dLSE_i / ds_ij = p_ij`` adds ``dLSE_i * p_ij`` to ``dS_ij``) and turns the forward's
  LSE into the ``lse2`` both kernels subtract: log2 units, less the row-constant bias terms the
  forward leaves out of its scores, ``+inf`` on rows without an allowed key (so that
  ``p = exp2(s - lse2)`` is 0 there, never NaN) (``_row_stats``); it writes both for the next kernel.
- ``_bwd_dkdv_kernel``: one program per (key block, b, kv head); it walks the query heads
  of its GQA group and, per head, the query blocks that see its key block, accumulating
  dK and dV in registers. Which query blocks: the plan's transposed walk
  (:attr:`attncc.analysis.Plan.transposed`, rendered by :mod:`attncc.codegen.walks`).

P is recomputed from ``lse2``, never stored. The score chain rule: with
``s = scale * qk + bias``, ``s2 = mod(s)``, ``s3 = softcap * tanh(s2 / softcap)``,
``dS3 = P * (dP - delta)``, ``dS = dS3 * (1 - tanh^2) * dmod/ds`` (``sympy.diff``), then
``dQ = scale * dS @ K``, ``dK = scale * dS^T @ Q``, ``dV = P^T @ dO``; with RoPE the
kernels work on rotated q and k and rotate dQ and dK back before storing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import sympy
from sympy.core.function import AppliedUndef

from attncc.analysis import Plan
from attncc.analysis.derivative import BackwardUnsupported, derivative, score_derivative
from attncc.analysis.hoist import Hoister
from attncc.analysis.score import along_j, mask_hoister
from attncc.codegen.helpers import helper_args, helper_list
from attncc.codegen.names import grad_args, grad_ptr, grad_stride, param_value, param_var
from attncc.codegen.printer import Temporaries, TritonPrinter, conjunction, joined
from attncc.codegen.softmax import Inputs, mod_text, printed  # as the forward's
from attncc.codegen.tile_dots import DotCode
from attncc.codegen.walks import render_walk
from attncc.spec import symbols as S
from attncc.spec.builtins import RandomBlocks, ToFloat
from attncc.spec.ir import Pattern

LOG2E = "1.4426950408889634"

# ---------------------------------------------------------------------------
# Expressions
# ---------------------------------------------------------------------------

def _index_names(pattern: Pattern, i_text: str, j_text: str, extra: Dict[sympy.Symbol, str], float64: bool = False):
    """Kernel text of each symbol; ``float64``: for mask code (see softmax._names)."""
    names = {S.b: "b", S.h: "h", S.n_q: "n_q", S.n_k: "n_k", S.n_heads: "H", S.i: i_text, S.j: j_text}
    if not float64:
        names[S.s] = "s"
    for p in pattern.params:
        names[p.symbol] = param_value(p, float64)
    names.update(extra)
    return names


class _Kernel:
    """The score code of one backward tile function: its hoisting and printers.

    ``inner``: the position the kernel's loop walks; sub-expressions of the other one
    (``outer``) are hoisted into vectors ``<vec_prefix>N`` indexed ``vec_suffix`` in a tile.
    """

    def __init__(self, pattern: Pattern, *, inner, outer, vec_prefix: str, vec_suffix: str, rb_render,
                 transposed: bool = False):
        self.pattern = pattern
        self.transposed = transposed  # tiles are [keys, queries] (dK/dV) instead of [queries, keys]
        self.hoist = Hoister(inner=inner, outer=outer, row_prefix=vec_prefix)
        self.mask_hoist = mask_hoister(inner=inner, outer=outer, row_prefix="m" + vec_prefix)
        self.vec_suffix = vec_suffix
        self.rb_render = rb_render
        self.helpers = set()
        self.temps = Temporaries()  # the names of values its code computes more than once

    def _tile_names(self, hoist: Hoister, float64: bool):
        i_text, j_text = ("offs_i[None, :]", "offs_j[:, None]") if self.transposed else ("offs_i[:, None]", "offs_j[None, :]")
        return _index_names(self.pattern, i_text, j_text,
                            {**{sym: sym.name for sym in hoist.scalars.values()},
                             **{sym: f"{sym.name}{self.vec_suffix}" for sym in hoist.rows.values()}}, float64)

    def tile_printer(self, s_name: str = "s") -> TritonPrinter:
        pr = TritonPrinter({**self._tile_names(self.hoist, False), S.s: s_name}, random_blocks=self.rb_render,
                           score=True, temps=self.temps)
        inputs = Inputs(self.pattern)
        pr.gather = lambda e: inputs.gather(pr, e)
        return pr

    def mask_printer(self) -> TritonPrinter:
        """Mask code: float64, values from the mask's own hoister (as the forward's)."""
        pr = TritonPrinter(self._tile_names(self.mask_hoist, True), random_blocks=self.rb_render, float64=True,
                           temps=self.temps)
        inputs = Inputs(self.pattern)
        pr.gather = lambda e: inputs.gather(pr, e)
        return pr

    def defs(self, pattern: Pattern):
        out = []
        for hoist, float64 in ((self.hoist, False), (self.mask_hoist, True)):
            scalars = {sym: sym.name for sym in hoist.scalars.values()}
            if self.outer is S.i:
                names = _index_names(pattern, "offs_i", "?", scalars, float64)
            else:
                names = _index_names(pattern, "?", "offs_j", scalars, float64)
            pr = TritonPrinter(names, float64=float64, score=not float64, temps=self.temps)
            inputs = Inputs(pattern)
            pr.gather = lambda e, pr=pr: inputs.gather(pr, e)
            named = [(e, sym, True) for e, sym in hoist.scalars.items()] + [(e, sym, False) for e, sym in hoist.rows.items()]
            for e, sym, scalar in named:
                per_head = S.h in e.free_symbols
                temps, code = pr.definition(e, scalar)
                out += [(name, value, per_head) for name, value in temps] + [(sym.name, code, per_head)]
            self.helpers |= pr.helpers
        return out

    @property
    def outer(self):
        return self.hoist.outer


def _score(pattern: Pattern, k: _Kernel, *, bias_j, simple_bias: bool, dmod, keep_ds_t: bool = False):
    """(score lines, (the mask's named values, mask code), chain lines) of one kernel. ``keep_ds_t``:
    name the gradient with respect to the transform's output ``ds_t`` before the chain rule
    through the transform."""
    mask = k.mask_hoist(pattern.mask) if pattern.mask is not None else None
    bias = k.hoist(bias_j) if bias_j is not None else None
    mod = k.hoist(pattern.mod) if pattern.mod is not None else None
    dm = k.hoist(dmod) if dmod is not None else None
    tile = k.tile_printer()
    lines: List[str] = []
    chain: List[str] = [f"ds = p * (dp - delta{'[None, :]' if k.transposed else '[:, None]'})"]
    bias_code = f" + {printed(lines, tile, bias)}" if bias is not None else ""
    if simple_bias:
        lines.append(f"s = qk * qk_scale{bias_code} * {LOG2E}  # bias * log2(e)" if bias_code else "s = qk * qk_scale")
    else:
        lines.append(f"s = qk * sm_scale{bias_code}")
        if mod is not None:
            lines.append("s_in = s")
            lines.append(f"s = {mod_text(tile, mod, lines)}")
        if pattern.softcap is not None:
            tile.helpers.add("_tanh")
            lines.append(f"tanh_s = _tanh(s * {1.0 / pattern.softcap!r}, FAST_MATH)")
            lines.append(f"s = tl.where(s == float(\"-inf\"), s, {pattern.softcap!r} * tanh_s)  # -inf stays -inf")
            chain.append("ds = ds * (1.0 - tanh_s * tanh_s)  # d softcap*tanh(x/softcap) / dx")
        if dm is not None:
            dtile = k.tile_printer("s_in")
            text = printed(chain, dtile, dm)
            tile.helpers |= dtile.helpers
            if keep_ds_t:
                chain.append("ds_t = ds  # dLoss / d mod(s)")
            chain.append(f"ds = ds * {text}  # d mod / d s")
        if pattern.softcap is not None or dm is not None:
            # as in the Gluon kernels' score_chain: the factors may be inf or NaN where p is 0
            # (a lane past the end, whose score is 0; a masked pair; one the mod removes), and 0 * inf is NaN
            chain.append("ds = tl.where(p == 0.0, 0.0, ds)  # a pair without weight passes no gradient")
        lines.append(f"s = s * {LOG2E}  # to log2 units")
    mask_tile = k.mask_printer()
    mask_code = mask_tile.statement(mask) if mask is not None else ([], None)
    k.helpers |= tile.helpers | mask_tile.helpers
    return lines, mask_code, chain


def backward_context(pattern: Pattern, plan: Plan, fwd: dict) -> dict:
    """The ``backward`` variable of the template: ``supported`` (False with ``reason`` when
    this pattern's backward cannot be generated) and what each kernel needs."""
    try:
        return dict(supported=True, reason="", **_context(pattern, plan, fwd))
    except (BackwardUnsupported, NotImplementedError) as e:  # the forward still builds
        return dict(supported=False, reason=str(e))


@dataclass(frozen=True)
class InputGradTerm:
    """One access ``X[idx...]`` of an input declared ``grad = true`` in the bias or the mod:
    ``dLoss/dX[idx] += dS * d_bias + dS_t * d_mod`` over every pair, where ``dS`` is the
    gradient w.r.t. the score after scale and bias and ``dS_t`` w.r.t. the transform's output
    (``d_bias`` / ``d_mod``: sympy derivatives by the gathered element, None when zero)."""

    access: AppliedUndef
    d_bias: Optional[sympy.Expr]
    d_mod: Optional[sympy.Expr]

    @property
    def name(self) -> str:
        return type(self.access).__name__


def input_grad_terms(pattern: Pattern) -> List[InputGradTerm]:
    """The accesses of grad inputs in the bias and mod, each with its derivatives. The mask's
    accesses get none (a boolean has no gradient); terms constant along j get theirs (their
    gradient sums to zero over a row, which the kernels compute rather than assume)."""
    names = {d.name for d in pattern.inputs if d.grad}
    accesses = sorted({a for e in (pattern.bias, pattern.mod) if e is not None for a in e.atoms(AppliedUndef)
                       if type(a).__name__ in names}, key=sympy.default_sort_key)
    out = []
    for a in accesses:
        d_bias = d_mod = None
        if pattern.bias is not None and pattern.bias.has(a):
            d_bias = derivative(pattern.bias, a, what="[score].bias", wrt=str(a))
        if pattern.mod is not None and pattern.mod.has(a):
            d_mod = derivative(pattern.mod, a, what="[score].mod", wrt=str(a))
        d_bias, d_mod = (None if d is None or d == 0 else d for d in (d_bias, d_mod))
        if d_bias is not None or d_mod is not None:
            out.append(InputGradTerm(a, d_bias, d_mod))
    return out


# A gathered axis of at most this many entries, indexed by both i and j (a T5 bucket): the
# dQ tile sums its dS per entry before one vector of atomics, instead of one atomic per pair.
ONE_HOT_MAX = 64


def _input_grad_lines(pattern: Pattern, k: _Kernel, terms: List[InputGradTerm], dots: DotCode, ds_t: str) -> List[str]:
    """The dQ tile's lines that add each term's dS into the fp32 gradient buffer ``<X>_grad``
    (strides ``<X>_grad_stride<d>``) with atomics, reduced first over what the index ignores:
    the whole tile (``slopes[h]``), its keys (``X[b, i]``), its queries (``X[b, j]``), or per entry
    of a small axis (``rel_bias[h, bucket(j - i)]``); any other access adds pair by pair. The
    learned operands of the lowered dots (``dots``) add theirs as tile products (attncc.codegen.tile_dots).

    A pair without weight adds nothing (:data:`WEIGHTLESS`): a lane past the last key or query,
    a pair the mask removes, a score of ``-inf``. Its dS is 0 where the row's statistics are
    finite, but ``0 * NaN`` in a row of ``+inf`` / NaN scores (lse2 NaN), so every term is masked
    with the lanes' weight in MASKED tiles, and in full tiles of blocks whose rows are not all
    exact (``rows_exact``: a uniform branch, computed once per query block; see the dQ kernel)."""
    hoisted = [(t, k.hoist(t.d_bias) if t.d_bias is not None else None,
                k.hoist(t.d_mod) if t.d_mod is not None else None, [k.hoist(a) for a in t.access.args]) for t in terms]
    tile, tile_s = k.tile_printer(), k.tile_printer("s_in")
    unbounded = [any(_may_be_unbounded(d) for d in (t.d_bias, t.d_mod) if d is not None) for t in terms]
    # dS (and the transform's dS, and P where a derivative may be unbounded) with the pairs without
    # weight zeroed, once per tile: each term then adds its gradient as soon as it is made, so that
    # one tile's worth of gradient is live at a time (a 64-wide dot's 128 terms made together
    # took ptxas minutes and spilled)
    by_mod = any(t.d_mod is not None for t in terms) or any(dot.in_mod and dots.learned(dot) for dot in dots.dots)
    names = [("ds", "ds_w")] + ([(ds_t, "ds_t_w")] if by_mod else [])
    names += [("p", "p_w")] if any(unbounded) else []
    body: List[str] = [f"{w} = {x}" for x, w in names]  # under "if INPUT_GRADS:"
    body += [f"if MASKED or not rows_exact:  # {WEIGHTLESS_WHY}", f"    weighted = {WEIGHTLESS}"]
    body += [f"    {w} = tl.where(weighted, {x}, 0.0)" for x, w in names]
    for n, (t, d_bias, d_mod, args) in enumerate(hoisted):
        parts = [(f"ds_w * {printed(body, tile, d_bias)}" if d_bias != 1 else "ds_w") if d_bias is not None else None,
                 (f"ds_t_w * {printed(body, tile_s, d_mod)}" if d_mod != 1 else "ds_t_w") if d_mod is not None else None]
        total = " + ".join(x for x in parts if x)
        if unbounded[n]:  # as dS: none from a pair without weight (P is NaN there in a NaN row: p_w is 0)
            body.append(f"dg{n} = tl.where(p_w == 0.0, 0.0, {total})  # dLoss / d{t.access}, per pair with weight")
        else:
            body.append(f"dg{n} = {total}  # dLoss / d{t.access}, per pair")
        decl = pattern.input(t.name)
        g = f"dg{n}"
        idx = [tile(a) for a in args]
        deps = [{S.i, S.j} & a.free_symbols for a in t.access.args]
        ptr = grad_ptr(t.name)
        varying = [d for d, dep in enumerate(deps) if dep]
        both = set().union(*deps) == {S.i, S.j}
        if both and len(varying) == 1 and isinstance(decl.dims[varying[0]], int) and decl.dims[varying[0]] <= ONE_HOT_MAX:
            (d,) = varying
            size = decl.dims[d]
            width = 1 << (size - 1).bit_length()
            offset = " + ".join([f"{x} * {grad_stride(t.name, e)}" for e, x in enumerate(idx) if e != d]
                                + [f"slots{n} * {grad_stride(t.name, d)}"])
            # the other dims' indices (b, h, params: one per program) checked as every read's
            _, others = dots.inputs.address(t.name, idx, args=t.access.args, grad=True, skip=(d,))
            body += [f"entry{n} = {idx[d]}",
                     f"slots{n} = tl.arange(0, {width})",
                     f"total{n} = tl.zeros([{width}], dtype=tl.float32)",
                     f"for e in tl.static_range({size}):  # dS summed per table entry",
                     f"    total{n} += tl.where(slots{n} == e, tl.sum(tl.sum(tl.where(entry{n} == e, {g}, 0.0), 1), 0), 0.0)"]
            within = f"slots{n} < {size}" if not others else conjunction([f"(slots{n} < {size})"] + others)
            body += _once(k, f"tl.atomic_add({ptr} + {offset}, total{n}, mask={within})")
            continue
        address, guards = dots.inputs.address(t.name, idx, args=t.access.args, grad=True)
        tests = []
        if both:
            value, tests = g, [f"({g} != 0.0)"]  # after the indices' checks: printer.conjunction
        elif any(S.i in dep for dep in deps):
            value = f"tl.sum({g}, 1, keep_dims=True)"
        elif any(S.j in dep for dep in deps):
            value = f"tl.sum({g}, 0, keep_dims=True)"
        else:
            value = f"tl.sum(tl.sum({g}, 1), 0)"
        mask = f", mask={conjunction(guards, tests)}" if guards or tests else ""
        body += _once(k, f"tl.atomic_add({address}, {value}{mask})")
    body += dots.gradients("ds_w", "ds_t_w")
    k.helpers |= tile.helpers | tile_s.helpers
    return ["if INPUT_GRADS:"] + [f"    {line}" for line in body]


# The pairs of a dQ tile that carry weight, hence gradient, to the learned inputs: those whose score
# (after the mask's -inf, in MASKED tiles, and the transform) is not -inf, in rows of the call.
WEIGHTLESS = '(s != float("-inf")) & row_live[:, None]'
WEIGHTLESS_WHY = "a pair without weight adds nothing, even 0 * NaN (a NaN row's dS)"
# The dQ kernel's per-block values of that mask (rendered once per query block, before the key
# loop): ``row_live`` the rows of the call, ``rows_exact`` whether every row exists and has finite
# statistics (lse2 not NaN or -inf, finite delta), where every pair without weight has dS = 0 exactly:
# a pair in a full tile is allowed, so the forward gave its value weight 0 in the row's o, and a
# non-finite dO . v there made the row's o, hence its delta, non-finite.
ROW_WEIGHT_LINES = [
    "row_live = rows  # the pairs that give the learned inputs gradient: see _dq_tile",
    'rows_exact = tl.min((rows & (lse2 > float("-inf")) & (tl.abs(delta) < float("inf"))).to(tl.int32), 0) == 1',
]


def _may_be_unbounded(d) -> bool:
    """Whether a derivative by an input may be inf or NaN at a pair whose P is 0 (a lane past the
    end, where s is 0; a masked pair; a score of -inf from an input's -inf), where it multiplies a
    dS of 0: anything but a polynomial of positions, heads and params (``j - i``, 1; an integer
    operand converted once, ``ToFloat(p0 - 1000000000)``, is its polynomial)."""
    d = d.replace(lambda x: isinstance(x, ToFloat), lambda x: x.args[0])
    return S.s in d.free_symbols or bool(d.atoms(AppliedUndef)) or not d.is_polynomial()


def _once(k: _Kernel, call: str) -> List[str]:
    """The lines of a statement (an expression written by hand around printed indices) that
    computes each value once (:meth:`Temporaries.name_repeats`)."""
    defs, code = k.temps.name_repeats(call)
    return [f"{name} = {value}" for name, value in defs] + [code]


def _context(pattern: Pattern, plan: Plan, fwd: dict) -> dict:
    grad_terms = input_grad_terms(pattern)
    simple_bias = pattern.mod is None and pattern.softcap is None
    bias_j, mod_j, lse_row = along_j(pattern)  # terms constant along j: the forward's LSE holds them
    if pattern.mod is not None and pattern.softcap is None:
        pattern = pattern.replace(mod=None if mod_j == S.s else mod_j)
    dmod = score_derivative(pattern.mod) if pattern.mod is not None else None

    random_blocks = sorted((pattern.mask.atoms(RandomBlocks) if pattern.mask is not None else set()),
                           key=sympy.default_sort_key)
    rb_names = {rb: f"rb{n}" for n, rb in enumerate(random_blocks)}

    def rb_rows(e: RandomBlocks) -> str:  # dQ: per-row table entries hoisted like the forward's
        r, block, _ = e.options
        if r == 0:
            return "False"
        name = rb_names[e]
        return joined("|", [f"(offs_j[None, :] // {block} == {name}_{t}[:, None])" for t in range(r)])

    def rb_tile(e: RandomBlocks) -> str:  # dK/dV: gathered per tile
        r, block, _ = e.options
        if r == 0:
            return "False"
        name = rb_names[e]
        return f"tl.trans(_random_hit(offs_i, offs_j, {name}_table, {name}_rows, {r}, {block}))"

    dq = _Kernel(pattern, inner=S.j, outer=S.i, vec_prefix="row", vec_suffix="[:, None]", rb_render=rb_rows)
    # dK/dV tiles are transposed, [BLOCK_N keys, BLOCK_M queries]: P^T and dS^T come out of the
    # score dot directly and feed dV and dK's dots without a register transpose.
    dkdv = _Kernel(pattern, inner=S.i, outer=S.j, vec_prefix="col", vec_suffix="[:, None]", rb_render=rb_tile,
                   transposed=True)
    kernels = {}
    learned_dots = [o.name for dot in plan.dots for o in dot.operands() if pattern.input(o.name).grad]
    grad_names = sorted({t.name for t in grad_terms} | set(learned_dots))
    # what every per-tile function (and the row values' bias terms: pre_ctx) may read of its kernel
    call_ctx = ["b", "h", "H", "n_q", "n_k"] + [param_var(p.name) for p in pattern.params] + fwd["input_args"]
    for name, k in (("dq", dq), ("dkdv", dkdv)):
        grads_here = name == "dq" and bool(grad_names)  # the dQ kernel adds the inputs' gradients
        dots = DotCode(pattern, plan.dots, _index_names(pattern, "offs_i", "offs_j", {}), Inputs(pattern), outer=k.outer)
        lines, (mask_temps, mask_code), chain = _score(pattern, k, bias_j=bias_j, simple_bias=simple_bias,
                                                       dmod=dmod, keep_ds_t=grads_here)
        lines = dots.products() + lines
        if grads_here:
            chain += _input_grad_lines(pattern, k, grad_terms, dots, "ds_t" if dmod is not None else "ds")
        defs = k.defs(pattern) + dots.resident()
        k.helpers |= dots.helpers
        ctx_args = call_ctx + [n for n, _, _ in defs]
        if grads_here:
            ctx_args += [a for n in grad_names for a in _grad_args(pattern, n)] + ["row_live", "rows_exact"]
        if name == "dq":
            for rb, rbn in rb_names.items():
                r, block, _ = rb.options
                for t in range(r):
                    defs.append((f"{rbn}_{t}", f"tl.load({rbn}_table + tl.minimum(offs_i // {block}, {rbn}_rows - 1) * {r} + {t})", False))
                    ctx_args.append(f"{rbn}_{t}")
        # dK/dV: values of the key block are defined once, those that depend on the query head
        # in the loop over the heads of the group; dQ: all once.
        kernels[name] = dict(score_lines=lines, mask_temps=mask_temps, mask_code=mask_code, chain_lines=chain,
                             ctx_args=ctx_args,
                             defs=[(n, c) for n, c, per_head in defs if name == "dq" or not per_head],
                             head_defs=[(n, c) for n, c, per_head in defs if name == "dkdv" and per_head])

    # -- the row-constant bias the forward leaves out of the scores (preprocessing) -------
    pre_defs, pre_bias = [], None
    helpers = dq.helpers | dkdv.helpers
    if lse_row is not None:
        pr = TritonPrinter(_index_names(pattern, "offs_i", "?", {}), score=True, temps=Temporaries())
        inputs = Inputs(pattern)
        pr.gather = lambda e: inputs.gather(pr, e)
        pre_defs, pre_bias = pr.statement(lse_row)
        helpers |= pr.helpers

    # -- which query blocks see a key block (dK/dV): the transposed walk --------------------
    dkdv_walk = render_walk(plan, transposed=True)
    helpers |= dkdv_walk["helpers"]
    # the loops reprint the steps only where they depend on the query head (inside its loop)
    dkdv_loop = dkdv_walk if dkdv_walk["per_head"] else dict(dkdv_walk, steps=[])

    extra_helpers = helper_list(helpers, have=fwd["helpers"]) + ([helper_args("_random_hit")] if rb_names else [])
    return dict(dq=kernels["dq"], dkdv=kernels["dkdv"], pre_ctx=call_ctx,
                input_grads=grad_names, row_weight=ROW_WEIGHT_LINES if grad_names else [], grad_args=[a for n in grad_names for a in _grad_args(pattern, n)],
                grad_launch=[a for n in grad_names for a in _grad_launch(pattern, n)],
                pre_defs=pre_defs, pre_bias=pre_bias,
                dkdv_walk=dkdv_walk, dkdv_loop=dkdv_loop, helpers=extra_helpers)


def _grad_args(pattern: Pattern, name: str) -> List[str]:
    return grad_args(name, len(pattern.input(name).dims))


def _grad_launch(pattern: Pattern, name: str) -> List[Tuple[str, str]]:
    """(kernel parameters, host value) of an input's gradient buffer, for ``sig.launch``."""
    pointer, *strides = _grad_args(pattern, name)
    buffer = f"input_grads[{name!r}]"
    return [(pointer, buffer)] + ([(" ".join(strides), f"*{buffer}.stride()")] if strides else [])
