"""Probe 18: integer and floating-point semantics of the generated kernels against the reference,
at positions and values where the arithmetic's types run out (int32 past 2**31, float64 past 2**53).

- The tile classifier (``tiles.classify_grid``, the torch path, and the generated tile-list
  kernel) computes in float64. Positions past 2**53 (offsets reach 2**62) were rounded to the
  nearest float64 and the arithmetic on them rounded too, so a tile holding both allowed and
  refused pairs could be classified FULL or EMPTY: ``j <= i + d[b]`` at ``q_offset = k_offset =
  2**61`` with 16 x 16 tiles ran its diagonal tiles unmasked (o 84 % off, gradients too).
  Now positions are rounded outward and every arithmetic step moves its ends outward past 2**53.
"""
from __future__ import annotations

import pytest
import torch

import attncc
from attncc._reference import pair_mask
from attncc.analysis import analyze
from attncc.core import tiles
from attncc.spec import parse_spec
from cases import build_inline, rel_err
from fuzz_specs import _tile_config
from tile_oracle import tile_classes

BIG = [2**61, 2**61 + 300, 2**55 + 3, 2**53 - 9, 2**53 + 2**40]

CLASSIFIED = {  # masks whose tiles the classifier decides at every call (inputs) or on block lists
    "shifted": ('[inputs]\nd = { dims = ["b"], dtype = "int64" }\n', "j <= i + d[b]"),
    "band": ('[inputs]\nd = { dims = ["b"], dtype = "int64" }\n', "i - j < d[b] and j <= i"),
    "scaled": ('[inputs]\nd = { dims = ["b"], dtype = "int64" }\n', "3 * j <= 3 * i + d[b]"),
    "param": ("[params]\nw = 9007199254740997\n", "j <= w and j <= i"),
    "residue": ('[inputs]\nd = { dims = ["b"], dtype = "int64" }\n', "(i - j) % 5 == d[b] or (i + j) // 3 > i - 2 + d[b]"),
}


def _inputs(base):
    return {"d": torch.tensor([0, 3, -2], dtype=torch.int64)}


@pytest.mark.parametrize("name", sorted(CLASSIFIED))
def test_classifier_is_sound_past_2_53(name):
    """Every tile the classifier calls EMPTY holds no allowed pair, every FULL one only allowed
    pairs, at positions past 2**53 (torch path; brute force on every pair)."""
    head, mask = CLASSIFIED[name]
    p = parse_spec(f'{head}[mask]\nwhere = "{mask}"\n')
    program = analyze(p).classifier
    bad = []
    for base in BIG:
        for qo, ko in ((base + 16, base), (base, base + 5), (base + 3, base + 3)):
            inputs = {k: v for k, v in _inputs(base).items() if k in {d.name for d in p.inputs}}
            truth = pair_mask(p, q_rows=40, k_rows=37, q_offset=qo, k_offset=ko, batch=3, inputs=inputs)
            for bm, bn in ((1, 1), (4, 4), (16, 16), (8, 32)):
                grid = tiles.classify_grid(program, q_offset=qo, k_offset=ko, q_rows=40, k_rows=37, block_m=bm,
                                           block_n=bn, n_q=qo + 40, n_k=ko + 37, params=p.param_values,
                                           inputs=inputs, batch=3, heads=1, device="cpu")
                for b in range(3):
                    want = tile_classes(truth[b, 0], bm, bn)[0]
                    got = grid[min(b, grid.shape[0] - 1), 0]
                    wrong = ((got == tiles.EMPTY) & (want != tiles.EMPTY)) | ((got == tiles.FULL) & (want != tiles.FULL))
                    if wrong.any():
                        bad.append((hex(qo), hex(ko), bm, bn, b, int(wrong.sum())))
    assert not bad, bad[:5]


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    head, mask = CLASSIFIED["shifted"]
    return build_inline({"p18_shifted": f'head_dim = 16\n{head}[mask]\nwhere = "{mask}"\n'},
                        tmp_path_factory.mktemp("p18"))["p18_shifted"]


@pytest.mark.parametrize("base", [2**61, 2**55 + 3])
def test_block_lists_past_2_53_in_kernels(shifted, base):
    """The tile-list kernel (interpreter) and the attention kernels at q_offset = k_offset past 2**53:
    forward and backward equal the reference (the diagonal tiles were run unmasked: o 84 % off)."""
    p, mod = shifted
    gen = torch.Generator().manual_seed(base % 1000)
    q, k, v = (torch.randn(2, 1, 64, 16, generator=gen).requires_grad_() for _ in range(3))
    d = torch.tensor([0, 3])
    with _tile_config(((16, 16), (16, 16), (16, 16))):
        o, lse = mod.attention(q, k, v, d=d, q_offset=base, k_offset=base, return_lse=True)
        g = torch.randn(o.shape, generator=gen)
        grads = torch.autograd.grad((o * g).sum(), (q, k, v))
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, ref_lse = attncc.reference(p, qd, kd, vd, d=d, q_offset=base, k_offset=base, return_lse=True)
    assert rel_err(o.detach(), ref.detach()) < 1e-4
    assert torch.allclose(lse.double(), ref_lse.detach(), atol=1e-4)
    for x, y in zip(grads, torch.autograd.grad((ref * g.double()).sum(), (qd, kd, vd))):
        assert rel_err(x, y) < 1e-4


def test_float_inequality_beside_a_head_condition_builds(tmp_path):
    """`j != 0.5` is True for integer positions, so the mask simplifies to True after its `w >= h`
    part was hoisted: the hoisted definition read h and w, which the exact tile kernel no longer
    took (attncc (internal): names undefined, at build). Definitions nothing reads are dropped."""
    p, mod = build_inline({"p18_ne": '[params]\nw = 64\n[mask]\nwhere = "(w >= h) | (j != 0.5)"\n'}, tmp_path)["p18_ne"]
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    assert rel_err(mod.attention(q, k, v), attncc.reference(p, q.double(), k.double(), v.double())) < 1e-4
