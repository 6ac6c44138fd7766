"""Integer arithmetic past int32 and division by zero (issue 15 leftovers).

Kernels compute the integer expressions of a spec in int32 unless a call is WIDE; the host
decides per call from exact interval bounds of every printed integer expression
(``_int_reach`` in each generated module, attncc.runtime.intervals). Each spec here
overflows int32 at small lengths (large offsets or params), where positions alone would not
switch WIDE on: forward and backward against attncc.reference, and decode.

Divisors: one of params and sizes only is checked at every call (ValueError, as the
reference); one that varies per pair must be provably non-zero, else ``attncc build`` refuses it.
"""
from __future__ import annotations

import pytest
import torch

import attncc
from attncc.runtime.intervals import INT32_MAX
from attncc.spec import SpecError
from cases import SOFTMAX, build_inline, module, rel_err
from test_big_positions import _check, _qkv

SPECS = {
    # i * j passes 2**31 at positions 60000 (int32 wraps: other residues)
    "int_product": '[mask]\nwhere = "(i * j) % 7 != 0 or j == i"\n',
    # (i + j) passes 2**31 at positions 1.5e9, below the positions' own WIDE threshold
    "mid_sum": '[mask]\nwhere = "j <= i"\n[score]\nbias = "0.25 * (((i + j) // 2) % 7)"\n',
    # w * w (a param times itself, hoisted once per program) passes 2**31 at w = 50000
    "square_param": '[params]\nw = 50000\n[mask]\nwhere = "j <= i and i - j < w * w"\n',
    # an input index: i * 100000 passes 2**31 at position 30000
    "index_product": ('[inputs]\nt = { dims = ["h", 7], dtype = "float32" }\n'
                      '[score]\nbias = "t[h, (i * 100000 + j) % 7]"\n'),
    # an int32 input's values near 2**31: d + 1000 passes int32 (the reference adds in int64)
    "input_values": ('[inputs]\nd = { dims = ["b", "n"], dtype = "int32" }\n'
                     '[mask]\nwhere = "d[b, j] + 1000 > d[b, i] or j == 0"\n'),
    # an integer power: repeated integer products (as the reference), int64 past 74 ** 5
    "power": '[mask]\nwhere = "(j - i) ** 5 > -100000 and j <= i"\n',
    # a divisor of params only, and one of positions that cannot be 0
    "param_divisor": '[params]\nw = 5\n[mask]\nwhere = "i // w == j // w or j % (abs(i - j) + 1) == 0"\n',
    # an input divisor guarded by max(., 1): d may hold 0 and negative values
    "input_divisor": ('[inputs]\nd = { dims = ["b"], dtype = "int32" }\n'
                      '[mask]\nwhere = "i // max(d[b], 1) == j // max(d[b], 1)"\n'),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_inline(SPECS, tmp_path_factory.mktemp("overflow_guard"))


def _reach(mod, **numbers):
    from attncc.runtime.intervals import CallNumbers

    base = dict(positions=100, batch=1, heads=2, n_q=100, n_k=100, params={})
    base.update(numbers)
    return mod._int_reach(CallNumbers("t", **base))


def test_int_product_past_int32(built):
    p, mod = built["int_product"]
    q, k, v = _qkv(40, 40, seed=1)
    _check(p, mod, q, k, v, q_offset=60000, k_offset=60000)
    assert _reach(mod, positions=40) <= INT32_MAX < _reach(mod, positions=60040)


def test_midpoint_of_two_positions_past_int32(built):
    p, mod = built["mid_sum"]
    q, k, v = _qkv(30, 30, seed=2)
    _check(p, mod, q, k, v, q_offset=1_500_000_000, k_offset=1_500_000_000)


def test_square_of_a_param_past_int32(built):
    p, mod = built["square_param"]
    q, k, v = _qkv(33, 33, seed=3)
    _check(p, mod, q, k, v)  # w * w = 2.5e9: every causal pair
    _check(p, mod, q, k, v, w=3)  # w * w = 9: a window
    assert _reach(mod, params={"w": 3}) <= INT32_MAX < _reach(mod, params={"w": 50000})


def test_index_product_past_int32(built):
    p, mod = built["index_product"]
    q, k, v = _qkv(20, 24, seed=4)
    t = torch.randn(2, 7, generator=torch.Generator().manual_seed(4))
    _check(p, mod, q, k, v, q_offset=30000, k_offset=29990, t=t)


def test_int32_input_values_near_their_limit(built):
    p, mod = built["input_values"]
    q, k, v = _qkv(30, 30, seed=5)
    d = (2**31 - 1 - torch.randint(0, 1500, (1, 30), generator=torch.Generator().manual_seed(5))).to(torch.int32)
    _check(p, mod, q, k, v, d=d)


def test_integer_power(built):
    p, mod = built["power"]
    q, k, v = _qkv(100, 100, seed=11)
    _check(p, mod, q, k, v, q_offset=7, k_offset=7)


def test_decode_with_a_square_param_past_int32(built):
    p, mod = built["square_param"]
    gen = torch.Generator().manual_seed(6)
    B, H, N, Nq, D = 1, 2, 40, 2, 16
    q = torch.randn(B, H, Nq, D, generator=gen)
    k, v = (torch.randn(B, H, N, D, generator=gen) for _ in range(2))
    for w in (50000, 3):
        o = mod.decode(q, k, v, kv_len=torch.tensor([N], dtype=torch.int32), w=w)
        ref = attncc.reference(p, q.double(), k.double(), v.double(), q_offset=N - Nq, w=w)
        assert rel_err(o, ref) < 1e-4, (w, rel_err(o, ref))


def test_divisors_that_cannot_be_zero(built):
    p, mod = built["param_divisor"]
    q, k, v = _qkv(40, 40, seed=7)
    _check(p, mod, q, k, v, q_offset=3, k_offset=3)
    p, mod = built["input_divisor"]
    q, k, v = _qkv(40, 40, seed=8, B=4)
    _check(p, mod, q, k, v, d=torch.tensor([0, -3, 1, 7], dtype=torch.int32))


def test_a_param_divisor_of_zero_is_refused_at_the_call(built):
    p, mod = built["param_divisor"]
    q, k, v = _qkv(8, 8, seed=9)
    with pytest.raises(ValueError, match=r"param_divisor.attention: division by zero: the divisor of i // w and j // w is 0 "
                                         r"with w = 0"):
        mod.attention(q, k, v, w=0)
    with pytest.raises(ValueError, match="division by zero"):
        attncc.reference(p, q.double(), k.double(), v.double(), w=0)
    with pytest.raises(ValueError, match=r"param_divisor.decode: division by zero: .* with w = 0"):
        mod.decode(q[:, :, :1], k, v, kv_len=torch.tensor([8], dtype=torch.int32), w=0)


def test_a_size_divisor_of_zero_is_refused_at_the_call(tmp_path):
    # n_k >= k_offset + Nk (the call's own positions), so the divisor reaches 0 through a difference
    p, mod = build_inline({"size_divisor": '[mask]\nwhere = "j % (n_k - 10) == 0 or j <= i"\n'},
                          tmp_path)["size_divisor"]
    q, k, v = _qkv(8, 8, seed=10)
    with pytest.raises(ValueError, match=r"divisor of j % \(n_k - 10\) is 0 with n_k = 10"):
        mod.attention(q, k, v, n_k=10)
    _check(p, mod, q, k, v, n_k=13)


@pytest.mark.parametrize("text, key", [
    ('[mask]\nwhere = "i // (i - j) == 0"\n', "[mask].where"),
    ('[inputs]\nd = { dims = ["b"], dtype = "int32" }\n[mask]\nwhere = "j % d[b] == 0"\n', "[mask].where"),
    ('[score]\nbias = "0.5 * (100 // (h - 1))"\n', "[score].bias"),
    ('[params]\nw = 3\n[score]\nmod = "s + (i % (w + j))"\n', "[score].mod"),
])
def test_a_divisor_that_varies_per_pair_and_may_be_zero_is_refused_at_build(tmp_path, text, key):
    with pytest.raises(SpecError, match=r"may be 0 .*max\(") as err:
        build_inline({"per_pair_divisor": text}, tmp_path)
    assert err.value.key == key


@pytest.mark.parametrize("name", SOFTMAX)
def test_shipped_specs_run_narrow_at_long_contexts(name):
    """Every shipped softmax spec's arithmetic stays in int32 at a million positions with its
    default params: the guard bounds each kernel variable (the walks' steps name earlier steps),
    and none is taken as unbounded (that would make every call WIDE, int64, slower)."""
    from attncc.runtime.intervals import CallNumbers

    mod = module(name)
    params = {q.name: q.default for q in mod.SPEC.params if q.kind == "int"}  # (hidden ones too: residue classes)
    n = 2**20
    reach = mod._int_reach(CallNumbers(name, positions=n, batch=4, heads=32, n_q=n, n_k=n, params=params))
    assert reach <= INT32_MAX, (name, reach)
