"""Probe fuzz27: the blind spots of tests/fuzz_specs.py, drawn by its extensions (extend_draft,
extend_call: bitwise operators and shifts, boolean xor, booleans as numbers, true division in
masks, signed divisors, divisors of params, sizes and guarded input values, nested where, sum /
any / all / dot, int params past 2**31 and negative ones, 0-d inputs, [n, n] tables, params as
numpy scalars and tensors, inputs in other dtypes, grad tables as expanded views, unlisted head
dims, zero-length sides, one query row, large q and k, 5-8 heads, a param or input named scale,
bitwise operators on int8..int64/uint8 input values, q/k/v with a strided head dim, stride-0 rows
or sequence-first storage, decode rows with kv_len 0 or below Nq), forward and backward, plain,
packed and decode calls:

- seeds 27300..28799 of ``python tests/fuzz_specs.py`` (extensions drawn at EXTEND_RATE), 1500
  cases: the two defects below, a float32 precision limit (f32_abs_score) and three fuzzer faults
  fixed in the fuzzer (a NaN planted in an empty q, a NaN check under an added transform, a zero
  divisor both refuse counted as a failure; the fuzzer now
  counts a refusal for that reason by both as agreement);
- ~310 cases drawn with extend=True and filtered per construct (zero-length sides, grad tables as
  views / 0-d / cast, params near and past 2**31, negative, shift amounts and signed divisors in
  decode / packed / numpy-and-tensor forms, decode with unlisted dims and casts, packed backward,
  new bias and mod terms with grad tables backward, new mask clauses at offsets >= 2**20, named
  scale and 5-8 heads, bitwise ops on input values, short decode rows, unlisted head dims with
  forced tiles, backward with q, k x8 in float16/float32, dot terms, the new q/k/v layouts): clean;
- by hand, 64 calls: divisors -2**31, -2**31 + 1, 2**31 - 1, -1 (//, %, at positions past 2**31),
  shift amounts 31, 40, 63, 64, 100 and their negatives, ``~ << >> & | ^`` of uint8, int8, int16
  and int32 input values over their whole range: clean.

Defects found:

- ``attncc.reference`` refused a divisor of params and sizes that is 0 with "the divisor of
  Mod(j, pid - 1) is 0 with these params and sizes": sympy's spelling and no values, where the
  contract (docs/spec-language.md, "Division by zero") says it raises what the generated module
  raises, ``the divisor of j % (pid - 1) is 0 with pid = 1``.
- ``attncc.reference`` computed a divisor of params only (``i // (w - 1)``) where the other
  conjuncts held, so ``(j < start_n) and i // (w - 1) == ...`` at ``w = 1`` with no key before
  ``start_n`` returned o = 0 where the module (and the contract) refuse the call (fuzz seed 28394).
"""
from __future__ import annotations

import random

import pytest
import torch

import attncc
from attncc.module_cache import toml_text
from attncc.spec import load_spec


def _pattern(tmp_path, text):
    path = tmp_path / "probe.toml"
    path.write_text(text)
    return load_spec(path)


DIVISORS = [  # (divisor as written in the mask, its params, the sizes passed) -> that divisor is 0
    ("j % (w - 1) == 0", {"w": 1}, {}),
    ("(i + j) // w == 0", {"w": 0}, {}),
    ("j % (n_k - 10) == 0 or j <= i", {}, {"n_k": 10}),
    ("i // (-n_q + w + 1) >= 0", {"w": 7}, {}),  # (the order sympy and the module print it in)
]


@pytest.mark.parametrize("mask, params, sizes", DIVISORS)
def test_the_references_zero_divisor_names_the_expression_and_the_values(tmp_path, mask, params, sizes):
    declared = "".join(f"{k} = 3\n" for k in ("w",) if k in mask)
    p = _pattern(tmp_path, (f"[params]\n{declared}" if declared else "") + f"[mask]\nwhere = '{mask}'\n")
    gen = torch.Generator().manual_seed(random.Random(mask).randrange(2**31))
    q = torch.randn(1, 1, 8, 16, generator=gen, dtype=torch.float64)
    with pytest.raises(ValueError) as e:
        attncc.reference(p, q, q, q, **params, **sizes)
    message = str(e.value)
    written = mask.split(" ==")[0].split(" >=")[0]
    assert f"division by zero: the divisor of {written} is 0 with " in message, message
    values = {**params, **sizes, **({"n_q": 8} if "n_q" in mask else {})}
    assert all(f"{k} = {v}" in message for k, v in values.items()), message
    assert "Mod(" not in message and "floor(" not in message and "these params" not in message, message


def test_the_reference_refuses_a_zero_param_divisor_beside_a_conjunct_no_pair_meets(tmp_path):
    """Fuzz seed 28394: ``(j < start_n) and (i // (w - 1) == j // (w - 1))`` at ``w = 1`` with every
    key at or past ``start_n``. The module refuses the call (a divisor of params only is checked
    before a launch); the reference computed the divisor only where the other conjunct held, saw
    no 0 and returned o = 0: an answer where the contract says both raise."""
    p = _pattern(tmp_path, "[params]\nstart_n = 30\nw = 3\n[mask]\nwhere = '(j < start_n) and (i // (w - 1) == j // (w - 1))'\n")
    gen = torch.Generator().manual_seed(28394)
    q, k = (torch.randn(1, 1, n, 16, generator=gen, dtype=torch.float64) for n in (3, 5))
    for start_n in (17, 0, 40):  # no key before it, and every key before it
        with pytest.raises(ValueError, match=r"the divisor of i // \(w - 1\) is 0 with w = 1"):
            attncc.reference(p, q, k, k, k_offset=29, start_n=start_n, w=1)
    o = attncc.reference(p, q, k, k, k_offset=29, start_n=17, w=2)  # a nonzero divisor: computed
    assert (o == 0).all()


@pytest.mark.parametrize("where, params, refused", [
    ("(j < start_n) and (i // (w - 1) == j // (w - 1))", dict(start_n=17, w=1), True),  # seed 28394
    ("w != 0 and i % w == 1", dict(start_n=17, w=0), False),  # kept nonzero by its conjunct (probe meta27)
    ("w > 0 and (i - j) % w == 0 or j == i", dict(start_n=0, w=0), False),
    ("w > 5 and (i - j) % (w - 1) == 0 or j == i", dict(start_n=0, w=1), True),  # signs only: w - 1 may be 0
    ("w < 5 and i % w == 0 or j == i", dict(start_n=0, w=0), True),  # w < 5 allows w = 0
])
def test_module_and_reference_refuse_the_same_zero_param_divisors(tmp_path, where, params, refused):
    """One rule for a divisor of params beside a conjunct (attncc.spec.signs, session 27 merge of
    probes fuzz27 and meta27): refused by the module before a launch exactly where the reference
    raises, else both compute the same o."""
    spec = {"params": {"start_n": 30, "w": 3}, "mask": {"where": where}}
    p = _pattern(tmp_path, toml_text(spec))
    module = attncc.compile(spec)
    gen = torch.Generator().manual_seed(27)
    q, k = (torch.randn(1, 1, n, 16, generator=gen) for n in (9, 11))
    kw = dict(k_offset=29, **params)
    if refused:
        with pytest.raises(ValueError, match="division by zero: the divisor of"):
            attncc.reference(p, q, k, k, **kw)
        with pytest.raises(ValueError, match="division by zero: the divisor of"):
            module.attention(q, k, k, **kw)
    else:
        o = module.attention(q, k, k, **kw)
        assert torch.allclose(o.double(), attncc.reference(p, q.double(), k.double(), k.double(), **kw), atol=1e-5)
