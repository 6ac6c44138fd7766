"""Generated linear attention (under the Triton interpreter, 16-row chunks) against
attncc.reference (float64) and a float64 autograd of the state form: forward and gradients,
every feature map, causal and not, normalize on and off, GQA/MQA, chunk boundaries, state
carry-over, step-by-step decoding, half precision and the zero-denominator guard."""
from __future__ import annotations

import dataclasses
import importlib.util
import math

import pytest
import torch

import attncc
from attncc._reference import feature_map
from attncc.codegen import render
from attncc.runtime.feature_maps import LINEAR_DENOMINATOR_EPS
from attncc.spec import SpecError, parse_spec
from cases import REL_TOL, module, pattern, rel_err

MAPS = ["elu+1", "relu", "identity", "cosformer", "performer", "taylor"]
F64 = torch.float64
CHUNK = 16  # the interpreter's chunk (attncc.runtime.linear.linear_config)

_BUILT = {}


def linear_module(tmp_path_factory, fmap="elu+1", causal=True, normalize=True, features=24):
    """Render and import a linear spec (cached per spec): (pattern, module)."""
    key = (fmap, causal, normalize, features)
    if key not in _BUILT:
        name = f"lin_{fmap.replace('+', '')}_{int(causal)}{int(normalize)}"
        text = (f"name = '{name}'\nkind = 'linear'\n[feature_map]\nname = '{fmap}'\ncausal = {str(causal).lower()}\n"
                f"normalize = {str(normalize).lower()}\n" + (f"features = {features}\n" if fmap == "performer" else ""))
        if fmap == "taylor":
            text = "head_dim = 16\n" + text
        p = parse_spec(text)
        path = tmp_path_factory.mktemp("linear") / f"{name}.py"
        path.write_text(render(p))
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _BUILT[key] = (p, mod)
    return _BUILT[key]


def qkv(B=1, Hq=2, Hkv=1, Nq=19, Nk=None, D=16, Dv=12, dtype=torch.float32, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    Nk = Nq if Nk is None else Nk
    q, k, v = (torch.randn(*s, generator=g).to(dtype) for s in ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv)))
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def doubles(*ts):
    return tuple(t.detach().double().requires_grad_() for t in ts)


def tolerance(p, dtype=torch.float32):
    # identity features with a normalizer divide by phi(q).z, which random data drives near 0
    if p.feature_map.name == "identity" and p.feature_map.normalize:
        return 1e-3
    return REL_TOL[dtype]


def check_against_reference(p, mod, q, k, v, tol, **kw):
    """forward and dq, dk, dv of mod.attention against attncc.reference in float64."""
    o = mod.attention(q, k, v, **kw)
    qd, kd, vd = doubles(q, k, v)
    ref = attncc.reference(p, qd, kd, vd, **kw)
    assert o.shape == ref.shape and o.dtype == q.dtype and not o.isnan().any()
    assert rel_err(o, ref) < tol, rel_err(o, ref)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(9))
    o.backward(do.to(o.dtype))
    ref.backward(do.double())
    for t, r in ((q, qd), (k, kd), (v, vd)):
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
        assert rel_err(t.grad, r.grad) < 2 * tol, rel_err(t.grad, r.grad)
    return o


def naive(p, q, k, v, s0=None, z0=None, offset=0, period=None):
    """The state form in float64 (autograd-able): o, (S, z) after the keys; the initial state
    (S0 [B, Hkv, F, Dv], z0 [B, Hkv, F]) stands for keys before these."""
    fm = p.feature_map
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    period = period or max(offset + Nq, offset + Nk)
    fq = feature_map(q, fm, torch.arange(offset, offset + Nq), period)
    fk = feature_map(k, fm, torch.arange(offset, offset + Nk), period)
    F = fk.shape[-1]
    s0 = torch.zeros(B, Hkv, F, v.shape[-1], dtype=F64) if s0 is None else s0
    z0 = torch.zeros(B, Hkv, F, dtype=F64) if z0 is None else z0
    group = Hq // Hkv
    a = fq @ fk.repeat_interleave(group, 1).transpose(-1, -2)
    if fm.causal:
        a = a * torch.ones(Nq, Nk, dtype=F64).tril()
    num = a @ v.repeat_interleave(group, 1) + fq @ s0.repeat_interleave(group, 1)
    den = a.sum(-1) + (fq * z0.repeat_interleave(group, 1)[:, :, None, :]).sum(-1) + LINEAR_DENOMINATOR_EPS
    o = num / den[..., None] if fm.normalize else num
    return o, (s0 + fk.transpose(-1, -2) @ v, z0 + fk.sum(-2))


# --- every feature map against the reference --------------------------------------------


# normalize = false is the same template code for every map: taylor (slow in the interpreter) skips it
@pytest.mark.parametrize("fmap,causal,normalize", [(m, c, n) for m in MAPS for c, n in ((True, True), (False, True), (True, False))
                                                   if not (m == "taylor" and not n)])
def test_feature_maps_forward_and_gradients(tmp_path_factory, fmap, causal, normalize):
    p, mod = linear_module(tmp_path_factory, fmap, causal, normalize)
    # GQA, an odd length over two chunks, Dv != D; non-causal: more keys than queries. Taylor has
    # D + 2 feature blocks: D = 6 (padded to 16) keeps it fast under the interpreter.
    q, k, v = qkv(Hq=2, Hkv=1, Nq=19, Nk=19 if causal else 23, D=6 if fmap == "taylor" else 16)
    check_against_reference(p, mod, q, k, v, tolerance(p))


@pytest.mark.parametrize("name", ["linear_elu", "performer"])
def test_spec_modules(name):
    q, k, v = qkv(B=2, Hq=1, Hkv=1, Nq=21, D=16, Dv=16)
    check_against_reference(pattern(name), module(name), q, k, v, REL_TOL[torch.float32])


@pytest.mark.parametrize("N", [2, 15, 16, 17, 32, 33])
def test_chunk_boundaries(N):
    q, k, v = qkv(Nq=N, D=24, Dv=24, seed=N)  # D = 24 is padded to 32 in the kernel
    check_against_reference(pattern("linear_elu"), module("linear_elu"), q, k, v, REL_TOL[torch.float32])


@pytest.mark.parametrize("bwd_chunk", [32, 64])
def test_backward_chunk_other_than_forward_chunk(monkeypatch, bwd_chunk):
    """The backward recomputes the states at its own chunk size (LinearConfig.bwd_chunk, which
    python -m bench --sweep linear-bwd-chunks sets ATTNCC_LINEAR_CONFIG)."""
    monkeypatch.setenv("ATTNCC_LINEAR_CONFIG", f"bwd_chunk={bwd_chunk},scan_dv=16")
    q, k, v = qkv(Hq=2, Hkv=1, Nq=37 if bwd_chunk == 32 else 70)
    check_against_reference(pattern("linear_elu"), module("linear_elu"), q, k, v, REL_TOL[torch.float32])


def test_a_projection_beside_float32_states_takes_32_row_backward_chunks(monkeypatch):
    """GPU configs (linear_config): the performer's backward kernels in float16 (float32 states) and
    float32 need more shared memory at 64 rows than sm90 has (237568 bytes, dQ in float16): 32
    rows there, 64 for bfloat16 and without a projection (tests/test_sm90_compile.py compiles them)."""
    from attncc.runtime import linear as lin

    monkeypatch.setattr(lin, "interpreting", lambda: False)
    for dtype, projection, rows in [(torch.bfloat16, True, 64), (torch.float16, True, 32), (torch.float32, True, 32),
                                    (torch.float16, False, 64), (torch.float32, False, 64)]:
        q = torch.zeros(1, 2, 40, 128, dtype=dtype)
        call = attncc.runtime.bind(module("performer").SPEC, q, q, q)
        assert lin.linear_config(call, 128, 2, projection=projection).bwd_chunk == rows, (dtype, projection)


@pytest.mark.parametrize("value,message", [("bwd_chunk=48", "power of two >= 16"), ("bwd_chunk=8", "power of two >= 16"),
                                           ("bwd_chunks=64", "unknown field 'bwd_chunks'"), ("num_warps=x", "integer")])
def test_config_env_errors(monkeypatch, value, message):
    monkeypatch.setenv("ATTNCC_LINEAR_CONFIG", value)
    with pytest.raises(ValueError, match=message):
        module("linear_elu").attention(*qkv(Nq=4, grad=False))


@pytest.mark.parametrize("heads", [(3, 1), (4, 2), (2, 2)])
def test_gqa_mqa_mha(tmp_path_factory, heads):
    p, mod = linear_module(tmp_path_factory, "performer", True, True)
    q, k, v = qkv(Hq=heads[0], Hkv=heads[1], Nq=18)
    check_against_reference(p, mod, q, k, v, REL_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    q, k, v = qkv(Hq=2, Hkv=1, Nq=33, D=16, Dv=16, dtype=dtype)
    check_against_reference(pattern("linear_elu"), module("linear_elu"), q, k, v, REL_TOL[dtype])


def test_non_contiguous_inputs_and_empty_calls():
    mod, p = module("linear_elu"), pattern("linear_elu")
    x = torch.randn(1, 20, 3, 2, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
    o = mod.attention(*(x[:, :, t].transpose(1, 2) for t in range(3)))  # [B, N, 3, H, D]: a fused projection
    xd = x.detach().double().requires_grad_()
    ref = attncc.reference(p, *(xd[:, :, t].transpose(1, 2) for t in range(3)))
    assert rel_err(o, ref) < 1e-5
    o.sum().backward()
    ref.sum().backward()
    assert rel_err(x.grad, xd.grad) < 1e-4
    empty = torch.zeros(1, 2, 0, 16, requires_grad=True)
    o, (S, z) = mod.attention(empty, empty, empty, return_state=True)
    assert o.shape == (1, 2, 0, 16) and (S == 0).all() and (z == 0).all()


def test_positions(tmp_path_factory):
    """cosFormer's features depend on positions: q_offset = k_offset and n_q/n_k matter (causal);
    non-causal calls take any offsets and lengths."""
    p, mod = linear_module(tmp_path_factory, "cosformer", True, True)
    q, k, v = qkv(Nq=18)
    check_against_reference(p, mod, q, k, v, 1e-4, q_offset=7, k_offset=7, n_q=40, n_k=40)
    p, mod = linear_module(tmp_path_factory, "cosformer", False, True)
    q, k, v = qkv(Nq=9, Nk=30)
    check_against_reference(p, mod, q, k, v, 1e-4, q_offset=30, k_offset=3)


# --- state carry-over and decoding ------------------------------------------------------


@pytest.mark.parametrize("fmap", ["elu+1", "cosformer", "performer"])
def test_state_carry_equals_one_long_call(tmp_path_factory, fmap):
    p, mod = linear_module(tmp_path_factory, fmap, True, True)
    N, cut = 45, 21  # the cut is not on a chunk boundary
    q, k, v = qkv(Hq=4, Hkv=2, Nq=N, grad=False)
    whole, state = mod.attention(q, k, v, return_state=True)
    pos = dict(n_q=N, n_k=N)  # cosFormer's M is the whole sequence's length
    o1, s1 = mod.attention(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], return_state=True, **pos)
    o2, s2 = mod.attention(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], initial_state=s1, return_state=True,
                           q_offset=cut, k_offset=cut, **pos)
    assert rel_err(torch.cat([o1, o2], 2), whole.double()) < 1e-5
    ref, (S, z) = naive(p, *doubles(q, k, v))
    assert rel_err(whole, ref) < 1e-5
    for got, want in ((state[0], S), (state[1], z), (s2[0], S), (s2[1], z)):
        assert got.dtype == torch.float32 and rel_err(got, want) < 1e-5


@pytest.mark.parametrize("causal", [True, False])
def test_initial_state_gradients(tmp_path_factory, causal):
    """Gradients flow into the initial state and out of the final one (training over chunks)."""
    p, mod = linear_module(tmp_path_factory, "elu+1", causal, True)
    q, k, v = qkv(Hq=2, Hkv=1, Nq=20, Nk=20 if causal else 26)
    g = torch.Generator().manual_seed(4)
    s0 = (torch.rand(1, 1, 16, 12, generator=g) * 3).requires_grad_()
    z0 = (torch.rand(1, 1, 16, generator=g) * 3 + 1).requires_grad_()
    o, (S, z) = mod.attention(q, k, v, initial_state=(s0, z0), return_state=True, q_offset=5, k_offset=5)
    sign = S.detach().sign()
    ((o * o).sum() + (S * sign).sum() * 0.1 + z.sum() * 0.3).backward()
    qd, kd, vd, s0d, z0d = doubles(q, k, v, s0, z0)
    ref, (Sr, zr) = naive(p, qd, kd, vd, s0d, z0d, offset=5)
    assert rel_err(o, ref) < 1e-5 and rel_err(S, Sr) < 1e-5 and rel_err(z, zr) < 1e-5
    ((ref * ref).sum() + (Sr * sign.double()).sum() * 0.1 + zr.sum() * 0.3).backward()
    for t, r in ((q, qd), (k, kd), (v, vd), (s0, s0d), (z0, z0d)):
        assert rel_err(t.grad, r.grad) < 1e-4, rel_err(t.grad, r.grad)


def test_gradients_through_a_carried_state_equal_one_long_call():
    mod = module("linear_elu")
    q, k, v = qkv(Hq=2, Hkv=2, Nq=40)
    mod.attention(q, k, v).pow(2).sum().backward()
    want = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o1, s1 = mod.attention(q2[:, :, :17], k2[:, :, :17], v2[:, :, :17], return_state=True)
    o2 = mod.attention(q2[:, :, 17:], k2[:, :, 17:], v2[:, :, 17:], initial_state=s1, q_offset=17, k_offset=17)
    (o1.pow(2).sum() + o2.pow(2).sum()).backward()
    for t, w in zip((q2, k2, v2), want):
        assert rel_err(t.grad, w.double()) < 1e-5


@pytest.mark.parametrize("fmap", ["elu+1", "cosformer", "performer"])
def test_step_decoding_equals_causal_call(tmp_path_factory, fmap):
    p, mod = linear_module(tmp_path_factory, fmap, True, True)
    N = 7
    q, k, v = qkv(B=2, Hq=2, Hkv=1, Nq=N, grad=False)
    whole, final = mod.attention(q, k, v, return_state=True)
    state, rows = None, []
    for t in range(N):
        o_t, state = mod.step(q[:, :, t], k[:, :, t], v[:, :, t], state, position=t, n=N)
        assert o_t.shape == (2, 2, 12)
        rows.append(o_t)
    assert rel_err(torch.stack(rows, 2), whole.double()) < 1e-5
    assert rel_err(state[0], final[0].double()) < 1e-5 and rel_err(state[1], final[1].double()) < 1e-5
    o_t, _ = mod.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], None, position=0, n=N)  # [B, H, 1, D] layout
    assert o_t.shape == (2, 2, 1, 12) and rel_err(o_t, whole[:, :, :1].double()) < 1e-5


# --- numerics and options ---------------------------------------------------------------


def test_all_zero_features_give_zero_not_nan(tmp_path_factory):
    p, mod = linear_module(tmp_path_factory, "relu", True, True)
    q, k, v = qkv(Nq=20)
    q = (-q.detach().abs() - 0.1).requires_grad_()  # relu(q) = 0: the denominator is exactly 0 (+ eps)
    o = mod.attention(q, k, v)
    assert (o == 0).all()
    o.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    o_t, _ = mod.step(q[:, :, 0].detach(), k[:, :, 0].detach(), v[:, :, 0].detach())
    assert (o_t == 0).all()


def test_taylor_features_are_the_second_order_expansion_of_exp():
    """phi(q).phi(k) = 1 + q.k / sqrt(D) + (q.k)^2 / (2 D) exactly, with 1 + D + D^2 features."""
    fm = pattern("linear_taylor").feature_map
    g = torch.Generator().manual_seed(5)
    for d in (1, 5, 16):
        q, k = torch.randn(7, d, generator=g, dtype=F64), torch.randn(9, d, generator=g, dtype=F64)
        fq, fk = feature_map(q, fm), feature_map(k, fm)
        assert fq.shape == (7, 1 + d + d * d)
        s = q @ k.T
        torch.testing.assert_close(fq @ fk.T, 1 + s / math.sqrt(d) + s * s / (2 * d), rtol=1e-12, atol=1e-12)


def test_taylor_spec_module_state_and_decoding():
    """generated/linear_taylor: forward, the returned state (its feature order is the reference's)
    and step decoding; D = 4 (F = 21) keeps the interpreter fast."""
    p, mod = pattern("linear_taylor"), module("linear_taylor")
    q, k, v = qkv(B=1, Hq=2, Hkv=1, Nq=18, D=4, Dv=8, grad=False)
    o, (S, z) = mod.attention(q, k, v, return_state=True)
    ref, (Sr, zr) = naive(p, *doubles(q, k, v))
    assert S.shape == (1, 1, 21, 8)
    assert rel_err(o, attncc.reference(p, *doubles(q, k, v))) < 1e-5 and rel_err(o, ref) < 1e-5
    assert rel_err(S, Sr) < 1e-5 and rel_err(z, zr) < 1e-5
    state = None
    for t in range(3):
        o_t, state = mod.step(q[:, :, t], k[:, :, t], v[:, :, t], state, position=t)
        assert rel_err(o_t, o[:, :, t].double()) < 1e-5


def test_taylor_head_dim_limit():
    from attncc.spec.ir import TAYLOR_MAX_HEAD_DIM

    with pytest.raises(SpecError, match=r"taylor.*head dims up to 32.*\[128\]"):
        parse_spec("kind = 'linear'\n[feature_map]\nname = 'taylor'\n")
    q = torch.zeros(1, 1, 4, TAYLOR_MAX_HEAD_DIM + 1)
    with pytest.raises(ValueError, match=r"taylor.*up to 32, got D = 33"):
        module("linear_taylor").attention(q, q, q)


def test_performer_seed_redraws_the_projection():
    p, mod = pattern("performer"), module("performer")
    q, k, v = qkv(Nq=12, grad=False)
    o3 = mod.attention(q, k, v, seed=3)
    p3 = dataclasses.replace(p, feature_map=dataclasses.replace(p.feature_map, seed=3))
    assert rel_err(o3, attncc.reference(p3, *doubles(q, k, v))) < 1e-5
    assert rel_err(o3, mod.attention(q, k, v).double()) > 1e-3


def test_errors():
    mod = module("linear_elu")
    q, k, v = qkv(Nq=8, grad=False)
    with pytest.raises(NotImplementedError, match="initial_state"):
        mod.attention(q, k[:, :, :5], v[:, :, :5])
    with pytest.raises(NotImplementedError, match="same positions"):
        mod.attention(q, k, v, q_offset=3)
    with pytest.raises(ValueError, match=r"S must have shape \[1, 1, 16, 12\]"):
        mod.attention(q, k, v, initial_state=(torch.zeros(1, 2, 16, 12), torch.zeros(1, 2, 16)))
    with pytest.raises(TypeError, match="pair"):
        mod.attention(q, k, v, initial_state=torch.zeros(1, 1, 16, 12))
    with pytest.raises(TypeError, match="performer"):
        mod.attention(q, k, v, seed=1)
    with pytest.raises(ValueError, match="one token"):
        mod.step(q[:, :, :2], k[:, :, :2], v[:, :, :2])
    for seed, error in ((-1, ValueError), (2**63, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="seed must be"):  # a wrong type a TypeError, a wrong value a ValueError
            module("performer").attention(q, k, v, seed=seed)


def test_eps_is_documented_in_the_generated_module():
    text = module("linear_elu").__doc__
    assert "eps = LINEAR_DENOMINATOR_EPS" in text and "1e-6" in text and math.isclose(LINEAR_DENOMINATOR_EPS, 1e-6)
