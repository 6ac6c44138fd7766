"""Probe 28: the second extension layer of tests/fuzz_specs.py (extend2_draft, extend2_call) and
what it found.

Blind spots of the earlier draws (random_spec/random_call, extend_draft/extend_call) that the layer
draws now, each named by :func:`fuzz_specs.extend2_features` (checked below): dropout (keep mask from
``dropout_keep_mask`` handed to the reference; packed calls, backward, ``dropout_p``/``training``
overrides), input reads outside the input's extent (negative indices, past the end, past the last
head or batch row, tables shorter than the heads), inputs of dims ``["n", "b"]``, ``["h", "n", "n"]``,
``["b", "h", "n"]`` (masks, with GQA), ``["h", "b"]``; the residue-class and column-split clauses
with the splits forced on; ``n_q``, ``n_k``, ``alibi`` and the aliases inside biases and
transforms; conditions on the score beside tables, positions and a softcap; int params in float
score arithmetic; RoPE of rotary dims 2-16 and thetas 1.5-1e6, and far into a sequence (2**20 to
2**32 + 5); offsets, ``n_q``, ``n_k`` and ``scale=`` as numpy scalars and (int32) tensors; k and v of
batch 1 beside q's batch; forwards without the LSE; Nq far from Nk; decode pages of 17, 24 or 48
rows, ``kv_len`` as a list or int64, int64 block tables with garbage past each row's pages.

Probed (``python tests/fuzz_specs.py --extend2 yes``, the first layer now and then): seeds
40000-41449 (1300 of them with ``--poison``: torch.empty fills NaN, so a read of memory nothing
wrote fails every run) and 41450-41849 with ``--backward yes --poison``: clean but for seed 40003
(below) and 41604, a gap of the harness (a packed call refused for ``j % (blk - 1)`` at ``blk = 1``,
as the reference refuses it: _run_packed now checks that, as _run_built did).

Found and fixed:

- An input's "b" or "h" dim read at an index other than ``b`` or ``h`` itself (``t[h + 2, j % 5]``,
  ``x[b + 1, j]``, ``d[h - 1, j]``) had no bounds check in the kernels: attncc.codegen.softmax's
  Inputs.address guarded every dim but those two, taking their index to be in range, so a read past
  the last head or batch row loaded whatever memory followed the tensor (the contract: "An index
  outside an input's extent reads 0, in every dim"), forward, backward, decode alike, and the
  gradient of a ``grad = true`` table read that way was added (atomically) past its buffer, the
  one-hot path (a small table dim read at ``(i - j) % 5``) without a check on its other dims at all.
  Fuzz seed 40003 (``--extend2 yes``): o 0.28 off, relative, and different from run to run (the
  memory after the table). A dim of "b" or "h" is now checked unless it is read at ``b`` or ``h``.
"""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import attncc
import fuzz_specs as F
from cases import build_inline

# (declaration, expression, where, fill of the memory after the table)
PAST_THE_HEADS = [
    ('t = { dims = ["h", 5], dtype = "float32" }', "t[h + 2, j % 5]", "bias", 1e4),
    ('t = { dims = ["b", "n"], dtype = "float32" }', "t[b + 1, j]", "bias", 1e4),
    ('t = { dims = ["h", "n"], dtype = "float32" }', "0.5 * t[h - 1, j]", "bias", 1e4),
    ('t = { dims = ["h", "n"], dtype = "float32" }', "s + t[h + 1, i] * t[h, j]", "mod", 1e4),
    ('t = { dims = ["h", "n"], dtype = "int32" }', "t[h + 1, j] == 0 or j == i", "mask", 1),
    ('t = { dims = ["b", "n"], dtype = "bool" }', "not t[b + 1, j] or j == i", "mask", 1),
]


def _table(decl: str, shape, fill, gen):
    """The table as a view inside a larger buffer whose other entries are ``fill``: a read past the
    table's end (in any dim) sees ``fill``, not 0."""
    dtype = {"float32": torch.float32, "int32": torch.int32, "bool": torch.bool}[re.search(r'dtype = "(\w+)"', decl)[1]]
    n = torch.Size(shape).numel()
    big = torch.full((3 * n + 64,), fill, dtype=dtype)
    t = big[16:16 + n].view(*shape)
    if dtype == torch.float32:
        t.copy_(torch.randn(*shape, generator=gen))
    else:
        t.copy_(torch.zeros(*shape, dtype=dtype))  # 0 / False: what a read past the end must see too
    return t


def _spec(decl, expr, where):
    key = {"bias": "[score]\nbias", "mod": "[score]\nmod", "mask": "[mask]\nwhere"}[where]
    return f'head_dim = [16]\ndtypes = ["float32"]\n[inputs]\n{decl}\n{key} = "{expr}"\n'


@pytest.mark.parametrize("case", range(len(PAST_THE_HEADS)))
def test_an_index_past_the_heads_or_batch_reads_zero(tmp_path, case):
    decl, expr, where, fill = PAST_THE_HEADS[case]
    pattern, mod = build_inline({f"past{case}": _spec(decl, expr, where)}, tmp_path)[f"past{case}"]
    gen = torch.Generator().manual_seed(case)
    B, H, N = 2, 2, 20
    q, k, v = (torch.randn(B, H, N, 16, generator=gen) for _ in range(3))
    dims = re.search(r"dims = \[(.*?)\]", decl)[1].replace('"', "").split(", ")
    t = _table(decl, [{"b": B, "h": H, "n": N}.get(x) or int(x) for x in dims], fill, gen)
    o, lse = mod.attention(q, k, v, t=t, return_lse=True)
    ref, ref_lse = attncc.reference(pattern, q.double(), k.double(), v.double(), t=t, return_lse=True)
    assert torch.allclose(o.double(), ref, atol=1e-4), float((o.double() - ref).abs().max())
    assert torch.allclose(lse.double(), ref_lse, atol=1e-4), float((lse.double() - ref_lse).abs().max())
    # decode: the last 3 rows of each batch row against a cache of the keys
    kv_len = torch.tensor([N, N - 4], dtype=torch.int32)
    od = mod.decode(q[:, :, -3:], k, v, kv_len=kv_len, t=t)
    for b in range(B):
        n = int(kv_len[b])
        rb = attncc.reference(pattern, q[:, :, -3:].double(), k[:, :, :n].double(), v[:, :, :n].double(),
                              q_offset=n - 3, t=t)[b]
        assert torch.allclose(od[b].double(), rb, atol=1e-4), (b, float((od[b].double() - rb).abs().max()))


@pytest.mark.parametrize("bias", ["t[h + 2, (i - j) % 5]", "t[h + 1, j % 5] * 0.5", "t[b + 1, j % 5]"])
def test_the_gradient_of_a_table_read_past_the_heads(tmp_path, bias):
    """Entries past the table get no gradient, and nothing is added past its gradient buffer: the
    dQ kernel's atomic adds are masked along every dim (the one-hot path, ``(i - j) % 5`` in a dim of
    5, along the others too)."""
    dim0 = "b" if "b + 1" in bias else "h"
    text = (f'head_dim = [16]\ndtypes = ["float32"]\n[inputs]\nt = {{ dims = ["{dim0}", 5], dtype = "float32", grad = true }}\n'
            f'[score]\nbias = "{bias}"\n')
    name = "pastgrad"
    pattern, mod = build_inline({name: text}, tmp_path)[name]
    source = (tmp_path / "gen" / f"{name}.py").read_text()
    adds = [line for line in source.splitlines() if "tl.atomic_add(gptr_t" in line]
    assert adds and all("size0_t" in line for line in adds), adds
    gen = torch.Generator().manual_seed(1)
    B, H, N = 2, 3, 24
    q, k, v = (torch.randn(B, H, N, 16, generator=gen, requires_grad=True) for _ in range(3))
    t = torch.randn(B if dim0 == "b" else H, 5, generator=gen, requires_grad=True)
    g = torch.randn(B, H, N, 16, generator=gen)
    grads = torch.autograd.grad((mod.attention(q, k, v, t=t) * g).sum(), (q, k, v, t))
    refs = [x.detach().double().requires_grad_() for x in (q, k, v, t)]
    ref = attncc.reference(pattern, *refs[:3], t=refs[3])
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), refs)
    for x, r in zip(grads, ref_grads):
        assert torch.allclose(x.double(), r, atol=1e-4), float((x.double() - r).abs().max())


def test_fuzz_seed_40003():
    """The seed that found it (its o differed from run to run: the memory after the table)."""
    assert F.check_case(40003, extend=None, extend2=True) is None


# ---------------------------------------------------------------------------------------------
# the second extension layer draws what it is there for
# ---------------------------------------------------------------------------------------------

EXTEND2_FEATURES = {
    "oob_index", "short_head_table", "n_first_input", "head_pair_table", "per_head_mask_input", "head_batch_input",
    "modulo", "alibi_expr", "sizes", "aliases", "score_cond", "score_cond_softcap", "sizes_in_mod", "rope_variant",
    "dropout", "dropout_varlen", "dropout_backward", "rope_far", "kv_batch1", "splits", "no_lse",
    "form_np_int32", "form_np_int64", "form_tensor0", "form_tensor1", "form_tensor_int32", "form_np_float32",
    "form_np_float64", "odd_pages", "kv_len_list", "kv_len_int64", "table_int64_wide", "skewed",
}


def test_extend2_draws_every_feature():
    """Over 400 seeds the second layer draws each of its features (extend2_features names them)."""
    seen = set()
    for seed in range(400):
        seen |= F.extend2_features(*F.draw_case(seed, extend=None, extend2=True))
    assert EXTEND2_FEATURES <= seen, sorted(EXTEND2_FEATURES - seen)


def test_extend2_leaves_the_earlier_draws_alone():
    """extend2=False (draw_case's default) draws what seeds drew before the layer; a case the layer
    extends keeps every earlier draw of its spec and adds to it."""
    for seed in range(60):
        d0, p0 = F.draw_case(seed, extend=None)
        d1, p1 = F.draw_case(seed, extend=None, extend2=False)
        assert (d0, p0) == (d1, p1)
        d2, p2 = F.draw_case(seed, extend=None, extend2=True)
        assert d2.bias[:len(d0.bias)] == d0.bias and (d0.mask is None or _contains(d2.mask, d0.mask)), seed
        assert d0.mod is None or d2.mod == d0.mod, seed
        assert (p2.seed, p2.B, p2.dtype, p2.backward, p2.tiles) == (p0.seed, p0.B, p0.dtype, p0.backward, p0.tiles)
        plain = dataclasses.replace(p2, number_forms=(), kv_batch1=False, splits=False, no_lse=False, dropout=None)
        assert plain.overrides[:len(p0.overrides)] == p0.overrides


def _contains(mask, part) -> bool:
    return mask == part or (isinstance(mask, F.Node) and any(_contains(k, part) for k in mask.kids))
