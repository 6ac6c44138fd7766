"""Masks with a residue conjunct ``(i - j) % m == 0`` (dilated windows) run class by class
(attncc.analysis.residue, attncc.runtime.residue): the rows and keys of each residue class as
strided views, positions through hidden params. Randomized differential tests against the float64
reference (odd lengths, Nq != Nk, offsets, GQA, params and their overrides, biases and transforms
of what the splits leave alone, n_q / n_k), forward and backward, with the split forced at small
sizes; when the split must not happen; and that its params stay hidden."""
from __future__ import annotations

import random

import pytest
import sympy
import torch

import attncc
import attncc.runtime.residue as R
from attncc.analysis.residue import COLUMN_HIDDEN, HIDDEN, residue_split
from attncc.spec import parse_spec
from cases import module, pattern, rel_err


@pytest.fixture
def split_calls(monkeypatch):
    """Every call split however small (ATTNCC_RESIDUE_MIN_ROWS=1); the list of classes run."""
    monkeypatch.setenv("ATTNCC_RESIDUE_MIN_ROWS", "1")
    seen, real = [], R._sub_call

    def spy(call, part, m):
        seen.append((part, m))
        return real(call, part, m)

    monkeypatch.setattr(R, "_sub_call", spy)
    return seen


# masks with a residue conjunct, with what else reads positions: windows both ways, bottom-right
# alignment, a literal modulus, a bias and a transform of the head (one of the positions would keep a
# call whole: attncc.analysis.residue._splittable)
SPECS = {
    "window_param": ('[params]\nw = 23\nd = 3\n[mask]\nwhere = "j <= i and i - j < w and (i - j) % d == 0"\n',
                     lambda rng: {"w": rng.randint(1, 40), "d": rng.choice([2, 3, 5, 7])}),
    "bidir_literal": ('[params]\nw = 9\n[mask]\nwhere = "abs(i - j) <= w and (j - i) % 4 == 0"\n'
                      '[score]\nbias = "0.25 * h - 0.1"\n', lambda rng: {"w": rng.randint(0, 30)}),
    "residue_pair": ('[params]\nd = 3\nw = 20\n[mask]\nwhere = "i % d == j % d and abs(i - j) <= w"\n',
                     lambda rng: {"d": rng.choice([2, 3, 6]), "w": rng.randint(0, 30)}),
    "bottom_right": ('[params]\nd = 2\n[mask]\nwhere = "j - n_k <= i - n_q and (i - j) % d == 0"\n'
                     '[score]\nmod = "s + where(h % 2 == 0, 0.5, -0.25)"\n', lambda rng: {"d": rng.choice([2, 3])}),
}


def _random_call_against_reference(specs: dict, seed: int, offsets: bool) -> None:
    """One seeded call of one of ``specs`` (name: (text, params drawn from a Random)): odd lengths,
    Nq != Nk, GQA, offsets; o, the LSE and the gradients of q, k, v (through o and the LSE) against
    the float64 reference."""
    rng = random.Random(seed)
    text, draw = specs[sorted(specs)[seed % len(specs)]]
    mod, p = attncc.compile(text), parse_spec(text)
    Nq, Nk = rng.randint(1, 60), rng.randint(1, 60)
    kw = draw(rng)
    heads = rng.choice([(2, 2), (4, 2), (3, 1)])
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(rng.randint(1, 2), heads[0], Nq, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(q.shape[0], heads[1], Nk, 16, generator=gen, requires_grad=True) for _ in range(2))
    extra = {"q_offset": rng.randint(0, 12), "k_offset": rng.randint(0, 12)} if offsets else {}
    o, lse = mod.attention(q, k, v, return_lse=True, **extra, **kw)
    do = torch.randn(o.shape, generator=gen)
    grads = torch.autograd.grad((o * do).sum() + lse.masked_fill(lse.isinf(), 0).sum(), (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attncc.reference(p, *leaves, return_lse=True, **extra, **kw)
    want = torch.autograd.grad((ref * do.double()).sum() + ref_lse.masked_fill(ref_lse.isinf(), 0).sum(), leaves)
    assert rel_err(o, ref) < 1e-4
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    if finite.any():
        assert float((lse.double()[finite] - ref_lse[finite]).abs().max()) < 1e-4
    for label, got, w in zip("qkv", grads, want):  # (a row with one key has dq = 0)
        torch.testing.assert_close(got.double(), w, rtol=1e-4, atol=1e-5, msg=lambda e: f"d{label}: {e}")


@pytest.mark.parametrize("seed", range(8))
def test_split_equals_reference(seed, split_calls):
    # (the bottom-right spec aligns by n_q, n_k: offsets only on the others)
    _random_call_against_reference(SPECS, seed, offsets=sorted(SPECS)[seed % len(SPECS)] != "bottom_right")
    assert split_calls and len(split_calls) % 2 == 0  # the classes with pairs, forward and backward


def test_dilated_spec_half_precision_and_param_overrides(split_calls):
    mod, p = module("dilated"), pattern("dilated")
    gen = torch.Generator().manual_seed(9)
    for dtype, kw in ((torch.float16, {"window": 17, "dilation": 3}), (torch.float32, {"window": 40, "dilation": 1}),
                      (torch.float32, {"window": 40, "dilation": 70})):
        q, k, v = (torch.randn(1, 2, 45, 16, generator=gen).to(dtype) for _ in range(3))
        split_calls.clear()
        o = mod.attention(q, k, v, **kw)
        ref = attncc.reference(p, q.double(), k.double(), v.double(), **kw)
        assert rel_err(o, ref) < (5e-3 if dtype == torch.float16 else 1e-4)
        # dilation 1 (no classes) and 70 (more than MAX_CLASSES) run whole
        assert bool(split_calls) == (2 <= kw["dilation"] <= R.MAX_CLASSES)


def test_when_a_call_runs_whole(monkeypatch):
    mod = module("dilated")
    seen = []
    monkeypatch.setattr(R, "_sub_call", lambda *a: seen.append(a) or (_ for _ in ()).throw(AssertionError))
    q = torch.randn(1, 2, 40, 16)
    mod.attention(q, q, q)  # 40 rows: fewer than 4 classes x 128 rows (the default)
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    monkeypatch.setenv("ATTNCC_RESIDUE_MIN_ROWS", "1")
    mod.attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu)  # packed: whole
    mod.attention(q, q, q, q_offset=R.POSITION_LIMIT, k_offset=R.POSITION_LIMIT)  # positions near 2**30: whole
    assert not seen
    monkeypatch.setenv("ATTNCC_RESIDUE_MIN_ROWS", "x")
    with pytest.raises(ValueError, match="ATTNCC_RESIDUE_MIN_ROWS"):
        mod.attention(q, q, q)


def test_hidden_params_cannot_be_passed_and_are_not_documented():
    mod = module("dilated")
    q = torch.randn(1, 1, 8, 16)
    for name in HIDDEN:
        with pytest.raises(TypeError, match="unexpected keyword"):
            mod.attention(q, q, q, **{name: 2})
        assert name not in mod.attention.__doc__


def test_residue_split_analysis():
    def split(text):
        return residue_split(parse_spec(text))

    assert split('[params]\nd = 3\n[mask]\nwhere = "(i - j) % d == 0 and j <= i"\n').modulus == "d"
    assert split('[mask]\nwhere = "0 == (j - i) % 5"\n').modulus == 5
    assert split('[params]\nd = 3\n[mask]\nwhere = "i % d == j % d and abs(i - j) < 9"\n').modulus == "d"
    for text in ('[mask]\nwhere = "(i - j) % 1 == 0"\n',  # no classes
                 '[mask]\nwhere = "(i - j) % 3 == 0 or j == 0"\n',  # not a conjunct
                 '[mask]\nwhere = "(i - 2 * j) % 3 == 0"\n',  # not i - j
                 '[mask]\nwhere = "i % 3 == j % 4"\n',  # two moduli
                 '[params]\nd = 0.5\n[mask]\nwhere = "(i - j) % d == 0"\n',  # a float param
                 '[inputs]\nx = { dims = ["b", "n"], dtype = "int32" }\n[mask]\nwhere = "(i - j) % 3 == 0 and x[b, j] > 0"\n',
                 '[mask]\nwhere = "(i - j) % 3 == 0"\n[rope]\ntheta = 10000.0\n',
                 '[mask]\nwhere = "(i - j) % 3 == 0 and (random_blocks(2, block=8, seed=1) or j < 4)"\n',
                 '[mask]\nwhere = "(i - j) % 3 == 0"\n[score]\nmod = "where(random_blocks(1, block=8), s, -inf)"\n',
                 # a bias or mod of the positions (its terms constant along j, rounded at split positions)
                 '[mask]\nwhere = "(i - j) % 3 == 0"\n[score]\nbias = "0.5 * (i - j)"\n',
                 '[mask]\nwhere = "(i - j) % 3 == 0"\n[score]\nmod = "s + 0.01 * i"\n'):
        assert split(text) is None, text
    # the kernels' pattern: the spec's at i -> step*i + cq, j -> step*j + ck; itself at step 1, cq = ck = 0
    text = '[params]\nd = 3\n[mask]\nwhere = "(i - j) % d == 0 and j <= i - n_q + n_k"\n[score]\nbias = "0.5 * h"\n'
    s = split(text)
    step, cq, ck = (sympy.Symbol(n, integer=True) for n in HIDDEN)
    at_one = {step: 1, cq: 0, ck: 0}
    original = parse_spec(text)
    assert s.pattern.mask != original.mask and s.pattern.mask.xreplace(at_one) == original.mask
    assert s.pattern.bias == original.bias
    assert [p.name for p in s.pattern.params if p.hidden] == list(HIDDEN)


# ------------------------------------------------------------------------------------------------
# summary columns apart (attncc.analysis.residue.ColumnSplit)

COLUMN_SPECS = {
    "strided": ('[params]\nstride = 4\n[mask]\nwhere = "j <= i and ((i - j) < stride or (j % stride) == stride - 1)"\n',
                lambda rng: {"stride": rng.choice([2, 3, 5, 8])}),
    "bidir_columns": ('[params]\nw = 3\nS = 5\n[mask]\nwhere = "abs(i - j) <= w or j % S == 2"\n'
                      '[score]\nsoftcap = 2.0\n', lambda rng: {"w": rng.randint(0, 9), "S": rng.choice([2, 5, 7])}),
    "literal_out_of_range": ('[params]\nw = 4\n[mask]\nwhere = "j <= i and (i - j < w or j % 6 == 7 + w)"\n',
                             lambda rng: {"w": rng.choice([-8, -3, 0, 4])}),  # r = 7 + w: some classes never exist
}


@pytest.fixture
def column_calls(monkeypatch):
    """Every call split however small (ATTNCC_COLUMN_MIN_ROWS=1); whether each call split."""
    monkeypatch.setenv("ATTNCC_COLUMN_MIN_ROWS", "1")
    seen, real = [], R.column_parts

    def spy(*args):
        parts = real(*args)
        seen.append(parts is not None)
        return parts

    monkeypatch.setattr(R, "column_parts", spy)
    return seen


@pytest.mark.parametrize("seed", range(6))
def test_column_split_equals_reference(seed, column_calls):
    _random_call_against_reference(COLUMN_SPECS, 1000 + seed, offsets=True)
    assert column_calls and all(column_calls)  # forward and backward, split


def test_column_split_only_where_it_pays(column_calls, monkeypatch):
    mod, p = module("strided"), pattern("strided")
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 50, 16, generator=gen) for _ in range(3))
    for stride, split in ((4, True), (1, False)):  # stride 1: one class (no columns apart)
        column_calls.clear()
        o = mod.attention(q, k, v, stride=stride)
        assert rel_err(o, attncc.reference(p, q.double(), k.double(), v.double(), stride=stride)) < 1e-4
        assert column_calls == [split]
    monkeypatch.delenv("ATTNCC_COLUMN_MIN_ROWS")  # 50 rows: fewer than the default 1024
    column_calls.clear()
    mod.attention(q, k, v, stride=4)
    assert column_calls == [False]
    for name in COLUMN_HIDDEN:
        with pytest.raises(TypeError, match="unexpected keyword"):
            mod.attention(q, k, v, **{name: 1})


def test_column_split_analysis():
    from attncc.analysis.residue import column_split

    s = column_split(parse_spec('[params]\nstride = 4\n[mask]\nwhere = "j <= i and ((i - j) < stride or (j % stride) == stride - 1)"\n'))
    assert s.modulus == "stride" and str(s.residue) == "stride - 1"
    assert column_split(parse_spec('[mask]\nwhere = "j % 5 == 1 or abs(i - j) < 3"\n')).modulus == 5
    for text in ('[mask]\nwhere = "j <= i and i - j < 4"\n',  # no union
                 '[mask]\nwhere = "j % 5 == i % 5 or i - j < 3"\n',  # the class depends on i
                 '[mask]\nwhere = "i % 5 == 1 or i - j < 3"\n',  # rows, not columns
                 '[mask]\nwhere = "j % 1 == 0 or i - j < 3"\n',  # one class
                 # a transform of j: fuzzed at positions 2**20, its terms constant along j rounded apart
                 # in the two parts' LSEs moved o by 4e-3 through the merge
                 '[mask]\nwhere = "abs(i - j) <= 21 and (i - j < 5 or j % 2 == 1)"\n[score]\nmod = "s + 0.1 * (i - j)"\n',
                 # terms constant along j: in each part's float32 LSE, where the merge weighs the parts
                 '[mask]\nwhere = "j % 5 == 1 or abs(i - j) < 3"\n[score]\nbias = "0.01 * i"\n',
                 '[params]\nc = 0.0\n[mask]\nwhere = "j % 5 == 1 or abs(i - j) < 3"\n[score]\nbias = "c"\n',
                 '[mask]\nwhere = "j % 5 == 1 or abs(i - j) < 3"\n[score]\nmod = "s - 3e5 * h"\n'):
        assert column_split(parse_spec(text)) is None, text
    # a score transform without such terms splits
    assert column_split(parse_spec('[mask]\nwhere = "j % 5 == 1 or abs(i - j) < 3"\n[score]\nsoftcap = 20.0\n'))
    assert column_split(parse_spec('[mask]\nwhere = "j % 5 == 1 or abs(i - j) < 3"\n[score]\nmod = "s * 1.5"\n'))


@pytest.mark.parametrize("score, kw, offset", [
    ('bias = "c + 0.1 * i"', {}, 2**29),   # o was off by 1.0 (the probe of session 13)
    ('bias = "c"', {"c": 1e5}, 0),         # 3e-3
    ('mod = "s + c"', {"c": 1e5}, 10**6),  # 2.6e-3
])
def test_column_split_keeps_row_terms_out_of_the_merge(column_calls, score, kw, offset):
    """A score term constant along j runs whole (the whole call keeps it out of o exactly)."""
    text = f'[params]\nstride = 8\nc = 0.0\n[mask]\nwhere = "j <= i and ((i - j) < stride or (j % stride) == stride - 1)"\n[score]\n{score}\n'
    mod, p = attncc.compile(text), parse_spec(text)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 64, 16, generator=gen) for _ in range(3))
    o = mod.attention(q, k, v, q_offset=offset, k_offset=offset, **kw)
    assert rel_err(o, attncc.reference(p, q.double(), k.double(), v.double(), q_offset=offset, k_offset=offset,
                                       **kw)) < 1e-5
    assert not any(column_calls)  # (the module has no column split: the analysis refused it)


def test_column_split_huge_modulus_runs_whole(column_calls):
    """m past the keys runs whole: its strided view of k stepped past 2**63 (m = 2**58: a RuntimeError)."""
    text = '[params]\nm = 8\n[mask]\nwhere = "j <= i and (i - j < 5 or j % m == 3)"\n'
    mod, p = attncc.compile(text), parse_spec(text)
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 1, 64, 32, generator=gen) for _ in range(3))
    for m, split in ((8, True), (64, True), (65, False), (2**58, False), (2**62 - 1, False)):
        column_calls.clear()
        o = mod.attention(q, k, v, m=m)
        assert rel_err(o, attncc.reference(p, q.double(), k.double(), v.double(), m=m)) < 1e-5, m
        assert column_calls == [split], m


@pytest.mark.parametrize("where, named", [
    ("j <= i and (i - j) % m == 0", "(i - j) % m"),
    ("i % m == j % m", "i % m and j % m"),
    ("j <= i and (i - j < 5 or j % m == 3)", "j % m"),
])
def test_a_zero_divisor_names_the_spec_expression(where, named):
    """Not the split's rewrite of it, with its hidden params (_rs_step*i + ..., _cs_sk*j + ...)."""
    mod = attncc.compile(f'[params]\nm = 8\n[mask]\nwhere = "{where}"\n')
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="division by zero") as e:
        mod.attention(q, q, q, m=0)
    assert f"the divisor of {named} is 0 with m = 0" in str(e.value) and "_rs_" not in str(e.value) \
        and "_cs_" not in str(e.value)


def test_explain_names_the_split():
    from attncc.analysis import analyze
    from attncc.report import explain_data

    assert explain_data(analyze(pattern("dilated")), n_q=256, n_k=256)["residue"] == "dilation"
    assert explain_data(analyze(pattern("strided")), n_q=256, n_k=256)["columns"] == "j % stride == stride - 1"
    causal = explain_data(analyze(pattern("causal")), n_q=256, n_k=256)
    assert causal["residue"] is None and causal["columns"] is None
