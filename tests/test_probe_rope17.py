"""Probe 17: RoPE, dropout, learned tables, ALiBi / softcap with the LSE, and the tune cache.

Seeded differential checks against attncc.reference at small odd sizes (B = 2, Nq = 37, Nk = 53),
and regressions of what the probe found wrong."""
from __future__ import annotations

import json

import pytest
import torch

import attncc
from attncc.runtime import KernelConfig, bind, pick_config, tuning
from attncc.runtime.launch import default_config
from attncc.spec import parse_spec
from cases import module, rel_err

# ---------------------------------------------------------------------------------------------
# The tune cache: a record that passes the schema but that no tuner run could have stored
# ---------------------------------------------------------------------------------------------


# (the tune_cache fixture: tests/conftest.py)


def _call(D=128, dtype=torch.bfloat16, N=300):
    q = torch.randn(1, 4, N, D, dtype=dtype)
    k = torch.randn(1, 2, N, D, dtype=dtype)
    return bind(module("causal").SPEC, q, k, k.clone())


def _write(call, configs):
    """A cache file with one record per kernel ("" the forward, "dq", "dkdv"): config dicts."""
    entries = {}
    for kernel, cfg in configs.items():
        key = tuning.key_for(call, kernel)
        entries[key.entry] = {"config": cfg, "ms": 1.0, "key": {f: getattr(key, f) for f in tuning.KEY_FIELDS}}
    path = tuning.cache_dir() / key.file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "gpu": key.gpu, "triton": key.triton, "entries": entries}))
    tuning._LOADED.clear()
    return path


def _cfg(bm, bn, warps, stages):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


# Each was run from the cache on an H100 (bf16 / fp32, N = 300): every one stalled the call for over
# two minutes in Triton's compiler (accumulators of 1024 registers a thread) or in a retry per
# pipeline stage of a config that needs 1 MB of shared memory.
HOSTILE = [(128, torch.bfloat16, _cfg(256, 256, 1, 8)), (256, torch.float32, _cfg(256, 256, 8, 1)),
           (128, torch.bfloat16, _cfg(16, 256, 2, 8)), (256, torch.float32, _cfg(128, 128, 4, 3)),
           # a flag no tuner candidate has (an experiment of ATTNCC_CONFIG's), on the built-in forward config
           (128, torch.bfloat16, {**_cfg(128, 128, 8, 3), "warp_specialize": True})]


@pytest.mark.parametrize("D, dtype, cfg", HOSTILE)
def test_a_cached_config_the_call_cannot_run_is_ignored(tune_cache, monkeypatch, caplog, D, dtype, cfg):
    """The schema check let these through (block sizes among 16..256, warps 1..32, stages 1..8), and
    pick_config ran them as they were: on an H100 each such call hung in the compiler. They are
    ignored with a warning naming the entry; the built-in config runs."""
    call = _call(D, dtype)
    _write(call, {"": cfg, "dq": cfg, "dkdv": cfg})
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # pick_config as on a GPU
    assert tuning.lookup(tuning.key_for(call, "")) is not None  # the record passes the schema check
    # (a dK/dV tile of 256 keys x 128 dims on 1 warp, say, is refused whichever kernel reads it)
    assert tuning.cached_config(call, "") is None
    assert pick_config(call) == default_config(call)
    assert "ignoring tune cache entry" in caplog.text and "built-in config" in caplog.text


def test_a_usable_cached_config_is_still_used(tune_cache, monkeypatch):
    call = _call(128, torch.bfloat16)
    _write(call, {"": _cfg(64, 32, 8, 3), "dkdv": _cfg(32, 128, 8, 2)})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert pick_config(call) == KernelConfig(64, 32, 8, 3)
    assert tuning.cached_config(call, "dkdv") == KernelConfig(32, 128, 8, 2)


@pytest.mark.parametrize("kernel", ["", "dkdv", "dq"])
@pytest.mark.parametrize("D, dtype", [(16, torch.float32), (64, torch.bfloat16), (128, torch.float16),
                                      (256, torch.bfloat16), (256, torch.float32), (96, torch.float32)])
def test_every_config_the_tuner_may_store_passes(kernel, D, dtype):
    """The check rejects nothing the tuner could have written: its candidates (exhaustive too, which
    always hold the built-in config) on an H100's shared memory."""
    call = _call(D, dtype, N=4096)
    configs = tuning.candidates(call, kernel, 232448, exhaustive=True) + tuning.candidates(call, kernel, 232448)
    assert default_config(call, kernel) in configs
    for cfg in configs:
        assert tuning.config_problem(call, kernel, cfg) is None, (cfg, tuning.config_problem(call, kernel, cfg))


def test_tune_replaces_an_unusable_entry(tune_cache, monkeypatch):
    """tune() returned any cached record as it was (force=False), so `attncc tune` kept a hostile
    entry for good; it tunes that key again and stores the winner over it."""
    call = _call(64, torch.bfloat16)
    _write(call, {"": _cfg(256, 256, 1, 8)})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    best = tuning.tune(call, "", lambda c: None, timer=lambda fn: 1.0, quick_timer=lambda fn: 1.0)
    assert tuning.config_problem(call, "", best) is None
    assert tuning.cached_config(call, "") == best


# ---------------------------------------------------------------------------------------------
# dropout_keep_mask takes the calls attention takes, no others
# ---------------------------------------------------------------------------------------------

DROPOUT_SPEC = 'name = "probe17_dropout"\nhead_dim = 16\n[mask]\nwhere = "causal"\n[score]\ndropout = 0.3\n'


@pytest.mark.parametrize("shapes, match", [
    (((1, 2, 5, 16), (1, 2, 6, 16), (1, 2, 7, 16)), "k has 6 positions but v has 7"),
    (((2, 2, 5, 16), (3, 2, 5, 16), (3, 2, 5, 16)), "batch sizes differ"),
    (((1, 2, 5, 16), (1, 2, 5, 16), (1, 1, 5, 16)), "k has 2 heads but v has 1"),
])
def test_keep_mask_refuses_what_attention_refuses(shapes, match):
    """dropout_keep_mask checked heads and head dims only: k and v of different lengths (or
    batches) gave a mask, of a call attention refuses, without a word."""
    mod = attncc.compile(DROPOUT_SPEC)
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        mod.attention(q, k, v, seed=1)
    with pytest.raises(ValueError, match=match):
        mod.dropout_keep_mask(q, k, v, seed=1)
    with pytest.raises(ValueError, match="below 2\\*\\*62"):
        mod.dropout_keep_mask(torch.zeros(1, 2, 5, 16), torch.zeros(1, 2, 5, 16), torch.zeros(1, 2, 5, 16), seed=1,
                              q_offset=2**62 - 3)


# ---------------------------------------------------------------------------------------------
# Seeded differential checks (all passed when the probe ran them; kept as regressions)
# ---------------------------------------------------------------------------------------------

B, NQ, NK = 2, 37, 53


def _qkv(seed, Hq=4, Hkv=2, D=24, Nq=NQ, Nk=NK, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Nq, D, generator=gen) * scale, torch.randn(B, Hkv, Nk, D, generator=gen) * scale,
            torch.randn(B, Hkv, Nk, D, generator=gen))


def _against_reference(text, q, k, v, tables=None, keep=None, **kw):
    """o, the LSE and the gradients of q, k, v and the tables (from o and the LSE) against
    attncc.reference in float64; ``tables``: name -> (leaf, view of it passed as the input)."""
    mod, pattern = attncc.compile(text), parse_spec(text)
    tables = tables or {}
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    own = {n: leaf.detach().clone().requires_grad_() for n, (leaf, _) in tables.items()}
    o, lse = mod.attention(*leaves, return_lse=True, **{n: tables[n][1](own[n]) for n in tables}, **kw)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref_own = {n: leaf.detach().double().requires_grad_() for n, (leaf, _) in tables.items()}
    kw_ref = {a: b for a, b in kw.items() if a != "seed"}
    if keep is not None:
        kw_ref["keep_mask"] = keep
    ref, ref_lse = attncc.reference(pattern, *ref_in, return_lse=True, **{n: tables[n][1](ref_own[n]) for n in tables},
                                    **kw_ref)
    assert rel_err(o.detach(), ref.detach()) < 1e-4
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert torch.allclose(lse[fin].double(), ref_lse[fin].detach(), atol=1e-4)
    gen = torch.Generator().manual_seed(99)
    g, g_lse = torch.randn(o.shape, generator=gen), torch.randn(lse.shape, generator=gen)
    loss = (o * g).sum() + (torch.where(fin, lse, 0.0) * g_lse).sum()
    ref_loss = (ref * g.double()).sum() + (torch.where(fin, ref_lse, 0.0) * g_lse.double()).sum()
    names = list(tables)
    got = torch.autograd.grad(loss, leaves + [own[n] for n in names])
    want = torch.autograd.grad(ref_loss, ref_in + [ref_own[n] for n in names])
    for label, a, b in zip(["q", "k", "v"] + names, got, want):
        assert rel_err(a, b) < 1e-4, (label, rel_err(a, b))
    return mod


@pytest.mark.parametrize("style, rotary_dim, theta, q_offset, k_offset", [
    ("neox", None, 10000.0, 0, 0), ("neox", 8, 500000.0, 100, 90), ("gptj", None, 10000.0, 5, 0),
    ("gptj", 12, 10000.0, 1000, 1003)])
def test_rope_matches_transformers_rotations(style, rotary_dim, theta, q_offset, k_offset):
    """RoPE as a transformers user applies it before SDPA: Llama / GPT-NeoX rotate_half
    ('neox', partial rotary as GPT-NeoX's rotary_ndims) and GPT-J rotate_every_two ('gptj'), with
    transformers' own frequency formula, at position offsets and with GQA."""
    pytest.importorskip("transformers")
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_rope
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope

    D = 24
    rd = rotary_dim or D
    text = (f'name = "probe17_hf_{style}_{rd}"\nhead_dim = {D}\n[mask]\nwhere = "j - n_k <= i - n_q"\n'
            f'[rope]\nstyle = "{style}"\ntheta = {theta}\n' + (f"rotary_dim = {rotary_dim}\n" if rotary_dim else ""))
    q, k, v = _qkv(7, Hq=6, Hkv=2, D=D)

    def hf(x, offset):
        pos = torch.arange(offset, offset + x.shape[2])
        inv_freq = 1.0 / (theta ** (torch.arange(0, rd, 2, dtype=torch.int64).float() / rd))
        freqs = pos[:, None].float() * inv_freq[None, :]
        rot, rest = x[..., :rd], x[..., rd:]
        if style == "neox":
            emb = torch.cat([freqs, freqs], -1)
            rot, _ = llama_rope(rot, rot, emb.cos()[None], emb.sin()[None])
        else:  # GPT-J: x [B, N, H, D], sin / cos [B, N, rd / 2]
            rot = gptj_rope(rot.transpose(1, 2), freqs.sin()[None], freqs.cos()[None]).transpose(1, 2)
        return torch.cat([rot, rest], -1)

    o = attncc.compile(text).attention(q, k, v, q_offset=q_offset, k_offset=k_offset)
    qi, kj = torch.arange(NQ)[:, None], torch.arange(NK)[None, :]
    mask = kj - NK <= qi - NQ  # j - n_k <= i - n_q: both offsets cancel (n_q, n_k end the call's rows)
    want = torch.nn.functional.scaled_dot_product_attention(
        hf(q, q_offset), hf(k, k_offset).repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask)
    assert rel_err(o, want) < 1e-5


@pytest.mark.parametrize("seed", range(4))
def test_rope_seeded_against_the_reference(seed):
    """Style, rotary dim, theta, GQA, head dims 16 / 24 / 15 (partial), offsets up to 10**6: o, the LSE
    and the gradients of o and the LSE."""
    rng = __import__("random").Random(seed)
    style = rng.choice(["neox", "gptj"])
    D, rd = rng.choice([(16, None), (24, None), (24, 8), (15, 14)])
    theta = rng.choice([10000.0, 1.5, 1e6])
    mask = rng.choice(["", '[mask]\nwhere = "causal"\n', '[mask]\nwhere = "j <= i and i - j < 9"\n'])
    text = (f'name = "probe17_rope{seed}"\nhead_dim = {D}\n{mask}[rope]\nstyle = "{style}"\ntheta = {theta}\n'
            + (f"rotary_dim = {rd}\n" if rd else ""))
    hkv = rng.choice([1, 2])
    q_offset = rng.choice([0, 17, 10**6])
    q, k, v = _qkv(seed, Hq=3 * hkv, Hkv=hkv, D=D)
    _against_reference(text, q, k, v, q_offset=q_offset, k_offset=max(q_offset - 20, 0))


# case 2 draws softcap as case 1 does (case 0 ALiBi): another seed of the same class, with -m slow
@pytest.mark.parametrize("case", [0, 1, pytest.param(2, marks=pytest.mark.slow)])
def test_dropout_seeded_forward_backward_and_lse(case):
    """Dropout with GQA, offsets, a tensor dropout_p and the LSE's gradient: the backward drops the
    pairs the forward dropped (dropout_keep_mask), two calls with one seed agree bitwise."""
    rng = __import__("random").Random(case)
    extra = rng.choice(["softcap = 5.0\n", 'bias = "alibi"\n', "[rope]\n"])
    text = f'name = "probe17_drop{case}"\nhead_dim = 24\n[mask]\nwhere = "causal"\n[score]\ndropout = 0.2\n{extra}'
    q, k, v = _qkv(case, Hq=6, Hkv=2)
    kw = dict(q_offset=20, k_offset=4, seed=2**63 - 1 - case, dropout_p=torch.tensor(0.35))
    mod = attncc.compile(text)
    keep = mod.dropout_keep_mask(q, k, v, **kw)
    assert keep.shape == (B, 6, NQ, NK) and 0.5 < keep.float().mean() < 0.8
    _against_reference(text, q, k, v, keep=keep, **kw)
    assert torch.equal(mod.attention(q, k, v, **kw), mod.attention(q, k, v, **kw))
    plain = attncc.compile(text.replace("dropout = 0.2\n", "").replace("probe17_drop", "probe17_nodrop"))
    assert torch.equal(mod.attention(q, k, v, q_offset=20, k_offset=4, training=False),
                       plain.attention(q, k, v, q_offset=20, k_offset=4))


TABLES = [
    ('rel_bias = { dims = ["h", 32], grad = true }', 'bias = "rel_bias[h, bucket(j - i)]"', "rel_bias", (32, 6),
     lambda t: t.t()),  # a transposed [32, Hq] parameter
    ('slopes = { dims = ["h"], grad = true }', 'bias = "slopes[h] * (j - i)"', "slopes", (12,), lambda t: t[::2]),
    ('rel = { dims = ["h", 41], grad = true }', 'bias = "rel[h, min(max(i - j + 20, 0), 40)]"', "rel", (1, 41),
     lambda t: t.expand(6, 41)),  # one row shared by every head; clamped (repeated) indices
    ('tab = { dims = [2, 7], grad = true }', 'bias = "tab[h % 2, (i - j) % 7]"\nsoftcap = 4.0', "tab", (2, 7),
     lambda t: t),
]


@pytest.mark.parametrize("decl, score, name, shape, view", TABLES, ids=[t[2] for t in TABLES])
def test_learned_tables_seeded_with_views_gqa_and_offsets(decl, score, name, shape, view):
    text = f'name = "probe17_{name}"\nhead_dim = 16\n[mask]\nwhere = "causal"\n[inputs]\n{decl}\n[score]\n{score}\n'
    q, k, v = _qkv(len(name), Hq=6, Hkv=2, D=16)
    leaf = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.5
    _against_reference(text, q, k, v, tables={name: (leaf, view)}, q_offset=30, k_offset=14)


@pytest.mark.parametrize("score, offset", [('bias = "alibi"\nsoftcap = 3.0', 2**31 + 3), ("softcap = 0.5\nscale = 2.0", 0),
                                           ('bias = "alibi * 2 + 0.5 * i"\nsoftcap = 7.0', 1000)])
def test_alibi_and_softcap_with_gqa_offsets_and_the_lse_gradient(score, offset):
    text = f'name = "probe17_cap{offset}"\nhead_dim = 24\n[mask]\nwhere = "j <= i and i - j < 30"\n[score]\n{score}\n'
    q, k, v = _qkv(offset % 97, Hq=6, Hkv=2, scale=2.0)
    _against_reference(text, q, k, v, q_offset=offset + 16, k_offset=offset)
