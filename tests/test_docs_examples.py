"""The TOML examples of docs/spec-language.md §7 ("A few more") and §8 ("Porting from
FlexAttention") are valid specs, and the reference evaluates each on small random inputs."""
from __future__ import annotations

import re

import pytest
import torch

import attncc
from attncc.spec import parse_spec
from cases import ROOT

DOC = (ROOT / "docs" / "spec-language.md").read_text()
SECTION = DOC[DOC.index("### A few more, written from scratch"):]
BLOCKS = re.findall(r"```toml\n(.*?)```", SECTION, re.S)


def test_the_sections_have_examples():
    assert len(BLOCKS) >= 11 and "## 8. Porting from FlexAttention" in SECTION


@pytest.mark.parametrize("k", range(len(BLOCKS)))
def test_example_parses_and_evaluates(k):
    p = parse_spec(BLOCKS[k], f"docs_example_{k}.toml")
    gen = torch.Generator().manual_seed(k)
    B, H, N = 2, 4, 40
    inputs = {}
    for d in p.inputs:
        shape = [{"b": B, "h": H, "n": N}.get(x, x) for x in d.dims]
        if d.dtype.startswith(("int", "uint")):
            inputs[d.name] = torch.randint(0, 4, shape, generator=gen, dtype=getattr(torch, d.dtype))
        elif d.dtype == "bool":
            inputs[d.name] = torch.rand(shape, generator=gen) < 0.5
        else:
            inputs[d.name] = torch.rand(shape, generator=gen) + 0.5
    if "prefix_len" in inputs:
        inputs["prefix_len"] = torch.tensor([5, 17], dtype=torch.int32)
    q, k_, v = (torch.randn(B, h, N, 16, generator=gen) for h in (H, H, H))
    o, lse = attncc.reference(p, q, k_, v, return_lse=True, **inputs)
    assert o.shape == (B, H, N, 16) and not torch.isnan(o).any()
