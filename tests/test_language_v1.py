"""The language additions of contract v1: booleans as values, integer bitwise operators and
shifts, erf, reductions (sum / any / all over range(K), dot over a fixed axis) and 0-d inputs.

Each one against a hand-written Python formula (through attncc.reference's evaluator), the
interval classifier against brute force, and generated kernels (forward, LSE and gradients,
learned inputs included) against the float64 reference."""
from __future__ import annotations

import math
import random

import pytest
import torch

import attncc
from attncc._reference import evaluate, pair_mask
from attncc.analysis import analyze
from attncc.core import tiles
from attncc.spec import SpecError, parse_spec
from attncc.spec.builtins import shift
from cases import build_inline, rel_err, vjp_case
from test_analysis import _check_grid, _tile_truth
from test_tile_kernel import build  # noqa: F401 - the fixture

N = 48  # positions 0..47; expressions subtract constants to reach negative operands


def grid_values(text, *, params="", inputs="", values=None, env_extra=None):
    """``text`` as a mask or bias of a spec, evaluated by the reference on every (i, j) of an
    N x N grid (b = h = 0): an [N, N] tensor."""
    key = "[mask]\nwhere" if values == "bool" else "[score]\nbias"
    p = parse_spec(f"{params}\n{inputs}\n{key} = {text!r}".replace("'", '"'))
    expr = p.mask if values == "bool" else p.bias
    env = {"b": torch.zeros(1, 1, dtype=torch.long), "h": torch.zeros(1, 1, dtype=torch.long), "i": torch.arange(N).view(-1, 1),
           "j": torch.arange(N).view(1, -1), "n_q": N, "n_k": N, "n_heads": 1, **p.param_values, **(env_extra or {})}
    env = {k: (v.long() if isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dtype != torch.bool else v)
           for k, v in env.items()}
    return evaluate(expr, env).expand(N, N), p


def python_grid(fn, dtype=None):
    return torch.tensor([[fn(i, j) for j in range(N)] for i in range(N)], dtype=dtype)


NUMBERS = {
    "(i - 20) & (j - 7)": lambda i, j: (i - 20) & (j - 7),
    "(i - 20) | (j - 7)": lambda i, j: (i - 20) | (j - 7),
    "(i - 20) ^ (j - 7)": lambda i, j: (i - 20) ^ (j - 7),
    "~(i - 20) + ~j": lambda i, j: ~(i - 20) + ~j,
    "(i - 20) >> 2": lambda i, j: (i - 20) >> 2,
    "(i - 20) << 3": lambda i, j: (i - 20) << 3,
    "1 << 62 >> 60": lambda i, j: 1 << 62 >> 60,
    "(i - 20) >> (j % 5)": lambda i, j: (i - 20) >> (j % 5),
    "(i - 20) << (j % 7)": lambda i, j: (i - 20) << (j % 7),
    # a negative amount that is not a constant shifts the other way (Python raises; the language defines it)
    "(i - 20) << (j - 24)": lambda i, j: shift(i - 20, j - 24),
    "(i - 20) >> (j - 24)": lambda i, j: shift(i - 20, 24 - j),
    "(i < j) * 2 + (j > 3)": lambda i, j: (i < j) * 2 + (j > 3),
    "(i < j) - (j == 5) + ((i < j) < (j < 5))": lambda i, j: (i < j) - (j == 5) + ((i < j) < (j < 5)),
    "where(i < j, True, 7) + abs(-(j < 4))": lambda i, j: (True if i < j else 7) + abs(-(j < 4)),
    "((i & 1) | ((i >> 1) & 2) | ((i >> 2) & 4)) * 10 + (((i >> 1) & 1) | ((i >> 2) & 2) | ((i >> 3) & 4))":
        lambda i, j: sum(((i >> (2 * b)) & 1) << b for b in range(3)) * 10 + sum(((i >> (2 * b + 1)) & 1) << b for b in range(3)),
    "sum((i + t) % 3 for t in range(5))": lambda i, j: sum((i + t) % 3 for t in range(5)),
    "sum(j < t for t in range(6))": lambda i, j: sum(j < t for t in range(6)),
    "sum(sum(t * u + (i & u) for u in range(3)) for t in range(4)) - j": lambda i, j: sum(
        sum(t * u + (i & u) for u in range(3)) for t in range(4)) - j,
    "sum(t for t in range(0))": lambda i, j: 0,
}
FLOATS = {
    "erf((i - j) / 7)": lambda i, j: math.erf((i - j) / 7),
    "0.5 * (i - 20) * (1 + erf((i - 20) / sqrt(2)))": lambda i, j: 0.5 * (i - 20) * (1 + math.erf((i - 20) / math.sqrt(2))),
    "(i < j) * 0.5 + sum(erf(t / 3) for t in range(3))": lambda i, j: (i < j) * 0.5 + sum(math.erf(t / 3) for t in range(3)),
}
BOOLEANS = {
    "(i < j) == (j < 5)": lambda i, j: (i < j) == (j < 5),
    "(i < j) != (j < 5) or i == j": lambda i, j: (i < j) != (j < 5) or i == j,
    "(i < j) ^ (j < 5) ^ (i % 3 == 0)": lambda i, j: (i < j) ^ (j < 5) ^ (i % 3 == 0),
    "(i < 10) == (j < 10) == (i > 2)": lambda i, j: (i < 10) == (j < 10) == (i > 2),
    "((i ^ j) >> 3) == 0": lambda i, j: ((i ^ j) >> 3) == 0,
    "(i & ~7) == (j & ~7)": lambda i, j: (i & ~7) == (j & ~7),
    "any(j == i - t for t in range(3))": lambda i, j: any(j == i - t for t in range(3)),
    "all(j != t for t in range(4)) and not any((i | j) == t for t in range(2))":
        lambda i, j: all(j != t for t in range(4)) and not any((i | j) == t for t in range(2)),
}


@pytest.mark.parametrize("text", sorted(NUMBERS))
def test_integer_expressions_match_python(text):
    got, _ = grid_values(text)
    assert not got.is_floating_point()
    assert torch.equal(got, python_grid(NUMBERS[text]).to(got.dtype))


@pytest.mark.parametrize("text", sorted(FLOATS))
def test_float_expressions_match_python(text):
    got, _ = grid_values(text)
    want = python_grid(FLOATS[text], torch.float64)
    assert torch.allclose(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("text", sorted(BOOLEANS))
def test_boolean_expressions_match_python(text):
    got, _ = grid_values(text, values="bool")
    assert torch.equal(got, python_grid(BOOLEANS[text]))


def test_a_param_count_runs_to_the_calls_value():
    """range(K) of a param: the terms go up to K's spec value, those past the call's K left out."""
    params = "[params]\nK = 4"
    for k in (4, 2, 0, -3):
        got, _ = grid_values("sum(t + (i & t) for t in range(K))", params=params, env_extra={"K": k})
        assert torch.equal(got, python_grid(lambda i, j: sum(t + (i & t) for t in range(k))))
        got, _ = grid_values("any(j == i - t for t in range(K)) or all(j > t for t in range(K))", params=params,
                             values="bool", env_extra={"K": k})
        assert torch.equal(got, python_grid(lambda i, j: any(j == i - t for t in range(k)) or all(j > t for t in range(k))))
    _, p = grid_values("sum(t for t in range(K))", params=params)
    assert p.param("K").count
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="param K counts the terms of a reduction .* at most 4, got 5"):  # the modules' words
        attncc.reference(p, q, q, q, K=5)


def test_dot_and_zero_d_inputs():
    gen = torch.Generator().manual_seed(0)
    x, y, temp = torch.randn(1, 1, N, 5, generator=gen).double(), torch.randn(N, 5, generator=gen).double(), torch.tensor(0.3, dtype=torch.float64)
    inputs = ('[inputs]\nx = { dims = ["b", "h", "n", 5] }\ny = { dims = ["n", 5] }\n'
              'temp = { dims = [], dtype = "float32" }')
    got, _ = grid_values("dot(x[b, h, i, :], y[j, :]) * temp + temp", inputs=inputs,
                         env_extra={"x": x, "y": y, "temp": temp})
    want = (x[0, 0] @ y.T) * 0.3 + 0.3
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


REFUSED = [
    ('[mask]\nwhere = "(i << -1) < j"', "negative shift count"),
    ('[mask]\nwhere = "(i << 63) < j"', "constant shift amounts are 0 to 62"),
    ('[mask]\nwhere = "(i & 1.5) < j"', "'&' needs integers"),
    ('[score]\nbias = "~(i * 0.5)"', "'~' needs an integer or a boolean"),
    ('[score]\nbias = "(i / 2) >> 1"', "'>>' needs integers"),
    ('[mask]\nwhere = "range(3) == i"', "range\\(\\) is only the iterable"),
    ('[score]\nbias = "sum(i for i in range(3))"', "loop variable 'i' is already a name"),
    ('[score]\nbias = "sum(t for t in range(300))"', "at most 256 terms"),
    ('[score]\nbias = "sum(t for t in range(n_q))"', "non-negative integer literal or an int param"),
    ('[score]\nbias = "sum(t for t in range(-2))"', "non-negative integer literal or an int param"),
    ('[score]\nbias = "sum(sum(1 for u in range(100)) for t in range(100))"', "more than 1024 terms"),
    ('[score]\nbias = "sum(t for t in range(4) if t > 1)"', "'if' in the generator"),
    ('[score]\nbias = "sum(t for t in range(2) for u in range(2))"', "one 'for' clause"),
    ('[score]\nbias = "sum([t for t in range(2)])"', "sum\\(\\) takes one generator"),
    ('[score]\nbias = "any(t for t in range(2)) * 1.0"', "any\\(\\) needs a boolean"),
    ('[score]\nbias = "(t for t in range(2))"', "generator expression outside sum"),
    ('[params]\nK = 1000\n[score]\nbias = "sum(t for t in range(K))"', "from 0 to 256; got 1000"),
    ('[params]\nK = 3.0\n[score]\nbias = "sum(t for t in range(K))"', "non-negative integer literal or an int param"),
    ('[inputs]\nx = { dims = ["n", 4] }\n[score]\nbias = "x[i, :]"', "only allowed in dot"),
    ('[inputs]\nx = { dims = ["n", 4] }\ny = { dims = ["n", 3] }\n[score]\nbias = "dot(x[i, :], y[j, :])"',
     "different extents: 4 and 3"),
    ('[inputs]\nx = { dims = ["n", 4] }\n[score]\nbias = "dot(x[:, 0], x[j, :])"', "declared with a number"),
    ('[inputs]\nx = { dims = ["n", 4] }\n[score]\nbias = "dot(x[i, 1:3], x[j, :])"', "a whole axis"),
    ('[inputs]\nx = { dims = ["n", 4] }\n[score]\nbias = "dot(x[i, 1], x[j, :])"', "needs one ':'"),
    ('[inputs]\ntemp = { dims = [] }\n[score]\nbias = "temp[0]"', "use it by name"),
    ('[params]\nsum = 3', "built-in name"),
]


@pytest.mark.parametrize("text, message", REFUSED, ids=[m for _, m in REFUSED])
def test_refused_with_a_clear_error(text, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(text)


# ---------------------------------------------------------------------------
# the analysis: interval operators and the tile classifier against brute force
# ---------------------------------------------------------------------------

def _interval(rng, wide):
    a = rng.randint(-wide, wide)
    return a, a + rng.randint(0, wide)


def test_bitwise_interval_ops_are_sound():
    """bitand / bitor / bitxor / shift_ hold every value of the operator over their intervals
    (negative operands included), as Python numbers and as tensors; erf_ and xor_ too."""
    rng = random.Random(0)
    ops = {"bitand": lambda x, y: x & y, "bitor": lambda x, y: x | y, "bitxor": lambda x, y: x ^ y,
           "shift_": shift}
    for trial in range(300):
        wide = rng.choice([3, 40, 2**20])
        x, y = _interval(rng, wide), _interval(rng, wide)
        if trial % 4 == 0:
            x = (abs(x[0]), abs(x[0]) + x[1] - x[0])  # non-negative, as positions
        for op, fn in ops.items():
            yy = (max(-70, min(y[0], 70)), max(-70, min(y[1], 70))) if op == "shift_" else y
            for as_tensor in (False, True):
                wrap = (lambda iv: tuple(torch.tensor([float(v)], dtype=torch.float64) for v in iv)) if as_tensor else (lambda iv: iv)
                lo, hi = (float(v) for v in getattr(tiles, op)(wrap(x), wrap(yy)))
                pts_x = [x[0], x[1]] + [rng.randint(*x) for _ in range(8)]
                pts_y = [yy[0], yy[1]] + [rng.randint(*yy) for _ in range(8)]
                for p in pts_x:
                    for q in pts_y:
                        # Python numbers: integer values wrap as int64 (docs/spec-language.md), as in the kernels
                        # and the reference; tensors (a call's classifier) hold the unwrapped value: the open
                        # case of tests/test_probe_spec.py::test_kernels_wrap_per_pair_as_the_reference
                        got = fn(p, q) if as_tensor else (fn(p, q) + 2**63) % 2**64 - 2**63
                        assert lo <= got <= hi, f"{op}({x}, {yy}) gave [{lo}, {hi}], but {op}({p}, {q}) = {got}"
    # tight where it matters for positions: a & 7 of non-negative a is in [0, 7]
    assert tiles.bitand((100, 5000), 7) == (0, 7)
    lo, hi = tiles.erf_((-1.0, 2.0))
    assert lo == math.erf(-1.0) and hi == math.erf(2.0)
    for a in ((True, False), (False, True), (True, True)):
        for b in ((True, False), (False, True), (True, True)):
            mt, mf = tiles.xor_(a, b)
            for va in [v for v, ok in ((True, a[0]), (False, a[1])) if ok]:
                for vb in [v for v, ok in ((True, b[0]), (False, b[1])) if ok]:
                    assert (mt if va != vb else mf)


MASKS = {
    # a Z-order (Morton) 8 x 8 image: each token sees its 3 x 3 neighbourhood
    "morton": "abs(((i & 1) | ((i >> 1) & 2) | ((i >> 2) & 4)) - ((j & 1) | ((j >> 1) & 2) | ((j >> 2) & 4))) <= 1 and "
              "abs((((i >> 1) & 1) | ((i >> 2) & 2) | ((i >> 3) & 4)) - (((j >> 1) & 1) | ((j >> 2) & 2) | ((j >> 3) & 4))) <= 1",
    "xor_block": "((i ^ j) >> 3) == 0 or j <= (i >> 2)",
    "bool_eq": "(i < 20) == (j < 20) and (j <= i) != (j % 3 == 0)",
    "shift_param": "j <= (i >> sh) or (j | 1) == (i | 1)",
    "reduction": "any(j == i - t * 5 for t in range(K)) or all(j != t for t in range(3)) and j <= i",
    "erf": "erf((i - j) / 9) > 0.3",
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_classifier_is_sound_for_the_new_operators(name):
    p = parse_spec(f'name = "{name}"\n[params]\nsh = 1\nK = 3\n[mask]\nwhere = "{MASKS[name]}"')
    program = analyze(p).classifier
    for q_rows, k_rows, q_offset, k_offset in [(64, 64, 0, 0), (45, 70, 3, 11)]:
        truth = pair_mask(p, q_rows=q_rows, k_rows=k_rows, q_offset=q_offset, k_offset=k_offset)
        assert truth.any() and not truth.all()
        for block_m, block_n in [(16, 16), (8, 32)]:
            grid = tiles.classify_grid(program, q_offset=q_offset, k_offset=k_offset, q_rows=q_rows, k_rows=k_rows,
                                       block_m=block_m, block_n=block_n, n_q=q_offset + q_rows, n_k=k_offset + k_rows,
                                       params={}, inputs={}, batch=1, heads=1, device="cpu")
            _check_grid(grid, *_tile_truth(truth, block_m, block_n), False, f"{name} {block_m}x{block_n}")
    if name == "morton":  # the intervals of & and >> on positions still prove most tiles empty
        grid = tiles.classify_grid(program, q_offset=0, k_offset=0, q_rows=64, k_rows=64, block_m=8, block_n=8,
                                   n_q=64, n_k=64, params={}, inputs={}, batch=1, heads=1, device="cpu")
        assert (grid == tiles.EMPTY).float().mean() > 0.3


# ---------------------------------------------------------------------------
# kernels against the reference
# ---------------------------------------------------------------------------

KERNEL_SPECS = {
    "v1_morton": f'head_dim = [16]\n[mask]\nwhere = "{MASKS["morton"]} or j == 0"\n',
    "v1_booleans": """head_dim = [16]
[inputs]
is_image = { dims = ["b", "n"], dtype = "bool" }
[mask]
where = "(i < 20) == (j < 20) or j <= i or ((j - i) >> 3) == -1"
[score]
bias = "is_image[b, j] * 0.5 + (i < j) * 0.25 - ((i ^ j) & 3) * 0.1 + ((i - j) >> 2) * 0.01"
mod = "(s > 0) * s + (s <= 0) * 0.1 * s"
""",
    # exact GELU as the score transform (attention-gym's activation score mod)
    "v1_gelu": """head_dim = [16]
[params]
sh = 1
[mask]
where = "j <= i and (j >> sh) != 3"
[score]
mod = "0.5 * s * (1 + erf(s / sqrt(2)))"
""",
    # MLA-style: a learned rope part of q and k (extent 4 here), and a learned scalar temperature
    "v1_dot": """head_dim = [16]
[inputs]
qr = { dims = ["b", "h", "n", 4], dtype = "float32", grad = true }
kr = { dims = ["b", "n", 4], dtype = "float32", grad = true }
temp = { dims = [], dtype = "float32", grad = true }
[mask]
where = "causal"
[score]
bias = "0.5 * dot(qr[b, h, i, :], kr[b, j, :])"
mod = "s * temp"
""",
    # top-k block selection: each query block sees the K key blocks listed for it
    "v1_topk": """head_dim = [16]
[params]
K = 3
[inputs]
sel = { dims = ["b", "h", "n", 4], dtype = "int32" }
[mask]
where = "j // 8 == i // 8 or any(j // 8 == sel[b, h, i // 8, t] for t in range(K))"
[score]
bias = "sum((j % 4 == t) * 0.1 * t for t in range(4))"
""",
}


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return build_inline(KERNEL_SPECS, tmp_path_factory.mktemp("v1"))


def _inputs(p, B, Hq, n, gen):
    out = {}
    for d in p.inputs:
        shape = [{"b": B, "h": Hq, "n": n}.get(x, x) for x in d.dims]
        if d.dtype == "bool":
            out[d.name] = torch.rand(shape, generator=gen) < 0.4
        elif d.dtype == "int32":
            out[d.name] = torch.randint(0, n // 8 + 1, shape, generator=gen, dtype=torch.int32)
        else:
            out[d.name] = torch.rand(shape, generator=gen) + 0.5
    return out


@pytest.mark.parametrize("name", sorted(KERNEL_SPECS))
def test_kernels_match_the_reference(kernels, name):
    """Forward, LSE and the gradients of q, k, v and the learned inputs (through dot and a 0-d
    input), with offsets; decode's last rows too."""
    p, mod = kernels[name]
    gen = torch.Generator().manual_seed(1)
    kw = _inputs(p, 1, 4, 80, gen)
    vjp_case(name, p=p, mod=mod, Nq=45, Nk=45, kw=kw, seed=2)
    vjp_case(name, p=p, mod=mod, Nq=21, Nk=50, q_offset=29, kw=kw, seed=3)
    q, k, v = (torch.randn(1, h, 40, 16, generator=gen) for h in (4, 2, 2))
    kv_len = torch.tensor([40], dtype=torch.int32)
    last = mod.decode(q[:, :, -3:], k, v, kv_len=kv_len, **kw)
    assert rel_err(last, attncc.reference(p, q, k, v, **kw)[:, :, -3:]) < 1e-4


def test_a_count_param_per_call(kernels):
    """K = 1, 2, 3 per call (each against the reference); past the spec's value it is refused."""
    p, mod = kernels["v1_topk"]
    gen = torch.Generator().manual_seed(4)
    kw = _inputs(p, 1, 4, 40, gen)
    q, k, v = (torch.randn(1, h, 40, 16, generator=gen) for h in (4, 2, 2))
    outs = []
    for K in (1, 2, 3):
        o = mod.attention(q, k, v, K=K, **kw)
        assert rel_err(o, attncc.reference(p, q, k, v, K=K, **kw)) < 1e-4
        outs.append(o)
    assert not torch.equal(outs[0], outs[2])
    with pytest.raises(ValueError, match="param K counts the terms of a reduction .* at most 3, got 4"):
        mod.attention(q, k, v, K=4, **kw)


def test_tile_list_kernel_takes_xor_and_leaves_bitwise_to_torch(build):
    """The per-call tile-list kernel (attncc.codegen.tile_kernel) evaluates xor on tri-states as the
    torch path does; integer bitwise operators on tile intervals stay on the torch path (None)."""
    from attncc.codegen.tile_kernel import render_tile_kernel
    from test_tile_kernel import check, documents, make_call, spec_info

    doc = '[inputs]\ndoc = { dims = ["b", "n"], dtype = "int32" }\n'
    p = parse_spec(doc + '[mask]\nwhere = "(doc[b, i] == doc[b, j]) != (j <= i) or i == j"\n', "xor.toml")
    gen = torch.Generator().manual_seed(5)
    call = make_call(spec_info(p), Nq=45, Nk=93, q_offset=13, doc=documents(2, 106, gen))
    check(build, analyze(p).classifier, call, [(16, 16), (32, 16)], p)
    p = parse_spec(doc + '[mask]\nwhere = "(doc[b, i] & 1) == (doc[b, j] & 1)"\n', "bits.toml")
    assert render_tile_kernel(analyze(p).classifier, p) is None
