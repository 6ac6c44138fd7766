"""Probe 16 (expression arithmetic and the score path): each test is a case that was wrong."""
from __future__ import annotations

import contextlib
import math
import io
import json

import pytest
import torch

import attncc
from attncc.analysis import analyze
from attncc.spec import parse_spec


def _grads(o, r, tensors):
    g = torch.randn_like(o)
    got = torch.autograd.grad(o, tensors, g)
    want = torch.autograd.grad(r, tensors, g.double())
    return [(a.double() - b).abs().max().item() for a, b in zip(got, want)]


@pytest.mark.parametrize("mask", ["j * 0.5 >= i - 33", "2 * j <= i + 0.5", "j <= i * 1.0",
                                  "abs(2 * i - 3 * j) <= 23 and j * 0.5 >= i - 33"])
def test_float_literal_in_a_le_mask_atom_takes_no_float_band(mask):
    """An atom ``a <= b`` with a float literal was solved into a closed-form band with a float
    bound (floor(0.5*x) + 33, printed as tl.floor of a float32 product): the walk's loop bounds
    were floats, and the kernel failed (InterpreterError TypeError('unexpected type fp32')) and
    ``attncc explain`` raised Unsupported: not integer arithmetic. Only ``<`` checked that its sides
    are integers. Found by a probe's random masks."""
    text = f'[mask]\nwhere = "{mask}"\n'
    pattern = parse_spec(text)
    plan = analyze(pattern)
    for walk in (plan.forward, plan.transposed):
        assert walk.kind.value != "bands" or not walk.cover.band or "0.5" not in str(walk.cover.band)
    m = attncc.compile(text)
    torch.manual_seed(0)
    q = torch.randn(1, 1, 70, 16, requires_grad=True)
    k = torch.randn(1, 1, 50, 16, requires_grad=True)
    v = torch.randn(1, 1, 50, 16, requires_grad=True)
    o = m.attention(q, k, v, q_offset=20)
    r = attncc.reference(pattern, q.double(), k.double(), v.double(), q_offset=20)
    assert (o - r).abs().max().item() < 1e-5
    assert max(_grads(o, r, (q, k, v))) < 1e-4
    from attncc.explain import main_explain

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main_explain([_spec_file(text), "--n", "70", "--nk", "50", "--block", "16x32", "--json"]) == 0
    assert json.loads(out.getvalue())["walks"]["dkdv"]["visited"] > 0


def _spec_file(text):
    import tempfile

    f = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    f.write('name = "probe16_float_band"\n' + text)
    f.close()
    return f.name


@pytest.mark.parametrize("mask, param, value, divisor", [
    ("i // w == j // w or j * f > i", "w", 0, "i // w"),      # every-pair counts: a traceback from pair_mask
    ("i // (w - 3) == j", "w", 3, "i // (w - 3)"),            # closed form: ZeroDivisionError in intexpr
])
def test_explain_of_a_zero_divisor_is_the_calls_error(mask, param, value, divisor, capsys):
    """``attncc explain --param w=0`` of a mask dividing by ``w`` ended in a traceback (ValueError
    from the reference's pair_mask after pair_counts' Unsupported, or a bare ZeroDivisionError
    from the closed form's integer program) where a call raises a ValueError naming the divisor:
    now explain_data raises that error and the command prints it (status 2). Found by a probe."""
    from attncc.explain import main_explain
    from attncc.report import explain_data

    path = _spec_file(f'[params]\nw = 5\nf = 0.5\n[mask]\nwhere = "{mask}"\n')
    assert main_explain([path, "--n", "100", "--param", f"{param}={value}", "--json"]) == 2
    err = capsys.readouterr().err
    assert f"division by zero: the divisor of {divisor} is 0 with w = {value}" in err, err
    with pytest.raises(ValueError, match="division by zero"):
        explain_data(analyze(parse_spec(f'[params]\nw = {value}\nf = 0.5\n[mask]\nwhere = "{mask}"\n')), n_q=64, n_k=64)
    assert main_explain([path, "--n", "100", "--param", f"{param}={value + 1}", "--json"]) == 0


@pytest.mark.parametrize("bias, offset", [("exp((j - i) / 10)", 900), ("0.9 ** (i - j)", 5000), ("2 ** (j - i)", 200),
                                          ("exp(0.1 * (j - i))", 2**40), ("3 * exp(0.1 * (j - i) + 2) * (i + 1) * 1e-4", 2000)])
def test_a_power_of_the_distance_is_not_split_into_powers_of_positions(bias, offset):
    """The bias's terms were found with sympy.expand, whose power_exp hint splits exp(a + b) and
    x ** (a + b): exp((j - i) / 10) became exp(-i/10) * exp(j/10) (a row factor times a key factor)
    and RetNet's decay 0.9 ** (i - j) became 0.9**i / 0.9**j, each factor overflowing or
    underflowing float32 a few hundred positions in: o NaN at q_offset 900 (exp), 5000 (0.9 **),
    200 (2 **), with the reference finite. Found by a probe (biases of the distance far along)."""
    text = f'[score]\nbias = "{bias}"\n'
    m = attncc.compile(text)
    pattern = parse_spec(text)
    torch.manual_seed(0)
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    k = torch.randn(1, 2, 12, 16, requires_grad=True)
    v = torch.randn(1, 2, 12, 16, requires_grad=True)
    kw = dict(q_offset=offset, k_offset=offset - 10)
    o = m.attention(q, k, v, **kw)
    r = attncc.reference(pattern, q.double(), k.double(), v.double(), **kw)
    assert torch.isfinite(o).all()
    assert (o - r).abs().max().item() < 1e-5
    assert max(_grads(o, r, (q, k, v))) < 1e-4


@pytest.mark.parametrize("c", ["1e17", "1e30"])
def test_reference_weights_sum_to_one_at_huge_scores(c):
    """attncc.reference took p = exp(s - lse): with a bias so large that the LSE rounds log(n) away
    (1e17 + log(6) is 1e17 in float64) every weight was 1 and o the *sum* of the values (6x their
    mean), where the docs say the reference sees equal scores (the mean, as FlexAttention's
    softmax and the kernels, which drop a constant bias). Now torch's softmax. Found by a probe
    (huge integer biases)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 16, dtype=torch.float64) for n in (3, 6, 6))
    o = attncc.reference(parse_spec(f'[score]\nbias = "{c}"\n'), q, k, v)
    assert torch.allclose(o[0, 0], v[0, 0].mean(0).expand(3, 16), atol=1e-12)
    q.requires_grad_(True)
    o, lse = attncc.reference(parse_spec('[mask]\nwhere = "j <= i - 1"\n'), q, k, v, return_lse=True)
    (o.sum() + lse[torch.isfinite(lse)].sum()).backward()  # a row without keys: o = 0, lse = -inf, no NaN
    assert (o[0, 0, 0] == 0).all() and lse[0, 0, 0] == -math.inf and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("mod, same_as", [
    ("min(s, where(j <= i, inf, -inf))", "where(j <= i, s, -inf)"),   # was the where itself: +inf scores, NaN rows
    ("max(s, where(j <= i, -inf, inf))", "where(j <= i, s, inf)"),    # was s: plain attention
    ("min(s, 2 * where(j <= i, inf, -inf) + 1)", "where(j <= i, s, -inf)"),
    ("tanh(tanh(where(s > 0, inf, -inf))) + s", "where(s > 0, s + tanh(1), s - tanh(1))"),  # was s + 0
])
def test_min_max_and_functions_of_a_where_of_infinities(mod, same_as):
    """sympy misjudges a Piecewise whose every branch is infinite (``s - where(c, inf, -inf)``
    "is nonnegative", ``tanh`` of it "is zero"), so the parser's min / max / functions of one
    evaluated to the wrong branch: ``min(s, where(j <= i, inf, -inf))`` became the where itself (the
    kernels and the reference alike: every allowed score +inf, o NaN) where Python gives the causal
    mask. Now such a where is folded out of the call first. Found by a probe comparing parsed
    expressions with Python's evaluation of their text."""
    got, want = (parse_spec(f'[score]\nmod = "{m}"\n') for m in (mod, same_as))
    m = attncc.compile(f'[score]\nmod = "{mod}"\n')
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 9, 16) for _ in range(3))
    o = m.attention(q, k, v)
    r = attncc.reference(want, q.double(), k.double(), v.double())
    assert torch.equal(o.isnan(), r.isnan()) and torch.equal(attncc.reference(got, q, k, v).isnan(), r.isnan())
    assert (o - r).nan_to_num(0).abs().max().item() < 1e-5
    assert (attncc.reference(got, q.double(), k.double(), v.double()) - r).nan_to_num(0).abs().max().item() < 1e-12


@pytest.mark.parametrize("mod, value", [("s + (0 == 0)", 1.0), ("s + (0 != 0)", 0.0), ("s + ((0 == 0) - (0 != 0)) * 0.5", 0.5),
                                        ("s + where(0 == 0, 1.5, 0)", 1.5), ("s + where(0 != 0, 1.5, -2)", -2.0),
                                        ("s + (1.5 == 1.5) * 2", 2.0), ("s + (not (2 == 2)) * 3", 0.0)])
def test_a_comparison_of_two_numbers_counts_as_python_says(mod, value):
    """``==`` / ``!=`` were built unevaluated (Eq(0, 0)), and sympy's Piecewise takes an
    unevaluated Eq of two numbers as false: ``(0 == 0)`` as a number was 0, ``(0 != 0)`` was 1,
    ``where(0 == 0, 1.5, 0)`` was 0 (the kernels and the reference alike). Found by a probe comparing
    parsed expressions with Python's evaluation of their text."""
    from attncc._reference import evaluate

    pattern = parse_spec(f'[score]\nmod = "{mod}"\n')
    env = {"s": torch.tensor(0.25, dtype=torch.float64), "i": torch.tensor(3), "j": torch.tensor(1), "b": torch.tensor(0),
           "h": torch.tensor(0), "n_q": 8, "n_k": 8, "n_heads": 1}
    got = float(evaluate(pattern.mod, env)) if pattern.mod is not None else 0.25
    assert got == 0.25 + value
