"""Probe 18 of docs/spec-language.md against the implementation: what disagreed, each fixed.

- A spec given as a str or dict (attncc.compile) with a lone surrogate raised a UnicodeEncodeError
  from hashing the text, not the SpecError the doc promises for a bad spec; a dict with an integer
  too long for str() a bare ValueError; a dict that contains itself a RecursionError.
- ``dropout_p``: a boolean or a string was a ValueError in the modules (a TypeError for every other
  argument of the wrong type), and ``attncc.reference`` took ``"0.1"`` and ``np.bool_(False)``, and
  anything at all without a keep mask.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import attncc
from attncc.module_cache import toml_text
from attncc.spec import SpecError, parse_spec


@pytest.mark.parametrize("text", ["description = '\ud800'\n", "[mask]\nwhere = 'j <= i # \udcff'\n"])
def test_a_spec_text_with_a_lone_surrogate_is_a_spec_error(text):
    with pytest.raises(SpecError, match="surrogate U\\+D"):
        parse_spec(text)
    with pytest.raises(SpecError, match="surrogate"):
        attncc.compile(text)
    with pytest.raises(SpecError, match="surrogate"):
        attncc.compile({"description": "x\ud800"})


def test_dict_specs_toml_can_not_hold_are_spec_errors():
    with pytest.raises(SpecError, match="head_dim: .*integer of 16610 bits"):
        toml_text({"head_dim": 10**5000})
    loop = []
    loop.append(loop)
    with pytest.raises(SpecError, match="head_dim: .*nested more than 16"):
        toml_text({"head_dim": loop})
    deep = [1]
    for _ in range(17):
        deep = [deep]
    with pytest.raises(SpecError, match="nested"):
        attncc.compile({"params": {"w": deep}})


def _pattern():
    return parse_spec("[mask]\nwhere = 'causal'\n[score]\ndropout = 0.2\n")


@pytest.mark.parametrize("bad,error", [(True, TypeError), (np.bool_(False), TypeError), ("0.1", TypeError),
                                       (torch.tensor(True), TypeError), (1.0, ValueError), (-0.1, ValueError),
                                       (float("nan"), ValueError)])
def test_reference_checks_dropout_p_as_the_modules_do(bad, error):
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    keep = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    for keep_mask in (keep, None):
        with pytest.raises(error, match="dropout_p"):
            attncc.reference(_pattern(), q, q, q, dropout_p=bad, keep_mask=keep_mask)


def test_reference_takes_dropout_p_as_numbers_in_any_dress():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    keep = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    want = attncc.reference(_pattern(), q, q, q, dropout_p=0.25, keep_mask=keep)
    for same in (np.float32(0.25), torch.tensor(0.25)):
        assert torch.equal(attncc.reference(_pattern(), q, q, q, dropout_p=same, keep_mask=keep), want)


def test_module_refuses_a_boolean_dropout_p_with_a_type_error():
    mod = attncc.compile("[mask]\nwhere = 'causal'\n[score]\ndropout = 0.2\n")
    q = torch.randn(1, 1, 16, 16)
    with pytest.raises(TypeError, match="dropout_p must be a number"):
        mod.attention(q, q, q, dropout_p=True, seed=1)
    with pytest.raises(TypeError, match="dropout_p must be a number"):
        mod.dropout_keep_mask(q, q, q, dropout_p="0.1", seed=1)
    with pytest.raises(ValueError, match="dropout_p must be a number"):
        mod.attention(q, q, q, dropout_p=1.0, seed=1)


def test_header_hash_is_of_the_text_as_read(tmp_path):
    """docs §6: the header's hash is the sha256 of the spec's text with line endings as \\n."""
    import hashlib
    import subprocess
    import sys

    from cases import ROOT

    spec = tmp_path / "crlf_probe.toml"
    spec.write_bytes(b'name = "crlf_probe"\r\n[mask]\r\nwhere = "causal"\r\n')
    subprocess.run([sys.executable, "-m", "attncc", "build", str(spec), "--out", str(tmp_path / "out")], check=True,
                   cwd=ROOT, capture_output=True)
    header = (tmp_path / "out" / "crlf_probe.py").read_text().splitlines()[0]
    lf = spec.read_bytes().replace(b"\r\n", b"\n")
    assert f"spec sha256 {hashlib.sha256(lf).hexdigest()[:16]}" in header


@pytest.mark.parametrize("outer,ok", [(31, True), (32, False)])
def test_nested_reductions_count_each_level_s_own_term(outer, ok):
    """docs §3.3: K terms around reductions of n terms in all count K * (1 + n), at most 1024."""
    text = f"[mask]\nwhere = 'sum(sum(j < t + u for u in range(32)) for t in range({outer})) > 0'\n"
    if ok:
        parse_spec(text)
    else:
        with pytest.raises(SpecError, match="1024"):
            parse_spec(text)


def test_a_divisor_that_may_be_0_is_named_in_spec_syntax():
    """docs §3.3: `j % d[b]` is refused at build naming the expression; the message wrote sympy's
    `d(b)`, and suggested `max(d(b), 1)`, a call the language refuses."""
    from attncc.codegen.bounds import check_divisors

    p = parse_spec("[inputs]\nd = { dims = ['b'], dtype = 'int32' }\n[mask]\nwhere = 'j % d[b] == 0'\n")
    with pytest.raises(SpecError, match=r"the divisor of j % d\[b\] may be 0 .* max\(d\[b\], 1\)") as e:
        check_divisors(p)
    assert e.value.key == "[mask].where"
