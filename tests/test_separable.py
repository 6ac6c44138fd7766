"""Integer ``%`` and ``//`` of a sum of a row part and a column part leave the pairs
(attncc.analysis.separable): ``(i - j) % w`` is computed from ``i % w`` (hoisted per row) and
``j % w`` (per column of a tile), with no division per pair, and means what attncc.reference says
at any sign and size of the divisor and at any position, int32 or WIDE (int64).

Seeded random expressions (separable ones and ones that are not) through the hoister and the
printer, in both loop orientations (the forward's, and the dK/dV kernel's that walks ``i``); random
specs through whole kernels, forward and backward, against the reference; and every kernel that
the specs render is checked to divide no pair.
"""
from __future__ import annotations

import ast
import random

import pytest
import sympy
import torch

import attncc
from attncc._reference import evaluate
from attncc.analysis.integer import integer_ops
from attncc.analysis.separable import ModSum, SumCarry, separated
from attncc.codegen import render
from attncc.codegen.bounds import _BoundPrinter
from attncc.runtime.intervals import INT32_MAX, CallNumbers
from attncc.spec import load_spec
from attncc.spec import symbols as S
from attncc.spec.ir import Param, Pattern
from cases import build_inline, rel_err, vjp_case
from printed import run_printed
from test_cse import shipped_statements, statements  # noqa: F401 - the fixture: every statement the printers give

W = Param("w", 5, "int")
ORIENTATIONS = [(S.j, S.i), (S.i, S.j)]  # (inner, outer): the forward and dQ kernels', the dK/dV kernel's


def _separable_arg(rng: random.Random):
    """``a*i + b*j + c`` (``a``, ``b`` nonzero), sometimes with ``h`` or the param ``w`` in it."""
    a, b = rng.choice([1, -1, 2, -2, 3]), rng.choice([1, -1, 2, -3])
    c = rng.choice([0, 0, -7, 5, 123457])  # (literals within int32: the printed kernel has no WIDE casts)
    e = a * S.i + b * S.j + c
    return e + rng.choice([0, 0, S.h, W.symbol, -W.symbol])


def _other_arg(rng: random.Random):
    """Arguments that do not separate (a term of both positions), or separate with nothing to gain."""
    # (products of positions with small values: no overflow at the test's positions)
    return rng.choice([S.i * sympy.Mod(S.j, 5) - 3, (S.i - S.j) * sympy.Mod(S.i, 3), 2 * S.i + 1, S.j - 4,
                       S.i - S.j + sympy.Mod(S.i, 7) * sympy.Mod(S.j, 11), sympy.Abs(S.i - S.j) + S.j,
                       sympy.Max(S.i, S.j) - S.i])


def _divisor(rng: random.Random, wide: bool):
    big = [2**31 + 11, -(2**33) - 1] if wide else []
    return rng.choice([W.symbol, W.symbol, 3, 7, -5, -8, 64, 1, 2**31 - 1] + big)


def _forms(rng: random.Random, arg, m):
    """``arg % m``, ``arg // m``, ``arg % m == 0`` (``!=``) as the parser writes them, and in sums."""
    mod, div = sympy.Mod(arg, m), sympy.floor(arg / m)
    return [mod, div, sympy.Eq(mod, 0), sympy.Ne(0, mod), 2 * mod - S.j + div,
            sympy.Mod(div, 7) + rng.randint(-3, 3)]


def _positions(rng: random.Random, n: int, wide: bool):
    """Positions: small ones, the edges of the divisors' periods, and (WIDE) ones past 2**31."""
    base = 2**33 if wide else 0
    top = 2**40 if wide else 2**28
    values = [base + v for v in (0, 1, 2, 4, 5, 7, 63, 64, 65)] + [base + rng.randrange(0, top) for _ in range(n)]
    return torch.tensor(values, dtype=torch.int64 if wide else torch.int32)


def _reach(e, w: int, positions: int, inner, outer) -> int:
    """The largest magnitude of the integer values computing ``e`` in the separated form, as the
    host's overflow guard bounds them (attncc.codegen.bounds): past int32 a kernel runs WIDE."""
    printer = _BoundPrinter(Pattern(name="t", source="t", params=(W,)))
    x = CallNumbers("t", positions=positions, batch=1, heads=1, n_q=1, n_k=1, params={"w": w})
    nodes = [n for n in sympy.preorder_traversal(separated(integer_ops(e), inner, outer))
             if n.is_integer and not n.is_Atom]
    return max((eval(printer(n), {"x": x}).reach for n in nodes), default=0)  # noqa: S307 - the guard's own source


@pytest.mark.parametrize("wide", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("float64", [False, True], ids=["score_code", "mask_code"])
def test_separated_forms_equal_the_reference(wide, float64):
    """Each expression in int32 where the overflow guard keeps it there, else in int64 (WIDE)."""
    rng = random.Random(20 + wide + 2 * float64)
    exprs = []
    for _ in range(14):
        m = _divisor(rng, wide)
        arg = _separable_arg(rng) if rng.random() < 0.75 else _other_arg(rng)
        exprs += _forms(rng, arg, m)
    i = _positions(rng, 400, wide)
    j = i[torch.randperm(i.numel(), generator=torch.Generator().manual_seed(rng.randrange(1000)))]
    values = [1, -1, 5, -7, 64, 2**31 - 1, -(2**31 - 1)] + ([2**31 + 5, -(2**32) - 3] if wide else [])
    # (the printed kernel has b = h = 0)
    env = {"i": i.long(), "j": j.long(), "b": 0, "h": 0, "n_q": 1, "n_k": 1, "n_heads": 1}
    rewritten, narrow = 0, 0
    for inner, outer in ORIENTATIONS:
        rewritten += sum(separated(integer_ops(e), inner, outer) != integer_ops(e) for e in exprs)
        for w in rng.sample(values, 3):
            fits = [_reach(e, w, int(i.max()), inner, outer) <= INT32_MAX for e in exprs]
            narrow += sum(fits) if not wide else 0
            for int32 in ([True, False] if not wide else [False]):
                group = [e for e, f in zip(exprs, fits) if f or not int32]
                if not group:
                    continue
                ii, jj = (i, j) if int32 else (i.long(), j.long())
                got = run_printed(group, [W], {"w": w}, ii, jj, float64=float64, out_dtype=torch.int64, inner=inner,
                                  outer=outer)
                for e, x in zip(group, got):
                    want = evaluate(e, {**env, "w": w}).long().expand_as(x)
                    bad = (x != want).nonzero().flatten()
                    assert bad.numel() == 0, (e, w, inner, ii.dtype,
                                              [(int(i[n]), int(j[n]), int(x[n]), int(want[n])) for n in bad[:3]])
    assert rewritten > len(exprs) // 2  # many took the separated form (not: divisors 1 and 64, other arguments)
    assert wide or narrow > len(exprs)  # and most ran in int32


def test_the_rewrite_keeps_the_row_part_outside_the_loop():
    """Which forms the rewrite gives: residues of each part, the row's free of the loop's position."""
    w = W.symbol
    fwd = separated(integer_ops(sympy.Eq(sympy.Mod(S.i - S.j, w), 0)))
    assert fwd == sympy.Eq(integer_ops(sympy.Mod(S.i, w)), integer_ops(sympy.Mod(S.j, w)))
    # the dK/dV kernel (inner i): the same residues, i's now the column's
    assert separated(integer_ops(sympy.Eq(sympy.Mod(S.i - S.j, w), 0)), S.i, S.j) == sympy.Eq(
        integer_ops(sympy.Mod(S.j, w)), integer_ops(sympy.Mod(S.i, w)))
    mod = separated(integer_ops(sympy.Mod(2 * S.i + S.j - 7, w)))
    assert isinstance(mod, ModSum) and mod.args[0] == integer_ops(sympy.Mod(2 * S.i - 7, w))
    assert mod.args[1] == integer_ops(sympy.Mod(S.j, w))
    div = separated(integer_ops(sympy.floor((S.i - S.j) / w)))
    x, y = integer_ops(sympy.Mod(S.i, w)), integer_ops(sympy.Mod(-S.j, w))
    assert div == integer_ops(sympy.floor(S.i / w) + sympy.floor(-S.j / w)) + SumCarry(x, y, w)
    # not separable, nothing to gain, a divisor of the positions, a shift: unchanged
    for e in (sympy.Mod(S.i * S.j, w), sympy.Mod(S.i + 3, w), sympy.Mod(S.i - S.j, S.i + 1),
              sympy.floor((S.i - S.j) / 8)):
        assert separated(integer_ops(e)) == integer_ops(e)


# -- whole kernels ------------------------------------------------------------------------------

# Masks, biases and mods with every form: == 0 of a residue, % and // by params (either sign) and by
# literals (positive: one comparison less; negative), in the forward, dQ, dK/dV and decode kernels.
# (Score terms stay small at any divisor: float32 scores of 1e8 would differ from the reference's.)
SPECS = {
    "sep_eq": ('[params]\nm = 3\nc = 1\n[mask]\nwhere = "j <= i + 20 and (i - j + c) % m == 0"\n'
               '[score]\nbias = "((i + 2 * j) // m) * 0.1 + ((j - i) % 5) * 0.25"\n'),
    "sep_mod": ('[params]\nm = -4\nr = 2\n[mask]\nwhere = "j <= i + 20 and (2 * i + j - 7) % m < r - 3"\n'
                '[score]\nbias = "((i - j) // -3) * 0.1"\n'),
    "sep_div": ('[params]\nm = 5\nc = -2\nr = 2\n[mask]\nwhere = "abs((i - j) // m) <= r and (j - i) % 3 != 1"\n'
                '[score]\nmod = "s + (((i - j + c) % m) % 4) * 0.25 - where((i + 2 * j) % m < 2, 0.5, 0.0)"\n'),
}
SPECS = {name: f'name = "{name}"\nhead_dim = [16]\n' + text for name, text in SPECS.items()}


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    return build_inline(SPECS, tmp_path_factory.mktemp("separable"))


# (q_offset, k_offset, divisor): positions past 2**31 run WIDE, and so do divisors past int32 (the
# smallest int param is -2**31: its m - y passes int32)
CALLS = [(0, 0, None), (5, 11, -7), (2**31 - 30, 2**31 - 25, 2**31 - 1), (2**32 + 3, 2**32 - 4, -(2**31)),
         (7, 2, 2**33 + 5), (40, 3, 1)]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_kernels_with_separable_integer_ops_equal_the_reference(specs, name):
    """Forward and backward (dQ, dK/dV) against the reference, Nq != Nk, at offsets and divisors
    that run int32 and WIDE."""
    p, mod = specs[name]
    rng = random.Random(name)
    for n, (q_offset, k_offset, m) in enumerate(CALLS):
        kw = {} if m is None else {x.name: rng.randint(-9, 9) for x in p.params if x.name != "m"} | {"m": m}
        vjp_case(name, p=p, mod=mod, Nq=23 + n, Nk=19 + 3 * n, q_offset=q_offset, k_offset=k_offset, kw=kw, seed=n)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_decode_with_separable_integer_ops_equals_the_reference(specs, name):
    """The decode kernel's mask and score (query rows at the end of each cache row)."""
    p, mod = specs[name]
    gen = torch.Generator().manual_seed(7)
    B, Nq, Nmax = 3, 4, 45
    q = torch.randn(B, 4, Nq, 16, generator=gen)
    k, v = torch.randn(B, 2, Nmax, 16, generator=gen), torch.randn(B, 2, Nmax, 16, generator=gen)
    kv_len = torch.tensor([Nmax, 9, 30], dtype=torch.int32)
    for m in (-7, 2**31 - 1):
        o = mod.decode(q, k, v, kv_len=kv_len, m=m)
        for b, n in enumerate(kv_len.tolist()):
            ref = attncc.reference(p, q[b:b + 1].double(), k[b:b + 1, :, :n].double(), v[b:b + 1, :, :n].double(),
                                   q_offset=n - Nq, m=m)
            assert rel_err(o[b:b + 1], ref) < 1e-4, (m, b, rel_err(o[b:b + 1], ref))


# -- no division per pair -------------------------------------------------------------------------

ROW, COLUMN = "row", "column"
_AXES = {"(:, None)": ROW, "(None, :)": COLUMN}  # the index, as ast.unparse writes it
DIVISIONS = ("_floormod", "_floordiv")


def _axes(node, names) -> frozenset:
    """Along which axes of a tile a printed value varies: a row vector ``x[:, None]``, a column
    ``x[None, :]``, a named temporary's."""
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        axis = _AXES.get(ast.unparse(node.slice))
        if axis is not None:
            return frozenset([axis])
    if isinstance(node, ast.Name):
        return names.get(node.id, frozenset())
    out = frozenset()
    for child in ast.iter_child_nodes(node):
        out |= _axes(child, names)
    return out


def per_pair_divisions(temps, code):
    """The integer divisions (``//``, ``%``, the floor helpers) a printed statement computes on a
    whole tile, a value of both the row and the column."""
    names, found = {"i": frozenset([ROW]), "j": frozenset([COLUMN])}, []  # the Gluon fragments' positions
    for name, text in list(temps) + [(None, code)]:
        tree = ast.parse(text, mode="eval")
        for node in ast.walk(tree):
            divides = ((isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.FloorDiv)))
                       or (isinstance(node, ast.Call) and ast.unparse(node.func) in DIVISIONS))
            if divides and _axes(node, names) == {ROW, COLUMN}:
                found.append(ast.unparse(node))
        if name is not None:
            names[name] = _axes(tree, names)
    return found


def test_no_kernel_divides_per_pair(statements, tmp_path):
    """The kernels of every spec (dilated's ``(i - j) % dilation == 0`` was a modulo per pair) and of
    the random specs above: mask, bias and mod code, every kernel and the Gluon fragments."""
    statements.extend(shipped_statements())
    for name, text in SPECS.items():
        spec = tmp_path / f"{name}.toml"
        spec.write_text(text)
        render(load_spec(spec))
    assert statements
    bad = [(code, found) for temps, code in statements for found in [per_pair_divisions(temps, code)] if found]
    assert not bad, bad[:3]
    # the check checks
    assert per_pair_divisions([("tmp0", "offs_i[:, None] - offs_j[None, :]")], "_floormod(tmp0, w) == 0")
