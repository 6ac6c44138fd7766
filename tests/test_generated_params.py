"""Kernels take only the parameters they read (attncc.codegen.params), in every shipped module and in
modules of random specs: no @triton.jit function of a generated module has a parameter its body
never reads, and none reads a name nothing defines."""
from __future__ import annotations

import ast
import random
import textwrap

import pytest

from attncc.codegen import render
from attncc.codegen.params import Signatures, jit_functions, kernel_reads, param_names, undefined_names
from attncc.spec import load_spec
from cases import ROOT, SPEC_FILES, SPEC_NAMES
from fuzz_specs import random_spec

RANDOM_SEEDS = range(20)

# Specs that reach the kernels' optional parts the shipped ones and the fuzzer's draws may not:
# dropout with an input bias, a 0-d input, a float param, a softcap with rope and decode.
EXTRA_SPECS = {
    "x_dropout_bias": """
[params]
w = 5
[inputs]
slope = { dims = ["h"], dtype = "float32" }
[mask]
where = "j <= i"
[score]
bias = "slope[h] * (j - i)"
dropout = 0.1
""",
    "x_scalar_input": """
[inputs]
t = { dims = [], dtype = "float32", grad = true }
[score]
bias = "t * (i - j)"
""",
    "x_float_param": """
[params]
r = 2.5
[mask]
where = "abs(i - j) <= r * 3"
[score]
softcap = 30.0
[rope]
theta = 10000.0
""",
}


# Every linear feature map, causal or not, normalized or not (rendering is cheap: no analysis).
LINEAR_SPECS = {f"x_linear_{fmap.replace('+', '')}_{int(causal)}{int(normalize)}": (
    f"kind = 'linear'\n{'head_dim = 16' if fmap == 'taylor' else ''}\n[feature_map]\nname = '{fmap}'\n"
    f"causal = {str(causal).lower()}\nnormalize = {str(normalize).lower()}\n") + ("features = 24\n" if fmap == "performer" else "")
    for fmap in ("elu+1", "relu", "identity", "performer", "cosformer", "taylor")
    for causal in (True, False) for normalize in (True, False)}


def _module_problems(source: str):
    """(function, what is wrong) for every unread parameter and undefined name."""
    tree = ast.parse(source)
    reads = kernel_reads(source)
    problems = []
    for name, fn in jit_functions(tree).items():
        loaded = {n.id for stmt in fn.body for n in ast.walk(stmt) if isinstance(n, ast.Name)
                  and isinstance(n.ctx, ast.Load)}
        for p in param_names(fn):
            if p not in loaded:  # the plain test, independent of the analysis
                problems.append((name, f"parameter {p} is never loaded"))
            elif p not in reads[name]:
                problems.append((name, f"parameter {p} is read only by statements that are dead or that feed "
                                       f"parameters of callees that do not read them"))
    for name, names in undefined_names(source).items():
        problems.append((name, f"reads undefined {sorted(names)}"))
    return problems


@pytest.mark.parametrize("path", SPEC_FILES, ids=SPEC_NAMES)
def test_shipped_modules_read_every_parameter(path):
    source = (ROOT / "generated" / f"{load_spec(path).name}.py").read_text()
    assert not _module_problems(source)


def test_random_specs_read_every_parameter(tmp_path):
    texts = {f"r{seed}": random_spec(random.Random(seed))[0] for seed in RANDOM_SEEDS}
    texts.update(EXTRA_SPECS)
    texts.update(LINEAR_SPECS)
    for name, text in texts.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        problems = _module_problems(render(load_spec(path)))
        assert not problems, f"{name}:\n{text}\n{problems}"


# -- the analysis itself -----------------------------------------------------------------------

def _reads(source: str):
    return kernel_reads(textwrap.dedent(source))


def test_self_casts_and_dead_locals_do_not_read():
    reads = _reads("""
        @triton.jit
        def k(X, n_q, q_offset, WIDE: tl.constexpr):
            if WIDE:
                n_q = tl.cast(n_q, tl.int64)
            offs = q_offset + tl.arange(0, 16)
            tl.store(X, 1)
    """)["k"]
    assert "X" in reads and not {"n_q", "q_offset", "WIDE", "offs"} & reads


def test_arguments_count_only_for_parameters_the_callee_reads():
    reads = _reads("""
        @triton.jit
        def tile(acc, a, b, FLAG: tl.constexpr):
            if FLAG:
                acc = acc + a
            return acc

        @triton.jit
        def kernel(X, a, b, FLAG: tl.constexpr):
            acc = tile(0.0, a + 1, b * 2, FLAG=FLAG)
            tl.store(X, acc)
    """)
    assert reads["tile"] >= {"acc", "a", "FLAG"} and "b" not in reads["tile"]
    assert reads["kernel"] >= {"X", "a", "FLAG"} and "b" not in reads["kernel"]


def test_calls_that_store_are_kept():
    reads = _reads("""
        @triton.jit
        def put(P, x):
            tl.store(P, x)
            return x

        @triton.jit
        def kernel(P, x, y):
            unused = put(P, x)
            for t in range(0, y):
                pass
    """)["kernel"]
    assert {"P", "x"} <= reads and "y" not in reads


def test_undefined_names_are_found():
    assert undefined_names(textwrap.dedent("""
        import triton
        LIMIT = 3

        @triton.jit
        def k(X):
            tl.store(X, q_offset + LIMIT + len([]))
    """)) == {"k": frozenset({"tl", "q_offset"})}


# -- the template side ------------------------------------------------------------------------

def test_signature_call_and_launch_leave_out_the_same_parameters():
    sig = Signatures({"f": frozenset({"a", "C"})})
    assert sig.define("def f(a, b,\n      C: tl.constexpr, D: tl.constexpr):\n") == "def f(a,\n      C: tl.constexpr):\n"
    assert sig.call("    y = f(x + 1, g(b), D=4, C=3)  # why\n") == "    y = f(x + 1, C=3)  # why\n"
    assert sig.launch("f", [("a", "t"), ("b", "u"), ("C", "3"), ("D", "4")], "  ") == "  t,\n  C=3,"


def test_launch_refuses_what_would_bind_wrongly():
    sig = Signatures({"f": frozenset({"a", "b"})})
    sig.define("def f(a, b, c):")
    with pytest.raises(ValueError, match="pass them one by one"):
        sig.launch("f", [("a", "t"), ("b c", "*rest")], "")
    with pytest.raises(ValueError, match="signature"):
        sig.launch("f", [("b", "u"), ("a", "t"), ("c", "v")], "")
    with pytest.raises(ValueError, match="no parameter"):
        sig.launch("f", [("a", "t"), ("b", "u"), ("d", "v")], "")
