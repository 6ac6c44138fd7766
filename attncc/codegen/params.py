"""Kernels take only the parameters they read.

A template writes each ``@triton.jit`` function with every parameter its pattern could need
(the mask's ``n_q``, the softcap's ``FAST_MATH``, a tile's ``b, h``...). :func:`render` in
:mod:`attncc.codegen` renders a module twice: the first text is read back
(:func:`kernel_reads`: which names each kernel's body really reads), the second is written
with only those. The templates route the three places a parameter appears through one
:class:`Signatures` object (``sig``), so that they always agree:

- ``{% filter signature %}def f(...):{% endfilter %}`` (:meth:`Signatures.define`): the
  signature, each line of parameters kept as a line (the template's grouping), the unread ones
  left out;
- ``{% filter kernel_call %}x = f(a, b, K=c){% endfilter %}`` (:meth:`Signatures.call`): a call
  from another kernel, its arguments matched to the callee's parameters as Python would, the
  unread ones left out;
- ``sig.launch("f", [(names, host value), ...], indent)``: the host's launch arguments, one
  line per signature line; constexprs (and :data:`BY_KEYWORD`) by keyword, the rest by position;
- ``sig.reads("f")``: what ``f`` reads, for the statements that only feed a left-out
  parameter (``n_q = tl.cast(n_q, tl.int64)``): the first rendering keeps them all, the
  second only those; a statement left in that reads a left-out parameter fails the build
  (:func:`undefined_names`).

What "reads" means (:func:`kernel_reads`): a name is read when a statement that has an effect
(a store, a ``return``, a call of a kernel that stores) or that defines a read name uses it;
an ``if`` / ``for`` reads its test when a statement inside is kept; an argument of a call to a
kernel of the module is read only when the callee reads the parameter it binds. So
``n_q = tl.cast(n_q, tl.int64)`` alone does not read ``n_q``, and a tile's ``ROTARY_DIM`` that
the tile ignores is not read by the kernel that only passes it on.
"""
from __future__ import annotations

import ast
import builtins
import re
import textwrap
from dataclasses import dataclass
from typing import Container, Dict, FrozenSet, List, Optional, Sequence, Tuple

# Runtime parameters the host passes by keyword: FastKernel keys keyword arguments by their
# value's specialization, positional ones by the call's signature, which does not fix these
# (the dropout seed is an int Triton specializes on; attncc.runtime.launch.FastKernel).
BY_KEYWORD = frozenset({"seed", "dropout_p"})
WIDTH = 120  # the generated code's line length


# ---------------------------------------------------------------------------------------------
# reading a module back
# ---------------------------------------------------------------------------------------------

def jit_functions(tree: ast.Module) -> Dict[str, ast.FunctionDef]:
    """The module-level ``@triton.jit`` functions of a parsed module, by name."""
    return {node.name: node for node in tree.body
            if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in node.decorator_list)}


def _is_jit(decorator: ast.expr) -> bool:
    if isinstance(decorator, ast.Call):
        decorator = decorator.func
    return (isinstance(decorator, ast.Attribute) and decorator.attr == "jit") or (
        isinstance(decorator, ast.Name) and decorator.id == "jit")


def param_names(fn: ast.FunctionDef) -> List[str]:
    a = fn.args
    return [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]


def kernel_reads(source: str) -> Dict[str, FrozenSet[str]]:
    """The names each ``@triton.jit`` function of ``source`` reads (see the module docstring),
    parameters and locals: a parameter outside its set is never read."""
    return _Reader(ast.parse(source)).reads


def undefined_names(source: str) -> Dict[str, FrozenSet[str]]:
    """The names each ``@triton.jit`` function of ``source`` reads that nothing defines: not a
    parameter, a local, a name of the module or a builtin (a statement left in for a parameter
    left out). Functions without any are not listed."""
    tree = ast.parse(source)
    known = set(dir(builtins))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            known.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            known |= {(a.asname or a.name).split(".")[0] for a in node.names}
        else:
            known |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    out = {}
    for name, fn in jit_functions(tree).items():
        local = set(param_names(fn)) | {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)
                                        and isinstance(n.ctx, ast.Store)}
        loaded = {n.id for stmt in fn.body for n in ast.walk(stmt) if isinstance(n, ast.Name)
                  and isinstance(n.ctx, ast.Load)}
        if loaded - local - known:
            out[name] = frozenset(loaded - local - known)
    return out


@dataclass(frozen=True)
class _Statement:
    defines: FrozenSet[str]
    reads: FrozenSet[str]
    effect: bool  # kept whatever it defines (a store, a return, a call of a storing kernel)
    controls: Tuple[int, ...]  # the enclosing if / for / while statements (indices into _Reader's tests)
    side_effect: bool = False  # an effect a caller sees (not a return)


class _Reader:
    def __init__(self, tree: ast.Module):
        self.functions = jit_functions(tree)
        self.reads: Dict[str, FrozenSet[str]] = {}
        self.stores: Dict[str, bool] = {}  # whether calling it has a side effect
        for name in self.functions:
            self._visit(name, ())

    def _visit(self, name: str, stack: Tuple[str, ...]) -> None:
        if name in self.reads:
            return
        if name in stack:
            raise ValueError(f"recursive @triton.jit functions: {' -> '.join(stack + (name,))}")
        fn = self.functions[name]
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in self.functions:
                self._visit(node.func.id, stack + (name,))
        self.reads[name], self.stores[name] = self._liveness(fn)

    def _expr_reads(self, node: ast.AST) -> FrozenSet[str]:
        return self._expr(node)[0]

    def _expr(self, node: ast.AST) -> Tuple[FrozenSet[str], bool]:
        """(the names ``node`` reads, whether it calls a kernel with a side effect)."""
        out = set()
        storing = False

        def visit(n: ast.AST) -> None:
            nonlocal storing
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in self.functions:
                storing |= self.stores[n.func.id]
                callee, live = self.functions[n.func.id], self.reads[n.func.id]
                params = param_names(callee)
                for i, a in enumerate(n.args):
                    if isinstance(a, ast.Starred) or i >= len(params) or params[i] in live:
                        visit(a)
                for kw in n.keywords:
                    if kw.arg is None or kw.arg in live:
                        visit(kw.value)
                return
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
                out.add(n.id)
            for child in ast.iter_child_nodes(n):
                visit(child)

        visit(node)
        return frozenset(out), storing

    def _liveness(self, fn: ast.FunctionDef) -> Tuple[FrozenSet[str], bool]:
        statements: List[_Statement] = []
        tests: List[FrozenSet[str]] = []

        def block(body: Sequence[ast.stmt], controls: Tuple[int, ...]) -> None:
            for s in body:
                if isinstance(s, (ast.If, ast.While)):
                    tests.append(self._expr_reads(s.test))
                    inner = controls + (len(tests) - 1,)
                    block(s.body, inner)
                    block(s.orelse, inner)
                elif isinstance(s, ast.For):
                    tests.append(self._expr_reads(s.iter))
                    statements.append(_Statement(_stored(s.target), tests[-1], False, controls))  # the loop variable
                    inner = controls + (len(tests) - 1,)
                    block(s.body, inner)
                    block(s.orelse, inner)
                elif isinstance(s, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                    targets = s.targets if isinstance(s, ast.Assign) else [s.target]
                    defines = frozenset().union(*[_stored(t) for t in targets])
                    reads, storing = self._expr(s.value) if s.value is not None else (frozenset(), False)
                    if isinstance(s, ast.AugAssign):
                        reads |= defines
                    plain = all(isinstance(t, ast.Name) or (isinstance(t, (ast.Tuple, ast.List))
                                                            and all(isinstance(e, ast.Name) for e in t.elts))
                                for t in targets)
                    if not plain:  # x[i] = ..., x.a = ...: kept, and what the target reads too
                        reads |= frozenset().union(*[self._expr_reads(t) for t in targets])
                    statements.append(_Statement(defines, reads, storing or not plain, controls, storing))
                elif isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant):
                    continue  # a docstring
                elif isinstance(s, ast.Pass):
                    continue
                else:  # stores, atomics, asserts, return, break, continue
                    statements.append(_Statement(frozenset(), self._expr_reads(s), True, controls,
                                                 not isinstance(s, (ast.Return, ast.Break, ast.Continue))))

        block(fn.body, ())
        live, kept, kept_tests = set(), set(), set()
        changed = True
        while changed:
            changed = False
            for k, s in enumerate(statements):
                if k in kept or not (s.effect or s.defines & live):
                    continue
                kept.add(k)
                live |= s.reads
                changed = True
                for t in s.controls:
                    if t not in kept_tests:
                        kept_tests.add(t)
                        live |= tests[t]
        return frozenset(live), any(s.side_effect for s in statements)


def _stored(target: ast.AST) -> FrozenSet[str]:
    return frozenset(n.id for n in ast.walk(target) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))


# ---------------------------------------------------------------------------------------------
# writing signatures, calls and launches
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    name: str
    text: str  # as declared: "x", "BLOCK: tl.constexpr", "a: tl.float64"
    constexpr: bool
    line: int  # which line of the template's signature it sits on


class _Everything:
    def __contains__(self, name) -> bool:
        return True


class Signatures:
    """The template side of unread-parameter removal (see the module docstring). ``reads``:
    :func:`kernel_reads` of the first rendering; None while rendering it (everything is kept)."""

    def __init__(self, reads: Optional[Dict[str, FrozenSet[str]]] = None):
        self._reads = reads
        self.params: Dict[str, List[Param]] = {}

    def reads(self, fn: str) -> Container[str]:
        if self._reads is None:
            return _Everything()
        return self._reads.get(fn, frozenset())

    def _kept(self, fn: str, params: Sequence[Param]) -> List[Param]:
        live = self.reads(fn)
        return [p for p in params if p.name in live]

    def define(self, text: str) -> str:
        """The rendered ``def f(...):`` with f's unread parameters left out."""
        head = text.strip()
        src = textwrap.dedent(head) + "\n    pass\n"
        fn = ast.parse(src).body[0]
        if not isinstance(fn, ast.FunctionDef):
            raise ValueError(f"sig.define expects a def, got: {head[:60]!r}")
        if fn.args.vararg or fn.args.kwarg or fn.args.defaults or fn.args.kw_defaults or fn.args.kwonlyargs:
            raise ValueError(f"{fn.name}: kernels take plain parameters")
        if fn.name in self.params:
            raise ValueError(f"{fn.name} is defined twice")
        args = fn.args.posonlyargs + fn.args.args
        segment = _segments(src)
        params = [Param(a.arg, segment(a), _is_constexpr(a.annotation), a.lineno) for a in args]
        self.params[fn.name] = params
        kept = self._kept(fn.name, params)
        opening = f"def {fn.name}("
        lines = _wrap([[p.text for p in kept if p.line == n] for n in _lines_of(params)], len(opening), len(opening))
        return opening + (",\n" + " " * len(opening)).join(lines) + "):" + text[len(text.rstrip()):]

    def call(self, text: str) -> str:
        """The rendered statement holding one call of a function of :meth:`define`, its
        arguments for unread parameters left out (rewrapped; the statement's indentation kept)."""
        body = text.rstrip()
        indent = body[:len(body) - len(body.lstrip())]
        src = textwrap.dedent(body)
        calls = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                 and n.func.id in self.params]
        if len(calls) != 1:
            raise ValueError(f"sig.call expects one call of a defined kernel in {src[:80]!r}")
        node = calls[0]
        name = node.func.id
        params = self.params[name]
        live = self.reads(name)
        segment = _segments(src)
        args = []
        for i, a in enumerate(node.args):
            if isinstance(a, ast.Starred) or i >= len(params):
                raise ValueError(f"{name}: {segment(a)!r} binds no parameter")
            if params[i].name in live:
                args.append(segment(a))
        known = {p.name for p in params}
        for kw in node.keywords:
            if kw.arg not in known:
                raise ValueError(f"{name} has no parameter {kw.arg!r}")
            if kw.arg in live:
                args.append(f"{kw.arg}={segment(kw.value)}")
        start = _offset(src, node.lineno, node.col_offset)
        end = _offset(src, node.end_lineno, node.end_col_offset)
        opening = textwrap.indent(src[:start] + name + "(", indent)
        column = len(opening.split("\n")[-1])
        lines = _wrap([args], column, column)
        return opening + (",\n" + " " * column).join(lines) + ")" + src[end:] + text[len(body):]

    def launch(self, fn: str, values: Sequence[Tuple[str, str]], indent: str) -> str:
        """The arguments of a host launch of ``fn``, in lines at ``indent`` that end with a
        comma, one line (or more) per line of its signature: ``values`` pairs each parameter,
        in the signature's order, with its host text; several parameters can share one starred
        text (``("stride_qb stride_qh stride_qm", "*q.stride()[:3]")``: all read or none)."""
        params = self.params[fn]
        by_name = {p.name: p for p in params}
        entries, keywords = [], False
        for names, group, value, keyword in self._read_values(fn, values):
            if keywords and not keyword:
                raise ValueError(f"{fn}: {names} is passed by position after a keyword argument")
            keywords |= keyword
            entries.append((by_name[group[0]].line, f"{group[0]}={value}" if keyword else value))
        lines = _wrap([[text for line, text in entries if line == n] for n in _lines_of(params)],
                      len(indent), len(indent))
        return "\n".join(f"{indent}{line}," for line in lines)


    def _read_values(self, fn: str, values: Sequence[Tuple[str, str]]) -> List[Tuple[str, List[str], str, bool]]:
        """``(names, group, value, keyword)`` of the launch ``values`` of ``fn`` whose parameters the
        kernel reads (a group is read whole or not at all), after checking that ``values`` name
        every parameter of the signature once, in its order; ``keyword``: passed by keyword
        (constexprs and :data:`BY_KEYWORD`), one parameter alone. Shared by :meth:`launch` and
        :meth:`bound`."""
        params = self.params[fn]
        by_name = {p.name: p for p in params}
        live = self.reads(fn)
        read, covered = [], []
        for names, value in values:
            group = names.split()
            unknown = [n for n in group if n not in by_name]
            if unknown:
                raise ValueError(f"{fn} has no parameter {unknown[0]!r} (launch value {value!r})")
            covered += group
            kept = [n for n in group if n in live]
            if not kept:
                continue
            if len(kept) != len(group):
                raise ValueError(f"{fn}: {names} are passed together ({value!r}) but only {' '.join(kept)} "
                                 f"are read: pass them one by one")
            keyword = by_name[group[0]].constexpr or group[0] in BY_KEYWORD
            if keyword and len(group) != 1:
                raise ValueError(f"{fn}: keyword arguments are passed one by one ({names})")
            read.append((names, group, value, keyword))
        if covered != [p.name for p in params]:
            raise ValueError(f"{fn}: the launch values name {covered}, the signature {[p.name for p in params]}")
        return read

    def bound(self, fn: str, values: Sequence[Tuple[str, str]], per_call: Container[str],
              options: Sequence[Tuple[str, str]] = (), indent: str = "    ",
              reserved: Container[str] = (), call_indent: str = "        ") -> "BoundLaunch":
        """A launch of ``fn`` split for :func:`attncc.runtime.launch.bound_launch`: what the call's
        signature fixes is computed once, in a plan function, and a launch closure takes the rest.
        ``values`` as for :meth:`launch`; ``per_call``: the parameters (a group by its first name)
        whose values change from call to call (tensors, per-call flags), which the closure takes
        as arguments named like the parameters; ``options``: launch options (``num_warps``...) that
        the plan computes; ``reserved``: names the plan function uses itself (its arguments), which
        no parameter may shadow. See :class:`BoundLaunch` for the pieces."""
        params = self.params[fn]
        by_name = {p.name: p for p in params}
        plan: list = []  # (signature line, 1 or a group's size, names, values) of the plan's assignments
        keywords: List[str] = []  # NAME=value of the plan's options dict
        closure: List[str] = []  # the closure's parameters
        entries: List[Tuple[int, str]] = []  # (signature line, argument text) of the closure's launch
        late: List[str] = []  # per-call keyword arguments of the closure's launch
        args: List[str] = []  # the call site's arguments
        for names, group, value, keyword in self._read_values(fn, values):
            clash = [n for n in group if n in reserved or n in ("grid", "options", "launch")]
            if clash:
                raise ValueError(f"{fn}: parameter {clash[0]!r} would shadow a name of the plan function")
            line = by_name[group[0]].line
            if group[0] in per_call:
                closure += group
                args.append(value)
                if keyword:
                    late.append(f"{group[0]}={group[0]}")
                else:
                    entries += [(line, name) for name in group]
            elif keyword:
                keywords.append(f"{group[0]}={value}")
            else:
                starred = value.startswith("*")
                if len(group) > 1 and not starred:
                    raise ValueError(f"{fn}: {names} share {value!r}, which is not starred")
                if value == group[0] or value == ", ".join(group):
                    pass  # a local of that name already
                elif starred and len(group) == 1:
                    plan.append((line, 0, [f"({group[0]},)"], [value[1:]]))  # a one-element sequence
                elif len(group) == 1 and plan and plan[-1][0] == line and plan[-1][1] == 1:
                    prev = plan.pop()  # singles of one signature line: one assignment, while it fits
                    joined = (line, 1, prev[2] + group, prev[3] + [value])
                    if len(indent) + len(", ".join(joined[2]) + " = " + ", ".join(joined[3])) <= WIDTH:
                        plan.append(joined)
                    else:
                        plan += [prev, (line, 1, group, [value])]
                else:
                    plan.append((line, len(group), group, [value[1:] if len(group) > 1 else value]))
                entries += [(line, name) for name in group]
        plan = [f"{', '.join(names)} = {', '.join(texts)}" for _, _, names, texts in plan]
        keywords += [f"{name}={value}" for name, value in options]
        body = indent + "        "
        lines = _wrap([[text for line, text in entries if line == n] for n in _lines_of(params)] + [late],
                      len(body), len(body))
        if keywords:
            lines.append("**options")
            opening = "options = dict("
            plan.append(opening + (",\n" + " " * (len(indent) + len(opening))).join(
                _wrap([keywords], len(indent) + len(opening), len(indent) + len(opening))) + ")")
        return BoundLaunch(
            plan="\n".join(indent + line for line in plan),
            params=(",\n" + " " * (len(indent) + len("def launch("))).join(
                _wrap([closure], len(indent) + len("def launch("), len(indent) + len("def launch("))),
            launch="\n".join(f"{body}{line}," for line in lines),
            args="\n".join(f"{call_indent}{line}," for line in _wrap([args], len(call_indent), len(call_indent))))


@dataclass(frozen=True)
class BoundLaunch:
    """The pieces of :meth:`Signatures.bound`: ``plan``, the plan function's lines that compute the
    launch's fixed values (each parameter's value in a local of the parameter's name, the
    keyword ones in ``options``); ``params``, the launch closure's parameters; ``launch``, the
    kernel's arguments in the closure (a line per signature line, ending in commas); ``args``,
    the call site's arguments for the closure (lines ending in commas)."""

    plan: str
    params: str
    launch: str
    args: str


def _is_constexpr(annotation: Optional[ast.expr]) -> bool:
    return isinstance(annotation, ast.Attribute) and annotation.attr == "constexpr"


def _lines_of(params: Sequence[Param]) -> List[int]:
    return sorted({p.line for p in params})


def _segments(src: str):
    """``ast.get_source_segment(src, node)`` as a function of ``node``, ``src`` split into lines
    once: get_source_segment splits the whole source, character by character, at every call
    (a quarter of the time of rendering a module)."""
    lines = re.split(r"(?<=\r\n)|(?<=\r)(?!\n)|(?<=\n)", src)  # as ast's splitting: line ends kept

    def segment(node: ast.AST) -> str:
        first, last = node.lineno - 1, node.end_lineno - 1
        if first == last:
            return lines[first].encode()[node.col_offset:node.end_col_offset].decode()
        return "".join([lines[first].encode()[node.col_offset:].decode(), *lines[first + 1:last],
                        lines[last].encode()[:node.end_col_offset].decode()])

    return segment


def _offset(src: str, line: int, col: int) -> int:
    """The index into ``src`` of an ast position (``col``: a byte offset into its line)."""
    lines = src.split("\n")
    return sum(len(x) + 1 for x in lines[:line - 1]) + len(lines[line - 1].encode()[:col].decode())


def _wrap(groups: Sequence[Sequence[str]], first: int, rest: int) -> List[str]:
    """The lines of ``groups`` of items: items joined by ", ", each group starting a line of its
    own (empty groups dropped), a line broken before it passes :data:`WIDTH`; the first line
    starts at column ``first``, the others at ``rest``."""
    lines: List[str] = []
    for group in groups:
        line = ""
        for item in group:
            candidate = f"{line}, {item}" if line else item
            if line and (first if not lines else rest) + len(candidate) + 2 > WIDTH:
                lines.append(line)
                line = item
            else:
                line = candidate
        if line:
            lines.append(line)
    return lines
