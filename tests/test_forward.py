"""Generated forward kernels (under the Triton interpreter) against attncc.reference."""
from __future__ import annotations

import math

import pytest
import torch

import attncc
from cases import REL_TOL, SMALL_PARAMS, SOFTMAX, share, heads_for, inputs_for, module, pattern, rel_err


def run_case(name, *, B=2, Nq=45, Nk=None, D=32, dtype=torch.float32, q_offset=0, k_offset=0, seed=0,
             n_q=None, n_k=None, heads=None):
    p = pattern(name)
    Nk = Nq if Nk is None else Nk
    Hq, Hkv = heads or heads_for(p)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype)
    n = max(q_offset + Nq, k_offset + Nk, n_q or 0, n_k or 0)
    kw = dict(SMALL_PARAMS.get(name, {}), **inputs_for(p, B, Hq, n, gen))
    pos = dict(q_offset=q_offset, k_offset=k_offset, n_q=n_q, n_k=n_k)
    o, lse = module(name).attention(q, k, v, return_lse=True, **pos, **kw)
    ref, ref_lse = attncc.reference(p, q.double(), k.double(), v.double(), return_lse=True, **pos, **kw)
    assert o.shape == ref.shape and o.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert rel_err(o, ref) < REL_TOL[dtype], rel_err(o, ref)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse[finite].double(), ref_lse[finite], atol=1e-3 if dtype == torch.float32 else 5e-2)
    assert (o[~finite] == 0).all()  # rows with no allowed key
    return o, lse


@pytest.mark.parametrize("name", share(SOFTMAX, 0, 2))
def test_spec_fp32_odd_length(name):
    run_case(name, Nq=45 if name != "bigbird" else 150)


@pytest.mark.parametrize("name", share(SOFTMAX, 1, 2))
def test_spec_cross_attention(name):
    run_case(name, Nq=37, Nk=70, seed=1)


@pytest.mark.parametrize("name", ["causal", "sliding_window", "document", "prefix_lm", "alibi", "rope_causal"])
def test_chunk_of_a_sequence_equals_rows_of_the_whole(name):
    """q_offset: a chunk of queries gets exactly the rows of the full computation."""
    p = pattern(name)
    B, Hq, Hkv, N, D = 1, 2, 2, 61, 32
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, h, N, D, generator=gen) for h in (Hq, Hkv, Hkv))
    kw = dict(SMALL_PARAMS.get(name, {}), **inputs_for(p, B, Hq, N, gen))
    full = module(name).attention(q, k, v, **kw)
    chunk = module(name).attention(q[:, :, 40:], k, v, q_offset=40, **kw)
    assert rel_err(chunk, full[:, :, 40:]) < 1e-5


@pytest.mark.parametrize("name", ["causal", "cross_causal", "sliding_window"])
def test_rows_without_keys_are_zero_with_lse_minus_inf(name):
    # keys placed after every query: a causal mask leaves every row empty
    # (cross_causal: j - n_k <= i - n_q with n_q = 200 leaves the first rows without keys)
    o, lse = run_case(name, Nq=20, Nk=33, k_offset=50 if name != "cross_causal" else 0,
                      n_q=None if name != "cross_causal" else 200)
    assert (lse == -math.inf).any() and (o[lse == -math.inf] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["causal", "alibi", "softcap", "t5_bias", "document"])
def test_half_precision(name, dtype):
    run_case(name, Nq=40, dtype=dtype)


@pytest.mark.parametrize("D", [16, 64, 80, 24])
def test_head_dims_including_padded(D):
    run_case("causal", Nq=33, D=D)


@pytest.mark.parametrize("heads", [(4, 1), (6, 3), (3, 3)])
def test_gqa_mqa_mha(heads):
    run_case("sliding_window", Nq=40, heads=heads)


def test_value_dim_differs_from_head_dim():
    p = pattern("causal")
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 2, 30, 32, generator=gen), torch.randn(1, 2, 30, 32, generator=gen)
    v = torch.randn(1, 2, 30, 16, generator=gen)
    o = module("causal").attention(q, k, v)
    assert rel_err(o, attncc.reference(p, q.double(), k.double(), v.double())) < 1e-4


def test_params_override_per_call():
    a = run_case("sliding_window", Nq=40)[0]
    p = pattern("sliding_window")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 40, 32, generator=gen)
    k, v = torch.randn(2, 2, 40, 32, generator=gen), torch.randn(2, 2, 40, 32, generator=gen)
    wide = module("sliding_window").attention(q, k, v, window=3)
    ref = attncc.reference(p, q.double(), k.double(), v.double(), window=3)
    assert rel_err(wide, ref) < 1e-4 and rel_err(wide, a) > 1e-2


def test_non_contiguous_inputs():
    p = pattern("causal")
    gen = torch.Generator().manual_seed(7)
    qkv = torch.randn(2, 40, 3, 4, 32, generator=gen)  # [B, N, 3, H, D] as a fused projection gives
    q, k, v = (qkv[:, :, t].transpose(1, 2) for t in range(3))
    o = module("causal").attention(q, k, v)
    ref = attncc.reference(p, q.double(), k.double(), v.double())
    assert rel_err(o, ref) < 1e-4


def test_gradient_is_not_silently_wrong():
    # the backward kernels are tested in tests/test_backward.py; here: a gradient flows and is right
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 20, 16, generator=gen, requires_grad=True)
    k, v = torch.randn(1, 2, 20, 16, generator=gen), torch.randn(1, 2, 20, 16, generator=gen)
    module("causal").attention(q, k, v).sum().backward()
    qd = q.detach().double().requires_grad_()
    attncc.reference(pattern("causal"), qd, k.double(), v.double()).sum().backward()
    assert rel_err(q.grad, qd.grad) < 1e-3


def test_params_named_like_kernel_locals(tmp_path):
    """A param called like a kernel local (p, acc, l_i) must not shadow it. (q, k, v are keywords of
    attention() and refused as param names: tests/test_spec_limits.py.)"""
    import importlib.util

    from attncc.codegen import build
    from attncc.spec import load_spec

    spec = tmp_path / "clash.toml"
    spec.write_text('[params]\nacc = 5\np = 3\nl_i = 1\n[mask]\nwhere = "abs(i - j) <= acc + p and j <= i + l_i"\n')
    (path,) = build([spec], tmp_path)
    mod_spec = importlib.util.spec_from_file_location("clash", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=gen) for _ in range(3))
    q.requires_grad_(True)
    o = mod.attention(q, k, v, p=4)
    ref = attncc.reference(load_spec(spec), q.double(), k.double(), v.double(), p=4)
    assert rel_err(o, ref) < 1e-4
    o.sum().backward()
    (gq,) = torch.autograd.grad(attncc.reference(load_spec(spec), q.double(), k.double(), v.double(), p=4).sum(), q)
    assert rel_err(q.grad, gq) < 1e-3


@pytest.mark.parametrize("decl", ["[params]\nscale = 0.5", '[inputs]\nscale = { dims = ["h"], dtype = "float32" }'])
def test_a_param_or_input_named_scale_takes_the_scale_keyword(tmp_path, decl):
    """As in attncc.reference: ``scale=`` goes to the spec's own ``scale``; the softmax scale stays the spec's."""
    from cases import build_inline

    use = "scale" if "params" in decl else "scale[h]"
    text = f'{decl}\n[mask]\nwhere = "causal"\n[score]\nbias = "{use} * (j - i)"\n'
    p, mod = build_inline({"named_scale": text}, tmp_path)["named_scale"]
    gen = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(1, h, 30, 16, generator=gen) for h in (2, 1, 1))
    value = 0.25 if "params" in decl else torch.rand(2, generator=gen)
    ref = attncc.reference(p, q.double(), k.double(), v.double(), scale=value)
    assert rel_err(mod.attention(q, k, v, scale=value), ref) < 1e-4
    last = mod.decode(q[:, :, -2:], k, v, kv_len=torch.tensor([30], dtype=torch.int32), scale=value)
    assert rel_err(last, ref[:, :, -2:]) < 1e-4
