"""Kinks of max and min at a tie pass the gradient as torch.maximum / torch.minimum do: half to each
side; k tied arguments of a 3+ argument min / max get 1/k each, as torch.amax (and the reference). Both sides got
0 there, so a table initialised to zeros never trained (found by a probe); float inputs are real
numbers to sympy (abs(exp(x[h])) was exp(re(x[h])), which no printer renders); a host condition
with a max or min renders (PythonPrinter)."""
from __future__ import annotations

import pytest
import torch

import attncc
from cases import rel_err

TIES = {
    "zero tables": ('x = { dims = ["h"], dtype = "float32", grad = true }\ny = { dims = ["h"], dtype = "float32", grad = true }',
                    'bias = "max(x[h], y[h]) * (j - i) * 0.1"', {"x": [0.0, 0.0], "y": [0.0, 0.0]}),
    "min of tables": ('x = { dims = ["h"], dtype = "float32", grad = true }\ny = { dims = ["h"], dtype = "float32", grad = true }',
                      'bias = "min(x[h], y[h]) * (i - j) * 0.2"', {"x": [0.5, -1.0], "y": [0.5, 2.0]}),
    "score and scaled score": ('t = { dims = ["h"], dtype = "float32", grad = true }', 'mod = "max(s, s * t[h])"',
                               {"t": [1.0, 0.5]}),
    "three ways": ('t = { dims = ["h"], dtype = "float32", grad = true }\nu = { dims = ["h"], dtype = "float32", grad = true }',
                   'mod = "max(s, s * t[h], s * u[h])"', {"t": [1.0, 0.5], "u": [1.0, 2.0]}),
    "three ways, min": ('t = { dims = ["h"], dtype = "float32", grad = true }\nu = { dims = ["h"], dtype = "float32", grad = true }',
                        'mod = "min(s * u[h], s, s * t[h])"', {"t": [1.0, 1.0], "u": [1.0, 3.0]}),
    "masked min": ("", 'mod = "min(where(j <= i, s, -inf), s)"', {}),
    "min with a constant": ("", 'mod = "min(where(j <= i, s, 5.0), s)"', {}),
    "three ways, in an index": ('rel = { dims = ["h", 16], dtype = "float32", grad = true }',
                                'bias = "rel[h, min(i, j, 3)] + 0.5 * rel[h, 15]"', {"rel": [[0.1 * n for n in range(16)]] * 2}),
    "abs of exp": ('x = { dims = ["h"], dtype = "float32", grad = true }', 'mod = "s * abs(exp(x[h]))"', {"x": [0.3, -0.2]}),
}


@pytest.mark.parametrize("name", sorted(TIES))
def test_ties_pass_half_the_gradient_to_each_side(name):
    inputs, score, values = TIES[name]
    text = (f"[inputs]\n{inputs}\n" if inputs else "") + f"[score]\n{score}\n"
    mod, p = attncc.compile(text), attncc.parse_spec(text)
    gen = torch.Generator().manual_seed(len(name))
    q, k, v = (torch.randn(1, 2, 19, 16, generator=gen).requires_grad_() for _ in range(3))
    tables = {n: torch.tensor(x, requires_grad=True) for n, x in values.items()}
    do = torch.randn(1, 2, 19, 16, generator=gen)
    o = mod.attention(q, k, v, **tables)
    grads = torch.autograd.grad(o, (q, k, v, *tables.values()), do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, *tables.values())]
    ref = attncc.reference(p, *leaves[:3], **dict(zip(tables, leaves[3:])))
    want = torch.autograd.grad(ref, leaves, do.double())
    assert rel_err(o.detach(), ref.detach()) < 1e-5
    for label, got, w in zip(["q", "k", "v", *tables], grads, want):
        assert w.abs().max() > 0 or got.abs().max() == 0, label
        assert rel_err(got, w) < 1e-4, (label, got, w)


def test_a_host_condition_with_max_renders():
    text = '[mask]\nwhere = "i // 16 >= j // 8 and i < 3 * j and i > 40"\n'
    mod, p = attncc.compile(text), attncc.parse_spec(text)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 90, 16, generator=gen) for _ in range(3))
    assert rel_err(mod.attention(q, k, v), attncc.reference(p, q.double(), k.double(), v.double())) < 1e-5


def test_three_way_ties_share_the_gradient_evenly_whatever_the_written_order():
    """k tied arguments of a max get 1/k each (torch.amax), in any written order (a probe found the
    split following sympy's sorted arguments); the table's total gradient is that of one argument."""
    grads = []
    for order in ("y[h], x[h], 0.0", "0.0, x[h], y[h]", "x[h], 0.0, y[h]"):
        text = ('[inputs]\nx = { dims = ["h"], dtype = "float32", grad = true }\n'
                'y = { dims = ["h"], dtype = "float32", grad = true }\n'
                f'[score]\nbias = "max({order}) * (j - i) * 0.1"\n')
        mod = attncc.compile(text)
        gen = torch.Generator().manual_seed(7)
        q, k, v = (torch.randn(1, 1, 9, 16, generator=gen) for _ in range(3))
        x, y = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
        mod.attention(q, k, v, x=x, y=y).sum().backward()
        grads.append((float(x.grad), float(y.grad)))
        # one table alone in the max with the tie: all of the gradient
        lone = attncc.compile('[inputs]\nx = { dims = ["h"], dtype = "float32", grad = true }\n'
                              '[score]\nbias = "x[h] * (j - i) * 0.1"\n')
        xl = torch.zeros(1, requires_grad=True)
        lone.attention(q, k, v, x=xl).sum().backward()
        assert abs(3 * grads[-1][0] - float(xl.grad)) < 1e-5 * max(1.0, abs(float(xl.grad)))
    assert all(abs(a - grads[0][0]) < 1e-6 and abs(b - grads[0][0]) < 1e-6 for a, b in grads), grads
