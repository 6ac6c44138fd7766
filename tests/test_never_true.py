"""A mask that is never true (contract v1): it builds, every row gives o = 0 and lse = -inf,
every gradient is 0, and `attncc explain` warns."""
from __future__ import annotations

import math

import pytest
import torch

import attncc
from attncc.explain import main_explain
from cases import build_inline

SPECS = {
    # and_masks(causal, anti_causal): sympy proves it false
    "never_and": '[mask]\nwhere = "j <= i and j > i"\n',
    "never_literal": '[mask]\nwhere = "False"\n',
    # a negative position: false for every j >= 0
    "never_mod": '[params]\nw = 3\n[score]\nmod = "where(j < 0, s * w, -inf)"\n',
    "never_with_inputs": ('[inputs]\ndoc = { dims = ["b", "n"], dtype = "int32" }\n'
                          '[mask]\nwhere = "doc[b, i] == doc[b, j] and i < 0"\n'),
}


@pytest.fixture(scope="module")
def never(tmp_path_factory):
    return build_inline(SPECS, tmp_path_factory.mktemp("never"))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_no_pair_gives_zero_output_minus_inf_lse_and_zero_gradients(never, name):
    p, mod = never[name]
    assert p.mask is not None  # the mask is kept (false), not dropped
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 37, 16, generator=gen, requires_grad=True) for h in (4, 2, 2))
    kw = {"doc": torch.zeros(2, 40, dtype=torch.int32)} if p.inputs else {}
    o, lse = mod.attention(q, k, v, return_lse=True, **kw)
    ref_o, ref_lse = attncc.reference(p, q.detach(), k.detach(), v.detach(), return_lse=True, **kw)
    assert (o == 0).all() and (ref_o == 0).all()
    assert (lse == -math.inf).all() and (ref_lse == -math.inf).all()
    grads = torch.autograd.grad([o, lse], [q, k, v], [torch.randn_like(o), torch.randn_like(lse)])
    assert all((g == 0).all() for g in grads)
    last = mod.decode(q[:, :, -1:].detach(), k.detach(), v.detach(), kv_len=torch.tensor([37, 20]), **kw)
    assert (last == 0).all()


def test_explain_warns(tmp_path, capsys):
    path = tmp_path / "never.toml"
    path.write_text(SPECS["never_and"])
    assert main_explain([str(path), "--n", "128"]) == 0
    assert "warning     the mask is never true" in capsys.readouterr().out
    path.write_text('[mask]\nwhere = "causal"\n')
    assert main_explain([str(path), "--n", "128"]) == 0
    assert "warning" not in capsys.readouterr().out
