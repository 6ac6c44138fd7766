"""The float64 reference against independent formulas: SDPA, hand-written bias/RoPE/T5/ALiBi
code, a naive loop for linear attention, and sympy's own evaluation of the masks."""
from __future__ import annotations

import glob
import math
import random
from pathlib import Path

import pytest
import sympy
import torch
import torch.nn.functional as F
from sympy.core.function import AppliedUndef

from attncc._reference import evaluate, index_env, pair_mask, reference
from attncc.runtime.feature_maps import performer_projection
from attncc.spec import load_spec, parse_spec
from attncc.spec import symbols as S
from attncc.spec.builtins import AlibiSlope, Bucket, FloatDiv

SPECS = Path(__file__).resolve().parent.parent / "specs"
F64 = torch.float64
TOL = dict(atol=1e-10, rtol=1e-9)


def spec(name):
    return load_spec(SPECS / f"{name}.toml")


def qkv(B=2, Hq=4, Hkv=None, Nq=37, Nk=None, D=16, Dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    Hkv, Nk, Dv = Hkv or Hq, Nk or Nq, Dv or D
    return (torch.randn(B, Hq, Nq, D, generator=g, dtype=F64), torch.randn(B, Hkv, Nk, D, generator=g, dtype=F64),
            torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=F64))


def sdpa(q, k, v, mask=None, **kw):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)


def positions(Nq, Nk):
    return torch.arange(Nq)[:, None], torch.arange(Nk)[None, :]


def masked_lse(q, k, bias, mask, scale):
    s = scale * q @ k.transpose(-1, -2) + bias
    return torch.logsumexp(s.masked_fill(~mask, -math.inf), dim=-1)


# --- softmax against SDPA ------------------------------------------------------------


def test_dense_matches_sdpa_and_logsumexp():
    q, k, v = qkv(Nq=29, Nk=41, Dv=8)
    o, lse = reference(spec("dense"), q, k, v, return_lse=True)
    assert o.dtype == lse.dtype == F64 and lse.shape == (2, 4, 29)
    torch.testing.assert_close(o, sdpa(q, k, v), **TOL)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / 4.0, dim=-1), **TOL)


def test_causal_matches_sdpa_is_causal():
    q, k, v = qkv(Nq=45)
    o, lse = reference(spec("causal"), q, k, v, return_lse=True)
    torch.testing.assert_close(o, sdpa(q, k, v, is_causal=True), **TOL)
    i, j = positions(45, 45)
    torch.testing.assert_close(lse, masked_lse(q, k, 0.0, j <= i, 0.25), **TOL)


def test_sliding_window_with_param_override():
    q, k, v = qkv(Nq=50)
    i, j = positions(50, 50)
    for window, kw in ((1024, {}), (7, {"window": 7})):
        o = reference(spec("sliding_window"), q, k, v, **kw)
        torch.testing.assert_close(o, sdpa(q, k, v, (j <= i) & (i - j < window)), **TOL)


@pytest.mark.parametrize("name,mask", [
    ("local_bidirectional", lambda i, j: (i - j).abs() <= 256),
    ("longformer", lambda i, j: (i < 64) | (j < 64) | ((i - j).abs() <= 256)),
    ("prefix_lm", lambda i, j: (j < 512) | (j <= i)),
    ("dilated", lambda i, j: (j <= i) & (i - j < 2048) & ((i - j) % 4 == 0)),
    ("strided", lambda i, j: (j <= i) & (((i - j) < 128) | (j % 128 == 127))),
])
def test_affine_masks_match_sdpa(name, mask):
    q, k, v = qkv(B=1, Hq=2, Nq=300, D=8)
    i, j = positions(300, 300)
    torch.testing.assert_close(reference(spec(name), q, k, v), sdpa(q, k, v, mask(i, j)), **TOL)


def test_cross_causal_is_bottom_right_aligned():
    q, k, v = qkv(Nq=13, Nk=40)
    i, j = positions(13, 40)
    torch.testing.assert_close(reference(spec("cross_causal"), q, k, v), sdpa(q, k, v, j - 40 <= i - 13), **TOL)


def test_document_mask_matches_sdpa():
    B, N = 2, 33
    q, k, v = qkv(B=B, Nq=N)
    doc = torch.tensor([[0] * 10 + [1] * 15 + [2] * 8, [0] * 33], dtype=torch.int32)
    i, j = positions(N, N)
    mask = (doc[:, None, :, None] == doc[:, None, None, :]) & (j <= i)
    torch.testing.assert_close(reference(spec("document"), q, k, v, doc=doc), sdpa(q, k, v, mask), **TOL)


def test_padding_mask_and_empty_rows():
    B, N = 3, 21
    q, k, v = qkv(B=B, Nq=N)
    kv_len = torch.tensor([21, 5, 0], dtype=torch.int32)
    o, lse = reference(spec("padding"), q, k, v, kv_len=kv_len, return_lse=True)
    mask = torch.arange(N)[None, None, None, :] < kv_len[:, None, None, None].long()
    torch.testing.assert_close(o[:2], sdpa(q[:2], k[:2], v[:2], mask[:2]), **TOL)
    assert not o.isnan().any() and not lse.isnan().any()
    assert (o[2] == 0).all() and (lse[2] == -math.inf).all()
    assert torch.isfinite(lse[:2]).all()


def test_empty_rows_of_cross_causal():
    q, k, v = qkv(Nq=20, Nk=8)  # bottom-right aligned: the first 12 query rows see nothing
    o, lse = reference(spec("cross_causal"), q, k, v, return_lse=True)
    assert (o[:, :, :12] == 0).all() and (lse[:, :, :12] == -math.inf).all()
    i, j = positions(8, 8)
    torch.testing.assert_close(o[:, :, 12:], sdpa(q[:, :, 12:], k, v, j <= i), **TOL)


def test_gqa_and_mqa_match_sdpa():
    q, k, v = qkv(B=1, Hq=32, Hkv=8, Nq=17, D=8)
    torch.testing.assert_close(reference(spec("gqa"), q, k, v), sdpa(q, k, v, is_causal=True, enable_gqa=True), **TOL)
    q, k, v = qkv(Hq=6, Hkv=1, Nq=17)
    expected = sdpa(q, k.expand(-1, 6, -1, -1), v.expand(-1, 6, -1, -1), is_causal=True)
    torch.testing.assert_close(reference(spec("mqa"), q, k, v), expected, **TOL)


def test_scale_override_and_spec_scale():
    q, k, v = qkv()
    torch.testing.assert_close(reference(spec("dense"), q, k, v, scale=0.3), sdpa(q, k, v, scale=0.3), **TOL)
    p = parse_spec("[score]\nscale = 0.125\n")
    torch.testing.assert_close(reference(p, q, k, v), sdpa(q, k, v, scale=0.125), **TOL)


# --- score terms against hand-written formulas ---------------------------------------


def attention_from_scores(s, mask, v):
    p = torch.softmax(s.masked_fill(~mask, -math.inf), dim=-1)
    return p @ v


def test_softcap():
    q, k, v = qkv(Nq=31)
    q = q * 8  # large logits, so that the cap matters
    s = q @ k.transpose(-1, -2) / 4.0
    s = 30.0 * torch.tanh(s / 30.0)
    i, j = positions(31, 31)
    torch.testing.assert_close(reference(spec("softcap"), q, k, v), attention_from_scores(s, j <= i, v), **TOL)


def paper_alibi_slopes(n):
    """ALiBi's slopes as the paper's code defines them: a geometric sequence starting at
    2^(-8/n) for a power of two n; otherwise the closest power of two's slopes followed by
    every other slope of twice that count."""
    def geometric(m):
        start = 2.0 ** (-(2.0 ** -(math.log2(m) - 3)))
        return [start * start**t for t in range(m)]
    if math.log2(n).is_integer():
        return geometric(n)
    p2 = 2 ** math.floor(math.log2(n))
    return geometric(p2) + paper_alibi_slopes(2 * p2)[0::2][: n - p2]


@pytest.mark.parametrize("n", [8, 12])
def test_alibi_slopes_match_the_paper(n):
    env = {"h": torch.arange(n), "n_heads": n}
    got = evaluate(AlibiSlope(S.h, S.n_heads), env)
    torch.testing.assert_close(got, torch.tensor(paper_alibi_slopes(n), dtype=F64), atol=0, rtol=1e-15)


@pytest.mark.parametrize("H", [8, 12])
def test_alibi_bias(H):
    q, k, v = qkv(B=1, Hq=H, Nq=26, D=8)
    slopes = torch.tensor(paper_alibi_slopes(H), dtype=F64)[:, None, None]
    i, j = positions(26, 26)
    s = q @ k.transpose(-1, -2) / math.sqrt(8) + slopes * (j - i)
    torch.testing.assert_close(reference(spec("alibi"), q, k, v), attention_from_scores(s, j <= i, v), **TOL)


def hf_t5_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128):
    """T5's relative position bucket, vectorized as in Hugging Face's T5 (float64 logs);
    ``rel`` = memory position - query position = j - i."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    large = max_exact + (torch.log(rel.double().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, rel, large)


@pytest.mark.parametrize("nb,md,bidir", [(32, 128, True), (32, 128, False), (16, 40, True), (8, 500, False), (64, 256, True)])
def test_bucket_matches_brute_force_t5(nb, md, bidir):
    d = torch.arange(-1200, 1201)
    got = evaluate(Bucket(S.j - S.i, nb, md, int(bidir)), {"i": torch.zeros(1, dtype=torch.int64), "j": d})
    assert got.dtype == torch.int64
    assert torch.equal(got, hf_t5_bucket(d, bidir, nb, md))


def test_t5_bias_table():
    H, N = 3, 150  # distances past max_distance reach the last buckets
    q, k, v = qkv(B=1, Hq=H, Nq=N, D=8)
    table = torch.randn(H, 32, dtype=torch.float32)
    i, j = positions(N, N)
    bias = table.double()[:, hf_t5_bucket(j - i)]
    s = q @ k.transpose(-1, -2) / math.sqrt(8) + bias
    got = reference(spec("t5_bias"), q, k, v, rel_bias=table)
    torch.testing.assert_close(got, attention_from_scores(s, torch.ones(N, N, dtype=torch.bool), v), **TOL)


def test_score_mod_and_bias_expression():
    p = parse_spec("""
[inputs]
head_scale = { dims = ["h"], dtype = "float32" }
[score]
bias = "0.25 * ((i - j) // 3) + (i - j) / 2 // 3"
mod = "where(j <= i, s * head_scale[h] + sigmoid(s), -inf)"
""")
    q, k, v = qkv(Hq=3, Nq=19)
    hs = torch.tensor([0.5, 1.0, 2.0])
    i, j = positions(19, 19)
    s = q @ k.transpose(-1, -2) / 4.0 + 0.25 * torch.div(i - j, 3, rounding_mode="floor") + torch.div((i - j) / 2, 3, rounding_mode="floor")
    s = s * hs.double()[:, None, None] + torch.sigmoid(s)
    torch.testing.assert_close(reference(p, q, k, v, head_scale=hs), attention_from_scores(s, j <= i, v), **TOL)


def test_dropout_keep_mask():
    q, k, v = qkv(Nq=12)
    keep = torch.rand(2, 4, 12, 12, generator=torch.Generator().manual_seed(3)) > 0.3
    i, j = positions(12, 12)
    p = torch.softmax((q @ k.transpose(-1, -2) / 4.0).masked_fill(j > i, -math.inf), dim=-1)
    expected = (p * keep / 0.7) @ v
    torch.testing.assert_close(reference(spec("causal"), q, k, v, keep_mask=keep, dropout_p=0.3), expected, **TOL)
    dp = parse_spec("[mask]\nwhere = 'causal'\n[score]\ndropout = 0.3\n")
    torch.testing.assert_close(reference(dp, q, k, v, keep_mask=keep), expected, **TOL)
    torch.testing.assert_close(reference(dp, q, k, v), sdpa(q, k, v, is_causal=True), **TOL)  # no mask, no dropout


# --- RoPE ------------------------------------------------------------------------------


def rope_rotate_half(x, pos, theta, rd):
    """GPT-NeoX / LLaMA: x * cos + rotate_half(x) * sin on the first rd dims."""
    inv = 1.0 / theta ** (torch.arange(0, rd, 2, dtype=F64) / rd)
    freqs = pos.double()[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    xr = x[..., :rd]
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
    rotated = xr * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()
    return torch.cat([rotated, x[..., rd:]], dim=-1)


def rope_complex_pairs(x, pos, theta, rd):
    """GPT-J: consecutive pairs (x[2m], x[2m+1]) as complex numbers times e^(i * pos * freq_m)."""
    inv = 1.0 / theta ** (torch.arange(0, rd, 2, dtype=F64) / rd)
    rot = torch.polar(torch.ones(len(pos), rd // 2, dtype=F64), pos.double()[:, None] * inv[None, :])
    xc = torch.view_as_complex(x[..., :rd].contiguous().view(*x.shape[:-1], rd // 2, 2))
    return torch.cat([torch.view_as_real(xc * rot).flatten(-2), x[..., rd:]], dim=-1)


@pytest.mark.parametrize("style,rd", [("neox", None), ("neox", 8), ("gptj", None), ("gptj", 6)])
def test_rope_matches_plain_rotary(style, rd):
    text = f"[mask]\nwhere = 'causal'\n[rope]\ntheta = 500.0\nstyle = '{style}'\n" + (f"rotary_dim = {rd}\n" if rd else "")
    p = parse_spec(text)
    q, k, v = qkv(Nq=23, D=16)
    ref_rope = rope_rotate_half if style == "neox" else rope_complex_pairs
    for q_offset in (0, 100):
        pos = torch.arange(q_offset, q_offset + 23)
        qr, kr = ref_rope(q, pos, 500.0, rd or 16), ref_rope(k, pos, 500.0, rd or 16)
        expected = sdpa(qr, kr, v, is_causal=True)
        torch.testing.assert_close(reference(p, q, k, v, q_offset=q_offset, k_offset=q_offset), expected, **TOL)


# --- positions: chunks of a longer call ----------------------------------------------


CHUNK_SPECS = ["causal", "sliding_window", "cross_causal", "document", "alibi", "rope_causal", "bigbird", "strided",
               "t5_bias"]


def chunk_inputs(name, B, H, N):
    g = torch.Generator().manual_seed(7)
    return {"document": {"doc": torch.sort(torch.randint(0, 4, (B, N), generator=g), dim=1).values.int()},
            "t5_bias": {"rel_bias": torch.randn(H, 32, generator=g)}}.get(name, {})


@pytest.mark.parametrize("name", CHUNK_SPECS)
def test_query_chunks_equal_rows_of_the_full_call(name):
    B, H, N = 1, 2, 200
    p = spec(name)
    if name == "sliding_window":
        extra = {"window": 50}
    else:
        extra = {}
    kw = {**chunk_inputs(name, B, H, N), **extra}
    q, k, v = qkv(B=B, Hq=H, Nq=N, D=8)
    o, lse = reference(p, q, k, v, return_lse=True, **kw)
    for lo, hi in ((0, 37), (37, 130), (130, 200)):
        oc, lc = reference(p, q[:, :, lo:hi], k, v, q_offset=lo, n_q=N, return_lse=True, **kw)
        torch.testing.assert_close(oc, o[:, :, lo:hi], **TOL)
        torch.testing.assert_close(lc, lse[:, :, lo:hi], **TOL)


@pytest.mark.parametrize("name", ["causal", "document", "alibi", "rope_causal", "bigbird"])
def test_key_chunks_merge_by_lse(name):
    B, H, N, cut = 1, 2, 150, 64
    p = spec(name)
    kw = chunk_inputs(name, B, H, N)
    q, k, v = qkv(B=B, Hq=H, Nq=N, D=8)
    o, lse = reference(p, q, k, v, return_lse=True, **kw)
    o1, l1 = reference(p, q, k[:, :, :cut], v[:, :, :cut], n_k=N, return_lse=True, **kw)
    o2, l2 = reference(p, q, k[:, :, cut:], v[:, :, cut:], k_offset=cut, n_k=N, return_lse=True, **kw)
    merged_lse = torch.logaddexp(l1, l2)
    w1, w2 = torch.exp(l1 - merged_lse)[..., None], torch.exp(l2 - merged_lse)[..., None]
    torch.testing.assert_close(merged_lse, lse, **TOL)
    torch.testing.assert_close(w1 * o1 + w2 * o2, o, **TOL)


# --- the mask evaluator against sympy itself -----------------------------------------


def sympy_mask_value(pattern, point, inputs, params):
    """Evaluate the mask at one (b, h, i, j) with sympy alone (subs, then input lookups)."""
    subs = {S.b: point[0], S.h: point[1], S.i: point[2], S.j: point[3], S.n_q: point[4], S.n_k: point[5],
            S.n_heads: point[6]}
    subs.update({p.symbol: params.get(p.name, p.value) for p in pattern.params})
    e = pattern.mask.xreplace({k: sympy.sympify(v) for k, v in subs.items()})
    e = e.replace(lambda x: isinstance(x, AppliedUndef),
                  lambda x: sympy.Integer(int(inputs[x.func.__name__][tuple(int(a) for a in x.args)])))
    return bool(sympy.simplify(e))


SOFTMAX_MASKED = [Path(f).stem for f in sorted(glob.glob(str(SPECS / "*.toml")))
                  if load_spec(f).kind == "softmax" and load_spec(f).mask is not None]


@pytest.mark.parametrize("name", SOFTMAX_MASKED)
def test_pair_mask_agrees_with_sympy(name):
    p = spec(name)
    B, H, rows, cols, q_off, k_off = 2, 3, 70, 90, 260, 200
    n_q, n_k = q_off + rows, k_off + cols + 10
    g = torch.Generator().manual_seed(1)
    inputs = {"document": {"doc": torch.sort(torch.randint(0, 5, (B, 400), generator=g), dim=1).values.int()},
              "padding": {"kv_len": torch.tensor([230, 290], dtype=torch.int32)},
              "alibi_learned": {"slopes": torch.rand(H, generator=g)}}.get(name, {})
    params = {"window": 40} if "window" in p.param_values else {}
    m = pair_mask(p, q_rows=rows, k_rows=cols, q_offset=q_off, k_offset=k_off, n_q=n_q, n_k=n_k, batch=B, heads=H,
                  inputs=inputs, params=params)
    assert m.shape == (B, H, rows, cols) and m.dtype == torch.bool
    rng = random.Random(name)
    for _ in range(60):
        b, h, r, c = rng.randrange(B), rng.randrange(H), rng.randrange(rows), rng.randrange(cols)
        want = sympy_mask_value(p, (b, h, q_off + r, k_off + c, n_q, n_k, H), inputs, params)
        assert bool(m[b, h, r, c]) == want, (name, b, h, q_off + r, k_off + c)


def test_bigbird_random_blocks_are_seeded_per_query_block():
    from attncc.core import semantics
    p = parse_spec("[mask]\nwhere = 'random_blocks(2, block=16, seed=5)'\n")
    m = pair_mask(p, q_rows=100, k_rows=90)[0, 0]
    nkb = math.ceil(90 / 16)
    for qb in range(math.ceil(100 / 16)):
        chosen = set(semantics.random_block_set(qb, nkb, 2, 5))
        for kb in range(nkb):
            assert bool(m[qb * 16, kb * 16]) == (kb in chosen)
        assert m[qb * 16: qb * 16 + 16].float().sum(-1).eq(sum(min(16, 90 - kb * 16) for kb in chosen)).all()


def test_integer_division_and_modulo_follow_python():
    ii, jj = torch.arange(-20, 21)[:, None], torch.arange(-7, 8)[None, :]
    jj = jj[jj != 0][None, :]
    env = {"i": ii, "j": jj}
    got_div = evaluate(sympy.floor(S.i / S.j), env)
    got_mod = evaluate(sympy.Mod(S.i, S.j), env)
    got_ceil = evaluate(-sympy.floor(-S.i / 7), env)
    for a in range(-20, 21):
        for col, c in enumerate(jj[0].tolist()):
            assert int(got_div[a + 20, col]) == a // c and int(got_mod[a + 20, col]) == a % c
        assert int(got_ceil[a + 20, 0]) == -((-a) // 7)
    assert got_div.dtype == torch.int64
    # a / c is one division, so i / 49 >= 1 holds at i = 49 (49 * (1/49) < 1 in float64).
    assert bool(evaluate(sympy.Ge(S.i / 49, 1), {"i": torch.tensor(49)}))


def test_sqrt_and_float_floor_division_and_modulo_are_pythons():
    """Correctly rounded square roots (torch's CPU sqrt of a float64 is not always: sqrt(51)) and
    Python's float // and % (torch's % gives -0.0 for -4.0 % 2.0, and NaN past a quotient of ~1e300)."""
    v = sympy.Symbol("v", real=True)
    x = torch.tensor([float(n) for n in range(200)] + [1e300, -4.0], dtype=torch.float64)
    xs = x.tolist()
    assert evaluate(sympy.sqrt(v), {"v": x[:-1]}).tolist() == [math.sqrt(a) for a in xs[:-1]]
    for c in (0.1, -0.7, 2.0):
        mod, div = evaluate(sympy.Mod(v, c), {"v": x}), evaluate(sympy.floor(FloatDiv(v, c)), {"v": x})
        assert [math.copysign(1, a) for a in mod.tolist()] == [math.copysign(1, a % c) for a in xs]
        assert mod.tolist() == [a % c for a in xs] and div.tolist() == [a // c for a in xs], c


def test_pair_mask_defaults_and_params():
    m = pair_mask(spec("sliding_window"), q_rows=10, k_rows=10, params={"window": 3}, batch=2, heads=3)
    i, j = positions(10, 10)
    assert m.shape == (2, 3, 10, 10)
    assert torch.equal(m[1, 2], (j <= i) & (i - j < 3))
    assert pair_mask(spec("dense"), q_rows=3, k_rows=5).all()
    cross = pair_mask(spec("cross_causal"), q_rows=4, k_rows=6, q_offset=4, n_q=10, n_k=6)[0, 0]
    assert torch.equal(cross, (j[:, :6] - 6 <= i[4:8] - 10))


# --- linear attention against a naive loop -------------------------------------------


def naive_linear(q, k, v, phi, causal, normalize, q_offset=0, k_offset=0):
    B, H, Nq, _ = q.shape
    group = H // k.shape[1]
    o = torch.zeros(B, H, Nq, v.shape[-1], dtype=F64)
    for b in range(B):
        for h in range(H):
            fq, fk, vv = phi(q[b, h]), phi(k[b, h // group]), v[b, h // group]
            for r in range(Nq):
                S_ = torch.zeros(fk.shape[-1], vv.shape[-1], dtype=F64)
                z = torch.zeros(fk.shape[-1], dtype=F64)
                for c in range(k.shape[2]):
                    if causal and k_offset + c > q_offset + r:
                        continue
                    S_ += torch.outer(fk[c], vv[c])
                    z += fk[c]
                num = fq[r] @ S_
                o[b, h, r] = num / (fq[r] @ z + 1e-6) if normalize else num
    return o


def elu_plus_one(x):
    return torch.where(x > 0, x + 1, torch.exp(x))


def performer_phi(features, seed):
    def phi(x):
        d = x.shape[-1]
        w = performer_projection(features, d, seed, dtype=F64)
        xs = x / d**0.25
        return torch.exp(xs @ w.T - (xs**2).sum(-1, keepdim=True) / 2) / math.sqrt(features)
    return phi


@pytest.mark.parametrize("fmap,phi", [("elu+1", elu_plus_one), ("relu", torch.relu), ("identity", lambda x: x),
                                      ("performer", performer_phi(24, 0))])
@pytest.mark.parametrize("causal", [True, False])
def test_linear_matches_naive_loop(fmap, phi, causal):
    features = "features = 24\n" if fmap == "performer" else ""
    p = parse_spec(f"kind = 'linear'\n[feature_map]\nname = '{fmap}'\n{features}causal = {str(causal).lower()}\n")
    q, k, v = qkv(B=1, Hq=2, Hkv=1, Nq=9, D=4, Dv=3)
    o = reference(p, q, k, v)
    assert not o.isnan().any()
    torch.testing.assert_close(o, naive_linear(q, k, v, phi, causal, True), **TOL)


def test_linear_unnormalized_with_offsets():
    p = parse_spec("kind = 'linear'\n[feature_map]\nname = 'elu+1'\nnormalize = false\n")
    q, k, v = qkv(B=1, Hq=2, Nq=5, Nk=9, D=4)
    got = reference(p, q, k, v, q_offset=6, k_offset=0)
    torch.testing.assert_close(got, naive_linear(q, k, v, elu_plus_one, True, False, q_offset=6), **TOL)
    assert (reference(p, q, k, v, q_offset=0, k_offset=100) == 0).all()  # no key precedes any query


def test_linear_zero_denominator_is_not_nan():
    p = parse_spec("kind = 'linear'\n[feature_map]\nname = 'relu'\ncausal = false\n")
    q, k, v = qkv(B=1, Hq=1, Nq=4, D=4)
    o = reference(p, -q.abs() - 1, k.abs() + 1, v)  # relu(q) = 0 everywhere
    assert not o.isnan().any() and (o == 0).all()


def test_performer_projection_is_deterministic_and_blockwise_orthogonal():
    w = performer_projection(20, 8, seed=3, dtype=F64)
    assert w.shape == (20, 8) and torch.equal(w, performer_projection(20, 8, seed=3, dtype=F64))
    assert not torch.equal(w, performer_projection(20, 8, seed=4, dtype=F64))
    for lo in (0, 8):
        block = w[lo:lo + 8]
        directions = block / block.norm(dim=1, keepdim=True)
        torch.testing.assert_close(directions @ directions.T, torch.eye(8, dtype=F64), atol=1e-12, rtol=0)


def test_performer_approximates_the_softmax_kernel():
    d, m = 8, 4096
    g = torch.Generator().manual_seed(0)
    x, y = 0.5 * torch.randn(16, d, generator=g, dtype=F64), 0.5 * torch.randn(16, d, generator=g, dtype=F64)
    phi = performer_phi(m, 0)
    approx, exact = phi(x) @ phi(y).T, torch.exp(x @ y.T / math.sqrt(d))
    assert ((approx - exact).abs() / exact).mean() < 0.05


def test_taylor_reference_is_the_quadratic_kernel():
    """taylor: the linear form of a = 1 + s + s^2 / 2, s = q.k / sqrt(D), causal, normalized."""
    p = parse_spec("kind = 'linear'\nhead_dim = 16\n[feature_map]\nname = 'taylor'\n")
    q, k, v = qkv(Nq=5)
    s = (q @ k.transpose(-1, -2)).double() / math.sqrt(q.shape[-1])
    a = (1 + s + s * s / 2) * torch.ones(5, 5, dtype=F64).tril()
    want = (a @ v.double()) / (a.sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(reference(p, q, k, v), want, rtol=1e-10, atol=1e-10)


# --- errors -----------------------------------------------------------------------------


def test_unknown_keyword_names_the_known_ones():
    with pytest.raises(TypeError, match=r"'wndow'.*window"):
        reference(spec("sliding_window"), *qkv(Nq=3), wndow=3)


def test_missing_input_is_a_value_error():
    with pytest.raises(ValueError, match="doc"):
        reference(spec("document"), *qkv(Nq=3))


def test_short_position_input():
    # an "n" dim must cover the call's positions, as in the generated modules (an index past a
    # table's end otherwise reads 0: tests/test_probe_tables17.py)
    with pytest.raises(ValueError, match=r"input 'doc' has dims \['b', 'n'\]: expected shape \[1, n>=8\]"):
        reference(spec("document"), *qkv(B=1, Nq=8), doc=torch.zeros(1, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="expected shape"):
        reference(spec("t5_bias"), *qkv(Hq=4, Nq=8), rel_bias=torch.zeros(4, 16))


def test_bad_shapes():
    q, k, v = qkv(Hq=4, Hkv=3, Nq=5)
    with pytest.raises(ValueError, match="multiple"):
        reference(spec("dense"), q, k, v)
    q, k, v = qkv(Hq=4, Nq=5)
    with pytest.raises(ValueError, match="32 query heads"):
        reference(spec("gqa"), q, k, v)


def test_index_env_grids():
    env = index_env(spec("sliding_window"), batch=2, heads=3, q_rows=4, k_rows=5, q_offset=10, k_offset=1)
    assert env["i"].shape == (1, 1, 4, 1) and env["i"].flatten().tolist() == [10, 11, 12, 13]
    assert env["j"].shape == (1, 1, 1, 5) and env["j"].flatten().tolist() == [1, 2, 3, 4, 5]
    assert (env["n_q"], env["n_k"], env["n_heads"], env["window"]) == (14, 6, 3, 1024)


def test_int_params_past_what_the_kernels_take_are_refused():
    """The reference takes an int param's override in the kernels' range only (-2**31 to 2**62 - 1),
    as the generated modules do (it took 2**62 and -2**31 - 1, which a call refuses)."""
    p = parse_spec('[params]\ng = 3\n[mask]\nwhere = "i < g or j <= i"\n')
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    for g in (2**62 - 1, -2**31):
        reference(p, q, q, q, g=g)
    for g, bound in ((2**62, "<= 2\\*\\*62 - 1"), (-2**31 - 1, ">= -2\\*\\*31")):
        with pytest.raises(ValueError, match=f"param g must be {bound}"):
            reference(p, q, q, q, g=g)
