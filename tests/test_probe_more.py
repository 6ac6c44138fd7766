"""An outside tester's second probe (probe 10), on ground the earlier probes did not reach: packed
variable-length calls of random specs, linear attention carried over chunks and decoded by step(),
`attncc explain --json` at odd tile shapes, and the transformers integration with random padding.
Seeded random cases against attncc.reference (float64) or a brute-force oracle, and the defects the
probe found, each with its regression test.

Bigger sweeps of the same checks: ``python tests/test_probe_more.py varlen|linear|explain 0 200``.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import re
import sys
from dataclasses import replace

os.environ.setdefault("TRITON_INTERPRET", "1")  # run as a script too (before Triton is imported)

import pytest  # noqa: E402
import torch  # noqa: E402

import attncc  # noqa: E402
from cases import module  # noqa: E402

# ---------------------------------------------------------------------------------------------
# step() has no backward: it says so instead of returning outputs that silently carry no gradient
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wants_grad", ["q", "k", "v", "state"])
def test_step_refuses_inputs_that_want_a_gradient(wants_grad):
    """step() ran its kernel under no_grad whatever its inputs: q.requires_grad gave an o with
    requires_grad False, so a model trained through step() silently got no gradient from it
    (decode() raises NotImplementedError for the same case)."""
    mod = module("linear_elu")
    q, k, v = (torch.randn(1, 2, 16) for _ in range(3))
    state = (torch.rand(1, 2, 16, 16), torch.rand(1, 2, 16))
    if wants_grad == "state":
        state = (state[0].requires_grad_(), state[1])
    else:
        {"q": q, "k": k, "v": v}[wants_grad].requires_grad_()
    with pytest.raises(NotImplementedError, match=r"linear_elu\.step is for inference and has no backward"):
        mod.step(q, k, v, state, position=3)
    with torch.no_grad():  # and runs without autograd
        o, (S, z) = mod.step(q, k, v, state, position=3)
    assert o.shape == (1, 2, 16) and S.shape == (1, 2, 16, 16)


def test_step_names_its_own_state_argument():
    """A bad state passed to step() was reported as attention()'s initial_state."""
    q = torch.randn(1, 2, 16)
    with pytest.raises(ValueError, match=r"linear_elu\.step: state S must have shape \[1, 2, 16, 16\]"):
        module("linear_elu").step(q, q, q, (torch.zeros(1, 2, 15, 16), torch.zeros(1, 2, 15)))


# ---------------------------------------------------------------------------------------------
# transformers: generation with a static (compileable) cache
# ---------------------------------------------------------------------------------------------


def test_generation_with_a_static_cache_equals_sdpa(tmp_path, monkeypatch):
    """generate(cache_implementation="static") builds the masks once (create_masks_for_generate) and
    passes them to the model as its attention_mask; the model's mask code then asked the KeyMask for
    .ndim: AttributeError: 'KeyMask' object has no attribute 'ndim' (Gemma 2's per-layer dict of masks
    went through). The KeyMask is now taken again, its padding flags kept."""
    transformers = pytest.importorskip("transformers")
    from attncc.integrations import transformers as attncc_hf

    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    attncc_hf.register("attncc_probe10")
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=100, max_position_embeddings=64, pad_token_id=0,
                  bos_token_id=1, eos_token_id=99, initializer_range=0.2)
    config = transformers.MistralConfig(**common, sliding_window=5)  # llama failed the same way
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    ours = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="attncc_probe10")
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(2, 99, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    ids[mask == 0] = 0
    args = dict(attention_mask=mask, max_new_tokens=2, do_sample=False, cache_implementation="static")
    assert torch.equal(ours.generate(ids, **args), ref.generate(ids, **args))



# ---------------------------------------------------------------------------------------------
# seeded random probes: packed varlen calls of random specs, decode rows at negative positions,
# linear attention over chunks and step(), explain at odd tile shapes
# ---------------------------------------------------------------------------------------------


def _rel(x, ref) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / max(float(ref.norm()), 1e-3 * math.sqrt(max(ref.numel(), 1))))


def check_varlen(seed: int, backward: bool = False):
    """A random spec (tests/fuzz_specs.py) called on S packed sequences of random lengths (0 and 1
    included, q and k lengths equal or not, rows past cu_seqlens_q[-1]) against S reference calls;
    sequence s sits in batch row s of its reference call, so that ``b`` and the "b" inputs are s.
    Returns None, or what differs."""
    from fuzz_specs import build_spec, call_arguments, random_call, random_spec

    rng = random.Random(seed)
    text, draft = random_spec(rng, avoid={"random_blocks"})
    built = build_spec(text)
    if isinstance(built, Exception):
        return None
    pattern, mod = built
    plan = random_call(rng, draft, backward=backward)
    S = rng.choice((1, 2, 3))
    lq = [rng.choice((0, 1, rng.randint(1, 30))) for _ in range(S)]
    lk = list(lq) if rng.random() < 0.5 else [rng.choice((0, 1, rng.randint(1, 30))) for _ in range(S)]
    plan = replace(plan, B=S, Nq=max(max(lq), 1), Nk=max(max(lk), 1), q_offset=0, k_offset=0, n_q_extra=None,
                   n_k_extra=None, decode=None, layouts=("contiguous",) * 3, nan=None, dtype="float32", tiles=None,
                   int64_values=False)
    a = call_arguments(draft, plan)
    tail = rng.choice((0, 0, 3))
    q = torch.cat([a.q[s, :, :lq[s]] for s in range(S)] + [torch.randn(plan.Hq, tail, plan.D)], 1)[None]
    k = torch.cat([a.k[s, :, :lk[s]] for s in range(S)], 1)[None]
    v = torch.cat([a.v[s, :, :lk[s]] for s in range(S)], 1)[None]
    q, k, v = (x.detach().clone().requires_grad_(backward) for x in (q, k, v))
    cq, ck = (torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32) for n in (lq, lk))
    kw = dict(a.params, **{n: t.detach() for n, t in a.inputs.items()})
    if plan.scale is not None:
        kw["scale"] = plan.scale
    if rng.random() < 0.5:
        kw.update(max_seqlen_q=max(lq), max_seqlen_k=max(lk))
    desc = f"lq={lq} lk={lk} {plan.describe()}\n{text}"
    try:
        o, lse = mod.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, return_lse=True, **kw)
    except (ValueError, NotImplementedError) as e:  # the refusal is a NotImplementedError
        if "cu_seqlens" in str(e) and "input" in str(e):
            return None  # documented: masks that read [inputs] refuse cu_seqlens
        return f"raised {e}\n{desc}"
    kw.pop("max_seqlen_q", None), kw.pop("max_seqlen_k", None)
    qd, kd, vd = (x.detach().double().requires_grad_(backward) for x in (q, k, v))
    refs, ref_lses = [], []
    for s in range(S):
        if lq[s] == 0:
            continue

        def row_s(x, n, s=s):  # the sequence in batch row s, zeros elsewhere
            rows = [torch.zeros(1, x.shape[1], n, x.shape[3], dtype=x.dtype)] * S
            rows[s] = x
            return torch.cat(rows, 0)

        r, r_lse = attncc.reference(pattern, row_s(qd[:, :, cq[s]:cq[s + 1]], lq[s]),
                                    row_s(kd[:, :, ck[s]:ck[s + 1]], lk[s]), row_s(vd[:, :, ck[s]:ck[s + 1]], lk[s]),
                                    return_lse=True, **kw)
        refs.append(r[s:s + 1])
        ref_lses.append(r_lse[s:s + 1])
    T = int(cq[-1])
    if (o[:, :, T:] != 0).any() or (lse[:, :, T:] != -math.inf).any():
        return f"rows past cu_seqlens_q[-1] are not o = 0, lse = -inf\n{desc}"
    if not refs:
        return None
    ref, ref_lse = torch.cat(refs, 2), torch.cat(ref_lses, 2)
    if not torch.isfinite(ref).all():
        return None  # a huge param: nothing exact to compare
    if _rel(o[:, :, :T], ref) > 1e-4 or not torch.isfinite(o).all():
        return f"o: relative error {_rel(o[:, :, :T], ref):.3g}\n{desc}"
    got_lse, fin = lse[:, :, :T].detach(), torch.isfinite(ref_lse)
    if not torch.equal(torch.isfinite(got_lse), fin) or (
            fin.any() and float((got_lse[fin].double() - ref_lse[fin]).abs().max()) > 1e-3):
        return f"lse differs\n{desc}"
    if backward and ref.requires_grad:
        g = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        (o * g.float()).sum().backward()
        (ref * g[:, :, :T]).sum().backward()
        for name, x, xd in (("dq", q, qd), ("dk", k, kd), ("dv", v, vd)):
            if _rel(x.grad, xd.grad) > 1e-3:
                return f"{name}: relative error {_rel(x.grad, xd.grad):.3g}\n{desc}"
    return None


@pytest.mark.parametrize("seed", [10, 101, 113])
def test_packed_varlen_calls_of_random_specs(seed):
    # 10: a mask on b (b == 0: the sequence index); 101, 113: gradients, sequences of length 0
    assert check_varlen(seed, backward=seed > 100) is None


def check_decode(seed: int):
    """decode() of a random spec with kv_len anywhere in 0..capacity (rows shorter than Nq: their
    query rows at negative positions see nothing), contiguous or paged caches of 16-48 rows a page."""
    from fuzz_specs import DecodePlan, _decode_cache, build_spec, call_arguments, random_call, random_spec

    rng = random.Random(seed)
    avoid = {"random_blocks", "noncontig_int", "int64", "pos_2_31", "nan"}
    text, draft = random_spec(rng, avoid=avoid)
    built = build_spec(text)
    if isinstance(built, Exception):
        return None
    pattern, mod = built
    plan = random_call(rng, draft, backward=False, avoid=avoid)
    Nq, page, capacity, B = rng.choice((1, 2, 3, 5, 16)), rng.choice((0, 16, 32, 48)), rng.randint(1, 70), rng.choice((1, 2, 3))
    if page:
        capacity = -(-capacity // page) * page
    lens = tuple(rng.choice((0, rng.randint(0, min(Nq, capacity)), rng.randint(0, capacity), capacity)) for _ in range(B))
    plan = replace(plan, B=B, Nq=Nq, Nk=capacity, q_offset=0, k_offset=0, n_q_extra=None, n_k_extra=None, nan=None,
                   int64_values=False, tiles=None, decode=DecodePlan(kv_lens=lens, capacity=capacity, page_size=page))
    a = call_arguments(draft, plan)
    k = a.k
    if pattern.rope is not None:  # the cache holds rotated keys
        from attncc._reference import rotary

        r = pattern.rope
        k = rotary(k.double(), torch.arange(capacity), r.theta, r.style, r.rotary_dim or plan.D).to(k.dtype)
    kc, vc, kv_len, table = _decode_cache(plan, k, a.v)
    kw = dict(a.params, **a.inputs, **({} if plan.scale is None else {"scale": plan.scale}))
    desc = f"{plan.describe()}\n{text}"
    with torch.no_grad():
        o, lse = mod.decode(a.q, kc, vc, kv_len=kv_len, block_table=table, return_lse=True, **kw)
    tol = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}[plan.dtype]
    for b, n in enumerate(lens):
        first = max(0, Nq - n)
        if (o[b, :, :first] != 0).any() or (lse[b, :, :first] != -math.inf).any():
            return f"row {b}: query rows at negative positions are not o = 0, lse = -inf\n{desc}"
        if first == Nq:
            continue
        r, r_lse = attncc.reference(pattern, a.q[:, :, first:].double(), a.k[:, :, :n].double(), a.v[:, :, :n].double(),
                                    return_lse=True, q_offset=n - Nq + first, **kw)
        r, r_lse, got, got_lse = r[b], r_lse[b], o[b, :, first:], lse[b, :, first:]
        if not torch.isfinite(r).all():
            continue
        if _rel(got, r) > tol or not torch.isfinite(got).all():
            return f"row {b}: o relative error {_rel(got, r):.3g}\n{desc}"
        fin = torch.isfinite(r_lse)
        if not torch.equal(torch.isfinite(got_lse), fin):
            return f"row {b}: rows without keys differ\n{desc}"
    return None


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_decode_of_random_specs_with_short_rows(seed):
    assert check_decode(seed) is None



_LINEAR = {}


def _linear_module(fmap: str, causal: bool, normalize: bool, features: int):
    key = (fmap, causal, normalize, features)
    if key not in _LINEAR:
        text = (("head_dim = 16\n" if fmap == "taylor" else "") + "kind = 'linear'\n[feature_map]\n"
                f"name = '{fmap}'\ncausal = {str(causal).lower()}\nnormalize = {str(normalize).lower()}\n"
                + (f"features = {features}\n" if fmap == "performer" else ""))
        _LINEAR[key] = (attncc.parse_spec(text), attncc.compile(text))
    return _LINEAR[key]


def check_linear(seed: int):
    """Linear attention of a random feature map, GQA and head dims: causal calls cut into 1-4 pieces
    at random rows carrying the state equal one call (o, final state, and dq, dk, dv of a loss on
    both), step() from the state at the last cut equals the last rows, float16/bfloat16 pieces stay
    near the reference; non-causal calls with an initial state against the float64 state form, its
    gradients included."""
    from test_linear import naive

    rng = random.Random(seed)
    fmap = rng.choice(["elu+1", "relu", "identity", "performer", "cosformer", "taylor"])
    causal = rng.random() < 0.75
    normalize = fmap != "identity" and rng.random() < 0.8  # identity / (phi(q).z) is ill-conditioned
    p, m = _linear_module(fmap, causal, normalize, rng.choice((16, 20, 40)))
    hq = rng.choice((1, 2, 3, 4))
    hkv = rng.choice([d for d in (1, 2, 3, 4) if hq % d == 0])
    B, D = rng.choice((1, 2)), rng.choice((4, 6)) if fmap == "taylor" else rng.choice((5, 16, 20))
    Dv, N = rng.choice((D, 3, 16)), rng.randint(1, 40)
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, hq, N, D, generator=g) * 0.5, torch.randn(B, hkv, N, D, generator=g) * 0.5
    v = torch.randn(B, hkv, N, Dv, generator=g)
    desc = f"{fmap} causal={causal} normalize={normalize} B={B} Hq={hq} Hkv={hkv} D={D} Dv={Dv} N={N}"
    grads = lambda *ts: [t.detach().clone().requires_grad_() for t in ts]  # noqa: E731
    if not causal:
        F = m.feature_layout(D)[0]
        s0, z0 = torch.rand(B, hkv, F, Dv, generator=g), torch.rand(B, hkv, F, generator=g) + 1
        qq, kk, vv, s0, z0 = grads(q, k, v, s0, z0)
        o, (S, z) = m.attention(qq, kk, vv, initial_state=(s0, z0), return_state=True)
        qd, kd, vd, sd, zd = (t.detach().double().requires_grad_() for t in (qq, kk, vv, s0, z0))
        ref, (Sr, zr) = naive(p, qd, kd, vd, sd, zd)
        if max(_rel(o, ref), _rel(S, Sr), _rel(z, zr)) > 1e-4:
            return f"non-causal with a state: {max(_rel(o, ref), _rel(S, Sr), _rel(z, zr)):.3g} {desc}"
        cot = torch.randn(o.shape, generator=g)
        ((o * cot).sum() + S.sum() * 0.1 + z.sum() * 0.2).backward()
        ((ref * cot.double()).sum() + Sr.sum() * 0.1 + zr.sum() * 0.2).backward()
        for name, x, xd in (("dq", qq, qd), ("dk", kk, kd), ("dv", vv, vd), ("dS0", s0, sd), ("dz0", z0, zd)):
            if _rel(x.grad, xd.grad) > 1e-3:
                return f"non-causal {name}: {_rel(x.grad, xd.grad):.3g} {desc}"
        return None
    pos = dict(n_q=N, n_k=N)  # cosFormer's M: the whole sequence
    bounds = [0] + sorted(rng.sample(range(1, N), min(N - 1, rng.randint(0, 3)))) + [N]
    qq, kk, vv = grads(q, k, v)
    whole, (Sw, zw) = m.attention(qq, kk, vv, return_state=True, **pos)
    ref = attncc.reference(p, q.double(), k.double(), v.double(), **pos)
    if _rel(whole, ref) > 1e-4:
        return f"one call: {_rel(whole, ref):.3g} {desc}"
    q2, k2, v2 = grads(q, k, v)
    state, outs = None, []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        o, state = m.attention(q2[:, :, lo:hi], k2[:, :, lo:hi], v2[:, :, lo:hi], initial_state=state,
                               return_state=True, q_offset=lo, k_offset=lo, **pos)
        outs.append(o)
    chunked = torch.cat(outs, 2)
    if max(_rel(chunked, whole), _rel(state[0], Sw), _rel(state[1], zw)) > 1e-4:
        return f"pieces {bounds}: {max(_rel(chunked, whole), _rel(state[0], Sw), _rel(state[1], zw)):.3g} {desc}"
    cot = torch.randn(whole.shape, generator=g)
    ((whole * cot).sum() + (Sw * Sw).sum() * 0.01 + zw.sum() * 0.1).backward()
    ((chunked * cot).sum() + (state[0] * state[0]).sum() * 0.01 + state[1].sum() * 0.1).backward()
    for name, one, pieces in (("dq", qq, q2), ("dk", kk, k2), ("dv", vv, v2)):
        if _rel(pieces.grad, one.grad) > 1e-4:
            return f"pieces {bounds} {name}: {_rel(pieces.grad, one.grad):.3g} {desc}"
    with torch.no_grad():
        t0, st = bounds[-2], None
        if t0:
            _, st = m.attention(q[:, :, :t0], k[:, :, :t0], v[:, :, :t0], return_state=True, **pos)
        rows = []
        for t in range(t0, N):
            o_t, st = m.step(q[:, :, t], k[:, :, t], v[:, :, t], st, position=t, n=N)
            rows.append(o_t)
        if _rel(torch.stack(rows, 2), whole[:, :, t0:]) > 1e-4:
            return f"step() from row {t0}: {_rel(torch.stack(rows, 2), whole[:, :, t0:]):.3g} {desc}"
        dt = rng.choice((torch.float16, torch.bfloat16))
        state, outs = None, []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            o, state = m.attention(*(x[:, :, lo:hi].to(dt) for x in (q, k, v)), initial_state=state,
                                   return_state=True, q_offset=lo, k_offset=lo, **pos)
            outs.append(o)
        half = torch.cat(outs, 2)
        if half.dtype != dt or _rel(half, ref) > (3e-2 if dt == torch.bfloat16 else 5e-3):
            return f"{dt} pieces: {half.dtype}, {_rel(half, ref):.3g} {desc}"
    return None


@pytest.mark.parametrize("seed", [1, 4, 9])
def test_linear_pieces_states_and_steps(seed):
    assert check_linear(seed) is None


def check_explain(seed: int):
    """`attncc explain --json` (the command's own parsing) at odd tile shapes (1x1, 3x5, 17x100,
    tiles larger than the lengths), Nq != Nk, batch rows, heads and --param overrides: allowed pairs
    and both walks' tile counts equal brute force over every pair (tests/tile_oracle.py), for
    shipped specs, random band/chunk masks and the random expressions of tests/probe_specs.py."""
    import tempfile
    from pathlib import Path

    import probe_specs
    from attncc._reference import pair_mask
    from attncc.core import tiles
    from attncc.explain import main_explain
    from attncc.spec import SpecError, load_spec, parse_spec
    from cases import SMALL_PARAMS, SPEC_FILES
    from tile_oracle import mask_spec, random_cover_mask, random_overrides, tile_classes

    rng = random.Random(seed)
    over = {}
    with tempfile.TemporaryDirectory() as tmp:
        r = rng.random()
        if r < 0.3:
            path = Path(rng.choice(SPEC_FILES))
            pattern = load_spec(path)
            if pattern.kind != "softmax" or pattern.inputs:
                return None  # explain uses synthetic inputs
            over = {k: v for k, v in SMALL_PARAMS.get(path.stem, {}).items() if rng.random() < 0.7}
        else:
            if r < 0.6:
                mask, params = random_cover_mask(rng)
                text = mask_spec(f"c{seed}", mask, params)
                over = random_overrides(rng, params)
            else:
                text = probe_specs.draw_case(seed).text
            try:
                pattern = parse_spec(text)
            except SpecError:
                return None
            path = Path(tmp) / f"x{seed}.toml"
            path.write_text(text)
        n_q, n_k = rng.randint(1, 90), rng.randint(1, 90)
        sizes = (1, 2, 3, 5, 7, 16, 17, 33, 64, 100, 128)
        bm, bn, batch, heads = rng.choice(sizes), rng.choice(sizes), rng.choice((1, 2)), rng.choice((1, 2, 3))
        argv = [str(path), "--n", str(n_q), "--nk", str(n_k), "--block", f"{bm}x{bn}", "--batch", str(batch),
                "--heads", str(heads), "--json"] + [x for k, v in over.items() for x in ("--param", f"{k}={v}")]
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            assert main_explain(argv) == 0, argv
        got = json.loads(out.getvalue())
        mask = pair_mask(pattern, q_rows=n_q, k_rows=n_k, batch=batch, heads=heads, params={**pattern.param_values, **over})
    want = {w: dict.fromkeys(("empty", "full", "partial"), 0) for w in ("forward", "dkdv")}
    for b in range(batch):
        for h in range(heads):
            for walk, classes in zip(("forward", "dkdv"), tile_classes(mask[b, h], bm, bn)):
                for name, cls in (("empty", tiles.EMPTY), ("full", tiles.FULL), ("partial", tiles.PARTIAL)):
                    want[walk][name] += int((classes == cls).sum())
    counts = {w: got["walks"][w]["tiles"] for w in want}
    if got["allowed_pairs"] != int(mask.sum()) or counts != want:
        return f"{argv}: pairs {got['allowed_pairs']} vs {int(mask.sum())}, tiles {counts} vs {want}"
    return None


def test_explain_counts_at_odd_tile_shapes():
    bad = [f for f in (check_explain(seed) for seed in range(40)) if f]
    assert not bad, bad[:3]



# (the words of a call's errors: explain makes the call's own check, attncc.core.semantics.param_value)
@pytest.mark.parametrize("value, message", [
    ("w=1.5", r"param w must be an int, got float 1\.5"),
    ("w=1e3", "must be an int, got float 1000.0"),
    ("w=nan", "must be an int, got float nan"),
    ("w=99999999999999999999", r"param w must be <= 2\*\*62 - 1 \(4611686018427387903\), got 99999999999999999999"),
    ("w=-2147483649", r"param w must be >= -2\*\*31 \(-2147483648\), got -2147483649"),
    ("c=nan", r"param c must be a finite number in float32's range \(.*\), got nan"),
    ("c=inf", "got inf"),
    ("c=1e39", "got 1e\\+39"),
])
def test_explain_refuses_param_values_no_call_takes(tmp_path, capsys, value, message):
    """`explain --param w=1.5` for an int param explained a window of 1.5 (a call refuses it:
    TypeError), `w=1e3` one of 1000.0, `w=99999999999999999999` a window past int64, and `c=nan`
    for a float param ended in a traceback from the tile counter."""
    from attncc.explain import main_explain

    spec = tmp_path / "p.toml"
    spec.write_text("[params]\nw = 3\nc = 0.5\n[mask]\nwhere = 'j <= i and i - j < w'\n[score]\nbias = 'c * (i - j)'\n")
    assert main_explain([str(spec), "--n", "40", "--param", value, "--json"]) == 2
    assert re.search(message, capsys.readouterr().err)
    for good in ("w=-3", "w=7", "c=-2", "c=1e30"):  # what calls take is explained
        assert main_explain([str(spec), "--n", "40", "--param", good, "--json"]) == 0



def random_param_spec(rng: random.Random, name: str) -> dict:
    """A spec with 1 to 5 params of random kinds and spec values: int params in the mask, one maybe
    counting a reduction's terms (range(K)), float params in the bias."""
    params, where, bias = {}, ["j <= i"], []
    ints = [f"w{n}" for n in range(rng.randint(0, 2))]
    for w in ints:
        params[w] = rng.randint(1, 40)
    if ints:
        where.append(f"i - j < {' + '.join(ints)}")
    if rng.random() < 0.5:
        params["K"] = rng.randint(1, 4)
        where.append("(j % 8 == 0 or any(j % 8 == t + 1 for t in range(K)))")
    for n in range(rng.randint(0 if params else 1, 2)):
        params[f"c{n}"] = rng.choice([0.5, -0.25, 1e-3, 0.0, 2.0])
        bias.append(f"c{n} * 0.01 * (i - j)")
    spec = {"name": name, "head_dim": 16, "params": params, "mask": {"where": " and ".join(where)}}
    if bias:
        spec["score"] = {"bias": " + ".join(bias)}
    return spec


def random_param_value(rng: random.Random, spec_value):
    """A value a user may pass as a param: Python, numpy and tensor numbers of both kinds around
    the bounds of either kind, booleans, NaN, infinities, -0.0, huge ints, strings, None."""
    import fractions

    import numpy as np

    from attncc.core.semantics import FLOAT32_MAX, FLOAT32_TINY, INT_LIMIT, INT_PARAM_MIN

    ints = [0, 1, -1, spec_value if isinstance(spec_value, int) else 3, rng.randint(-50, 50), INT_PARAM_MIN,
            INT_PARAM_MIN - 1, INT_LIMIT - 1, INT_LIMIT, 2**63 - 1, 2**63, 2**64, -(2**63), 10**400]
    if isinstance(spec_value, int):
        ints += [spec_value + 1, spec_value - 1]
    floats = [0.0, -0.0, 0.5, -2.5, 3.0, 1e3, math.nan, -math.nan, math.inf, -math.inf, FLOAT32_MAX, FLOAT32_MAX * 1.0001,
              FLOAT32_TINY, FLOAT32_TINY * 0.99, 1e-45, 1e39, -1e300, float(2**62), rng.uniform(-100, 100)]
    kind = rng.randrange(8)
    if kind == 0:
        return rng.choice(ints)
    if kind == 1:
        return rng.choice(floats)
    if kind == 2:  # numpy's numbers and booleans
        which = rng.randrange(6)
        if which == 0:
            v = rng.choice([x for x in ints if -2**63 <= x < 2**63])
            return np.int64(v)
        if which == 1:
            return rng.choice([np.uint64(2**63 + 5), np.int32(rng.randint(-5, 5)), np.int8(-128), np.uint8(200)])
        if which == 2:
            return np.float64(rng.choice(floats))
        if which == 3:
            with np.errstate(over="ignore"):
                return np.float32(rng.choice(floats))
        if which == 4:
            return np.float16(rng.choice([0.5, -0.0, 65504.0, math.nan]))
        return np.bool_(rng.random() < 0.5)
    if kind == 3:  # tensors of one element (any shape), of more, complex ones
        which = rng.randrange(6)
        if which == 0:
            return torch.tensor(rng.choice([x for x in ints if -2**63 <= x < 2**63]))
        if which == 1:
            return torch.tensor(rng.choice(floats), dtype=rng.choice([torch.float32, torch.float64]))
        if which == 2:
            return torch.tensor(rng.random() < 0.5)
        if which == 3:
            return torch.tensor([[rng.randint(-5, 5)]], dtype=rng.choice([torch.int32, torch.int64, torch.uint8]))
        if which == 4:
            return torch.tensor([1, 2])
        return torch.tensor(1 + 0j)
    if kind == 4:
        return rng.choice([True, False])
    if kind == 5:  # numbers of other classes: a Fraction is a Real, a Decimal is no Real
        import decimal

        return rng.choice([fractions.Fraction(4, 1), fractions.Fraction(1, 3), decimal.Decimal("2"), 1 + 0j])
    if kind == 6:
        return rng.choice(["3", "0.5", "nan", "", None, [3], (0.5,)])
    return spec_value


def _verdict(fn, prefix: str = ""):
    """(how ``fn()`` ended: "ok" with the value's type and repr, or the error's type and message
    without ``prefix``), to compare two checks of one value."""
    try:
        value = fn()
    except (TypeError, ValueError) as e:
        message = str(e)
        return type(e).__name__, message[len(prefix):] if message.startswith(prefix) else message
    return "ok", type(value).__name__, repr(value)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_explain_and_a_call_take_the_same_param_values(seed):
    """`attncc explain --param` checked params with its own code, which restated a call's checks
    (the int64 range, the bound on a reduction's count, float32's range) in its own words: the two
    could disagree on which values describe a call. Random values of every kind, for random specs'
    params, now get the same verdict, value and message from a call's binding (everything a call
    checks before a launch) and from explain's check, and the numbers explain's command line takes
    (ints and floats, from their text) the same as a call of those numbers."""
    from attncc.explain import _param, checked_params
    from attncc.module_cache import toml_text
    from attncc.runtime.call import bind

    rng = random.Random(f"param values {seed}")
    spec = random_param_spec(rng, f"param_values_{seed}")
    mod = attncc.compile(spec)
    pattern = attncc.parse_spec(toml_text(spec))
    q = torch.zeros(1, 1, 4, 16)
    prefix = f"{spec['name']}.attention: "
    outcomes = set()
    for _ in range(300):
        p = rng.choice(pattern.params)
        value = random_param_value(rng, p.value)
        call = _verdict(lambda: bind(mod.SPEC, q, q, q, kwargs={p.name: value}).params[p.name], prefix)
        explained = _verdict(lambda: checked_params(pattern, {p.name: value})[p.name])
        assert call == explained, (spec, p.name, value)
        if type(value) in (int, float):  # what explain's command line makes of the number's text
            assert _param(f"{p.name}={value!r}")[1] == value or value != value
            assert _verdict(lambda: checked_params(pattern, dict([_param(f"{p.name}={value!r}")]))[p.name]) == call
        outcomes.add(call[0])
    assert outcomes == {"ok", "TypeError", "ValueError"}


if __name__ == "__main__":  # python tests/test_probe_more.py varlen|varlen_bw|decode|linear|explain START COUNT
    which, start, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    check = {"varlen": check_varlen, "varlen_bw": lambda s: check_varlen(s, backward=True), "decode": check_decode,
             "linear": check_linear, "explain": check_explain}[which]
    for seed in range(start, start + count):
        finding = check(seed)
        if finding:
            print(f"seed {seed}: {finding}", flush=True)


@pytest.mark.parametrize("where", ["ｊ <= i", "j <= ⅰ", "j <= i and ｗ > 0"])
def test_non_ascii_letters_in_expressions_are_refused(where):
    """Python's parser folds look-alike letters (NFKC): a fullwidth j or a Roman numeral i compiled
    as j and i without a word."""
    from attncc.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match="expressions are ASCII"):
        parse_spec(f'[params]\nw = 1\n[mask]\nwhere = "{where}"\n')
