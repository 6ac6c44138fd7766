"""IntervalProgram -> one Triton kernel that builds the per-call block lists, forward and transposed.

``tiles.classify_grid`` + ``tiles.to_block_lists`` run a mask's interval program as ~50
small torch ops per call. :func:`render_tile_kernel` compiles the same program into one
``@triton.jit`` kernel plus a host function ``_tile_lists(call, block_m, block_n, transposed)``
that returns exactly what ``_rt.blocks.classified_lists(program, call, block_m, block_n,
dynamic=True, transposed=transposed)`` returns: ``(lists, lists_t)``, the forward lists (per
(b, h, qb): its FULL and PARTIAL key blocks) and, when ``transposed``, the lists the dK/dV
kernel walks (per (b, h, kb): the query blocks that see it), else None; one launch either
way. Same counts and same indices (in increasing block order) in every row; entries of an
index row past its count differ (the torch path writes 0; the kernel fills them with the
other blocks, all in ``[0, width)``). ``_rt.blocks`` takes it as ``kernel=`` and keeps the
lists of a call that a backward follows, per tile shape, in ``call.for_backward``.

How the kernel mirrors ``attncc.runtime.tiles``:

- Axis 0 of the grid: one program per query block (``_tk_rows``, the forward lists), then,
  when launched with them, one per key block (``_tk_cols``, the transposed lists); axis 1:
  b or 0, h or 0, only the grid dims the mask depends on (the lists have the same shapes as
  the torch path's). A program walks the other axis's blocks in chunks of ``CHUNK`` lanes;
  per-block min / max of inputs along positions are computed in the kernel (clamped loads,
  like the torch path's "repeat the last row"). Both bodies render the same grid lines;
  only where they sit (before or inside the chunk loop) and the axis of the reductions differ.
- Values are classified at generation time as *literal* (known now: folded by calling the
  ``tiles`` function itself), *host* (Python numbers at run time: params, ``n_q``, ``n_k``
  and steps over them; the host function computes them by calling the ``tiles`` functions,
  so their Python semantics are the torch path's by construction) and *grid* (tensors:
  computed in the kernel in float64, one IEEE operation per torch operation, NaN-propagating
  min / max like ``torch.minimum``; launched with FMA contraction off).
- Where ``tiles`` picks a code path from a Python number (``point_value`` in mul / div /
  floordiv / mod), literals pick it here and host values pick it per call (both paths are
  computed, a uniform ``tl.where`` chooses).

Ops on grid values: const, span, unbounded, add, sub, neg, mul, reciprocal, div, floordiv,
mod, widen, floor_, abs_, min_, max_, select, tri, le, lt, eq, ne, and_, or_, not_, xor_. Steps on
literals / host values only may use any op of ``tiles.OPS`` except bucket and
random_blocks. Leaves: i, j, b, h, n_q, n_k, param, input (BlockStat along i or j, or a
point read by b / h / constants). Anything else: :func:`render_tile_kernel` returns None.

At run time ``_tile_lists`` falls back to the torch path when an input is missing or has
an unexpected rank, size or dtype (the torch path raises its error), or when a size is 0.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from attncc.codegen.templating import environment
from attncc.codegen.names import host_tensor, input_ptr, input_stride
from attncc.codegen.params import Signatures, kernel_reads
from attncc.core import tiles
from attncc.core.tiles import BlockStat, IntervalProgram

GRID_OPS = frozenset({"const", "span", "unbounded", "add", "sub", "neg", "mul", "reciprocal", "div", "floordiv",
                      "mod", "widen", "floor_", "abs_", "min_", "max_", "select", "tri", "le", "lt", "eq", "ne",
                      "and_", "or_", "not_", "xor_"})
HOST_OPS = frozenset(tiles.OPS) - {"bucket", "random_blocks"}
_TRI_OPS = frozenset({"tri", "le", "lt", "eq", "ne", "and_", "or_", "not_", "xor_"})
_INPUT_DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")


class Unsupported(Exception):
    """The program uses something the kernel does not implement."""


# ---------------------------------------------------------------------------
# Kernel helpers (pasted once; only the ones used)
# ---------------------------------------------------------------------------

# The helpers of the kernel (templates/helpers.j2, tile_helper), in the order they are pasted.
TILE_HELPERS = ("_tk_and", "_tk_or", "_tk_not", "_tk_min", "_tk_max", "_tk_pymin", "_tk_pymax", "_tk_nan_to",
                "_tk_bmin", "_tk_bmax", "_tk_point", "_tk_mag", "_tk_out", "_tk_add", "_tk_sub",
                "_tk_mul_c", "_tk_mul_iv", "_tk_recip", "_tk_div_c",
                "_tk_floordiv_c", "_tk_floordiv_iv", "_tk_mod_c", "_tk_mod_iv", "_tk_widen", "_tk_abs", "_tk_eq",
                "_tk_select", "_tk_append")


@functools.lru_cache(maxsize=1)
def _helper_sources() -> Dict[str, str]:
    macro = environment().get_template("helpers.j2").module.tile_helper
    return {name: str(macro(name, repr(tiles.WIDEN))) for name in TILE_HELPERS}


def _helpers_for(code: str) -> List[str]:
    """The helper sources ``code`` needs (transitively), in a stable order."""
    sources = _helper_sources()
    needed, todo = set(), [code]
    while todo:
        text = todo.pop()
        for name in re.findall(r"\b(_tk_[a-z_]+)\(", text):
            if name in sources and name not in needed:
                needed.add(name)
                todo.append(sources[name])
    return [sources[n] for n in TILE_HELPERS if n in needed]


# ---------------------------------------------------------------------------
# Values during generation
# ---------------------------------------------------------------------------

@dataclass
class _Val:
    """A program value. ``kind``: "num" (interval) or "tri" (tri-state).
    ``cat``: "lit" (``py`` holds the Python value), "host" (``py`` is the host variable's
    name) or "grid" (``a``, ``b``: kernel expressions of lo / hi or may_true / may_false).
    ``axes``: the tile axes it varies along, ``"i"`` (query blocks) and / or ``"j"`` (key
    blocks): a value varying along the inner loop's axis is computed inside the chunk loop.
    ``deps``: "b" / "h"."""

    kind: str
    cat: str
    py: object = None
    a: str = ""
    b: str = ""
    axes: frozenset = frozenset()
    deps: frozenset = frozenset()


def _num_src(v) -> str:
    """Python source of a number, exact (repr round-trips floats)."""
    if isinstance(v, bool):
        return repr(v)
    if isinstance(v, float):
        if math.isnan(v):
            return 'float("nan")'
        if math.isinf(v):
            return 'float("inf")' if v > 0 else 'float("-inf")'
    if isinstance(v, (int, float)):
        return repr(v)
    raise Unsupported(f"not a number: {v!r}")


def _py_src(obj) -> str:
    if isinstance(obj, tuple):
        if len(obj) == 1:
            return f"({_py_src(obj[0])},)"
        return "(" + ", ".join(_py_src(x) for x in obj) + ")"
    if isinstance(obj, str):
        return repr(obj)
    if obj is None:
        return "None"
    if isinstance(obj, BlockStat):
        return (f"_rt.tiles.BlockStat(input={obj.input!r}, axis_var={obj.axis_var!r}, block={obj.block!r}, "
                f"index={_py_src(obj.index)})")
    return _num_src(obj)


def _program_src(program: IntervalProgram) -> str:
    leaves = "".join(f"        {_py_src(leaf)},\n" for leaf in program.leaves)
    steps = "".join(f"        {_py_src(step)},\n" for step in program.steps)
    return (f"_rt.tiles.IntervalProgram(\n    leaves=(\n{leaves}    ),\n    steps=(\n{steps}    ),\n"
            f"    result={program.result!r},\n)")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class _Gen:
    def __init__(self, program: IntervalProgram):
        self.program = program
        # grid lines: (axes the line varies along, text in the rows body, text in the columns body)
        self.lines: List[Tuple[frozenset, str, str]] = []
        self.consts: List[str] = []  # kernel lines: literals and host values as float64 / int1
        self.host_lines: List[str] = []  # host function lines computing host values
        self.host_args: List[Tuple[str, str]] = []  # (kernel param, host expression)
        self.materialized: Dict[tuple, Tuple[str, str]] = {}
        self.flags: Dict[str, str] = {}
        self.inputs: Dict[str, int] = {}  # input name -> rank (kernel params ptr_<name>, stride<d>_<name>)
        self.stats: List[Tuple[str, BlockStat]] = []  # input leaves (checked on the host)
        self.needs_pos_q = False
        self.needs_pos_k = False
        self.n = 0

    def fresh(self, base: str) -> str:
        self.n += 1
        return f"{base}{self.n}"

    def line(self, axes: frozenset, text: str, cols_text: Optional[str] = None) -> None:
        """A kernel line of a grid value (``cols_text``: where the columns body differs)."""
        self.lines.append((axes, text, text if cols_text is None else cols_text))

    # -- making non-grid values available in the kernel ----------------------
    def kv(self, v: _Val) -> Tuple[str, str]:
        """Kernel expressions of a value's two parts."""
        if v.cat == "grid":
            return v.a, v.b
        key = (v.cat, v.kind, v.py if v.cat == "host" else _py_src(v.py))
        if key in self.materialized:
            return self.materialized[key]
        name = self.fresh("k")
        if v.cat == "lit":
            if v.kind == "tri":
                mt, mf = v.py
                self.consts.append(f"{name}_t = tl.full([], {int(bool(mt))}, tl.int1)")
                self.consts.append(f"{name}_f = tl.full([], {int(bool(mf))}, tl.int1)")
                out = (f"{name}_t", f"{name}_f")
            else:
                lo, hi = tiles.as_interval(v.py)
                self.consts.append(f"{name}_lo = tl.full([], {_num_src(lo)}, tl.float64)")
                self.consts.append(f"{name}_hi = tl.full([], {_num_src(hi)}, tl.float64)")
                out = (f"{name}_lo", f"{name}_hi")
        else:  # host: float64 kernel params, exact in compiled mode and in the interpreter
            if v.kind == "tri":
                parts = (("t", f"float({v.py}[0])"), ("f", f"float({v.py}[1])"))
            else:
                # float64 bounds (rounded outward past 2**53, as the torch path compares them)
                parts = (("lo", f"_rt.tiles.float_bounds({v.py})[0]"), ("hi", f"_rt.tiles.float_bounds({v.py})[1]"))
            names = []
            for suffix, expr in parts:
                param = f"a_{name}_{suffix}"
                self.host_args.append((param, expr))
                if v.kind == "tri":
                    self.consts.append(f"{name}_{suffix} = tl.full([], {param}, tl.float64) != 0.0")
                else:
                    self.consts.append(f"{name}_{suffix} = tl.full([], {param}, tl.float64)")
                names.append(f"{name}_{suffix}")
            out = tuple(names)
        self.materialized[key] = out
        return out

    def scalar_flag(self, v: _Val) -> str:
        """Kernel bool: ``tiles.point_value(v) is not None`` for a host value (decided per call)."""
        key = v.py  # the host variable
        if key not in self.flags:
            name = self.fresh("s")
            param = f"a_{name}"
            self.host_args.append((param, f"float(_rt.tiles.point_value({v.py}) is not None)"))
            self.consts.append(f"{name} = tl.full([], {param}, tl.float64) != 0.0")
            self.flags[key] = name
        return self.flags[key]

    def grid_call(self, fn: str, args: List[_Val], extra: Tuple[str, ...] = (),
                  sources: Optional[List[_Val]] = None) -> _Val:
        """A grid interval ``fn(parts of args..., extra...)`` (a helper returning (lo, hi))."""
        parts = [p for x in args for p in self.kv(x)] + list(extra)
        return self.grid_expr(f"{fn}({', '.join(parts)})", sources or args)

    def grid_expr(self, expr: str, sources: List[_Val], kind: str = "num") -> _Val:
        axes = frozenset().union(*[x.axes for x in sources])
        deps = frozenset().union(*[x.deps for x in sources if x.cat == "grid"])
        name = self.fresh("v")
        sa, sb = (f"{name}_t", f"{name}_f") if kind == "tri" else (f"{name}_lo", f"{name}_hi")
        self.line(axes, f"{sa}, {sb} = {expr}")
        return _Val(kind, "grid", a=sa, b=sb, axes=axes, deps=deps)

    def choose(self, flag: str, yes: _Val, no: _Val) -> _Val:
        """Per call (uniform) choice between two grid values."""
        (ya, yb), (na, nb) = self.kv(yes), self.kv(no)
        return self.grid_expr(f"tl.where({flag}, {ya}, {na}), tl.where({flag}, {yb}, {nb})", [yes, no])

    # -- non-grid steps: evaluated now (literals) or per call on the host ------
    def fold(self, op: str, args: List[_Val], raw: tuple) -> _Val:
        if op not in HOST_OPS:
            raise Unsupported(f"op {op!r} on host values")
        kind = "tri" if op in _TRI_OPS else "num"
        if all(x.cat == "lit" for x in args):
            try:
                value = getattr(tiles, op)(*[x.py for x in args])
            except Exception as e:  # the torch path would raise too: let it
                raise Unsupported(f"{op} of literals raises {e!r}")
            if any(_is_tensor_like(p) for p in (value if isinstance(value, tuple) else (value,))):
                raise Unsupported(f"{op} of literals gives a tensor")
            return _Val(kind, "lit", py=value)
        name = self.fresh("h")
        srcs = [x.py if x.cat == "host" else _py_src(x.py) for x in args]
        self.host_lines.append(f"{name} = _rt.tiles.{op}({', '.join(srcs)})")
        return _Val(kind, "host", py=name)


def _is_tensor_like(x) -> bool:
    return not isinstance(x, (int, float, bool))


# ---------------------------------------------------------------------------
# Grid ops
# ---------------------------------------------------------------------------

def _lit_scalar(v: _Val):
    """For a literal: ``tiles.point_value`` of it (None: not a point)."""
    return tiles.point_value(v.py)


def _emit_mul(g: _Gen, x: _Val, y: _Val) -> _Val:
    if x.cat != "grid" and y.cat != "grid":
        return g.fold("mul", [x, y], ())
    # tiles.mul: c = point_value(y); if c is None and point_value(x) is not None: swap. Grid values are never scalars.
    if y.cat == "grid":
        x, y = y, x  # the non-grid one (if any) is now y; products commute, so the general path is the same
    if y.cat == "grid":
        return g.grid_call("_tk_mul_iv", [x, y])
    if y.cat == "lit":
        c = _lit_scalar(y)
        if c is None:
            return g.grid_call("_tk_mul_iv", [x, y])
        if c == 0:
            return _Val("num", "lit", py=(0, 0))
        return g.grid_call("_tk_mul_c", [x], (g.kv(y)[0],), sources=[x, y])
    flag = g.scalar_flag(y)
    scale = g.grid_call("_tk_mul_c", [x], (g.kv(y)[0],), sources=[x, y])
    general = g.grid_call("_tk_mul_iv", [x, y])
    return g.choose(flag, scale, general)


def _emit_reciprocal(g: _Gen, x: _Val) -> _Val:
    if x.cat != "grid":
        return g.fold("reciprocal", [x], ())
    return g.grid_call("_tk_recip", [x])


def _emit_div(g: _Gen, x: _Val, y: _Val) -> _Val:
    if x.cat != "grid" and y.cat != "grid":
        return g.fold("div", [x, y], ())
    if y.cat == "grid":
        return _emit_mul(g, x, _emit_reciprocal(g, y))
    if y.cat == "lit":
        c = _lit_scalar(y)
        if c is None:
            return _emit_mul(g, x, _emit_reciprocal(g, y))
        if c == 0:
            return _Val("num", "lit", py=tiles.unbounded())
        return g.grid_call("_tk_div_c", [x], (g.kv(y)[0],), sources=[x, y])
    flag = g.scalar_flag(y)
    scale = g.grid_call("_tk_div_c", [x], (g.kv(y)[0],), sources=[x, y])
    general = _emit_mul(g, x, _emit_reciprocal(g, y))
    return g.choose(flag, scale, general)


def _emit_by_constant(g: _Gen, op: str, x: _Val, y: _Val, const_fn: str, iv_fn: str, extra=()) -> _Val:
    """floordiv / mod: the constant-divisor path when ``point_value(y)``, else the interval path."""
    if y.cat == "grid":
        return g.grid_call(iv_fn, [x, y], extra)
    if y.cat == "lit":
        c = _lit_scalar(y)
        if c is None:
            return g.grid_call(iv_fn, [x, y], extra)
        if c == 0:
            return _Val("num", "lit", py=tiles.unbounded())
        return g.grid_call(const_fn, [x], (g.kv(y)[0],) + tuple(extra), sources=[x, y])
    flag = g.scalar_flag(y)
    scale = g.grid_call(const_fn, [x], (g.kv(y)[0],) + tuple(extra), sources=[x, y])
    general = g.grid_call(iv_fn, [x, y], extra)
    return g.choose(flag, scale, general)


def _emit_select(g: _Gen, cond: _Val, x: _Val, y: _Val) -> _Val:
    # tiles._minimum of two Python numbers is Python's min; with a tensor, torch.minimum
    py = "True" if x.cat != "grid" and y.cat != "grid" else "False"
    return g.grid_call("_tk_select", [cond, x, y], (py,))


def _emit(g: _Gen, op: str, args: List[_Val], raw: tuple) -> _Val:
    if op not in GRID_OPS and op not in HOST_OPS:
        raise Unsupported(f"op {op!r}")
    # variadic ops are left folds of the binary op (tiles' _endwise / and_ / or_ loops)
    if op in ("min_", "max_", "and_", "or_", "xor_") and len(args) > 2:
        acc = _emit(g, op, args[:2], raw[:2])
        for x in args[2:]:
            acc = _emit(g, op, [acc, x], ())
        return acc
    if op in ("min_", "max_", "and_", "or_", "xor_") and len(args) == 1:
        return args[0]
    if op == "mod":
        if len(args) != 3 or args[2].cat != "lit":
            raise Unsupported("mod needs a literal 'integer' flag")
        x, y, integer = args
        if x.cat != "grid" and y.cat != "grid":
            return g.fold("mod", args, raw)
        one = "1" if integer.py else "0"
        return _emit_by_constant(g, "mod", x, y, "_tk_mod_c", "_tk_mod_iv", (one,))
    if all(x.cat != "grid" for x in args):
        return g.fold(op, args, raw)
    if op not in GRID_OPS:
        raise Unsupported(f"op {op!r} on grid values")
    for k, x in enumerate(args):
        expect = "tri" if (op in ("and_", "or_", "not_", "xor_") or (op == "select" and k == 0)) else "num"
        if x.kind != expect:
            raise Unsupported(f"{op}: argument {k} is a {x.kind}")
    kv = g.kv
    if op == "add":  # tiles.add / sub: moved outward past 2**53 (_tk_out)
        return g.grid_call("_tk_add", args)
    if op == "sub":
        return g.grid_call("_tk_sub", args)
    if op == "neg":
        a, b = kv(args[0])
        return g.grid_expr(f"-{b}, -{a}", args)
    if op == "widen":
        return g.grid_call("_tk_widen", args)
    if op == "mul":
        return _emit_mul(g, *args)
    if op == "reciprocal":
        return _emit_reciprocal(g, *args)
    if op == "div":
        return _emit_div(g, *args)
    if op == "floordiv":
        return _emit_by_constant(g, "floordiv", args[0], args[1], "_tk_floordiv_c", "_tk_floordiv_iv")
    if op == "floor_":
        a, b = kv(args[0])
        return g.grid_expr(f"tl.floor({a}), tl.floor({b})", args)
    if op == "abs_":
        return g.grid_call("_tk_abs", args)
    if op in ("min_", "max_"):
        (a, b), (c, d) = kv(args[0]), kv(args[1])
        fn = "_tk_min" if op == "min_" else "_tk_max"
        return g.grid_expr(f"{fn}({a}, {c}), {fn}({b}, {d})", args)
    if op == "select":
        return _emit_select(g, *args)
    if op == "le":
        (a, b), (c, d) = kv(args[0]), kv(args[1])
        return g.grid_expr(f"_tk_not({a} > {d}), _tk_not({b} <= {c})", args, "tri")
    if op == "lt":
        (a, b), (c, d) = kv(args[0]), kv(args[1])
        return g.grid_expr(f"_tk_not({a} >= {d}), _tk_not({b} < {c})", args, "tri")
    if op in ("eq", "ne"):
        (a, b), (c, d) = kv(args[0]), kv(args[1])
        v = g.grid_expr(f"_tk_eq({a}, {b}, {c}, {d})", args, "tri")
        return v if op == "eq" else _Val("tri", "grid", a=v.b, b=v.a, axes=v.axes, deps=v.deps)
    if op == "and_":
        (a, b), (c, d) = kv(args[0]), kv(args[1])
        return g.grid_expr(f"_tk_and({a}, {c}), _tk_or({b}, {d})", args, "tri")
    if op == "or_":
        (a, b), (c, d) = kv(args[0]), kv(args[1])
        return g.grid_expr(f"_tk_or({a}, {c}), _tk_and({b}, {d})", args, "tri")
    if op == "not_":
        x = args[0]
        return _Val("tri", "grid", a=x.b, b=x.a, axes=x.axes, deps=x.deps)
    if op == "xor_":  # tiles.xor_: true may come from (true, false) or (false, true)
        (a, b), (c, d) = kv(args[0]), kv(args[1])
        return g.grid_expr(f"_tk_or(_tk_and({a}, {d}), _tk_and({b}, {c})), _tk_or(_tk_and({a}, {c}), _tk_and({b}, {d}))",
                           args, "tri")
    raise Unsupported(f"op {op!r}")  # const / span / unbounded / tri take literals only


# ---------------------------------------------------------------------------
# Leaves
# ---------------------------------------------------------------------------

def _leaf(g: _Gen, name: str, kind: str, detail: tuple) -> _Val:
    if kind == "i":
        return _Val("num", "grid", a="i_lo", b="i_hi", axes=frozenset("i"))
    if kind == "j":
        return _Val("num", "grid", a="j_lo", b="j_hi", axes=frozenset("j"))
    if kind == "b":
        return _Val("num", "grid", a="b_f", b="b_f", deps=frozenset("b"))
    if kind == "h":
        return _Val("num", "grid", a="h_f", b="h_f", deps=frozenset("h"))
    if kind in ("n_q", "n_k"):
        var = g.fresh("h")
        g.host_lines.append(f"{var} = call.{kind}")
        return _Val("num", "host", py=var)
    if kind == "param":
        pname, default = detail
        var = g.fresh("h")
        g.host_lines.append(f"{var} = call.params.get({pname!r}, {_py_src(default)})")
        return _Val("num", "host", py=var)
    if kind == "input":
        (stat,) = detail
        if not isinstance(stat, BlockStat):
            raise Unsupported("input leaf without a BlockStat")
        g.stats.append((name, stat))
        return _input_leaf(g, stat)
    raise Unsupported(f"leaf kind {kind!r}")


def _input_leaf(g: _Gen, stat: BlockStat) -> _Val:
    if not stat.input.isidentifier():
        raise Unsupported(f"input name {stat.input!r}")
    named = [v for v in stat.index if not isinstance(v, int)]
    for v in stat.index:
        if isinstance(v, bool) or not (isinstance(v, int) and v >= 0 or v in ("b", "h", "i", "j")):
            raise Unsupported(f"index {v!r}")
    if len(set(named)) != len(named):
        raise Unsupported("repeated index variable")
    pos = [v for v in named if v in ("i", "j")]
    if len(pos) > 1:
        raise Unsupported("an input indexed by both i and j")
    rank = len(stat.index)
    if g.inputs.setdefault(stat.input, rank) != rank:
        raise Unsupported(f"input {stat.input!r} read with different ranks")
    terms = []
    for d, v in enumerate(stat.index):
        s = input_stride(stat.input, d)
        if isinstance(v, int):
            if v:
                terms.append(f"{v} * {s}")
        else:
            terms.append(f"{ {'b': 'b64', 'h': 'h64', 'i': 'pos_q', 'j': 'pos_k'}[v]} * {s}")
    addr = " + ".join([input_ptr(stat.input)] + terms)
    deps = frozenset(v for v in named if v in ("b", "h"))
    name = g.fresh("x")
    if not pos:
        g.line(frozenset(), f"{name}_lo, {name}_hi = _tk_point(tl.load({addr}))")
        return _Val("num", "grid", a=f"{name}_lo", b=f"{name}_hi", deps=deps)
    # pos_q / pos_k: the block's rows ([BM_P] / [BN_P]) in the body whose program owns the
    # block, [CHUNK, BM_P] / [CHUNK, BN_P] where the block is one lane of the inner loop
    if pos == ["i"]:
        g.needs_pos_q = True
        rows_axis, cols_axis = 0, 1
    else:
        g.needs_pos_k = True
        rows_axis, cols_axis = 1, 0
    axes = frozenset(pos)
    reduce = "{name}_lo, {name}_hi = _tk_bmin({name}, {ax}), _tk_bmax({name}, {ax})"
    g.line(axes, f"{name} = tl.load({addr})")
    g.line(axes, reduce.format(name=name, ax=rows_axis), reduce.format(name=name, ax=cols_axis))
    return _Val("num", "grid", a=f"{name}_lo", b=f"{name}_hi", axes=axes, deps=deps)


# ---------------------------------------------------------------------------
# The program
# ---------------------------------------------------------------------------

def _live(program: IntervalProgram):
    """Names the result depends on."""
    defs = {d: args for d, _, args in program.steps}
    live, todo = set(), [program.result]
    while todo:
        n = todo.pop()
        if n in live:
            continue
        live.add(n)
        for a in defs.get(n, ()):
            if isinstance(a, str):
                todo.append(a)
    return live


def _literal(a) -> _Val:
    if isinstance(a, bool):
        return _Val("tri", "lit", py=a)  # a flag (mod's 'integer', tri's parts)
    if _is_number(a):
        return _Val("num", "lit", py=a)
    raise Unsupported(f"literal {a!r}")


def _generate(program: IntervalProgram) -> _Gen:
    g = _Gen(program)
    live = _live(program)
    values: Dict[str, _Val] = {}
    for name, kind, detail in program.leaves:
        if name in live:
            values[name] = _leaf(g, name, kind, detail)
        elif kind == "input":  # unused, but the torch path still checks it
            g.stats.append((name, detail[0]))
    for dest, op, args in program.steps:
        if dest not in live:
            continue
        if op == "tri":
            if len(args) != 2 or not all(isinstance(a, bool) for a in args):
                raise Unsupported("tri of non-literals")
            values[dest] = _Val("tri", "lit", py=(args[0], args[1]))
            continue
        vals = []
        for a in args:
            if isinstance(a, str):
                if a not in values:
                    raise Unsupported(f"step {dest}: unknown name {a!r}")
                vals.append(values[a])
            else:
                vals.append(_literal(a))
        if op != "mod" and op != "tri" and any(v.cat == "lit" and v.kind == "tri" and not isinstance(v.py, tuple)
                                                for v in vals):
            raise Unsupported(f"step {dest}: a bare bool argument")
        values[dest] = _emit(g, op, vals, tuple(args))
    if program.result not in values:
        raise Unsupported("no result")
    g.result = values[program.result]
    if g.result.kind != "tri":
        raise Unsupported("the result is not a tri-state")
    return g


def _indent(lines: List[str], n: int) -> str:
    return "".join((" " * n + line if line else "") + "\n" for line in lines)


@dataclass(frozen=True)
class _Body:
    """One orientation of the lists: each program owns one ``outer`` block and walks the
    ``inner`` blocks in chunks of ``CHUNK`` lanes, compacting the FULL and PARTIAL ones."""

    name: str  # the @triton.jit function
    what: str  # its docstring
    outer: str  # "qb" / "kb": the program's block
    inner: str  # "kb" / "qb": the blocks listed per row
    inner_axis: str  # "j" / "i": grid lines varying along it go inside the chunk loop
    n_outer: str
    n_inner: str


_ROWS = _Body("_tk_rows", "The forward lists: per query block, its key blocks.", "qb", "kb", "j", "nqb", "nkb")
_COLS = _Body("_tk_cols", "The transposed lists (the dK/dV kernel's): per key block, the query blocks that see it.",
              "kb", "qb", "i", "nkb", "nqb")

# Position intervals and clamped rows ("repeat the last row", as tiles._block_reduce) of a
# block: for the program's own block (scalars, [BM_P] / [BN_P] rows) and for the chunk's
# blocks (vectors, [CHUNK, BM_P] / [CHUNK, BN_P] rows). Positions are summed in int64: an
# offset below 2**31 plus the rows of a call may pass it.
_OWN = {
    "qb": ["q_start = qb * BLOCK_M",
           "i_lo = _tk_point(q_offset + q_start.to(tl.int64))[0]",
           "i_hi = _tk_point(q_offset + tl.minimum(q_start + BLOCK_M, Nq).to(tl.int64) - 1)[1]"],
    "kb": ["k_start = kb * BLOCK_N",
           "j_lo = _tk_point(k_offset + k_start.to(tl.int64))[0]",
           "j_hi = _tk_point(k_offset + tl.minimum(k_start + BLOCK_N, Nk).to(tl.int64) - 1)[1]"],
}
_OWN_ROWS = {
    "qb": "pos_q = q_offset + tl.minimum(q_start + tl.minimum(tl.arange(0, BM_P), BLOCK_M - 1), Nq - 1"
          ").to(tl.int64)  # the query block's rows, the last one repeated",
    "kb": "pos_k = k_offset + tl.minimum(k_start + tl.minimum(tl.arange(0, BN_P), BLOCK_N - 1), Nk - 1"
          ").to(tl.int64)  # the key block's rows, the last one repeated",
}
_CHUNK_ROWS = {
    "qb": "pos_q = q_offset + tl.minimum(q_start[:, None] + tl.minimum(tl.arange(0, BM_P), BLOCK_M - 1)[None, :], "
          "Nq - 1).to(tl.int64)  # [CHUNK, BM_P] query rows, clamped",
    "kb": "pos_k = k_offset + tl.minimum(k_start[:, None] + tl.minimum(tl.arange(0, BN_P), BLOCK_N - 1)[None, :], "
          "Nk - 1).to(tl.int64)  # [CHUNK, BN_P] key rows, clamped",
}


# Coordinates a body may define, each after those it uses (dropped in this order when unused).
_COORDINATES = ("pos_q", "pos_k", "i_lo", "i_hi", "j_lo", "j_hi", "q_start", "k_start", "h_f", "b_f", "h64", "b64",
                "h", "b")


def _render_body(g: _Gen, body: _Body, params: List[str], sig: Signatures) -> str:
    mt, mf = g.kv(g.result)
    cols = body is _COLS
    needs_rows = {"qb": g.needs_pos_q, "kb": g.needs_pos_k}
    head = [f"{body.outer} = pid", "b = bh // Hl", "h = bh % Hl", "b64 = b.to(tl.int64)", "h64 = h.to(tl.int64)",
            "b_f = b.to(tl.float64)", "h_f = h.to(tl.float64)",
            f"row = bh * {body.n_outer} + {body.outer}  # row of the [Bl, Hl, {body.n_outer}] lists",
            f"R = n_bh * {body.n_outer}  # rows per list",
            "# out_ptr: [full counts | partial counts | full index | partial index], each 16-byte aligned",
            "R_pad = (R + 3) // 4 * 4",
            f"full_row = out_ptr + 2 * R_pad + row.to(tl.int64) * {body.n_inner}",
            f"part_row = full_row + (R.to(tl.int64) * {body.n_inner} + 3) // 4 * 4"]
    head += _OWN[body.outer] + ([_OWN_ROWS[body.outer]] if needs_rows[body.outer] else [])
    pre = [(c if cols else r) for axes, r, c in g.lines if body.inner_axis not in axes]
    loop = [(c if cols else r) for axes, r, c in g.lines if body.inner_axis in axes]
    inner, n_inner = body.inner, body.n_inner
    loop_head = [f"{inner} = c0 + lanes", f"valid = {inner} < {n_inner}"] + _OWN[inner]
    loop_head += [_CHUNK_ROWS[inner]] if needs_rows[inner] else []
    tail = [f"cls = tl.where({mt}, tl.where({mf}, 1, 2), 0) + tl.zeros([CHUNK], tl.int32)",
            "# a short last key block is never FULL (the attention kernels mask its tail)",
            "cls = tl.where(cls == 2, tl.where(kb == nkb - 1, tl.where(Nk % BLOCK_N != 0, 1, 2), 2), cls)",
            f"n_full = _tk_append(full_row, cls == 2, {inner}, valid, n_full, {n_inner})",
            f"n_part = _tk_append(part_row, cls == 1, {inner}, valid, n_part, {n_inner})"]
    # only the coordinates the mask uses (b, h, positions), and the constants it reads: a divisor
    # taken as a point (``j / w``) reads its lower bound alone, and the line of its upper bound,
    # left in, read a host parameter that the kernel, read back, no longer takes (codegen.params)
    consts = list(g.consts)
    parts = [head, consts, pre, loop_head, loop, tail]
    owned = [(name, part) for name in _COORDINATES for part in (head, loop_head)]
    owned += [(line.split(" = ")[0], consts) for line in g.consts]
    for name, part in owned:
        own = next((line for line in part if line.startswith(f"{name} = ")), None)
        if own is not None and not re.search(rf"\b{name}\b", "\n".join(x for p in parts for x in p if x is not own)):
            part.remove(own)
    return (
        "@triton.jit\n"
        + sig.define(f"def {body.name}(out_ptr, pid, bh, n_bh, {', '.join(params)},\n"
                     "BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BM_P: tl.constexpr, BN_P: tl.constexpr, "
                     "CHUNK: tl.constexpr):\n")
        + f'    """{body.what}"""\n'
        + _indent(head, 4)
        + _indent(consts, 4)
        + _indent(pre, 4)
        + "    n_full = tl.full([], 0, tl.int32)\n"
        "    n_part = tl.full([], 0, tl.int32)\n"
        "    lanes = tl.arange(0, CHUNK)\n"
        f"    for c0 in range(0, {n_inner}, CHUNK):\n"
        + _indent(loop_head + loop + tail, 8)
        + "    tl.store(out_ptr + row, n_full)\n"
        "    tl.store(out_ptr + R_pad + row, n_part)\n"
    )


def render_tile_kernel(program: IntervalProgram, pattern=None, program_name: Optional[str] = None) -> Optional[str]:
    """Python + Triton source defining ``_tile_lists(call, block_m, block_n, transposed)`` for
    ``program`` (see the module docstring), or None when the program uses something the
    kernel does not implement. The source expects ``torch``, ``triton``, ``tl`` (=
    ``triton.language``) and ``_rt`` (= ``attncc.runtime``) in its module's globals; it names
    ``program`` ``_TK_PROGRAM``, printed there, or, given the module's own name for it
    (``program_name``), as that name.
    ``pattern`` is only used for a comment."""
    if program is None:
        return None
    try:
        g = _generate(program)
    except Unsupported:
        return None
    # rendered with every parameter, read back, and rendered with those the kernels read (codegen.params)
    first = _render(g, program, pattern, program_name, Signatures())
    return first and _render(g, program, pattern, program_name, Signatures(kernel_reads(first)))


def _render(g: _Gen, program: IntervalProgram, pattern, program_name: Optional[str],
            sig: Signatures) -> Optional[str]:
    res = g.result
    g.kv(res)  # literal results become constants before the bodies are rendered
    by_b, by_h = "b" in res.deps, "h" in res.deps

    # -- kernel ---------------------------------------------------------------
    in_params = [p for name, rank in g.inputs.items() for p in [input_ptr(name)] + [input_stride(name, d) for d in range(rank)]]
    host_params = [p for p, _ in g.host_args]
    shared = ["nqb", "nkb", "Nq", "Nk", "q_offset", "k_offset", "Hl"] + in_params + host_params
    reserved = {"out_ptr", "pid", "bh", "n_bh", "cols_ptr"}
    if len(set(shared)) != len(shared) or reserved & set(shared):
        return None  # cannot happen (attncc.codegen.names): kept as a guard, the torch path is always right
    constexprs = "BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BM_P=BM_P, BN_P=BN_P"
    bodies = [_render_body(g, _ROWS, shared, sig), _render_body(g, _COLS, shared, sig)]
    kernel = (
        "@triton.jit\n"
        + sig.define(f"def _tk_kernel(out_ptr, {', '.join(shared[:7] + in_params + [f'{p}: tl.float64' for p in host_params])},\n"
                     "BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BM_P: tl.constexpr, BN_P: tl.constexpr, "
                     "ROW_CHUNK: tl.constexpr, COL_CHUNK: tl.constexpr):\n")
        + "    # programs [0, nqb) of axis 0: one query block each, the forward lists; [nqb, nqb + nkb) (launched\n"
        "    # when a backward follows): one key block each, the transposed lists, stored after the forward's.\n"
        "    # Axis 1: b or 0, h or 0.\n"
        "    pid = tl.program_id(0)\n"
        "    bh = tl.program_id(1)\n"
        "    n_bh = tl.num_programs(1)\n"
        "    if pid < nqb:\n"
        + sig.call(f"        _tk_rows(out_ptr, pid, bh, n_bh, {', '.join(shared)}, {constexprs}, CHUNK=ROW_CHUNK)\n")
        + "    else:\n"
        "        R = n_bh * nqb\n"
        "        cols_ptr = out_ptr + 2 * ((R + 3) // 4 * 4) + 2 * ((R.to(tl.int64) * nkb + 3) // 4 * 4)\n"
        + sig.call(f"        _tk_cols(cols_ptr, pid - nqb, bh, n_bh, {', '.join(shared)}, {constexprs}, CHUNK=COL_CHUNK)\n")
    )
    helpers = _helpers_for("\n".join(bodies))

    # -- host functions -------------------------------------------------------------
    # _tile_plan: what a launch takes that the inputs' values do not decide, once per call
    # signature (Call.cached); _tile_lists: per call, the buffer and the launch.
    checks, prep, launch_in, per_call = [], [], [], []  # launch_in: (kernel parameter, host value)
    for name, rank in g.inputs.items():
        prep.append(f"{host_tensor(name)} = call.inputs.get({name!r})")
    seen_inputs = set()
    for _, stat in g.stats:
        t = host_tensor(stat.input)
        if stat.input not in g.inputs and stat.input not in seen_inputs:
            prep.append(f"{t} = call.inputs.get({stat.input!r})")
        seen_inputs.add(stat.input)
        conds = [f"{t} is None", f"{t}.dim() != {len(stat.index)}", f"{t}.dtype not in _TK_INPUT_DTYPES"]
        for d, v in enumerate(stat.index):
            size = f"{t}.shape[{d}]"
            if isinstance(v, int):
                conds.append(f"{size} <= {v}")
            elif v in ("b", "h"):  # a shorter input reads 0 past its end: the torch path pads it so
                conds.append(f"{size} < {'B' if v == 'b' else 'H'}")
            else:
                conds.append(f"{size} < {'q_offset + Nq' if v == 'i' else 'k_offset + Nk'}")
        checks += [c for c in conds if c not in checks]
    strides = []
    for name, rank in g.inputs.items():
        t = host_tensor(name)
        per_call.append(f"{t} = call.inputs[{name!r}]")
        per_call.append(f"if {t}.dtype == torch.bool:")
        per_call.append(f"    {t} = {t}.view(torch.uint8)")
        launch_in.append((input_ptr(name), t))
        for d in range(rank):
            strides.append(f"{input_stride(name, d)} = {t}.stride({d}) if {t}.shape[{d}] != 1 else 0")
            launch_in.append((input_stride(name, d), input_stride(name, d)))
    fallback = ("return _rt.blocks.classified_lists(_TK_PROGRAM, call, block_m, block_n, dynamic=True, "
                "transposed=transposed)")
    plan = ["B, H, Nq, Nk, q_offset, k_offset = call.B, call.Hq, call.Nq, call.Nk, call.q_offset, call.k_offset",
            "nqb, nkb = -(-Nq // block_m), -(-Nk // block_n)",
            f"Bl, Hl = {'B' if by_b else '1'}, {'H' if by_h else '1'}"]
    plan += prep
    conds = ["nqb == 0 or nkb == 0 or B == 0 or H == 0 or Bl * Hl > 65535"]
    for c in checks:  # " or " chains short-circuit: the None test guards the others
        conds.append(c)
    plan.append("if (" + "\n        or ".join(conds) + "):")
    plan.append("    return None")
    plan += strides  # the layout of a bool input viewed as uint8 is its own
    plan += g.host_lines
    row_chunk = "min(64, max(1, 4096 // BN_P))" if g.needs_pos_k else "64"
    col_chunk = "min(64, max(1, 4096 // BM_P))" if g.needs_pos_q else "64"
    # launch() keeps numbers only (never the call: the plan outlives it, and must not hold its tensors)
    values = [("out_ptr", "out"), ("nqb", "nqb"), ("nkb", "nkb"), ("Nq", "Nq"), ("Nk", "Nk"), ("q_offset", "q_offset"),
              ("k_offset", "k_offset"), ("Hl", "Hl")] + launch_in + g.host_args
    values += [("BLOCK_M", "block_m"), ("BLOCK_N", "block_n"), ("BM_P", "BM_P"), ("BN_P", "BN_P"),
               ("ROW_CHUNK", row_chunk), ("COL_CHUNK", col_chunk)]
    bound = sig.bound("_tk_kernel", values, per_call=["out_ptr"] + [input_ptr(name) for name in g.inputs],
                      options=[("num_warps", "4"), ("enable_fp_fusion", "False")], indent="",
                      reserved=["call", "block_m", "block_n", "transposed", "B", "H", "Bl", "rows_size", "size"]
                      + [host_tensor(name) for name in g.inputs])
    plan += ["BM_P, BN_P = _rt.next_power_of_2(block_m), _rt.next_power_of_2(block_n)",
             "# one allocation: the forward lists, then (transposed) the transposed lists, each in the",
             "# layout of _rt.blocks.packed_lists",
             "rows_size = _rt.blocks.packed_size(Bl * Hl * nqb, nkb)",
             "size = rows_size + (_rt.blocks.packed_size(Bl * Hl * nkb, nqb) if transposed else 0)",
             "grid = (nqb + (nkb if transposed else 0), Bl * Hl)"]
    plan += [line for line in bound.plan.split("\n") if line]
    plan += ["",
             f"def launch({bound.params}):",
             "    _tk_kernel[grid]("]
    plan += bound.launch.split("\n")
    plan += ["    )",
             "",
             "return _rt.blocks.TilePlan(size, launch, _rt.blocks.packed_layout(0, Bl, Hl, nqb, nkb),",
             "                           _rt.blocks.packed_layout(rows_size, Bl, Hl, nkb, nqb) if transposed else None)"]
    host = ["plan = call.cached((_tile_plan, block_m, block_n, transposed),",
            "                   lambda: _tile_plan(call, block_m, block_n, transposed))",
            "if plan is None:  # missing / malformed inputs, empty shapes",
            f"    {fallback}"]
    host += per_call
    host += ["out = torch.empty(plan.size, dtype=torch.int32, device=call.q.device)",
             f"plan.launch(out, {', '.join(host_tensor(name) for name in g.inputs)})",
             "return plan.lists(out)"]
    title = getattr(pattern, "name", None)
    out = [
        "# Block lists from one Triton kernel (attncc.codegen.tile_kernel)"
        + (f" for pattern {title}" if title else "") + ": the same lists as",
        "# _rt.blocks.classified_lists(_TK_PROGRAM, call, block_m, block_n, dynamic=True, transposed=...),",
        "# forward and transposed, in one launch.",
        f"_TK_PROGRAM = {program_name or _program_src(program)}",
        "_TK_INPUT_DTYPES = frozenset((" + ", ".join(f"torch.{d}" for d in _INPUT_DTYPES) + "))",
    ]
    src = "\n".join(out) + "\n\n\n" + "\n\n\n".join(helpers + [b.rstrip("\n") for b in bodies]
                                                    + [kernel.rstrip("\n")]) + "\n\n\n"
    src += ("def _tile_plan(call, block_m, block_n, transposed):\n"
            '    """The tile-list kernel\'s launch for this call\'s signature (shapes, strides, dtypes, offsets,\n'
            "    params): a _rt.blocks.TilePlan whose launch takes the buffer and the inputs, or None when the\n"
            "    torch path must run (missing / malformed inputs, empty shapes).\"\"\"\n"
            + _indent([line for line in plan], 4) + "\n\n"
            "def _tile_lists(call, block_m, block_n, transposed):\n"
            '    """(forward lists, transposed lists or None) of this call\'s tiles, each _rt.blocks.BlockLists,\n'
            "    from one kernel launch (no host synchronization); the launch is planned once per call\n"
            "    signature (_tile_plan).\"\"\"\n"
            + _indent(host, 4))
    return src
