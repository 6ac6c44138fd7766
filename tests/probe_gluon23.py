"""Probe 23: ATTNCC_BACKEND=auto's Gluon split backward on chunk-aligned Plans (block diagonal, chunked
local and user specs whose bands step with a floor of the row), on the CPU, against attncc.reference.

The device stubbed as an sm90 (tests/gluon_host.py: the forward kernels emulated; tests/gluon_emulation.py:
the backward's), ``AUTO_MIN_PAIRS`` drawn around the call's size, the real tiles of the GPU (the
backward's ``default_bwd_config``, the forward's ``ws``). Each seeded case draws a spec, its chunk
(dividing N or not, multiples of the tiles, larger than N, 1), B, GQA / MQA heads, k / v of batch 1,
Nq != Nk, offsets, n_q / n_k, scale, return_lse with a loss on the LSE, packed sequences, head dims
64 / 128, bf16 / fp16, and checks:

- the decision: the Gluon backward ran exactly where auto's rule says (the Plan's
  ``gluon_backward_auto``, D = 64 or 128, the pairs, a call the Gluon backward can run: not packed, the
  fragments' preconditions), and the spec it ran for has no score terms constant along the key;
  seeds from 1000 also draw the shipped specs auto's wider pick of session 24 takes (causal, dense,
  GQA, sliding window, prefix-LM, softcap, ALiBi, ...) and sink + window, which it must not;
- the gradients (and o, lse) against the float64 reference.

    python tests/probe_gluon23.py --cases 200 --start 0

Session 24 (seeds 1000-1089, the wider pick): 49 calls through the emulated Gluon backward (causal,
dense, GQA, sliding window, prefix-LM, softcap, local bidirectional, cross causal, the chunk specs; 17
after the tl forward), 41 through tl, every decision auto's rule; one "finding", not one: seed 1034,
sink + window on the tl backward with 2 queries x 2 keys in bf16, dq 4.5 % off (float32: 3.5e-6):
the delta = rowsum(dO O) of a bf16 O against a near one-hot row, where dS = P (dP - delta) is a
small difference (seed 1035 of the same shape: 11 %; FlashAttention's backward has the same).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback
import types
from collections import Counter
from pathlib import Path

import script_env  # noqa: E402,F401  (the interpreter, this checkout on the path: before the imports below)

import torch  # noqa: E402

import attncc  # noqa: E402
from attncc.analysis.score import along_j, canonical_score  # noqa: E402
from attncc.runtime import backend, call as call_mod  # noqa: E402
from cases import build_inline, module, pattern  # noqa: E402
from gluon_emulation import emulate_sm90  # noqa: E402

# user specs whose Plan picks the Gluon backward under auto too (chunk-aligned bands, no score terms),
# and look-alikes that must not
USER = {
    "u_anticausal": 'name = "u_anticausal"\n[params]\nchunk = 64\n[mask]\nwhere = "j >= i and i // chunk == j // chunk"\n',
    "u_window": 'name = "u_window"\n[params]\nchunk = 64\nw = 20\n[mask]\n'
                'where = "j <= i and j > i - w and i // chunk == j // chunk"\n',
    "u_shifted": 'name = "u_shifted"\n[params]\nchunk = 64\nshift = 5\n[mask]\nwhere = "(i + shift) // chunk == (j + shift) // chunk"\n',
    "u_two": 'name = "u_two"\n[params]\nchunk = 64\nc2 = 48\n[mask]\n'
             'where = "i // chunk == j // chunk and i // c2 == j // c2"\n',
    "u_scaled": 'name = "u_scaled"\n[params]\nchunk = 64\n[mask]\nwhere = "i // chunk == j // chunk"\n[score]\nscale = 0.2\n',
    "u_bias": 'name = "u_bias"\n[params]\nchunk = 64\n[mask]\nwhere = "i // chunk == j // chunk"\n'
              '[score]\nbias = "0.01 * (i - j)"\n',
    "u_softcap": 'name = "u_softcap"\n[params]\nchunk = 64\n[mask]\nwhere = "i // chunk == j // chunk"\n[score]\nsoftcap = 20.0\n',
    "u_mod": 'name = "u_mod"\n[params]\nchunk = 64\n[mask]\nwhere = "i // chunk == j // chunk"\n'
             '[score]\nmod = "s * 0.5"\n',
    "u_nk": 'name = "u_nk"\n[params]\nchunk = 64\n[mask]\nwhere = "i // chunk == j // chunk and j < n_k - 3"\n',
    "u_heads": 'name = "u_heads"\n[heads]\nq = 4\nkv = 2\n[params]\nchunk = 64\n[mask]\n'
               'where = "j <= i and i // chunk == j // chunk"\n',
    "u_rect": 'name = "u_rect"\n[params]\nchunk = 64\nc2 = 32\n[mask]\nwhere = "i // chunk == j // c2"\n',
}
SHIPPED = ("block_diagonal", "chunked_local")
# session 24: auto's Gluon backward on the built-in walks and every single-segment rendered Plan; sink +
# window (two segments) must keep tl
WIDE = ("causal", "dense", "gqa", "sliding_window", "prefix_lm", "softcap", "alibi", "local_bidirectional",
        "cross_causal", "sink_window")
STUBS = {}


def install():
    os.environ["ATTNCC_BACKEND"] = "auto"
    emulate_sm90(STUBS)


_BUILT = {}


def spec_of(name):
    """(pattern, module) of a shipped or USER spec."""
    if name not in _BUILT:
        if name in SHIPPED + WIDE:
            _BUILT[name] = (pattern(name), module(name))
        else:
            import tempfile
            _BUILT[name] = build_inline({name: USER[name]}, Path(tempfile.mkdtemp(prefix="probe23_")))[name]
    return _BUILT[name]


def draw(seed):
    rng = random.Random(seed)
    name = rng.choice(SHIPPED * 3 + tuple(USER) + WIDE * (seed >= 1000))  # seeds from 1000: session 24's wider pick
    p, mod = spec_of(name)
    D = rng.choice((128, 128, 128, 64))
    dtype = rng.choice((torch.bfloat16, torch.float16))
    B = rng.choice((1, 1, 2))
    hkv = rng.choice((1, 2))
    Hq = hkv * rng.choice((1, 2, 3))
    if p.heads_q is not None:
        Hq, hkv = p.heads_q, p.heads_kv or p.heads_q
    length = lambda: rng.choice((1, 2, 17, 63, 64, 65, 100, 127, 128, 129, 192, 200, 256, 257))  # noqa: E731
    Nq = length()
    Nk = Nq if rng.random() < 0.4 else length()
    params = {}
    for prm in p.params:
        if prm.name in ("chunk", "c2"):
            params[prm.name] = rng.choice((1, 2, 3, 16, 37, 48, 64, 100, 128, 192, 256, 1000, 4096))
        elif prm.name == "shift":
            params[prm.name] = rng.choice((0, 5, -3, 64))
        elif prm.name == "w":
            params[prm.name] = rng.choice((1, 20, 70, 300))
    r = rng.random()
    q_offset = k_offset = 0
    if r < 0.3:
        q_offset, k_offset = rng.choice((0, 64, 128, 37, 1000)), rng.choice((0, 64, 128, 37, 1000))
    elif r < 0.45:
        q_offset = k_offset = rng.choice((1, 63, 128, 300))
    elif r < 0.5:  # right below the int32 reach, huge chunks
        base = call_mod.INT32_REACH - max(Nq, Nk) - rng.randint(0, 300)
        q_offset, k_offset = base + rng.randint(0, 40), base + rng.randint(0, 40)
        params = {n: rng.choice((2 ** 20, 2 ** 30 + 7, 2 ** 31 - 1, 128, 100)) if n in ("chunk", "c2") else x
                  for n, x in params.items()}
    n_q = rng.choice((None, None, q_offset + Nq + rng.randrange(0, 40)))
    n_k = rng.choice((None, None, k_offset + Nk + rng.randrange(0, 40)))
    varlen = rng.random() < 0.1
    if varlen:
        q_offset = k_offset = 0
        n_q = n_k = None
        Nk = Nq
        B = 1
    return types.SimpleNamespace(
        name=name, D=D, dtype=dtype, B=B, Hq=Hq, Hkv=hkv, Nq=Nq, Nk=Nk, params=params, q_offset=q_offset,
        k_offset=k_offset, n_q=n_q, n_k=n_k, scale=rng.choice((None, None, 0.05)), lse=rng.random() < 0.4,
        kv_b1=B > 1 and rng.random() < 0.25, varlen=varlen, min_pairs=rng.choice((0, 0, 0, 10 ** 9)),
        gluon_forward=rng.random() < 0.7,
        cut=sorted(rng.sample(range(1, Nq), min(2, Nq - 1))) if varlen and Nq > 2 else [])


def positions(c):
    if c.varlen:
        cu = torch.tensor([0, *c.cut, c.Nq], dtype=torch.int32)
        return dict(cu_seqlens_q=cu, cu_seqlens_k=cu)
    return dict(q_offset=c.q_offset, k_offset=c.k_offset, n_q=c.n_q, n_k=c.n_k)


def reference(p, c, q, k, v):
    """o, lse of the float64 reference (packed: sequence by sequence)."""
    kw = dict(c.params, **({} if c.scale is None else {"scale": c.scale}))
    if not c.varlen:
        return attncc.reference(p, q, k, v, return_lse=True, q_offset=c.q_offset, k_offset=c.k_offset,
                                n_q=c.n_q, n_k=c.n_k, **kw)
    bounds = [0, *c.cut, c.Nq]
    outs = [attncc.reference(p, q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], return_lse=True, **kw)
            for a, b in zip(bounds, bounds[1:])]
    return torch.cat([o for o, _ in outs], 2), torch.cat([lse for _, lse in outs], 2)


def expected_gluon_bwd(mod, c, call) -> bool:
    """auto's rule, worked out here: the Plan's pick, head dims 64 and 128 (128 alone before session 24),
    the pairs, and a call the Gluon backward can run."""
    spec = mod.SPEC
    if not (spec.gluon_backward_auto and c.D in (64, 128) and c.B * c.Hq * c.Nq * c.Nk >= c.min_pairs):
        return False
    if c.varlen or call.wide:
        return False
    if spec.gluon_fragments is None:  # a built-in walk (causal, dense): no precondition
        return True
    f = spec.gluon_fragments.load()
    return bool(f.exact(call)) and bool(f.backward_exact(call))


def run_case(c, seed):
    p, mod = spec_of(c.name)
    backend.gluon.AUTO_MIN_PAIRS = c.min_pairs
    backend.gluon.AUTO_SELECTS_GLUON = c.gluon_forward  # off: the tl forward's LSE into the Gluon backward
    for s in STUBS.values():
        getattr(s, "results", getattr(s, "launches", [])).clear()
    call_mod._BOUND.clear()
    gen = torch.Generator().manual_seed(seed)
    Bkv = 1 if c.kv_b1 else c.B
    q = torch.randn(c.B, c.Hq, c.Nq, c.D, generator=gen).to(c.dtype)
    k = torch.randn(Bkv, c.Hkv, c.Nk, c.D, generator=gen).to(c.dtype)
    v = torch.randn(Bkv, c.Hkv, c.Nk, c.D, generator=gen).to(c.dtype)
    do = torch.randn(c.B, c.Hq, c.Nq, c.D, generator=gen).to(c.dtype)
    dlse = torch.randn(c.B, c.Hq, c.Nq, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    kw = dict(c.params, **positions(c), **({} if c.scale is None else {"scale": c.scale}))
    o, lse = mod.attention(*leaves, return_lse=True, **kw)
    loss = (o.float() * do.float()).sum()
    if c.lse:
        loss = loss + torch.where(torch.isfinite(lse), lse * dlse, 0.0).sum()
    loss.backward()
    ran = bool(STUBS["attn_bwd_dkdv"].launches)
    fused = bool(STUBS["attn_bwd_fused"].launches)
    call = attncc.runtime.bind(mod.SPEC, q, k, v, return_lse=True, kwargs=dict(c.params),
                               **{n: x for n, x in kw.items() if n not in c.params})
    want_ran = expected_gluon_bwd(mod, c, call)
    problems = []
    if ran != want_ran or fused:
        problems.append(f"decision: Gluon backward ran={ran} fused={fused}, expected {want_ran}")
    if ran and along_j(canonical_score(p))[2] is not None:
        problems.append("the Gluon backward ran for a score with terms constant along the key")
    rl = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ro, rlse = reference(p, c, *rl)
    rloss = (ro * do.double()).sum()
    if c.lse:
        rloss = rloss + torch.where(torch.isfinite(rlse), rlse * dlse.double(), 0.0).sum()
    want = torch.autograd.grad(rloss, rl, allow_unused=True)
    tol = 2e-2 if c.dtype == torch.bfloat16 else 5e-3
    if not torch.equal(torch.isfinite(lse.detach()), torch.isfinite(rlse)):
        problems.append("lse rows with keys differ")
    for nm, got, w in (("o", o.detach(), ro), *zip(("dq", "dk", "dv"), (t.grad for t in leaves), want)):
        w = torch.zeros_like(got, dtype=torch.float64) if w is None else w
        if torch.isnan(got).any():
            problems.append(f"{nm}: NaN")
            continue
        err = float((got.double() - w).norm() / w.norm().clamp_min(1e-6))
        if w.norm() < 1e-6:
            err = float(got.double().abs().max())
        if err > tol:
            problems.append(f"{nm}: rel err {err:.3g}")
    return ran, problems


def tags(c):
    """What a case that ran the Gluon backward had of the shapes auto's pick was not measured at."""
    chunks = [v for n, v in c.params.items() if n in ("chunk", "c2")]
    return [t for t, on in (
        ("chunk-off-tile", any(v % 128 for v in chunks)), ("chunk-not-dividing-N", any(c.Nq % v or c.Nk % v for v in chunks)),
        ("offsets-off-tile", c.q_offset % 128 or c.k_offset % 128), ("Nq!=Nk", c.Nq != c.Nk), ("gqa", c.Hq != c.Hkv),
        ("mqa", c.Hkv == 1 and c.Hq > 1), ("B>1", c.B > 1), ("kv-batch-1", c.kv_b1), ("lse-loss", c.lse),
        ("n_q/n_k", c.n_q is not None or c.n_k is not None), ("tl-forward", not c.gluon_forward),
        ("int32-edge", max(c.q_offset, c.k_offset) > 2 ** 30)) if on]


def describe(c):
    return " ".join(f"{k}={v}" for k, v in vars(c).items())


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=50)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    install()
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.cases)
    counts = Counter()
    t0 = time.time()
    for seed in seeds:
        c = draw(seed)
        try:
            ran, problems = run_case(c, seed)
        except Exception as e:  # noqa: BLE001
            ran, problems = None, [f"crash: {type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"]
        counts["gluon-bwd" if ran else "tl-bwd"] += 1
        if ran:
            counts.update(f"gluon:{t}" for t in tags(c))
        counts[c.name] += 1
        if problems:
            counts["finding"] += 1
            print(f"=== seed {seed}: {describe(c)}\n   " + "\n   ".join(problems), flush=True)
    print(f"{time.time() - t0:.0f}s", dict(counts))
    return 1 if counts["finding"] else 0


if __name__ == "__main__":
    sys.exit(main())
