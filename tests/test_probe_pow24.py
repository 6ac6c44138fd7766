"""Probe 24: powers whose base or exponent is an expression of int params (``3 ** (w - 4)``).

Session 23 made ``c ** w`` of ints exact in the kernels' float64 mask code (``_ipow64``) and in the
closed forms' loop bounds (an int64), for a bare param as exponent. The parser keeps the operands of
float arithmetic opaque (``ToFloat``), so the exponent of ``3 ** (w - 4)`` is ``ToFloat(w - 4)``,
which sympy does not call an integer: the mask code took exp2 of a log again (``i % 3 ** (w - 7) ==
j % 3 ** (w - 7)`` at w = 9: o off by 4.5, silently) and a bound ``i <= 4 ** (w - 4)`` did not run
(float32 loop bound: "unexpected type fp32"). Both fixed (codegen.printer._whole).

Seeded: bases and exponents drawn from param expressions (``c``, ``c + 1``, ``2 * c - 1``, ``w``,
``w - 3``, ``2 * w - 5``, ``w - c``), in residue classes, quotients and row / column / band bounds;
params overridden per call (exponents from -2 to 5). Each case: the reference's mask against Python
evaluating the same text (tests/probe_spec23.py's oracle: torch.pow for a power that is not an int
to a literal), and the kernels (interpreter) against the reference.
"""
from __future__ import annotations

import random

import pytest
import torch

import attncc
from attncc._reference import pair_mask
from fuzz_specs import build_spec
import probe_spec23 as P

BASES = ("c", "(c + 1)", "(2 * c - 1)", "3", "(c - 1)")
EXPONENTS = ("w", "(w - 3)", "(w + 1)", "(2 * w - 5)", "(w - c)", "(w - 1)")
FORMS = ("i % {p} == j % {p}", "(i - j) // {p} == 1 or j == i", "i <= {p} and j <= i", "j <= {p} or j == i",
         "j <= i and i - j <= {p}", "i // {p} == j // {p}")
N = 41


def draw(seed: int):
    rng = random.Random(seed)
    power = f"{rng.choice(BASES)} ** {rng.choice(EXPONENTS)}"
    mask = rng.choice(FORMS).format(p=power)
    calls = [{"c": rng.choice((2, 3, 4, 5)), "w": rng.choice((1, 2, 3, 4, 5, 6))} for _ in range(3)]
    return mask, calls


def _usable(mask, call) -> bool:
    """Python's answer is a mask (no division by zero, no complex power) at this call's params."""
    try:
        P.oracle_grid(P.oracle_code(mask), {k: P.C64(v) for k, v in call.items()}, [0, 7], [0, 5], False)
    except (ZeroDivisionError, P.Skip, TypeError, OverflowError, ValueError):
        return False
    return True


@pytest.mark.parametrize("seed", range(14))
def test_power_of_param_expressions(seed):
    mask, calls = draw(seed)
    text = f'head_dim = 16\ndtypes = ["float32"]\n[params]\nc = 3\nw = 4\n[mask]\nwhere = "{mask}"\n'
    built = build_spec(text)
    if isinstance(built, Exception):
        raise built
    pattern, module = built
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 1, N, 16, generator=gen) for _ in range(3))
    checked = 0
    for call in calls:
        if not _usable(mask, call):
            continue
        python = P.oracle_grid(P.oracle_code(mask), {k_: P.C64(v_) for k_, v_ in call.items()}, list(range(N)),
                               list(range(N)), False)
        assert torch.equal(pair_mask(pattern, q_rows=N, k_rows=N, params=call)[0, 0], python), (mask, call)
        o = module.attention(q, k, v, **call)
        ref = attncc.reference(pattern, q.double(), k.double(), v.double(), **call)
        assert float((o.double() - ref).abs().max()) < 1e-5, (mask, call)
        checked += 1
    assert checked, f"no call of seed {seed} was usable: {mask} {calls}"


@pytest.mark.parametrize("mask, call", [("i % 3 ** (w - 7) == j % 3 ** (w - 7)", {"w": 9}),
                                        ("i <= 4 ** (w - 4) and j <= i", {"w": 6})])
def test_the_cases_found(mask, call):
    """The two findings as found: a residue class by 3 ** 2 written ``3 ** (w - 7)`` (o off by 4.5),
    a row bound ``4 ** (w - 4)`` (did not run)."""
    text = f'head_dim = 16\ndtypes = ["float32"]\n[params]\nw = 1\n[mask]\nwhere = "{mask}"\n'
    pattern, module = build_spec(text)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 70, 16, generator=gen) for _ in range(3))
    o = module.attention(q, k, v, **call)
    ref = attncc.reference(pattern, q.double(), k.double(), v.double(), **call)
    assert float((o.double() - ref).abs().max()) < 1e-5


def test_host_printer_takes_the_same_powers():
    """The host's printer (preconditions, monotone checks: Python) had the kernels' twin of the check:
    ``3 ** ToFloat(w - 4)`` printed as ``tl.exp2(...)``, Triton code in host Python. It prints
    Python's power now, which for a whole result is torch.pow's value."""
    import math

    import sympy

    from attncc.codegen.printer import PythonPrinter
    from attncc.spec.builtins import ToFloat

    w = sympy.Symbol("w", integer=True)
    for base, offset in ((3, 4), (4, 4), (7, 9), (10, 1)):
        e = sympy.floor(sympy.Pow(base, ToFloat(w - offset), evaluate=False))
        code = PythonPrinter({w: "w"})(e)
        assert "tl." not in code, code
        for value in range(offset - 2, offset + 6):
            got = eval(code, {"math": math, "w": value})  # noqa: S307 - our own printer's text
            assert got == math.floor(torch.pow(torch.tensor(float(base), dtype=torch.float64),
                                               float(value - offset)).item()), (code, value)
