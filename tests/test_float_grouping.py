"""Float arithmetic in expressions keeps the grouping it is written with, so a mask or a bias
computes what Python computes: ``(i - j) / 7 < 1`` is ``i - j < 7`` on every row.

sympy distributes a number over a sum (``(i - j) / 7`` became ``i/7 - j/7``, ``(i - j) * 0.1``
``0.1*i - 0.1*j``, ``(i - j) // 2.5`` ``floor(0.4*i - 0.4*j)``), and the float64 value of the
distributed form differs from Python's (the integer sum first, then one division or product) in
the last bit: ``(i - j) / 7 < 1`` allowed ``i - j = 7`` on some rows (12/7 - 5/7 < 1), a bias
``(i - j) // 2.5`` was -3 at distance -5 (Python: -2.0).

The parser keeps each operand of float arithmetic that sympy would take apart or merge as one
value (``attncc.spec.builtins.Grouped``, a ``ToFloat``) and divides by anything but an integer
literal with ``FloatDiv`` (one division); the reference, mask code and kernels compute those as
written. The seeded random tests compare Python's own ``eval`` of random expressions with the
reference, the printed mask code and whole kernels, pair by pair."""
from __future__ import annotations

import random

import torch

import attncc
from attncc._reference import evaluate, pair_mask
from attncc.spec import parse_spec
from attncc.spec.builtins import Grouped
from cases import build_inline, rel_err
from printed import run_printed

SUMS = ("i - j", "j - i", "i + j", "2 * i - j", "i - 3 * j + 5", "j - i - 1")
INT_DIVISORS = (3, 5, 7, 10, 11, 13)
FLOAT_FACTORS = (0.1, 0.3, 0.7, 1.1)


def _masks(rng, n):
    """Random masks that compare a number times / over an integer sum with a threshold on the
    sum's grid (where the last bit decides)."""
    out = []
    for _ in range(n):
        s, d, c = rng.choice(SUMS), rng.choice(INT_DIVISORS), rng.choice(FLOAT_FACTORS)
        k = rng.randrange(-6, 7)
        op = rng.choice(("<", "<=", "==", ">", ">="))
        out.append(rng.choice((
            f"({s}) / {d} {op} {k}",
            f"({s}) / {d} {op} {k} / {d}",
            f"-({s}) / {d} {op} {k}",
            f"({s}) * {c} {op} {k} * {c}",
            f"{c} * ({s}) {op} {round(k * c, 6)}",
            f"({s}) * {c} // 1 {op} {k}",
            f"({s} + 0.5) / {d} {op} {k} + 0.5 / {d}",
        )))
    return out


def _python(text, i, j):
    return bool(eval(text, {"__builtins__": {}}, {"i": i, "j": j}))



def test_reference_and_mask_code_compute_float_arithmetic_as_written():
    rng = random.Random(2024)
    ii, jj = torch.meshgrid(torch.arange(0, 60), torch.arange(0, 60), indexing="ij")
    i, j = ii.reshape(-1), jj.reshape(-1)
    for text in _masks(rng, 60):
        p = parse_spec(f'[mask]\nwhere = "{text}"\n')
        want = torch.tensor([_python(text, int(a), int(b)) for a, b in zip(i, j)])
        ref = pair_mask(p, q_rows=60, k_rows=60).reshape(-1)
        bad = (ref != want).nonzero().flatten()
        assert bad.numel() == 0, (text, str(p.mask), [(int(i[n]), int(j[n])) for n in bad[:4]])
        if p.mask is None:  # decided for every pair when parsed (positions are >= 0)
            continue
        (got,) = run_printed([p.mask], p.params, {}, i.to(torch.int32), j.to(torch.int32), float64=True,
                             out_dtype=torch.int64)
        assert torch.equal(got.bool(), want), (text, "mask code")



def test_float_floor_division_of_a_sum_in_a_bias():
    p = parse_spec('[score]\nbias = "(i - j) // 2.5 + (j - i) / 7"\n')
    env = {"i": torch.arange(40).view(-1, 1), "j": torch.arange(40).view(1, -1), "b": 0, "h": 0, "n_q": 40, "n_k": 40,
           "n_heads": 1}
    got = evaluate(p.bias, env)
    want = torch.tensor([[(a - b) // 2.5 + (b - a) / 7 for b in range(40)] for a in range(40)], dtype=torch.float64)
    assert torch.equal(got, want)



def test_kernels_allow_exactly_the_pairs_python_allows(tmp_path):
    """Distance 7 over 7 is 1.0 on every row: the kernels let through i - j < 7 exactly."""
    text = 'head_dim = 16\ndtypes = ["float32"]\n[mask]\nwhere = "(i - j) / 7 < 1 and j <= i"\n'
    p, mod = build_inline({"float_grouping": text}, tmp_path)["float_grouping"]
    N = 48
    v = torch.eye(N).view(1, 1, N, N)
    o = mod.attention(torch.zeros(1, 1, N, 16), torch.zeros(1, 1, N, 16), v)
    ii, jj = torch.meshgrid(torch.arange(N), torch.arange(N), indexing="ij")
    assert torch.equal(o[0, 0] > 0, (ii - jj < 7) & (jj <= ii))
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, N, 16, generator=gen) for _ in range(3))
    ref = attncc.reference(p, q.double(), k.double(), v.double(), q_offset=5, k_offset=1)
    assert rel_err(mod.attention(q, k, v, q_offset=5, k_offset=1), ref) < 1e-4


# -- seeded random float arithmetic: Python, the reference, mask code and kernels agree pair by pair --

# an int and a float param, at their spec values (t float32-exact: tests/printed.py's kernel gets a
# Python float argument, which the interpreter makes float32; generated modules pass float64)
PARAMS = {"w": 3, "t": 0.75}
PARAM_TOML = "[params]\nw = 3\nt = 0.75\n"
FLOATS = (0.1, 0.3, 0.7, 1.1, 2.5, 7.0, 0.5, 1e-3)
DIVISORS = ("3", "7", "10", "2.5", "0.1", "0.7", "7.0", "1.1", "w", "t", "(i + 1)", "(j + 3)")


def _expr(rng, depth, ops="+-*/%F"):
    """A random number expression over i, j, the params and literals, fully parenthesized
    (``F``: ``//``); divisors are never 0."""
    if depth == 0 or rng.random() < 0.25:
        return rng.choice(("i", "j", "i", "j", str(rng.randrange(-9, 10)), repr(rng.choice(FLOATS)), "w", "t"))
    op = rng.choice(ops)
    left = _expr(rng, depth - 1, ops)
    if op in "/%F":
        right = rng.choice(DIVISORS)
    else:
        right = _expr(rng, depth - 1, ops)
    return f"({left} {'//' if op == 'F' else op} {right})"


def _eval(text, i, j):
    return eval(text, {"__builtins__": {}}, {"i": i, "j": j, **PARAMS})


def _random_mask(rng, rows):
    """``E op threshold`` with the threshold E's Python value at a random pair (a boundary that
    the last bit decides), or a comparison of two expressions."""
    e = _expr(rng, 3)
    op = rng.choice(("<", "<=", "==", ">", ">=", "!="))
    if rng.random() < 0.7:
        return f"{e} {op} {float(_eval(e, rng.randrange(rows), rng.randrange(rows)))!r}"
    return f"{e} {op} {_expr(rng, 2)}"


def _grid(n):
    ii, jj = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    return ii.reshape(-1), jj.reshape(-1)


def test_random_float_arithmetic_python_reference_and_mask_code_agree():
    rng, n = random.Random(31), 24
    i, j = _grid(n)
    pairs = list(zip(i.tolist(), j.tolist()))
    masks, wants = [], []
    for _ in range(80):
        text = _random_mask(rng, n)
        p = parse_spec(f'{PARAM_TOML}[mask]\nwhere = "{text}"\n')
        want = torch.tensor([bool(_eval(text, a, b)) for a, b in pairs])
        ref = pair_mask(p, q_rows=n, k_rows=n).reshape(-1)
        bad = (ref != want).nonzero().flatten()
        assert bad.numel() == 0, (text, str(p.mask), [pairs[k] for k in bad[:4]])
        if p.mask is not None:
            masks.append((text, p))
            wants.append(want)
    printed = run_printed([p.mask for _, p in masks], masks[0][1].params, {}, i.to(torch.int32), j.to(torch.int32),
                          float64=True, out_dtype=torch.int64)
    for (text, _), got, want in zip(masks, printed, wants):
        assert torch.equal(got.bool(), want), (text, "mask code", [pairs[k] for k in (got.bool() != want).nonzero()[:4]])


def test_random_float_arithmetic_biases_are_pythons_in_the_reference():
    rng, n = random.Random(32), 24
    env = {"i": torch.arange(n).view(-1, 1), "j": torch.arange(n).view(1, -1), "b": 0, "h": 0, "n_q": n, "n_k": n,
           "n_heads": 1, **PARAMS}
    for _ in range(80):
        text = _expr(rng, 4)
        p = parse_spec(f'{PARAM_TOML}[score]\nbias = "{text}"\n')
        if p.bias is None:
            continue
        want = torch.tensor([[float(_eval(text, a, b)) for b in range(n)] for a in range(n)], dtype=torch.float64)
        got = evaluate(p.bias, env).to(torch.float64).expand(n, n)
        if not p.bias.has(Grouped):
            # terms that cancel (``(0.7 + t) + j - t``): the bias is that algebra (§1), Python's within rounding
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), (text, str(p.bias))
            continue
        assert torch.equal(got, want), (text, str(p.bias), (got != want).nonzero()[:4].tolist())


def test_random_float_arithmetic_kernels_allow_pythons_pairs(tmp_path):
    """Whole kernels (block walks, tile classes, mask code) on random float masks, with a smooth
    random float bias (score code is float32: compared with the reference within rounding)."""
    rng, n = random.Random(33), 40
    texts, masks = {}, {}
    for k in range(3):
        mask = f"({_random_mask(rng, n)}) or j == i"  # no empty rows
        bias = _expr(rng, 3, ops="+-*/")
        masks[f"float_random_{k}"] = mask
        texts[f"float_random_{k}"] = (f'head_dim = 16\ndtypes = ["float32"]\n{PARAM_TOML}[mask]\nwhere = "{mask}"\n'
                                      f'[score]\nbias = "0.01 * {bias}"\n')
    ii, jj = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    gen = torch.Generator().manual_seed(5)
    for name, (p, mod) in build_inline(texts, tmp_path).items():
        want = torch.tensor([[bool(_eval(masks[name], a, b)) for b in range(n)] for a in range(n)])
        v = torch.eye(n).view(1, 1, n, n)
        o = mod.attention(torch.zeros(1, 1, n, 16), torch.zeros(1, 1, n, 16), v)
        assert torch.equal(o[0, 0] > 0, want), (masks[name], (o[0, 0] > 0) ^ want)
        q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for _ in range(3))
        ref = attncc.reference(p, q.double(), k.double(), v.double())
        assert rel_err(mod.attention(q, k, v), ref) < 1e-4, texts[name]


def test_float_steps_in_scores_are_pythons(tmp_path):
    """Conditions and floors of float arithmetic in a score, free of ``s``, are computed in
    float64 as mask code is (attncc.analysis.exact). In float32 ``i * 0.1 > j * 0.3`` was false
    at i = 3j (Python: 0.30000000000000004 > 0.3) and ``(i - j) * a // 1.3`` was 7.0 at i - j = 13
    (Python: 6.0): a whole branch, or a whole unit of score, off for those pairs. Seeded random
    conditions and floors besides, on zero scores (every weight decided by the steps alone)."""
    rng, n = random.Random(34), 40
    mods = {"float_step_where": "where(i * 0.1 > j * 0.3, s, s - 5)",
            "float_step_floor": "s + (i - j) * 0.7 // 1.3"}
    for k in range(4):
        mods[f"float_step_random_{k}"] = (f"where({_random_mask(rng, n)}, s, s - 3) "
                                          f"+ 0.5 * ({_expr(rng, 2, ops='+-*/F')} // 1.1)")
    texts = {name: f'head_dim = 16\ndtypes = ["float32"]\n{PARAM_TOML}[score]\nmod = "{mod}"\n'
             for name, mod in mods.items()}
    gen = torch.Generator().manual_seed(6)
    for name, (p, mod) in build_inline(texts, tmp_path).items():
        zero, v = torch.zeros(1, 1, n, 16), torch.eye(n).view(1, 1, n, n)
        want = attncc.reference(p, zero.double(), zero.double(), v.double())
        assert rel_err(mod.attention(zero, zero, v), want) < 1e-6, (mods[name], "zero scores")
        q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for _ in range(3))
        ref = attncc.reference(p, q.double(), k.double(), v.double(), q_offset=3)
        assert rel_err(mod.attention(q, k, v, q_offset=3), ref) < 1e-4, mods[name]
