"""``attncc.evaluator``: the one evaluator of the Pattern IR gives the same bits on its two array
backends (torch for the reference, numpy for explain's pair counts), for every operation on values
at the edges (negative operands, signed zeros, infinities, NaN, int64 wrap-around) and for seeded
random masks, biases and mods; ``//`` and ``%`` are Python's for ints and floats; numpy refuses
exactly what it may round otherwise."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import sympy
import torch

import fuzz_specs
from attncc._reference import index_env
from attncc.evaluator import NUMPY, Evaluator, NotExact, TorchArrays
from attncc.spec import SpecError, parse_spec
from attncc.spec.builtins import BitAnd, BitOr, BitXor, Shift

TORCH = TorchArrays(torch.device("cpu"))
INTS = [-(2**62), -1000, -65, -64, -7, -3, -2, -1, 0, 1, 2, 3, 7, 63, 64, 65, 1000, 2**62 + 5]
FLOATS = [-math.inf, -1e300, -7.5, -2.5, -1.0, -0.7, -0.1, -0.0, 0.0, 5e-324, 0.1, 0.3, 1.0, 2.5, 7.5, 1e300,
          math.inf, math.nan]
M, N = sympy.symbols("m n", integer=True)  # int operands (i and j would be positions: never negative)
X, Y = sympy.symbols("x y", real=True)  # float operands
N_EXPRESSIONS = 200


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """The same dtype, shape and bits (any NaN equal to any NaN)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind != "f":
        return bool(np.array_equal(a, b))
    nan = np.isnan(a) & np.isnan(b)
    return bool(np.all(nan | (a.view(np.int64) == b.view(np.int64))))


def _both(expr, env):
    """``expr`` on numpy and on torch: (numpy result or its exception, torch result or its exception)."""
    out = []
    def to_numpy(v):  # numpy has no bfloat16 (float32 holds its values exactly)
        return (v.float() if v.dtype == torch.bfloat16 else v).numpy()

    for arrays, convert in ((NUMPY, to_numpy), (TORCH, lambda v: v)):
        try:
            with np.errstate(all="ignore"):
                r = Evaluator(arrays, {k: convert(v) if isinstance(v, torch.Tensor) else v for k, v in env.items()})(expr)
            out.append(np.asarray(r.numpy() if isinstance(r, torch.Tensor) else r))
        except Exception as e:  # noqa: BLE001 - compared below
            out.append(e)
    return out


def _grid(values, dtype):
    """(row operands [n, 1], column operands [1, n]) of every pair of ``values``, as tensors."""
    t = torch.tensor(values, dtype=dtype)
    return t[:, None], t[None, :]


OPERATIONS = [  # (expression of a, c, kinds it takes)
    (lambda a, c: a + c, "int float"), (lambda a, c: a - c, "int float"), (lambda a, c: a * c, "int float"),
    (lambda a, c: a / c, "int float"), (lambda a, c: sympy.floor(a / c), "int float"),
    (lambda a, c: sympy.ceiling(a / c), "int float"), (lambda a, c: sympy.Mod(a, c), "int float"),
    (lambda a, c: sympy.Min(a, c), "int float"), (lambda a, c: sympy.Max(a, c), "int float"),
    (lambda a, c: sympy.Abs(a) + 0 * c, "int float"), (lambda a, c: a**2 + c**3, "int float"),
    (lambda a, c: sympy.sqrt(a) + c ** sympy.Rational(-1, 2), "float"), (lambda a, c: a < c, "int float"),
    (lambda a, c: sympy.Eq(a, c), "int float"), (lambda a, c: sympy.Piecewise((a, a < c), (c, True)), "int float"),
    (lambda a, c: BitAnd(a, c), "int"), (lambda a, c: BitOr(a, c), "int"), (lambda a, c: BitXor(a, c), "int"),
    (lambda a, c: Shift(a, c), "int"), (lambda a, c: Shift(c, -a), "int"),
]


@pytest.mark.parametrize("kind", ["int", "float"])
@pytest.mark.parametrize("n", range(len(OPERATIONS)))
def test_backends_give_the_same_bits_for_every_operation(n, kind):
    make, kinds = OPERATIONS[n]
    if kind not in kinds:
        pytest.skip(f"no {kind} operands")
    a, c = (M, N) if kind == "int" else (X, Y)
    expr = make(a, c)
    values = INTS if kind == "int" else FLOATS
    rows, cols = _grid(values, torch.int64 if kind == "int" else torch.float64)
    if isinstance(expr, (sympy.floor, sympy.ceiling, sympy.Mod)) and kind == "int":
        cols = cols[cols != 0][None, :]  # an integer division by 0 raises (below)
    if isinstance(expr, Shift):
        cols = torch.arange(-70, 71)[None, :]  # amounts past the clamp too
    for env in ({a.name: rows, c.name: cols}, {a.name: rows[3, 0], c.name: cols[0, -2]}):  # arrays, and 0-d
        got_np, got_torch = _both(expr, env)
        assert not isinstance(got_np, Exception) and not isinstance(got_torch, Exception), (expr, got_np, got_torch)
        assert _same(got_np, got_torch), f"{expr}: {np.argwhere(got_np != got_torch)[:4].tolist()}"


@pytest.mark.parametrize("kind", ["int", "float"])
def test_floor_division_and_modulo_are_pythons(kind):
    """``//`` and ``%`` of ints and of floats (signed zeros, infinities, NaN included) give
    Python's values, on both backends."""
    a, c = (M, N) if kind == "int" else (X, Y)
    values = INTS if kind == "int" else FLOATS
    divisors = [v for v in values if v != 0]  # Python raises on 0
    rows, cols = _grid(values, torch.int64 if kind == "int" else torch.float64)
    cols = torch.tensor(divisors, dtype=rows.dtype)[None, :]
    env = {a.name: rows, c.name: cols}
    for expr, py in ((sympy.floor(a / c), lambda x, y: x // y), (sympy.Mod(a, c), lambda x, y: x % y),
                     (sympy.ceiling(a / c), lambda x, y: -(-x // y))):
        want = np.array([[py(x, y) for y in divisors] for x in values])
        if kind == "int":
            fits = (want >= -(2**63)) & (want < 2**63)
            want = np.where(fits, want, 0).astype(np.int64)
        for got in _both(expr, env):
            if kind == "int":
                got = np.where(fits, got, 0)
            assert _same(got, want), f"{expr}: {np.argwhere(got != want)[:4].tolist()}"


def test_an_integer_division_by_zero_is_the_references_error_on_both():
    from attncc.spec import symbols as S

    env = {"i": torch.arange(5)[:, None], "j": torch.arange(-2, 3)[None, :], "w": 0}
    w = sympy.Symbol("w", integer=True)
    for expr, error in ((sympy.floor(S.i / S.j), ZeroDivisionError), (sympy.Mod(S.i, S.j), ZeroDivisionError),
                        (sympy.floor(S.i / w), ValueError), (sympy.Mod(S.j, w), ValueError)):
        got_np, got_torch = _both(expr, env)
        assert type(got_np) is type(got_torch) is error, (expr, got_np, got_torch)
        assert str(got_np) == str(got_torch)


def test_numpy_refuses_what_it_may_round_otherwise():
    env = {"x": torch.linspace(-3, 3, 13, dtype=torch.float64)}
    for expr in (sympy.exp(X), sympy.sin(X), sympy.tanh(X), sympy.erf(X), X**1.5, 2**X):
        got_np, got_torch = _both(expr, env)
        assert isinstance(got_np, NotExact) and not isinstance(got_torch, Exception), (expr, got_np)


def _random_expressions(rng: random.Random, count: int):
    """(name, expression, pattern, call plan) of the masks, biases and mods of the fuzzer's specs."""
    out = []
    while len(out) < count:
        text, draft = fuzz_specs.random_spec(rng)
        try:
            pattern = parse_spec(text)
        except SpecError:
            continue
        plan = fuzz_specs.random_call(rng, draft, backward=False)
        if plan.decode is not None:
            continue
        for name in ("mask", "bias", "mod"):
            if getattr(pattern, name) is not None:
                out.append((name, getattr(pattern, name), pattern, draft, plan))
    return out


def test_backends_give_the_same_bits_for_random_masks_biases_and_mods():
    """The fuzzer's expressions (every built-in, inputs, params, float arithmetic as written) on
    the pairs of a random call: numpy's bits are torch's, or numpy refuses (NotExact) an
    expression that holds what it may round otherwise, or both raise the same error."""
    rng = random.Random(808)
    compared = refused = 0
    for n, (name, expr, pattern, draft, plan) in enumerate(_random_expressions(rng, N_EXPRESSIONS)):
        args = fuzz_specs.call_arguments(draft, plan)
        env = index_env(pattern, batch=plan.B, heads=plan.Hq, q_rows=plan.Nq, k_rows=plan.Nk,
                        inputs={k: v.detach().contiguous() for k, v in args.inputs.items()},
                        params=args.params, **args.positions)
        if name == "mod":
            g = torch.Generator().manual_seed(n)
            env["s"] = torch.randn(plan.B, plan.Hq, plan.Nq, plan.Nk, generator=g, dtype=torch.float64) * 4
        got_np, got_torch = _both(expr, env)
        case = f"#{n} {name} {expr}"
        if isinstance(got_np, NotExact):
            refused += 1
            assert not isinstance(got_torch, Exception), f"{case}: {got_torch!r}"
        elif isinstance(got_np, Exception) or isinstance(got_torch, Exception):
            assert type(got_np) is type(got_torch) and str(got_np) == str(got_torch), f"{case}: {got_np!r} {got_torch!r}"
        else:
            compared += 1
            assert _same(got_np, got_torch), f"{case}: {np.argwhere(got_np != got_torch)[:4].tolist()}"
    assert compared >= N_EXPRESSIONS // 2 and refused >= 1, (compared, refused)


def test_the_reference_keeps_the_gradient_of_sqrt_and_float_remainder():
    """torch's sqrt and float % are not the language's to the last bit (numpy's are), so the
    reference takes numpy's values, unless a gradient flows (a score of an input with
    ``grad = true``): then torch's ops, which differentiate."""
    x = torch.tensor([0.3, 2.0, 51.0, 7.9], dtype=torch.float64, requires_grad=True)
    expr = sympy.sqrt(X) + sympy.Mod(X, sympy.Float(0.7))
    y = Evaluator(TORCH, {"x": x})(expr)
    y.sum().backward()
    assert torch.allclose(x.grad, 0.5 / x.detach().sqrt() + 1, rtol=1e-12)
    exact = Evaluator(TORCH, {"x": x.detach()})(expr)
    assert _same(exact.numpy(), np.sqrt(x.detach().numpy()) + np.remainder(x.detach().numpy(), 0.7))
    assert float(Evaluator(TORCH, {"x": torch.tensor(51.0, dtype=torch.float64)})(sympy.sqrt(X))) == math.sqrt(51)


def test_random_blocks_at_every_position_are_its_sympy_values():
    """Query blocks before 0 have their own seeded sets (the old reference read another row's,
    through a negative index), key blocks outside [0, ceil(n_k / block)) are in none."""
    from attncc.spec import symbols as S
    from attncc.spec.builtins import RandomBlocks

    expr = RandomBlocks(S.i - 40, S.j - 24, S.n_k, 2, 8, 3)
    env = {"i": torch.arange(80)[:, None], "j": torch.arange(80)[None, :], "n_k": 40}
    want = np.array([[bool(expr.subs({S.i: a, S.j: c, S.n_k: 40})) for c in range(80)] for a in range(80)])
    for got in _both(expr, env):
        assert _same(got, want)
