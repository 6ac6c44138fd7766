"""Probe 16 (FlexAttention / attention-gym ports): each pattern as an attncc spec and as a float64
oracle written here from the Flex ``score_mod(score, b, h, q_idx, kv_idx)`` /
``mask_mod(b, h, q_idx, kv_idx)`` definition (plain torch, Python floor semantics), never from
``attncc.reference``. Flex's q_idx / kv_idx are taken as the global positions
``q_offset + row`` / ``k_offset + row`` (docs/spec-language.md §5)."""
from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import attncc
from attncc.spec import SpecError, parse_spec

NEG = float("-inf")


def _w(c, s):
    return torch.where(c, s, torch.full_like(s, NEG))


def oracle(q, k, v, *, scale, mask=None, score=None, q_offset=0, k_offset=0, env=None, b_first=0):
    """(o, lse) in float64; q [B,Hq,Nq,D], k/v [B,Hkv,Nk,D]; mask(E) / score(E, s) see E.b, E.h,
    E.i, E.j as broadcastable int64 tensors plus ``env`` (params, inputs)."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    kk = k.double().repeat_interleave(g, dim=1)
    vv = v.double().repeat_interleave(g, dim=1)

    class E:
        pass
    E.b = (b_first + torch.arange(B)).view(B, 1, 1, 1)
    E.h = torch.arange(Hq).view(1, Hq, 1, 1)
    E.i = (q_offset + torch.arange(Nq)).view(1, 1, Nq, 1)
    E.j = (k_offset + torch.arange(Nk)).view(1, 1, 1, Nk)
    E.H = Hq
    for key, val in (env or {}).items():
        setattr(E, key, val.double() if torch.is_tensor(val) and val.is_floating_point() else val)
    s = scale * (q.double() @ kk.transpose(-1, -2))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # int tensor * python float: float64, as Python's
    try:
        if score is not None:
            s = score(E, s)
        s = s.expand(B, Hq, Nq, Nk)
        if mask is not None:
            s = torch.where(mask(E).expand(B, Hq, Nq, Nk), s, torch.full_like(s, NEG))
    finally:
        torch.set_default_dtype(old)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    p = torch.where(torch.isfinite(lse)[..., None], p, torch.zeros_like(p))
    return p @ vv, lse


def alibi_gen(H):  # FlexAttention's test generator (test_flex_attention._generate_alibi_bias)
    return torch.tensor([math.exp2(-((i + 1) * 8.0 / H)) for i in range(H)])


def paper_slopes(H):
    P = 2 ** int(math.floor(math.log2(H)))
    s = [2 ** (-8 * (h + 1) / P) for h in range(P)]
    s += [2 ** (-4 * (2 * (h - P) + 1) / P) for h in range(P, H)]
    return torch.tensor(s, dtype=torch.float64)


def _docs(n, seed, B=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(B):
        ids, d = [], 0
        while len(ids) < n:
            ids += [d] * int(torch.randint(1, 9, (1,), generator=g))
            d += 1
        out.append(ids[:n])
    return torch.tensor(out, dtype=torch.int32)


# (name, spec, mask, score, env/inputs builder(B, H, Nq+qo, Nk+ko) -> (call kwargs, oracle env), hkv_div)
CASES = [
    ("noop", {}, None, None, None, 1),
    ("times_two", {"score": {"mod": "score * 2"}}, None, lambda E, s: s * 2, None, 1),
    ("squared", {"score": {"mod": "score * score"}}, None, lambda E, s: s * s, None, 1),
    ("head_plus", {"score": {"mod": "score + h"}}, None, lambda E, s: s + E.h, None, 1),
    ("rel_bias", {"score": {"mod": "score + (q_idx - kv_idx)", "scale": 0.3}}, None,
     lambda E, s: s + (E.i - E.j), None, 1),
    ("rel_causal", {"score": {"mod": "where(q_idx >= kv_idx, score + (q_idx - kv_idx), -inf)"}}, None,
     lambda E, s: _w(E.i >= E.j, s + (E.i - E.j)), None, 1),
    ("inverse_causal", {"score": {"mod": "where(q_idx < kv_idx, score, -inf)"}}, None,
     lambda E, s: _w(E.i < E.j, s), None, 1),
    ("trig_pos", {"score": {"mod": "score + sin(q_idx * 0.3) * cos(kv_idx * 0.7)"}}, None,
     lambda E, s: s + torch.sin(E.i * 0.3) * torch.cos(E.j * 0.7), None, 1),
    ("trig2_pos", {"score": {"mod": "cos(score) * sin(score) + tan(b * 0.5) + sin(q_idx * kv_idx * 0.01)"}}, None,
     lambda E, s: torch.cos(s) * torch.sin(s) + torch.tan(E.b * 0.5) + torch.sin(E.i * E.j * 0.01), None, 1),
    ("alibi_flexgen_table",
     {"inputs": {"slopes": {"dims": ["h"], "dtype": "float32"}}, "score": {"mod": "score + (kv_idx - q_idx) * slopes[h]"}},
     None, lambda E, s: s + (E.j - E.i) * E.slopes[E.h],
     lambda B, H, nq, nk: ({"slopes": alibi_gen(H).float()}, {"slopes": alibi_gen(H)}), 1),
    ("alibi_flexgen_expr", {"score": {"mod": "score + (kv_idx - q_idx) * exp2(-((h + 1) * 8.0 / 3))"}},
     None, lambda E, s: s + (E.j - E.i) * torch.exp2(-((E.h + 1) * 8.0 / 3)), None, 1),
    ("alibi_builtin_causal", {"mask": {"where": "causal"}, "score": {"bias": "alibi"}},
     lambda E: E.j <= E.i, lambda E, s: s + paper_slopes(E.H).view(1, -1, 1, 1) * (E.j - E.i), None, 1),
    ("doc_ids_batch", {"inputs": {"doc": {"dims": ["b", "n"], "dtype": "int32"}},
                       "mask": {"where": "doc[b, q_idx] == doc[b, kv_idx]"}},
     lambda E: E.doc[E.b, E.i] == E.doc[E.b, E.j], None,
     lambda B, H, nq, nk: (lambda d: ({"doc": d}, {"doc": d.long()}))(_docs(max(nq, nk), 3, B)), 1),
    ("doc_causal_batch", {"inputs": {"doc": {"dims": ["b", "n"], "dtype": "int32"}},
                          "mask": {"where": "(doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)"}},
     lambda E: (E.doc[E.b, E.i] == E.doc[E.b, E.j]) & (E.i >= E.j), None,
     lambda B, H, nq, nk: (lambda d: ({"doc": d}, {"doc": d.long()}))(_docs(max(nq, nk), 4, B)), 1),
    ("prefix_lm_per_batch", {"inputs": {"prefix": {"dims": ["b"], "dtype": "int32"}},
                             "mask": {"where": "(kv_idx < prefix[b]) | (q_idx >= kv_idx)"}},
     lambda E: (E.j < E.prefix[E.b]) | (E.i >= E.j), None,
     lambda B, H, nq, nk: (lambda p: ({"prefix": p}, {"prefix": p.long()}))(
         torch.tensor([5, 31, 0, 60][:B], dtype=torch.int32)), 1),
    ("sliding_window_gqa", {"params": {"w": 6}, "mask": {"where": "(q_idx >= kv_idx) & (q_idx - kv_idx <= w)"}},
     lambda E: (E.i >= E.j) & (E.i - E.j <= 6), None, None, 2),
    ("sliding_window_mqa_bidir", {"params": {"w": 5}, "mask": {"where": "abs(q_idx - kv_idx) <= w"}},
     lambda E: (E.i - E.j).abs() <= 5, None, None, 4),
    ("head_scale_table", {"inputs": {"hs": {"dims": ["h"], "dtype": "float32", "grad": True}},
                          "score": {"mod": "score * hs[h]"}},
     None, lambda E, s: s * E.hs[E.h],
     lambda B, H, nq, nk: (lambda t: ({"hs": t.float()}, {"hs": t}))(torch.linspace(0.3, 2.1, H).double()), 1),
    ("softcap_mod_causal", {"params": {"cap": 3.0}, "mask": {"where": "causal"},
                            "score": {"mod": "cap * tanh(score / cap)", "scale": 2.0}},
     lambda E: E.j <= E.i, lambda E, s: 3.0 * torch.tanh(s / 3.0), None, 1),
    ("dilated_window", {"params": {"w": 4, "d": 3},
                        "mask": {"where": "q_idx >= kv_idx and (q_idx - kv_idx) // d < w and (q_idx - kv_idx) % d == 0"}},
     lambda E: (E.i >= E.j) & (torch.div(E.i - E.j, 3, rounding_mode="floor") < 4) & ((E.i - E.j) % 3 == 0), None, None, 1),
    ("dilated_bidir_negmod", {"params": {"d": 3}, "mask": {"where": "(kv_idx - q_idx) % d == 1"}},
     lambda E: (E.j - E.i) % 3 == 1, None, None, 1),
    ("negfloor_score", {"score": {"mod": "score + (kv_idx - q_idx) // 4 * 0.25"}}, None,
     lambda E, s: s + torch.div(E.j - E.i, 4, rounding_mode="floor") * 0.25, None, 1),
    ("negmod_score", {"score": {"mod": "score + (q_idx - kv_idx) % 5 - ((kv_idx - 2 * q_idx) % -3)"}}, None,
     lambda E, s: s + (E.i - E.j) % 5 - torch.remainder(E.j - 2 * E.i, -3), None, 1),
    ("longformer", {"params": {"g": 3, "w": 4},
                    "mask": {"where": "(q_idx < g) | (kv_idx < g) | (abs(q_idx - kv_idx) <= w)"}},
     lambda E: (E.i < 3) | (E.j < 3) | ((E.i - E.j).abs() <= 4), None, None, 1),
    ("sink_window", {"params": {"sink": 4, "w": 8},
                     "mask": {"where": "(q_idx >= kv_idx) & ((kv_idx < sink) | (q_idx - kv_idx < w))"}},
     lambda E: (E.i >= E.j) & ((E.j < 4) | (E.i - E.j < 8)), None, None, 1),
    ("chunked_local", {"params": {"c": 7}, "mask": {"where": "(q_idx // c == kv_idx // c) & (q_idx >= kv_idx)"}},
     lambda E: (torch.div(E.i, 7, rounding_mode="floor") == torch.div(E.j, 7, rounding_mode="floor")) & (E.i >= E.j),
     None, None, 1),
    ("block_diagonal", {"params": {"c": 10}, "mask": {"where": "q_idx // c == kv_idx // c"}},
     lambda E: torch.div(E.i, 10, rounding_mode="floor") == torch.div(E.j, 10, rounding_mode="floor"), None, None, 1),
    ("natten_2d", {"params": {"W": 8, "K": 1},
                   "mask": {"where": "abs(q_idx // W - kv_idx // W) <= K and abs(q_idx % W - kv_idx % W) <= K"}},
     lambda E: ((E.i // 8 - E.j // 8).abs() <= 1) & ((E.i % 8 - E.j % 8).abs() <= 1), None, None, 1),
    ("natten_2d_clamped",
     {"params": {"W": 8, "HT": 8, "K": 1},
      "mask": {"where": "abs(min(max(q_idx // W, K), HT - 1 - K) - kv_idx // W) <= K and "
                        "abs(min(max(q_idx % W, K), W - 1 - K) - kv_idx % W) <= K"}},
     lambda E: ((E.i // 8).clamp(1, 6) - E.j // 8).abs().le(1) & ((E.i % 8).clamp(1, 6) - E.j % 8).abs().le(1),
     None, None, 1),
    ("rel_pos_table", {"params": {"M": 8},
                       "inputs": {"rel": {"dims": ["h", 17], "dtype": "float32", "grad": True}},
                       "score": {"mod": "score + rel[h, min(max(kv_idx - q_idx, -M), M) + M]"}},
     None, lambda E, s: s + E.rel[E.h, (E.j - E.i).clamp(-8, 8) + 8],
     lambda B, H, nq, nk: (lambda t: ({"rel": t.float()}, {"rel": t}))(
         torch.randn(H, 17, generator=torch.Generator().manual_seed(5)).double()), 1),
    ("float_param_int_use", {"params": {"tau": 0.5}, "score": {"mod": "score / tau + (q_idx - kv_idx) * tau"}},
     None, lambda E, s: s / 0.5 + (E.i - E.j) * 0.5, None, 1),
]

# (Nq, Nk, q_offset, k_offset)
SHAPES = [(37, 53, 0, 0), (64, 17, 0, 0), (23, 31, 40, 5)]
FAST = {"noop", "squared", "rel_causal", "inverse_causal", "alibi_flexgen_table", "doc_causal_batch",
        "prefix_lm_per_batch", "sliding_window_gqa", "head_scale_table", "dilated_bidir_negmod",
        "negmod_score", "natten_2d_clamped", "rel_pos_table", "softcap_mod_causal"}


def _run(case, shape, grads, B=2, H=4, D=16, seed=0):
    name, spec, mask, score, build, div = case
    Nq, Nk, qo, ko = shape
    mod = attncc.compile(dict(spec, name="pf_" + name))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g)
    k = torch.randn(B, H // div, Nk, D, generator=g)
    v = torch.randn(B, H // div, Nk, D, generator=g)
    kwargs, env = build(B, H, qo + Nq, ko + Nk) if build else ({}, {})
    scale = spec.get("score", {}).get("scale", 1 / math.sqrt(D))
    qd, kd, vd = (x.double().requires_grad_(grads) for x in (q, k, v))
    env_g = {}
    for key, val in env.items():
        if torch.is_tensor(val) and val.is_floating_point() and grads:
            val = val.clone().requires_grad_(True)
        env_g[key] = val
    ro, rl = oracle(qd, kd, vd, scale=scale, mask=mask, score=score, q_offset=qo, k_offset=ko, env=env_g)
    for x in (q, k, v):
        x.requires_grad_(grads)
    kw = {}
    for key, val in kwargs.items():
        if torch.is_tensor(val) and val.is_floating_point() and grads and spec.get("inputs", {}).get(key, {}).get("grad"):
            val = val.clone().requires_grad_(True)
        kw[key] = val
    o, lse = mod.attention(q, k, v, q_offset=qo, k_offset=ko, return_lse=True, **kw)
    err = {}
    tol = 1e-4 * max(1.0, ro.abs().max().item())
    err["o"] = (o.double() - ro).abs().max().item()
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), fin), (name, "lse finiteness differs")
    err["lse"] = (lse.double()[fin] - rl[fin]).abs().max().item() if fin.any() else 0.0
    if grads:
        go = torch.randn(o.shape, generator=g)
        gl = torch.randn(lse.shape, generator=g)
        lossk = (o * go).sum() + (torch.where(fin, lse, 0.0) * gl).sum()
        lossr = (ro * go.double()).sum() + (torch.where(fin, rl, 0.0) * gl.double()).sum()
        tk = [q, k, v] + [t for t in kw.values() if torch.is_tensor(t) and t.requires_grad]
        tr = [qd, kd, vd] + [env_g[n] for n, t in kw.items() if torch.is_tensor(t) and t.requires_grad]
        gk = torch.autograd.grad(lossk, tk)
        gr = torch.autograd.grad(lossr, tr)
        for n, a, b_ in zip(["dq", "dk", "dv"] + [n for n, t in kw.items() if torch.is_tensor(t) and t.requires_grad], gk, gr):
            err[n] = (a.double() - b_).abs().max().item() / max(1.0, b_.abs().max().item())
    return err, tol


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_flex_port(case):
    shapes = SHAPES if case[0] in ("rel_causal", "sliding_window_gqa", "doc_causal_batch") else SHAPES[:2] if case[0] in FAST else SHAPES[2:]
    for si, shape in enumerate(shapes):
        err, tol = _run(case, shape, grads=(si == 0), B=2 if si == 0 else 1, H=4, D=16 if si == 0 else 24)
        assert all(e <= tol * 10 for e in err.values()), (case[0], shape, err)



def test_chained_subscripts_are_one_access():
    """``bias[b][h][q_idx][kv_idx]`` (how FlexAttention score_mods often index a captured tensor) was
    refused with "only inputs from [inputs] can be indexed; ''Subscript'' is not one" (the node's
    class name, quoted twice). For integer indices torch gives the same element as
    ``bias[b, h, q_idx, kv_idx]``; the parser now flattens such a chain. Found by the Flex port probe."""
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(2, 3, 53, 53, generator=g)  # an "n" dim covers every position
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (37, 53, 53))
    want_o, want_l = oracle(q, k, v, scale=0.25, score=lambda E, s: s + bias[:, :, :37].double())
    for mod in ("score + bias[b][h][q_idx][kv_idx]", "score + bias[b, h][q_idx][kv_idx]"):
        m = attncc.compile({"inputs": {"bias": {"dims": ["b", "h", "n", 53]}}, "score": {"mod": mod}})
        o, lse = m.attention(q, k, v, bias=bias, return_lse=True)
        assert (o.double() - want_o).abs().max() < 1e-5 and (lse.double() - want_l).abs().max() < 1e-5
    with pytest.raises(ValueError, match=r"indexed with 3"):
        attncc.compile({"inputs": {"bias": {"dims": ["b", "h", "n", 53]}}, "score": {"mod": "score + bias[b][h][q_idx]"}})
    with pytest.raises(ValueError, match=r"can be indexed; 'BinOp' is not one"):
        attncc.compile({"score": {"mod": "score + (1 + q_idx)[0]"}})



@pytest.mark.parametrize("mod", ["where(kv_idx <= q_idx, score, -inf) * 0",
                                 "0 * where(kv_idx <= q_idx, score, -inf) + score",
                                 "where(kv_idx <= q_idx, score, -inf) - where(kv_idx <= q_idx, score, -inf)"])
def test_arithmetic_that_cancels_a_minus_inf_branch_is_refused(mod):
    """sympy simplified ``0 * where(c, s, -inf)`` and ``w - w`` to 0 while parsing, so the kernels
    and attncc.reference agreed on scores of 0 (a uniform softmax over every key: lse log(Nk) on
    every row) where Python, torch and FlexAttention compute ``0 * -inf`` / ``-inf - -inf`` = NaN on
    the masked pairs (NaN rows). Such a spec is now refused with a SpecError naming the branch.
    Found by the Flex port probe, evaluating each score_mod with Python floats pair by pair."""
    with pytest.raises(ValueError, match=r"cancels a branch that can be infinite"):
        attncc.compile({"score": {"mod": mod}})


@pytest.mark.parametrize("mod", ["where(kv_idx <= q_idx, score, -inf) * 2 + where(kv_idx <= q_idx, score, -inf)",
                                 "where(kv_idx <= q_idx, score, -inf) + where(kv_idx % 2 == 0, 0, -inf)",
                                 "2 * where(kv_idx <= q_idx, score, -inf) - h",
                                 "exp(where(kv_idx <= q_idx, score, -inf)) * 0"])  # exp(-inf) * 0 is 0 in Python
def test_arithmetic_that_keeps_a_minus_inf_branch_is_accepted(mod):
    m = attncc.compile({"score": {"mod": mod}})
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for n in (9, 13, 13))
    o, lse = m.attention(q, k, v, return_lse=True)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()



def _fl(a, b):
    return torch.div(a, b, rounding_mode="floor")


fl = _fl
EDGE_CASES = [
 ("mod_no_s", {"score": {"mod": "(q_idx - kv_idx) * 0.1"}}, None, lambda E, s: (E.i - E.j) * 0.1 + 0 * s, None, 1),
 ("mod_zero", {"score": {"mod": "score * 0"}}, None, lambda E, s: s * 0, None, 1),
 ("bool_num", {"score": {"mod": "score + (q_idx > kv_idx) * 2"}}, None, lambda E, s: s + (E.i > E.j) * 2, None, 1),
 ("float_div_pos", {"score": {"mod": "score / (kv_idx + 1)"}}, None, lambda E, s: s / (E.j + 1), None, 1),
 ("true_div_int", {"score": {"mod": "score + (q_idx - kv_idx) / 2"}}, None, lambda E, s: s + (E.i - E.j) / 2, None, 1),
 ("neg_literal_floordiv", {"score": {"mod": "score + (kv_idx - q_idx) // -3"}}, None, lambda E, s: s + fl(E.j - E.i, -3), None, 1),
 ("xor_pow", {"score": {"mod": "score + ((q_idx ^ kv_idx) & 3) - (q_idx - kv_idx) ** 2 * 0.001"}}, None,
   lambda E, s: s + ((E.i ^ E.j) & 3) - (E.i - E.j) ** 2 * 0.001, None, 1),
 ("head_neg_inf", {"score": {"mod": "where(h == 1, -inf, score)"}}, None, lambda E, s: torch.where(E.h == 1, torch.full_like(s, NEG), s), None, 1),
 ("neg_inf_plus", {"score": {"mod": "where(q_idx >= kv_idx, score, -inf) + h"}}, None, lambda E, s: _w(E.i >= E.j, s) + E.h, None, 1),
 ("neg_inf_times", {"score": {"mod": "where(q_idx >= kv_idx, score, -inf) * 2"}}, None, lambda E, s: _w(E.i >= E.j, s) * 2, None, 1),
 ("softcap_key_plus_mask", {"mask": {"where": "q_idx >= kv_idx"}, "score": {"mod": "where(kv_idx % 3 != 0, score, -inf)", "softcap": 2.0, "scale": 1.5}},
   lambda E: E.i >= E.j, lambda E, s: _w(E.j % 3 != 0, 2.0 * torch.tanh(s / 2.0)), None, 1),
 ("softcap_in_mod_of_masked", {"score": {"mod": "2.0 * tanh(where(kv_idx % 3 != 0, score, -inf) / 2.0)", "scale": 1.5}},
   None, lambda E, s: 2.0 * torch.tanh(_w(E.j % 3 != 0, s) / 2.0), None, 1),
 ("exp_of_masked", {"score": {"mod": "exp(where(kv_idx <= q_idx, score, -inf))"}},
   None, lambda E, s: torch.exp(_w(E.j <= E.i, s)), None, 1),
 ("sigmoid_of_masked", {"score": {"mod": "sigmoid(where(kv_idx <= q_idx, score, -inf)) * 3"}},
   None, lambda E, s: torch.sigmoid(_w(E.j <= E.i, s)) * 3, None, 1),
 ("bottom_right", {"mask": {"where": "q_idx + (n_k - n_q) >= kv_idx"}}, lambda E: E.i + (E.NK - E.NQ) >= E.j, None,
   lambda B, H, nq, nk: ({}, {"NQ": nq, "NK": nk}), 1),
 ("bool_input_keep", {"inputs": {"keep": {"dims": ["b", "n"], "dtype": "bool"}}, "mask": {"where": "keep[b, kv_idx] and q_idx >= kv_idx"}},
   lambda E: E.keep[E.b, E.j] & (E.i >= E.j), None,
   lambda B, H, nq, nk: (lambda t: ({"keep": t}, {"keep": t}))(torch.rand(B, max(nq, nk), generator=torch.Generator().manual_seed(1)) > 0.3), 1),
 ("abs_score", {"score": {"mod": "abs(score) - max(score, 0.5)"}}, None, lambda E, s: s.abs() - s.clamp(min=0.5), None, 1),
 ("exp_score", {"score": {"mod": "exp(score * 0.5)"}}, None, lambda E, s: torch.exp(s * 0.5), None, 1),
 ("score_cond", {"score": {"mod": "where(score > 0.2, score, score * 0.1)"}}, None, lambda E, s: torch.where(s > 0.2, s, s * 0.1), None, 1),
 ("sigmoid_gate", {"score": {"mod": "score + log(sigmoid(score))"}}, None, lambda E, s: s + torch.log(torch.sigmoid(s)), None, 1),
 ("mod_of_b_and_h", {"score": {"mod": "score * (1 + b) / (h + 1) + b * h"}}, None, lambda E, s: s * (1 + E.b) / (E.h + 1) + E.b * E.h, None, 1),
 ("pos_floor_float", {"score": {"mod": "score + (q_idx * 0.7) // 1.3"}}, None, lambda E, s: s + torch.div(E.i * 0.7, 1.3, rounding_mode="floor"), None, 1),
 ("min_max_ints", {"mask": {"where": "min(q_idx, 20) >= max(kv_idx - 3, 0)"}}, lambda E: E.i.clamp(max=20) >= (E.j - 3).clamp(min=0), None, None, 1),
 ("chained_cmp", {"mask": {"where": "0 <= q_idx - kv_idx < 9"}}, lambda E: (0 <= E.i - E.j) & (E.i - E.j < 9), None, None, 1),
 ("not_mask", {"mask": {"where": "not (q_idx % 4 == kv_idx % 4)"}}, lambda E: ~(E.i % 4 == E.j % 4), None, None, 1),
 ("neg_prefix_batch", {"inputs": {"st": {"dims": ["b"], "dtype": "int32"}}, "mask": {"where": "q_idx - st[b] >= kv_idx"}},
   lambda E: E.i - E.st[E.b] >= E.j, None, lambda B, H, nq, nk: (lambda t: ({"st": t}, {"st": t.long()}))(torch.tensor([-5, 7][:B], dtype=torch.int32)), 1),
 ("input_floordiv", {"inputs": {"st": {"dims": ["b"], "dtype": "int32"}}, "score": {"mod": "score + (kv_idx - st[b]) // 4 + (q_idx - st[b]) % 3"}},
   None, lambda E, s: s + fl(E.j - E.st[E.b], 4) + (E.i - E.st[E.b]) % 3, lambda B, H, nq, nk: (lambda t: ({"st": t}, {"st": t.long()}))(torch.tensor([30, -7][:B], dtype=torch.int32)), 1),
]


@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: c[0])
def test_flex_edge_port(case):
    """Edge semantics a Flex user relies on: -inf inside arithmetic, softcap of masked scores, bool
    as number, Python floor // and % of negatives (ints and floats), n_q / n_k, bool / int inputs."""
    err, tol = _run(case, SHAPES[2], grads=case[0] in ("score_cond", "abs_score", "neg_inf_plus", "input_floordiv"), B=2, H=2, D=16)
    assert all(e <= tol * 10 for e in err.values()), (case[0], err)


_PY_FNS = dict(where=lambda c, a, b: a if c else b, abs=abs, min=min, max=max, log=math.log, sqrt=math.sqrt,
               exp=math.exp, tanh=math.tanh, sin=math.sin, cos=math.cos, inf=math.inf)
MASKS = ["q_idx >= kv_idx & 7", "-(q_idx - kv_idx) % 7 < 3", "-q_idx // 3 >= -kv_idx // 2", "(q_idx - kv_idx) >> 2 == -1",
         "q_idx - kv_idx & 3 == 0", "(q_idx - 20) // -6 <= (kv_idx - 20) % -5 + 2", "~(q_idx ^ kv_idx) & 1 == 0",
         "q_idx % 5 != kv_idx % 5 == False", "not q_idx < kv_idx < q_idx + 9", "True + True <= q_idx - kv_idx",
         "q_idx ** 0.5 >= kv_idx ** 0.5 - 1", "q_idx * 2 ** -1 >= kv_idx * 0.5 - 3", "abs(-5 - kv_idx) // 2 <= q_idx", "q_idx == kv_idx or 3 > kv_idx",
         "(q_idx < 10) == (kv_idx < 10)", "q_idx < 10 != kv_idx < 10", "1 < 2 < q_idx - kv_idx"]
MODS = ["kv_idx - q_idx", "score + q_idx % -4", "min(score, 3 * (q_idx > kv_idx))", "score * 2 ** -1 + 2 ** 3", "score + (q_idx - kv_idx) / -3 // 2",
        "score - -score", "score + -2 ** 2", "score + (-2) ** 2 - 5 % 3 ** 2", "score ** 2 / 3", "score + (q_idx > kv_idx) - (q_idx < kv_idx) * 0.5",
        "score + max(q_idx, kv_idx, 30) * 0.01", "where(score > 0, score, score * 0.01) + sin(q_idx) * 0.1",
        "score + 7 // 2 * 1.5 + 7 / 2", "score + (kv_idx - q_idx) % 3 ** 2 * 0.1", "score + 1e-3 * (q_idx * kv_idx)", "score + ~q_idx % 4"]


@pytest.mark.parametrize("expr,is_mask", [(e, True) for e in MASKS] + [(e, False) for e in MODS])
def test_python_meaning_pair_by_pair(expr, is_mask):
    """Each expression evaluated by Python itself (eval with Python ints and floats, pair by pair)
    as the oracle: precedence, chained comparisons, floor // and % of negatives, ** of negative
    literals, ~ and shifts, bool arithmetic."""
    m = attncc.compile({"mask": {"where": expr}} if is_mask else {"score": {"mod": expr}})
    Nq, Nk, qo = 23, 31, 5
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 8, generator=g) for n in (Nq, Nk, Nk))
    S = (q.double() @ k.double().transpose(-1, -2))[0, 0] / math.sqrt(8)
    code = compile(expr, "<e>", "eval")
    out = torch.empty(Nq, Nk, dtype=torch.float64)
    for r in range(Nq):
        for c in range(Nk):
            val = eval(code, {"__builtins__": {}}, dict(_PY_FNS, q_idx=qo + r, kv_idx=c, score=S[r, c].item()))
            out[r, c] = (S[r, c] if val else NEG) if is_mask else float(val)
    lse = torch.logsumexp(out, -1)
    fin = torch.isfinite(lse)
    p = torch.where(fin[:, None], torch.exp(out - torch.where(fin, lse, 0)[:, None]), 0.0)
    o, lk = m.attention(q, k, v, q_offset=qo, return_lse=True)
    assert torch.equal(torch.isfinite(lk[0, 0]), fin)
    assert (o[0, 0].double() - p @ v.double()[0, 0]).abs().max() < 1e-5
    if fin.any():
        assert (lk[0, 0].double()[fin] - lse[fin]).abs().max() < 1e-4 * max(1.0, lse[fin].abs().max().item())


if __name__ == "__main__":
    import sys
    import time
    want = set(sys.argv[1:])
    for c in CASES:
        if want and c[0] not in want:
            continue
        for si, shape in enumerate(SHAPES):
            t = time.time()
            try:
                err, tol = _run(c, shape, grads=(si != 1), B=2 if si != 1 else 1, H=4, D=16 if si != 1 else 24)
                bad = {k_: e for k_, e in err.items() if e > tol * 10}
                print(("FAIL" if bad else "ok  "), c[0], shape, {k_: f"{e:.1e}" for k_, e in err.items()},
                      f"{time.time() - t:.1f}s", flush=True)
            except Exception as exc:  # noqa: BLE001
                print("ERR ", c[0], shape, type(exc).__name__, str(exc)[:300], flush=True)


def test_float_of_inf_says_how_to_write_it():
    """A Flex user's float("-inf") is refused with the spelling the language takes."""
    with pytest.raises(SpecError, match=r"-inf for float\('-inf'\)"):
        parse_spec('[score]\nmod = "where(j <= i, s, float(\'-inf\'))"\n')
