"""Float literals in mask code keep their float64 value: Triton converts a Python float that is
compared with a tensor (or given to ``tl.where``, ``tl.minimum``, ``tl.maximum``) to a float32
constant first, so ``j * 0.1 > 0.3`` compared with 0.30000001192 and left out j = 3 (Python and
the reference: 0.30000000000000004 > 0.3)."""
from __future__ import annotations

import random

import torch

from attncc._reference import pair_mask
from attncc.spec import parse_spec
from cases import build_inline
from printed import run_printed

CONSTANTS = (0.1, 0.3, 0.7, 1.1, 2.9, 0.2, 1e-3)


def _masks(rng, n):
    out = []
    for _ in range(n):
        c, t = rng.choice(CONSTANTS), rng.choice(CONSTANTS)
        k = rng.randrange(1, 30)
        d = rng.choice((3, 5, 7, 10))
        op = rng.choice(("<", "<=", "==", ">", ">=", "!="))
        out.append(rng.choice((
            f"j * {c} {op} {k} * {c}",
            f"j / {d} {op} {round(k / d, 12)}",
            f"i * {c} {op} j * {c} + {t}",
            f"min(j * {c}, {k} * {c}) {op} {k} * {c}",
            f"max(i * {c}, {t}) {op} j * {c}",
            f"where(j > {k}, j * {c}, {t}) {op} {k} * {c}",
        )))
    return out


def test_mask_code_compares_with_the_literals_float64_value():
    rng = random.Random(11)
    ii, jj = torch.meshgrid(torch.arange(0, 40), torch.arange(0, 40), indexing="ij")
    i, j = ii.reshape(-1), jj.reshape(-1)
    for text in _masks(rng, 60):
        p = parse_spec(f'[mask]\nwhere = "{text}"\n')
        env = {"min": min, "max": max, "where": lambda c, a, b: a if c else b}
        want = torch.tensor([bool(eval(text, {"__builtins__": {}}, {**env, "i": int(a), "j": int(b)}))
                             for a, b in zip(i, j)])
        assert torch.equal(pair_mask(p, q_rows=40, k_rows=40).reshape(-1), want), (text, "reference")
        (got,) = run_printed([p.mask], p.params, {}, i.to(torch.int32), j.to(torch.int32), float64=True,
                             out_dtype=torch.int64)
        bad = (got.bool() != want).nonzero().flatten()
        assert bad.numel() == 0, (text, [(int(i[n]), int(j[n])) for n in bad[:4]])


def test_kernels_allow_the_pair_on_the_literal(tmp_path):
    text = 'head_dim = 16\ndtypes = ["float32"]\n[mask]\nwhere = "j * 0.1 > 0.3 or j / 10 == 0.7"\n'
    _, mod = build_inline({"float_literals": text}, tmp_path)["float_literals"]
    N = 24
    o = mod.attention(torch.zeros(1, 1, N, 16), torch.zeros(1, 1, N, 16), torch.eye(N).view(1, 1, N, N))
    jj = torch.arange(N, dtype=torch.float64).expand(N, N)
    assert torch.equal(o[0, 0] > 0, (jj * 0.1 > 0.3) | (jj / 10 == 0.7))


def test_float_params_keep_their_float64_value_in_masks_and_conditions():
    """A float param is a float64 kernel argument when compiled; under the interpreter it arrives as a
    Python float, which Triton took as a float32 constant beside a tensor: `j * 0.1 > f` with f = 0.3
    left out j = 3 in [mask] and in a condition of [score].mod (found by a probe). Random params and
    overrides, against the reference's pairs."""
    import attncc

    rng = random.Random(11)
    for where in ("j * 0.1 > f", "i * 0.3 <= f + j * 0.1", "(i - j) * f < 0.7"):
        for body in (f'[mask]\nwhere = "{where}"', f'[score]\nmod = "where({where}, s, -inf)"'):
            text = f"[params]\nf = 0.3\n{body}\n"
            mod, p = attncc.compile(text), parse_spec(text)
            for f in (0.3, rng.choice(CONSTANTS), 1.1):
                q, k = torch.zeros(1, 1, 12, 16), torch.zeros(1, 1, 12, 16)
                v = torch.eye(16)[:12].view(1, 1, 12, 16)
                o = mod.attention(q, k, v, f=f)
                allowed = o[0, 0, :, :12] > 0
                want = pair_mask(p, q_rows=12, k_rows=12, params={"f": f})[0, 0]
                assert torch.equal(allowed | ~want.any(-1, keepdim=True), want | ~want.any(-1, keepdim=True)), (where, f)
