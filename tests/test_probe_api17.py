"""Probe 17 of the spec front end and the call API: expressions whose written-out form grows
exponentially with their nesting are refused at once (they hung the parser or the compiler), the
printer's naming of repeated code is linear per round and unchanged, and odd but valid calls
(empty dims, expanded, overlapping and transposed tensors, parameters, numbers as tensors,
positions near 2**62) agree with the reference."""
from __future__ import annotations

import ast
import random
import time

import pytest
import torch

import attncc
from attncc.codegen import printer
from attncc.module_cache import toml_text
from attncc.spec import SpecError, parse_spec


def _nest(fmt: str, base: str, n: int) -> str:
    e = base
    for t in range(n):
        e = fmt.format(e=e, t=t)
    return e


def _starts(k: int, where: str) -> str:
    return f'[inputs]\nst = {{ dims = ["b", {k}], dtype = "int32" }}\n' + where


def _sums(k: int) -> str:
    return f"sum(i >= st[b, t] for t in range({k})) == sum(j >= st[b, t] for t in range({k}))"


# (id, spec text, key): each took from 30 s to forever (or was killed for memory) before the limits
EXPONENTIAL = [
    ("where-in-condition", '[mask]\nwhere = "' + "where(" * 30 + "i < j" + "".join(f", j < {t}, i > {t})" for t in range(30)) + '"',
     "[mask].where"),
    ("boolean-as-number-compared", '[mask]\nwhere = "' + _nest("(({e}) * 2 > (j < {t}))", "i < j", 14) + '"', "[mask].where"),
    ("where-number-compared", '[mask]\nwhere = "' + _nest("(where({e}, i, j) < {t})", "i < j", 30) + '"', "[mask].where"),
    ("reads-in-indices", '[inputs]\nx = { dims = [64], dtype = "int32" }\n[mask]\nwhere = "' + "x[" * 12 + "i % 64" + "]" * 12 + ' == j"',
     "[mask].where"),
    ("document-count-in-mod", _starts(16, f'[score]\nmod = "where({_sums(16)}, s, -inf)"'), "[score].mod"),
    ("document-count-as-number", _starts(16, f'[mask]\nwhere = "({_sums(16)}) + (j <= i) > 1"'), "[mask].where"),
]


@pytest.mark.parametrize("text, key", [c[1:] for c in EXPONENTIAL], ids=[c[0] for c in EXPONENTIAL])
def test_exponentially_growing_expressions_are_refused_at_once(text, key):
    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        parse_spec(text, "bad.toml")
    assert time.perf_counter() - start < 5.0
    message = str(info.value)
    assert message.startswith(f"bad.toml: {key}, column ") and info.value.column is not None, message
    assert "written out" in message, message


# the same constructions, a few levels less deep, and the largest legitimate expressions met
ACCEPTED = [
    '[mask]\nwhere = "' + "where(" * 10 + "i < j" + "".join(f", j < {t}, i > {t})" for t in range(10)) + '"',
    '[mask]\nwhere = "' + _nest("(({e}) * 2 > (j < {t}))", "i < j", 7) + '"',
    '[inputs]\nx = { dims = [64], dtype = "int32" }\n[mask]\nwhere = "' + "x[" * 6 + "i % 64" + "]" * 6 + ' == j"',
    _starts(256, f'[mask]\nwhere = "{_sums(256)} and j <= i"'),  # docs §8: at most 256 documents
    _starts(2, f'[score]\nmod = "where({_sums(2)}, s, -inf)"'),
    '[mask]\nwhere = "any(((i * 7 + j * 3) % 11 + (i >> 2)) == t for t in range(256))"',
    '[score]\nmod = "' + "tanh(" * 90 + "s" + ")" * 90 + '"',
]


@pytest.mark.parametrize("text", ACCEPTED, ids=range(len(ACCEPTED)))
def test_deep_but_bounded_expressions_still_parse(text):
    start = time.perf_counter()
    parse_spec(text, "ok.toml")
    assert time.perf_counter() - start < 10.0


# --- the printer's naming of repeated code ---------------------------------------------------

def _dump_structure(node, shapes, keys):
    """The former key of Temporaries.name_repeats: ast.dump of every node."""
    for n in ast.walk(node):
        keys[id(n)] = shapes.setdefault(ast.dump(n), len(shapes))
    return keys[id(node)]


def _random_code(rng: random.Random, depth: int = 0) -> str:
    if depth > 4 or rng.random() < 0.2:
        return rng.choice(["offs_i[:, None]", "offs_j[None, :]", "h", "b", "1", "2.5", "-1.0", "w", "1.0", "True"])
    a, b = _random_code(rng, depth + 1), _random_code(rng, depth + 1)
    return rng.choice([f"({a} + {b})", f"({a} * {b})", f"({a} * 1.0)", f"tl.maximum({a}, {b})", f"tl.where({a} < {b}, {a}, {b})",
                       f"tl.load(ptr_x + {a} * stride0_x, mask=({a} >= 0) & ({a} < size0_x), other=0)",
                       f"_floordiv({a}, {b})", f"tl.cast({a}, tl.float64)", f"(-{a})", f"(({a} == {b}) & ({b} != {a}))"])


def test_naming_repeats_is_that_of_ast_dump(monkeypatch):
    rng = random.Random(17)
    texts = [_random_code(rng) for _ in range(150)]
    new = [printer.Temporaries().name_repeats(t) for t in texts]
    monkeypatch.setattr(printer, "_structure", _dump_structure)
    old = [printer.Temporaries().name_repeats(t) for t in texts]
    assert new == old
    assert sum(bool(defs) for defs, _ in new) > 50  # the texts do repeat code


def test_naming_repeats_of_deeply_nested_reads_is_fast():
    code = "offs_i[:, None]"
    for _ in range(7):  # each read writes its index three times: 3**7 copies of the innermost
        code = f"tl.load(ptr_x + {code} * stride0_x, mask=({code} >= 0) & ({code} < size0_x), other=0)"
    start = time.perf_counter()
    defs, out = printer.Temporaries().name_repeats(code)
    assert time.perf_counter() - start < 10.0
    assert len(defs) == 6 and out.count("tl.load") == 1


# --- odd but valid calls ---------------------------------------------------------------------

SPEC = {"name": "probe17_window", "head_dim": 16, "params": {"window": 9}, "mask": {"where": "j <= i and i - j < window"}}


@pytest.fixture(scope="module")
def window():
    return attncc.compile(SPEC), parse_spec(toml_text(SPEC))


def _qkv(B=2, Hq=4, Hkv=2, Nq=13, Nk=29, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Nq, D, generator=g), torch.randn(B, Hkv, Nk, D, generator=g),
            torch.randn(B, Hkv, Nk, D, generator=g))


def _layouts():
    g = torch.Generator().manual_seed(1)
    q, k, v = _qkv()
    base = torch.randn(4096, generator=g)
    return {
        "expanded": (torch.randn(1, 1, 1, 16, generator=g).expand(2, 4, 13, 16), torch.randn(1, 1, 29, 16, generator=g).expand(2, 2, 29, 16),
                     torch.randn(16, generator=g).expand(2, 2, 29, 16)),
        "overlapping": (base.as_strided((2, 4, 13, 16), (1, 2, 3, 1)), base.as_strided((2, 2, 29, 16), (100, 7, 1, 3)), v),
        "transposed": (torch.randn(2, 4, 16, 13, generator=g).transpose(-1, -2), k, torch.randn(2, 2, 16, 29, generator=g).transpose(-1, -2)),
        "strided-last-dim": (torch.randn(2, 4, 13, 32, generator=g)[..., ::2], k, v),
        "parameter": (torch.nn.Parameter(q.clone()), k, v),
        "kv-batch-1": (q, k[:1], v[:1]),
    }


@pytest.mark.parametrize("layout", list(_layouts()))
def test_tensor_layouts_match_the_reference(window, layout):
    mod, pattern = window
    q, k, v = _layouts()[layout]
    got = mod.attention(q, k, v)
    want = attncc.reference(pattern, q.detach(), k, v)
    assert torch.allclose(got.double(), want, atol=1e-5)


@pytest.mark.parametrize("scale", [torch.tensor(0.5), torch.tensor([[0.5]]), torch.tensor(0.5, dtype=torch.float64)])
def test_scale_as_a_one_element_tensor(window, scale):
    mod, pattern = window
    q, k, v = _qkv()
    assert torch.allclose(mod.attention(q, k, v, scale=scale).double(), attncc.reference(pattern, q, k, v, scale=0.5), atol=1e-5)


@pytest.mark.parametrize("kw", [dict(q_offset=2**62 - 100, k_offset=2**62 - 100), dict(q_offset=2**62 - 100), dict(window=2**62 - 1)])
def test_positions_near_the_limit_match_the_reference(window, kw):
    mod, pattern = window
    q, k, v = _qkv()
    o, lse = mod.attention(q, k, v, return_lse=True, **kw)
    o_ref, lse_ref = attncc.reference(pattern, q, k, v, return_lse=True, **kw)
    assert torch.allclose(o.double(), o_ref, atol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))


@pytest.mark.parametrize("dims", [dict(B=0), dict(Nq=0), dict(Nk=0)])
def test_empty_dims_train(window, dims):
    mod, _ = window
    q, k, v = (t.requires_grad_() for t in _qkv(**dims))
    o, lse = mod.attention(q, k, v, return_lse=True)
    (o.sum() + lse.clamp(min=-1e3).sum()).backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all()


# --- long chains of | & ^ --------------------------------------------------------------------

def _depth(node: ast.AST) -> int:
    return 1 + max((_depth(c) for c in ast.iter_child_nodes(node)), default=0)


def test_long_chains_print_as_shallow_groups():
    """An any() of 992 terms (within the 1024 the language unrolls) or random_blocks(1024) printed
    one ``|`` chain, parsed 1000 levels deep: a RecursionError naming repeats (and in Triton's
    code generator). Grouped by 32 they are a few dozen levels; short chains print as before."""
    assert printer.joined("|", ["a", "b", "c"]) == "(a | b | c)"
    code = printer.joined("|", [f"(j == x{t})" for t in range(1024)])
    assert _depth(ast.parse(code, mode="eval")) < 200
    assert eval(code.replace("x", "_"), {"j": 5, **{f"_{t}": t for t in range(1024)}}) is True
    defs, out = printer.Temporaries().name_repeats(code)
    assert not defs and out == code


def test_random_blocks_at_their_limit_compile_and_match():
    spec = {"name": "probe17_rb1024", "head_dim": 16, "mask": {"where": "random_blocks(1024, block=1) or j <= i"}}
    mod, pattern = attncc.compile(spec), parse_spec(toml_text(spec))
    q, k, v = _qkv(B=1)
    assert torch.allclose(mod.attention(q, k, v).double(), attncc.reference(pattern, q, k, v), atol=1e-5)
