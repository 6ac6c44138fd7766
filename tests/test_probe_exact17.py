"""Probe 17 of issue 16's promise (the Plan knows every static pattern exactly), with a generator
of its own, unlike tile_oracle's families:

- masks are random boolean formulas (and / or / not, nested, 1-4 clauses) of atoms the oracle does
  not draw: bands with signed offsets and slopes (``2 * j <= i + o``, ``j < i // 3 + w``), ``//`` and
  ``%`` by 1, 2, 3, 5, 7, 16, 37 or int params (different divisors on each side, ``(i + j) % d``,
  ``i % S == S - 1``), ``min`` / ``max`` / ``abs`` of positions, global rows and columns, ``n_q`` /
  ``n_k`` bands, odd 2D neighborhoods; and unions of bands that share a bound (the merges of
  analysis/bands.py) with floors, slopes, columns, rows and guards;
- problems: lengths 1, block multiples, block +/- 1, tiles 16/32/64/128 mixed, offsets past the
  lengths, explicit ``n_q`` / ``n_k``, call params that are 0, 1, past N, negative (offsets, divisors);

checked against brute force (``attncc._reference.pair_mask`` on every pair): the analysis' three
walks (``walk_grid``), the walks' printed kernel lines run with Triton's integer semantics (//
and % truncating) and the template's loops, ``attncc explain``'s counts (closed forms, numpy
pair counts by classes and by translation), the generated exact tile classifier, and the kernels
themselves (forward and backward under the interpreter, residue and column splits included)
against ``attncc.reference``.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import json
import random

import pytest
import torch

import attncc
from attncc._reference import pair_mask
from attncc.analysis import analyze
from attncc.analysis.bands import FIRST, LAST
from attncc.analysis.graph import walk_grid
from attncc.analysis.walks import precondition_holds
from attncc.codegen.names import param_var
from attncc.codegen.walks import precondition_code, render_walk
from attncc.core import tiles
from attncc.report import explain_data
from attncc.runtime import bind
from attncc.spec import parse_spec
from cases import build_inline, stream_parts
from tile_oracle import Problem, mask_spec, tile_classes, truth_classes

# ---------------------------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------------------------

VALUES = {
    "div": [1, 2, 3, 5, 7, 37, 16, 4],
    "w": [0, 1, 2, 5, 13, 31, 64, 200, 1000],
    "o": [-40, -7, -1, 0, 1, 3, 17, 150],
    "g": [1, 3, 16, 17, 40, 300],
    "r": [0, 1, 2],
    "W": [3, 5, 7, 9],
}
PREFIX = {"div": "d", "w": "w", "o": "o", "g": "g", "r": "r", "W": "ww"}
ATOMS = [
    "j <= i + {o}", "j >= i - {w}", "i - j >= {o}", "j - i <= {o}", "2 * j <= i + {o}", "j <= 2 * i + {o}",
    "3 * j >= i - {w}", "i // 2 <= j", "j < i // 3 + {w}",
    "i // {div} == j // {div}", "i // {div} >= j // {div}", "i // {div} - j // {div} <= {r}",
    "j % {div} == {div} - 1", "j % {div} < {r}", "i % {div} == {div} - 1", "(i - j) % {div} == 0",
    "(i + j) % {div} == 0", "j // {div} == i // {div}", "j >= i - i % {div}", "j < (i // {div} + 1) * {div}",
    "j // {div} <= i // {div} + {o}",
    "min(i, {g}) >= j", "j <= max(i, {g})", "abs(i - j) <= {w}", "abs(i - 2 * j) <= {w}", "max(i, j) < {g}",
    "min(i, j) < {g}", "abs(i - j - {o}) <= {w}", "max(i - {w}, 0) <= j", "min(j + {w}, {g}) >= i",
    "i < {g}", "j < {g}", "i >= n_q - {g}", "j >= n_k - {g}", "i < {g} or j < {g}",
    "j - n_k <= i - n_q", "i - n_q >= j - n_k - {w}",
    "abs(i // {W} - j // {W}) <= {r} and abs(i % {W} - j % {W}) <= {r}",
]
LOWER = ["j >= i - {w}", "j >= {g}", "j >= i // {div} * {div}", "j >= 2 * i - {w}", "j >= (i - {w}) // 2",
         "j * {div} >= i - {w}", "j >= i - i % {div} + {o}", "j > i - {w}", "j >= i + {o}", "j - n_k >= i - n_q - {w}",
         "max(j, {g}) >= i", "j // {div} >= i // {div} - {r}", "j >= (i + {o}) // {div}"]
UPPER = ["j <= i + {o}", "j <= {g}", "j < (i // {div} + 1) * {div}", "j <= i // 2 + {o}", "2 * j <= 3 * i + {o}",
         "j - n_k <= i - n_q", "j < i", "min(j, {g}) <= i", "j // {div} <= i // {div} + {r}", "j <= (i * 3) // {div}",
         "j < {g} + i // {div}"]
ROWS = ["i >= {g}", "i < {g}", "i >= n_q - {g}", "i > {o}", "i <= {g} + {w}"]
GUARDS = ["n_q > {g}", "n_k <= {g}", "{g} > 5"]


def _fill(template: str, rng: random.Random, params: dict, named: float = 0.35) -> str:
    """Each ``{kind}`` replaced by a literal (each occurrence its own) or an int param (all
    occurrences: ``{div}`` shares its value within an atom either way)."""
    out = template
    for kind in sorted(PREFIX, key=len, reverse=True):
        key = "{" + kind + "}"
        while key in out:
            value = rng.choice(VALUES[kind])
            if rng.random() < named:
                name = f"{PREFIX[kind]}{len(params)}"
                params[name] = value
                out = out.replace(key, name)
            elif kind == "div":
                out = out.replace(key, str(value))
            else:
                out = out.replace(key, str(value) if value >= 0 else f"({value})", 1)
    return out


def formula_mask(rng: random.Random):
    """A nested formula of 1-4 clauses of :data:`ATOMS`, negations included."""
    params: dict = {}

    def node(depth):
        if depth >= 2 or rng.random() < 0.4:
            atom = _fill(rng.choice(ATOMS), rng, params)
            return f"not ({atom})" if rng.random() < 0.12 else f"({atom})"
        parts = [node(depth + 1) for _ in range(rng.choice([2, 2, 3, 4] if depth == 0 else [2, 2, 3]))]
        f = "(" + rng.choice([" and ", " or "]).join(parts) + ")"
        return f"not {f}" if rng.random() < 0.1 else f

    return node(0), params


def merge_mask(rng: random.Random):
    """A union of band clauses of which some share their lower or upper atoms (merged bands), with
    columns, rows and call guards."""
    params: dict = {}
    fill = lambda t: _fill(t, rng, params)  # noqa: E731

    def clause(lower=None, upper=None):
        lo = lower if lower is not None else [fill(rng.choice(LOWER)) for _ in range(rng.choice([0, 1, 1, 2]))]
        up = upper if upper is not None else [fill(rng.choice(UPPER)) for _ in range(rng.choice([0, 1, 1, 2]))]
        atoms = lo + up + [fill(rng.choice(ROWS)) for _ in range(rng.choice([0, 0, 0, 1]))]
        atoms += [fill(rng.choice(GUARDS))] if rng.random() < 0.08 else []
        return lo, up, " and ".join(f"({a})" for a in atoms or [fill(rng.choice(LOWER))])

    lo, up, first = clause()
    clauses = [first]
    for _ in range(rng.choice([1, 1, 2, 3])):
        r = rng.random()
        if r < 0.3 and lo:
            clauses.append(clause(lower=lo)[2])
        elif r < 0.6 and up:
            clauses.append(clause(upper=up)[2])
        elif r < 0.75:
            clauses.append(fill(rng.choice(["j < {g}", "j >= {g} and j < {g}", "j >= n_k - {g}", "j < {g} or j >= {g}"])))
        elif r < 0.9:
            clauses.append(fill(rng.choice(ROWS)))
        else:
            clauses.append(clause()[2])
    rng.shuffle(clauses)
    return " or ".join(f"({c})" for c in clauses), params


def random_problem(rng: random.Random) -> Problem:
    block_m, block_n = rng.choice([(16, 16), (16, 32), (32, 16), (64, 16), (16, 64), (32, 128), (128, 32),
                                   (64, 128), (128, 16)])

    def length(b):
        return rng.choice([1, 2, b, b - 1, b + 1, 2 * b, 2 * b + 1, 3 * b - 1, rng.randint(1, 150)])

    q_rows, k_rows = length(block_m), length(block_n)
    q_offset = rng.choice([0, 0, 0, 5, 16, 63, 200, 1000])
    k_offset = rng.choice([0, 0, 0, 3, 32, 129, 700])
    n_q = q_offset + q_rows + rng.choice([0, 1, 37, 500]) if rng.random() < 0.25 else None
    n_k = k_offset + k_rows + rng.choice([0, 1, 37, 500]) if rng.random() < 0.25 else None
    return Problem(q_rows, k_rows, q_offset, k_offset, n_q, n_k, block_m, block_n)


def random_overrides(rng: random.Random, params: dict) -> dict:
    """Call-time values: divisors 1, 2, 3, 7, 37 and -3; offsets negative and past N; windows, rows
    and radii 0, 1, past N."""
    out = {}
    for name in params:
        if rng.random() < 0.4:
            kind = name.rstrip("0123456789")
            choices = {"ww": [1, 3, 5, 11], "d": [1, 3, 7, 37, -3, 2], "o": [-50, -1, 0, 9, 400]}
            out[name] = rng.choice(choices.get(kind, [0, 1, 7, 33, 500]))
    return out


def _cases(seed: int, count: int):
    """(mask, spec params) of both generators, alternating."""
    rng = random.Random(seed)
    return rng, [(formula_mask if n % 2 else merge_mask)(rng) for n in range(count)]


def _truth(pattern, problem, params):
    """Brute-force classes, or None where the reference refuses the params (a divisor 0)."""
    try:
        return dict(zip(("forward", "dkdv"), truth_classes(pattern, problem, params)))
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# the analysis' walks
# ---------------------------------------------------------------------------------------------

N_ANALYSIS = 240


@pytest.mark.parametrize("checked", stream_parts(N_ANALYSIS, N_ANALYSIS // 2))
def test_generated_masks_walk_exactly_the_allowed_tiles(checked):
    """Forward, dQ and dK/dV walks (closed forms, or the exact lists where a call breaks a
    precondition) against brute force: visited exactly the tiles with an allowed pair, unmasked
    exactly the FULL ones. The masks ``checked`` of the stream (the first half by default)."""
    rng, cases = _cases(1701, N_ANALYSIS)
    failures, kinds = [], set()
    for n, (mask, params) in enumerate(cases):
        problems = [(random_problem(rng), random_overrides(rng, params)) for _ in range(2)]
        if n not in checked:
            continue
        pattern = parse_spec(mask_spec(f"p{n}", mask, params))
        plan = analyze(pattern)
        kinds |= {w.kind.value for w in plan.walks}
        for problem, over in problems:
            want = _truth(pattern, problem, over)
            if want is None:
                continue
            want["dq"] = want["forward"]
            for walk in ("forward", "dq", "dkdv"):
                got = walk_grid(plan, walk, **problem.positions, block_m=problem.block_m, block_n=problem.block_n,
                                params=over)
                if not torch.equal(got, want[walk]):
                    failures.append((walk, mask, params, over, problem))
    assert not failures, failures[:5]
    assert kinds == {"dense", "bands", "block_list"}


# ---------------------------------------------------------------------------------------------
# the printed kernel lines of the walks
# ---------------------------------------------------------------------------------------------

def _tdiv(a, b):  # Triton's integer //: truncation toward zero
    q = abs(int(a)) // abs(int(b))
    return q if (a >= 0) == (b >= 0) else -q


class _Triton(ast.NodeTransformer):
    """Printed code with Triton's integer // and % (truncating), and ~ of a condition a logical not."""

    def visit_BinOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, ast.FloorDiv):
            return ast.Call(ast.Name("_tdiv", ast.Load()), [node.left, node.right], [])
        if isinstance(node.op, ast.Mod):
            return ast.Call(ast.Name("_tmod", ast.Load()), [node.left, node.right], [])
        return node

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, ast.Invert):
            return ast.Call(ast.Name("_inv", ast.Load()), [node.operand], [])
        return node


class _TL:
    int64 = int32 = None
    where = staticmethod(lambda c, a, b: a if c else b)
    maximum = staticmethod(max)
    minimum = staticmethod(min)
    cast = staticmethod(lambda x, _: x)


_NAMESPACE = {"tl": _TL, "_tdiv": _tdiv, "_tmod": lambda a, b: a - b * _tdiv(a, b),
              "_inv": lambda x: (not x) if isinstance(x, bool) else ~x,
              "_floordiv": lambda a, b: int(a) // int(b), "_floormod": lambda a, b: int(a) % int(b)}


def _code(text: str):
    return compile(ast.fix_missing_locations(_Triton().visit(ast.parse(text, mode="eval"))), "<walk>", "eval")


def printed_walk_grid(plan, walk: str, problem: Problem, params: dict, b: int = 0, h: int = 0):
    """The tile classes the kernel's printed walk gives at batch row ``b``, head ``h`` (its steps
    per outer block, then the template's loops: one segment's masked head, unmasked middle and
    masked tail, or two segments' virtual-index loops), run in Python with Triton's integer
    semantics; None when the host's precondition check (``_closed_form``) sends the call to the
    exact lists. Checks on the way: the host's check agrees with the analysis', the heavy rows are
    an int, no block twice or outside the grid."""
    p = problem
    n_q = p.q_offset + p.q_rows if p.n_q is None else p.n_q
    n_k = p.k_offset + p.k_rows if p.n_k is None else p.n_k
    params = {**plan.pattern.param_values, **params}
    transposed = walk == "dkdv"
    w = render_walk(plan, transposed)
    if w["kind"] != "bands":
        return None
    assert set(w["helpers"]) <= {"_floordiv", "_floormod"}, w["helpers"]
    call = type("Call", (), dict(q_offset=p.q_offset, k_offset=p.k_offset, Nq=p.q_rows, Nk=p.k_rows, n_q=n_q, n_k=n_k,
                                 params=params))
    host = bool(eval(precondition_code(plan, transposed), {"call": call, "max": max, "min": min}))
    first, rows = (p.k_offset, p.k_rows) if transposed else (p.q_offset, p.q_rows)
    env = dict(params, n_q=n_k if transposed else n_q, n_k=n_q if transposed else n_k)
    the_walk = plan.transposed if transposed else plan.forward
    assert host == precondition_holds(the_walk, {**env, FIRST: first, LAST: first + rows - 1})
    prm = {param_var(q.name): params[q.name] for q in plan.pattern.params}
    if w["heavy"] is not None:
        heavy = eval(_code(w["heavy"].code), {**_NAMESPACE, **prm})
        assert type(heavy) is int, w["heavy"]
    if not host:
        return None
    ns = {**_NAMESPACE, **prm, "b": b, "h": h, "n_q": n_q, "n_k": n_k, "q_offset": p.q_offset,
          "k_offset": p.k_offset, "Nq": p.q_rows, "Nk": p.k_rows, "BLOCK_M": p.block_m, "BLOCK_N": p.block_n}
    steps = [(name, _code(text)) for name, text in w["steps"]]
    block, n_inner = (p.block_n, -(-p.q_rows // p.block_m)) if transposed else (p.block_m, -(-p.k_rows // p.block_n))
    lo_name, hi_name = ("k_lo", "k_hi") if transposed else ("q_lo", "q_hi")
    out = w["out"]
    grid = torch.zeros(-(-rows // block), n_inner, dtype=torch.int8)
    for ob in range(grid.shape[0]):
        env = dict(ns)
        env[lo_name] = first + ob * block
        env[hi_name] = min(env[lo_name] + block - 1, first + rows - 1)
        for name, code in steps:
            env[name] = eval(code, env)
        if w["segments"] == 1:
            lo, flo, fhi, hi = (env[out[k]] for k in ("lo", "full_lo", "full_hi", "hi"))
            seen = [(kb, 1) for kb in range(lo, flo)] + [(kb, 2) for kb in range(flo, fhi)] + \
                   [(kb, 1) for kb in range(fhi, hi)]
        else:
            full, masked = _code(w["full_kb"]), _code(w["masked_kb"])
            seen = [(eval(full, {**env, "t": t}), 2) for t in range(env[out["n_full"]])]
            seen += [(eval(masked, {**env, "t": t}), 1) for t in range(env[out["n_masked"]])]
        blocks = [kb for kb, _ in seen]
        assert len(set(blocks)) == len(blocks) and all(0 <= kb < n_inner for kb in blocks), (ob, seen)
        for kb, cls in seen:
            grid[ob, kb] = cls
    return grid


N_PRINTED = 120


@pytest.mark.parametrize("checked", stream_parts(N_PRINTED, N_PRINTED // 2))
def test_printed_walks_visit_exactly_the_allowed_tiles(checked):
    """The masks ``checked`` of the stream (the first half by default)."""
    rng, cases = _cases(1702, N_PRINTED)
    failures, ran = [], 0
    for n, (mask, params) in enumerate(cases):
        problems = [(random_problem(rng), random_overrides(rng, params)) for _ in range(2)]
        if n not in checked:
            continue
        pattern = parse_spec(mask_spec(f"w{n}", mask, params))
        plan = analyze(pattern)
        for problem, over in problems:
            want = _truth(pattern, problem, over)
            if want is None:
                continue
            for walk in ("forward", "dkdv"):
                got = printed_walk_grid(plan, walk, problem, over)
                if got is not None:
                    ran += 1
                    if not torch.equal(got, want[walk]):
                        failures.append((walk, mask, params, over, problem))
    assert not failures, failures[:5]
    assert ran >= len(checked) // 2, ran


def test_heavy_rows_of_literal_row_bounds_print_as_an_int():
    """Two leading global-row bands with literal bounds (``i < 4 or i < 16``; ``j < 1 or j < 16``
    in the dK/dV walk) make the heavy rows ``Max(3, 15)``, unevaluated: the printer wrote it
    ``15.0``, so the dispatch's ``(... + BLOCK - 1) // BLOCK`` was a float's and every launch of
    that kernel raised (TypeError: unexpected type fp32; a compile error on a GPU too)."""
    for mask, transposed in (("i < 4 or i < 16 or j <= i", False), ("j < 1 or j < 16 or j <= i", True)):
        plan = analyze(parse_spec(mask_spec("heavy", mask, {})))
        heavy = render_walk(plan, transposed)["heavy"]
        assert heavy is not None and heavy.code == "15", (mask, heavy)


# ---------------------------------------------------------------------------------------------
# attncc explain
# ---------------------------------------------------------------------------------------------

N_EXPLAIN = 90


def _explain_failures(pattern, plan, n_q, n_k, block_m, block_n, params):
    truth = pair_mask(pattern, q_rows=n_q, k_rows=n_k, params=params)[0, 0]
    d = explain_data(plan, n_q=n_q, n_k=n_k, block_m=block_m, block_n=block_n, params=params)
    fwd, dkdv = tile_classes(truth, block_m, block_n)
    bad = []
    for walk, want in (("forward", fwd), ("dkdv", dkdv)):
        w = d["walks"][walk]
        if (w["visited"], w["unmasked"]) != (int((want != tiles.EMPTY).sum()), int((want == tiles.FULL).sum())):
            bad.append((walk, w["visited"], w["unmasked"], w["path"]))
        if w["kind"] == "block_list" and not w["path"].startswith("exact block lists") or \
                w["kind"] == "block_list" and w["reason"] not in w["path"]:
            bad.append((walk, "path", w["path"]))
    if d["allowed_pairs"] != int(truth.sum()):
        bad.append(("allowed", d["allowed_pairs"], int(truth.sum())))
    return bad


def test_explain_counts_equal_brute_force():
    """explain's visited / unmasked tiles of both walks and its allowed pairs, at small odd sizes
    and at sizes where the numpy counts translate along the diagonal (several hundred rows, small
    tiles); its path names the exact lists and the reason where a walk takes them."""
    rng, cases = _cases(1703, N_EXPLAIN)
    failures = []
    for n, (mask, params) in enumerate(cases):
        pattern = parse_spec(mask_spec(f"e{n}", mask, params))
        plan = analyze(pattern)
        over = random_overrides(rng, params)
        if n % 3:
            p = random_problem(rng)
            n_q, n_k, block_m, block_n = p.q_rows, p.k_rows, p.block_m, p.block_n
        else:
            block_m, block_n = rng.choice([(16, 16), (16, 32), (32, 16), (16, 48)])
            n_q = rng.choice([block_m * rng.randint(8, 20) + rng.choice([-1, 0, 1]), rng.randint(100, 400)])
            n_k = rng.choice([n_q, block_n * rng.randint(8, 20), rng.randint(100, 400)])
        try:
            pair_mask(pattern, q_rows=1, k_rows=1, params=over)
        except ValueError:
            continue
        bad = _explain_failures(pattern, plan, n_q, n_k, block_m, block_n, over)
        if bad:
            failures.append((mask, params, over, n_q, n_k, block_m, block_n, bad))
    assert not failures, failures[:5]


def test_explain_json_names_the_fallback_and_why(tmp_path):
    """The command itself: a negative param through --param, a walk without a closed form and one
    whose call breaks its precondition, each with its reason, and the counts brute force gives."""
    spec = tmp_path / "fallback.toml"
    spec.write_text(mask_spec("fallback", "(j >= i - i % C + a and j <= i + 2) or j % 7 == o + 6", {"a": 1, "C": 8, "o": 0}))
    strided = tmp_path / "pre.toml"
    strided.write_text(mask_spec("pre", "j >= i - i % C + a and j <= i + 2", {"a": 1, "C": 8}))
    from attncc.explain import main_explain

    for path, params, want_path in ((spec, {"o": -1}, "no closed form: "),
                                    (strided, {"a": 5}, "this call breaks the closed form's"),
                                    (strided, {"a": -3}, "closed form, one segment")):
        argv = [str(path), "--n", "77", "--nk", "130", "--block", "16x32", "--json"]
        argv += [a for k, v in params.items() for a in ("--param", f"{k}={v}")]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main_explain(argv) == 0
        d = json.loads(out.getvalue())
        pattern = attncc.load_spec(path)
        truth = pair_mask(pattern, q_rows=77, k_rows=130, params=params)[0, 0]
        fwd, dkdv = tile_classes(truth, 16, 32)
        for walk, want in (("forward", fwd), ("dkdv", dkdv)):
            w = d["walks"][walk]
            assert want_path in w["path"], (path.name, walk, w["path"])
            assert (w["visited"], w["unmasked"]) == (int((want != 0).sum()), int((want == 2).sum())), (path.name, walk)
        assert d["allowed_pairs"] == int(truth.sum())
        # the forward walk reads lists in the first two (it counted 0 bytes of lists where a call broke
        # its closed form's precondition)
        lists = d["walks"]["forward"]["path"].startswith("exact block lists")
        assert (d["block_list_bytes"] > 0) == lists and d["block_list_bytes"] in (0, 4 * 5 * (2 + 2 * 5)), d["block_list_bytes"]


# ---------------------------------------------------------------------------------------------
# generated code: the exact tile classifier, and the kernels
# ---------------------------------------------------------------------------------------------

N_LISTS = 30


def test_generated_exact_lists_equal_brute_force(tmp_path):
    """The generated ``_exact_tiles_kernel``'s forward and transposed lists (what a call without a
    closed form, or breaking its precondition, walks), under the interpreter."""
    rng, cases = _cases(1704, N_LISTS)
    names = {f"x{n}": case for n, case in enumerate(cases)}
    modules = build_inline({k: mask_spec(k, m, p) for k, (m, p) in names.items()}, tmp_path)
    failures, checked = [], 0
    for name, (mask, params) in names.items():
        pattern, mod = modules[name]
        if not hasattr(mod, "_exact_lists"):
            continue
        for _ in range(2):
            problem, over = random_problem(rng), random_overrides(rng, params)
            problem = dataclasses.replace(problem, q_rows=min(problem.q_rows, 90), k_rows=min(problem.k_rows, 90))
            want = _truth(pattern, problem, over)
            if want is None:
                continue
            lengths = {k: v for k, v in (("n_q", problem.n_q), ("n_k", problem.n_k)) if v is not None}
            call = bind(mod.SPEC, torch.zeros(1, 1, problem.q_rows, 16), torch.zeros(1, 1, problem.k_rows, 16),
                        torch.zeros(1, 1, problem.k_rows, 16), q_offset=problem.q_offset, k_offset=problem.k_offset,
                        kwargs=dict(over), **lengths)
            for lists, label in zip(mod._exact_lists(call, problem.block_m, problem.block_n), ("forward", "dkdv")):
                got = torch.zeros_like(want[label])
                for r in range(got.shape[0]):
                    for cls, (count, index) in ((2, (0, 1)), (1, (2, 3))):
                        got[r, lists[index][0, 0, r, :lists[count][0, 0, r]].long()] = cls
                checked += 1
                if not torch.equal(got, want[label]):
                    failures.append((label, mask, params, over, problem))
    assert not failures, failures[:5]
    assert checked >= N_LISTS // 2, checked


KERNEL_MASKS = {
    # the heavy-rows crash (forward walk, then the dK/dV walk), fixed in the printer
    "heavy_fwd": ("i < 4 or i < 16 or j <= i", {}),
    "heavy_dkdv": ("j < 1 or j < 16 or (j <= i and i - j < w)", {"w": 9}),
    # merged bands with a slope and a floor; a guard on n_q
    "merged": ("(j >= i - w and j <= i) or (j >= i - w and 2 * j <= 3 * i + o) or (n_q > 40 and j < 3)",
               {"w": 5, "o": -7}),
    # formulas with negations, min / max / abs, different divisors each side
    "formula": ("not (j > i) and (abs(i // 3 - j // 7) <= 1 or min(i, j) < g or i % 5 == 4)", {"g": 3}),
    # a residue class conjunct (split by class where each holds enough rows) and a column class
    "residue": ("(i - j) % d == 0 and (j <= i + o or max(i, j) < 11)", {"d": 3, "o": -1}),
    "columns": ("i // 7 >= j // 7 and (j >= i - 9 or j % st == st - 1)", {"st": 5}),
}


@pytest.mark.parametrize("name", KERNEL_MASKS)
def test_kernels_match_the_reference(tmp_path, monkeypatch, name):
    """Forward and backward under the interpreter against attncc.reference, at odd sizes, tiles and
    offsets; the residue-class and column splits taken (their row minimums lowered)."""
    monkeypatch.setenv("ATTNCC_RESIDUE_MIN_ROWS", "2")
    monkeypatch.setenv("ATTNCC_COLUMN_MIN_ROWS", "4")
    mask, params = KERNEL_MASKS[name]
    pattern, mod = build_inline({name: mask_spec(name, mask, params)}, tmp_path)[name]
    for case, ((bm, bn), (bm2, bn2), nq, nk, qo, ko) in enumerate((((16, 32), (32, 16), 37, 45, 0, 0),
                                                                  ((32, 16), (16, 32), 17, 66, 7, 300),
                                                                  ((16, 16), (16, 16), 33, 1, 300, 21))):
        suffix = ",num_warps=4,num_stages=1"
        monkeypatch.setenv("ATTNCC_CONFIG", f"BLOCK_M={bm},BLOCK_N={bn}{suffix}")
        monkeypatch.setenv("ATTNCC_CONFIG_DKDV", f"BLOCK_M={bm2},BLOCK_N={bn2}{suffix}")
        monkeypatch.setenv("ATTNCC_CONFIG_DQ", f"BLOCK_M={bn2},BLOCK_N={bm2}{suffix}")
        gen = torch.Generator().manual_seed(case)
        q = torch.randn(1, 2, nq, 16, generator=gen).requires_grad_()
        k, v = (torch.randn(1, 1, nk, 16, generator=gen).requires_grad_() for _ in range(2))
        go = torch.randn(1, 2, nq, 16, generator=gen)
        pos = dict(q_offset=qo, k_offset=ko)
        o = mod.attention(q, k, v, **pos)
        grads = torch.autograd.grad((o * go).sum(), (q, k, v))
        ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = attncc.reference(pattern, *ref_in, **pos)
        ref_grads = torch.autograd.grad((ref * go.double()).sum(), ref_in)
        for label, x, r in zip(("o", "dq", "dk", "dv"), (o.detach(),) + grads, (ref.detach(),) + ref_grads):
            err = float((x.double() - r).abs().max())
            assert torch.isfinite(x).all() and err <= 1e-4 + 1e-3 * float(r.abs().max()), (name, case, label, err)
