"""Names generated from spec identifiers never meet: not each other (inputs ``x`` and ``x_b``,
``x`` and ``x_ptr``), not the names the kernels give their own values (``qk``, ``acc``, ``m_i``,
``offs_j``, hoisted ``c0`` / ``mrow0``...). attncc/codegen/names.py holds the scheme."""
from __future__ import annotations

import glob
import re

import pytest
import torch

import attncc
from attncc.analysis import analyze
from attncc.codegen import names
from attncc.spec import parse_spec
from cases import ROOT, build_inline, rel_err


def test_classifier_leaves_of_different_reads_differ():
    """``x[b, i]`` and ``x_b[i]`` were both the leaf ``in_x_b_i``: one clause vanished from
    the tile classification."""
    p = parse_spec('[inputs]\nx = { dims = ["b", "n"], dtype = "int32" }\nx_b = { dims = ["n"], dtype = "int32" }\n'
                   '[mask]\nwhere = "x[b, i] > 0 and x_b[i] > 0"\n')
    program = analyze(p).classifier
    reads = {leaf[0]: leaf[2][0] for leaf in program.leaves if leaf[1] == "input"}
    assert len(reads) == 2 and {s.input for s in reads.values()} == {"x", "x_b"}


COLLIDING_LEAVES = """head_dim = 16
dtypes = ["float32"]
[inputs]
x = { dims = ["b", "n"], dtype = "int32" }
x_b = { dims = ["n"], dtype = "int32" }
[mask]
where = "x[b, i] > 0 and x_b[i] > 0 and j <= i + 3"
"""


def test_inputs_with_colliding_leaf_names_forward_backward(tmp_path):
    """The issue's case: x all ones, x_b zero on some rows; those rows must see no key (the
    merged leaf made their tiles FULL: error 1.1)."""
    p, mod = build_inline({"colliding_leaves": COLLIDING_LEAVES}, tmp_path)["colliding_leaves"]
    gen = torch.Generator().manual_seed(0)
    B, N = 2, 70
    x = torch.ones(B, N, dtype=torch.int32)
    x_b = (torch.rand(N, generator=gen) < 0.5).to(torch.int32)
    q, k, v = (torch.randn(B, h, N, 16, generator=gen).requires_grad_() for h in (2, 1, 1))
    o = mod.attention(q, k, v, x=x, x_b=x_b)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attncc.reference(p, *ref_in, x=x, x_b=x_b)
    assert rel_err(o.detach(), ref.detach()) < 1e-4
    g = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad((o * g).sum(), (q, k, v)),
                    torch.autograd.grad((ref * g.double()).sum(), ref_in)):
        assert rel_err(a, b) < 1e-3


# Params and inputs named after the kernels' own variables and after every pattern of
# generated names (attncc.codegen.names), so that any pasting of a suffix or prefix would meet.
ADVERSARIAL = """head_dim = 16
dtypes = ["float32"]
[params]
a = 2
prm_a = 3
qk = 1
acc = 0.5
m_i = 4
offs_j = 1
kb = 1
H = 2
Nq = 1
c0 = 1
mc0 = 0.25
mrow0 = 0
row0 = 1
lo0 = 0
rb0 = 1
dg0 = 0.5
[inputs]
x = { dims = ["b", "n"], dtype = "int32" }
x_b = { dims = ["n"], dtype = "int32" }
x_ptr = { dims = ["n"], dtype = "int32" }
x_stride0 = { dims = ["n"], dtype = "int32" }
in_x = { dims = ["n"], dtype = "int32" }
ptr_x = { dims = ["n"], dtype = "int32" }
stride0_x = { dims = ["n"], dtype = "int32" }
t_x = { dims = ["n"], dtype = "int32" }
w = { dims = ["h"], dtype = "float32", grad = true }
w_grad = { dims = ["h"], dtype = "float32", grad = true }
gptr_w = { dims = ["h"], dtype = "float32", grad = true }
[mask]
where = "x[b, i] > 0 and x_b[i] + x_ptr[j] >= 0 and x_stride0[j] + in_x[i] >= prm_a - a - 1 and ptr_x[i] + stride0_x[j] + t_x[i] >= 0 and j <= i + kb + lo0"
[score]
bias = "w[h] * acc * (j % 3) + w_grad[h] * qk * (i - j) * 0.01 + gptr_w[h] * mc0 * (j // 4 % 2) + dg0 * (m_i + offs_j + H + Nq + c0 + mrow0 + row0 + rb0) * 0.01"
"""


def test_adversarial_names_forward_backward_decode(tmp_path):
    p, mod = build_inline({"adversarial_names": ADVERSARIAL}, tmp_path)["adversarial_names"]
    gen = torch.Generator().manual_seed(3)
    B, N = 2, 45
    ints = {n: torch.randint(-1, 3, (N,), generator=gen, dtype=torch.int32)
            for n in ("x_b", "x_ptr", "x_stride0", "in_x", "ptr_x", "stride0_x", "t_x")}
    ints["x"] = torch.randint(0, 3, (B, N), generator=gen, dtype=torch.int32)
    tables = {n: torch.randn(2, generator=gen).requires_grad_() for n in ("w", "w_grad", "gptr_w")}
    q, k, v = (torch.randn(B, h, N, 16, generator=gen).requires_grad_() for h in (2, 1, 1))
    o = mod.attention(q, k, v, **ints, **tables, qk=2, acc=0.75)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, *tables.values())]
    ref = attncc.reference(p, *ref_in[:3], **ints, **dict(zip(tables, ref_in[3:])), qk=2, acc=0.75)
    assert rel_err(o.detach(), ref.detach()) < 1e-4
    g = torch.randn_like(o)
    grads = torch.autograd.grad((o * g).sum(), (q, k, v, *tables.values()))
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), ref_in)
    for n, (a, b) in enumerate(zip(grads, ref_grads)):
        assert rel_err(a, b) < 1e-3, (n, rel_err(a, b))
    last = mod.decode(q[:, :, -2:].detach(), k.detach(), v.detach(), kv_len=torch.full((B,), N, dtype=torch.int32),
                      **ints, **{n: t.detach() for n, t in tables.items()}, qk=2, acc=0.75)
    assert rel_err(last, ref[:, :, -2:].detach()) < 1e-4


def test_templates_and_generators_leave_the_generated_prefixes_to_spec_names():
    """No template or code generator names a value of its own like a spec-derived name
    (``prm_``, ``ptr_``, ``stride<d>_``, ``size<d>_``, ``gptr_``, ``gstride<d>_``, ``t_``):
    the prefixes make spec names unable to shadow a kernel local."""
    found = set()
    files = glob.glob(str(ROOT / "templates" / "*.j2")) + glob.glob(str(ROOT / "attncc" / "codegen" / "*.py"))
    for path in files:
        if path.endswith("names.py"):
            continue
        text = open(path).read()
        found |= {(path, m) for m in re.findall(r"\b[A-Za-z_][A-Za-z0-9_]*\b", text) 
                  if names.GENERATED.match(m) and not names.GENERATED.fullmatch(m)}  # "ptr_<name>" in prose is fine
    assert not found, sorted(found)


@pytest.mark.parametrize("pair", [("x", "x_b"), ("x_ptr", "x"), ("prm_a", "a"), ("stride0_x", "x")])
def test_naming_functions_are_injective(pair):
    made = lambda n: {names.param_var(n), *names.input_args(n, 3), *names.grad_args(n, 3), names.host_tensor(n)}  # noqa: E731
    a, b = pair
    assert not made(a) & made(b)
