"""Probe 20 on an H100/H200: the Gluon sm90 path (the default backend's forward on sm90 where
``ATTNCC_BACKEND=auto`` picks it, and ``ATTNCC_BACKEND=gluon``) against the float64 reference, forward,
LSE and gradients (tests/test_probe_gpu20.py is its CPU half and lists what was found).

- ``test_random``: 40 seeded cases through the default backend: a spec out of 11 (causal, dense,
  sliding window, prefix-LM, ALiBi, softcap, bottom-right causal, chunked local at head dim 64, causal
  at head dim 96, a spec of a distance bias, one with a row term), B, GQA ratio, odd Nq != Nk up to
  3000, offsets (rows without keys), bf16 / fp16, q, k, v each contiguous, [B, N, H, D] transposed,
  a slice of more heads, at an unaligned storage offset, a slice of a wider head dim, or (k, v) of
  batch 1 broadcast over q's; return_lse, gradients with and without dLSE. A quarter of the cases
  are real sizes (>= 2**28 pairs: what auto hands the Gluon forward); the others lower
  ``AUTO_MIN_PAIRS`` to 0 so that auto takes the Gluon forward at those odd shapes too. Each case
  checks which forward ran (Gluon where the spec's Plan, head dim and size say so, tl elsewhere); every
  third case runs ``ATTNCC_BACKEND=gluon`` too (the Gluon backward where it applies).
- targeted: operand layouts one by one, rows around the tile edges (Nq 1, 63, 64, 65, 129, 200; Nk
  1, 64, 65, 127), B x Hq past 65535, empty calls (B = 0 was a crash under gluon, fixed), the fused backward,
  the pipelined kernel launched directly, a row-term score far into a sequence (auto: tl after this
  probe's fix; ``ATTNCC_BACKEND=gluon``: still wrong, strict xfail).

Run (one H100/H200; the first run compiles ~12 spec x dtype x head-dim combinations, each a Gluon
forward, tl forward and backward and, every third case, the Gluon backward, with Triton's integer
specializations of odd sizes; estimated 6-10 minutes in all, ~1-3 s per case once compiled):

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_gpu_probe20.py -k "not random"
    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_gpu_probe20.py -k "random and (r0 or r1)"
    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_gpu_probe20.py -k "random and (r2 or r3)"

Cases: ``ATTNCC_GPU_TESTS_ON_CPU=1 python -m pytest --collect-only -q -m gpu tests/gpu/test_gpu_probe20.py``.
Not run yet (written without a GPU).
"""
from __future__ import annotations

import random

import pytest
import torch

from gpu_env import GRAD_TOL, MARKS, ON_GPU, TOL, rel, release, skip_unless_enabled

skip_unless_enabled()  # before anything is built or loaded

import attncc  # noqa: E402
import attncc.runtime as rt  # noqa: E402
from attncc.runtime import gluon as gluon_pkg  # noqa: E402
from cases import module, pattern  # noqa: E402

SM90 = ON_GPU and torch.cuda.get_device_capability() == (9, 0)
pytestmark = MARKS + [pytest.mark.skipif(not SM90, reason="the Gluon kernels need an sm90 GPU (H100, H200); "
                                         "Gluon has no interpreter")]
DEV = "cuda"
BF16, FP16 = torch.bfloat16, torch.float16
LSE_TOL = 5e-3  # |lse - ref| / max(1, |ref|)
BIAS_TEXT = 'name = "probe20_bias"\n[mask]\nwhere = "j <= i + 5"\n[score]\nbias = "0.25 * (j - i)"\n'
ROW_TEXT = 'name = "probe20_row"\n[mask]\nwhere = "j <= i and i - j < 700"\n[score]\nbias = "0.1 * i"\n'

# (spec, params, D, dtype): the compiled variants the random cases share
COMBOS = [
    ("causal", {}, 128, BF16), ("dense", {}, 128, FP16), ("sliding_window", {"window": 700}, 128, BF16),
    ("prefix_lm", {"prefix": 333}, 128, FP16), ("alibi", {}, 128, BF16), ("softcap", {}, 128, FP16),
    ("cross_causal", {}, 128, BF16), ("chunked_local", {"chunk": 500}, 64, BF16), ("causal", {}, 96, FP16),
    ("text:bias", {}, 128, FP16), ("text:row", {}, 128, BF16),
]
LAYOUTS = ["contig", "contig", "bnhd", "heads", "offset", "dimslice"]
_TEXTS = {"text:bias": BIAS_TEXT, "text:row": ROW_TEXT}
_BUILT = {}


def spec_of(name):
    """(module, pattern) of a shipped spec or one of the texts above (compiled once)."""
    if name not in _BUILT:
        if name in _TEXTS:
            _BUILT[name] = attncc.compile(_TEXTS[name]), attncc.parse_spec(_TEXTS[name])
        else:
            _BUILT[name] = module(name), pattern(name)
    return _BUILT[name]


def odd(rng, lo, hi):
    n = rng.randint(lo, hi)
    return n if n % 2 else n + 1


def random_cases(n=40, seed=2020):
    rng = random.Random(seed)
    out = []
    for c in range(n):
        name, params, D, dtype = rng.choice(COMBOS)
        real = c % 4 == 3
        if real:  # >= 2**28 pairs: what auto hands the Gluon forward without any change
            B, Hkv, group, Nq, Nk = 2, 4, 4, odd(rng, 2901, 2999), odd(rng, 2901, 2999)
        else:
            B, Hkv, group = rng.choice([1, 2, 3]), rng.choice([1, 2, 3]), rng.choice([1, 2, 3, 4])
            Nq, Nk = odd(rng, 1, 3000), odd(rng, 1, 3000)
            if rng.random() < 0.2:
                Nq, Nk = rng.choice([(1, 777), (63, 65), (129, 1), (65, 2999), (1999, 127)])
        q_offset = 0 if rng.random() < 0.5 else odd(rng, 1, 3000)
        k_offset = 0 if rng.random() < 0.6 else odd(rng, 1, 3000)
        layouts = [rng.choice(LAYOUTS) for _ in range(3)]
        if B > 1 and rng.random() < 0.2:
            layouts[1] = layouts[2] = "bcast"
        out.append(dict(id=f"r{c:02d}-{name.replace('text:', '')}-d{D}-{str(dtype)[6:]}-B{B}H{Hkv * group}/{Hkv}"
                        f"-{Nq}x{Nk}-o{q_offset}/{k_offset}-{'.'.join(layouts)}", name=name, params=params, D=D,
                        dtype=dtype, B=B, Hq=Hkv * group, Hkv=Hkv, Nq=Nq, Nk=Nk, q_offset=q_offset, k_offset=k_offset,
                        layouts=layouts, real=real, return_lse=rng.random() < 0.6, grad=rng.random() < 0.7,
                        dlse=rng.random() < 0.5, forced=c % 3 == 0, seed=c))
    return out


CASES = random_cases()


def operand(B, H, N, D, dtype, layout, gen, grad):
    """A [B, H, N, D] operand in ``layout`` (a leaf of that layout when ``grad``)."""
    def randn(*shape):
        return torch.randn(*shape, device=DEV, generator=gen).to(dtype)
    if layout == "bnhd":
        t = randn(B, N, H, D).transpose(1, 2)
    elif layout == "heads":
        t = randn(B, H + 2, N, D)[:, 1:H + 1]
    elif layout == "offset":  # 6 bytes past a 16-byte boundary: the TMA path copies it
        t = randn(B * H * N * D + 3)[3:].view(B, H, N, D)
    elif layout == "dimslice":  # rows of D + 8: strides TMA reads in place
        t = randn(B, H, N, D + 8)[..., :D]
    elif layout == "bcast":  # batch 1 beside q's batch: bind broadcasts it (stride 0)
        t = randn(1, H, N, D)
    else:
        t = randn(B, H, N, D)
    return t.detach().requires_grad_(grad)


@pytest.fixture
def gluon_calls(monkeypatch):
    """The walks of the calls that went through the Gluon forward and backward."""
    calls = {"fwd": [], "bwd": []}
    real_f, real_b = rt.gluon_forward, rt.gluon_backward

    def fwd(call, walk, *args, **kw):
        calls["fwd"].append(walk)
        return real_f(call, walk, *args, **kw)

    def bwd(call, walk, *args, **kw):
        calls["bwd"].append(walk)
        return real_b(call, walk, *args, **kw)
    monkeypatch.setattr(rt, "gluon_forward", fwd)
    monkeypatch.setattr(rt, "gluon_backward", bwd)
    return calls


def run_and_check(mod, p, q, k, v, *, B, return_lse=True, grad=True, dlse=True, seed=0, kw=None):
    """O (and the LSE) of ``mod.attention`` against the float64 reference; with ``grad`` dq, dk, dv
    of a random cotangent of o (and of the LSE with ``dlse``) against the reference's gradients."""
    kw = kw or {}
    out = mod.attention(q, k, v, return_lse=return_lse, **kw)
    o, lse = out if return_lse else (out, None)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    kk, vv = (x.expand(B, *x.shape[1:]) for x in leaves[1:])
    ro, rl = attncc.reference(p, leaves[0], kk, vv, return_lse=True, **kw)
    seen = torch.isfinite(rl)
    assert o.dtype == q.dtype and o.shape == ro.shape and not torch.isnan(o).any()
    assert torch.all(o[~seen] == 0), "rows without keys: o = 0"
    if seen.any():
        assert rel(o[seen], ro[seen]) < TOL, ("o", rel(o[seen], ro[seen]))
    if return_lse:
        assert lse.dtype == torch.float32 and lse.shape == rl.shape
        assert torch.equal(torch.isfinite(lse), seen) and not torch.isnan(lse).any()
        if seen.any():
            err = ((lse.double()[seen] - rl[seen]).abs() / rl[seen].abs().clamp_min(1.0)).max()
            assert float(err) < LSE_TOL, ("lse", float(err))
    if not grad:
        return
    gen = torch.Generator(device=DEV).manual_seed(seed + 100)
    do = torch.randn(o.shape, device=DEV, generator=gen).to(q.dtype)
    outs, cots, ref_outs, ref_cots = [o], [do], [ro], [do.double()]
    if return_lse and dlse:
        g = torch.randn(lse.shape, device=DEV, generator=gen)
        outs, cots = outs + [lse], cots + [g]
        ref_outs, ref_cots = ref_outs + [torch.where(seen, rl, 0.0)], ref_cots + [g.double()]
    got = torch.autograd.grad(outs, (q, k, v), cots)
    want = torch.autograd.grad(ref_outs, leaves, ref_cots)
    for label, x, w, t in zip("qkv", got, want, (q, k, v)):
        assert x.dtype == t.dtype and x.shape == t.shape, label
        assert not torch.isnan(x).any(), f"d{label} has NaN"
        if float(w.norm()) == 0:  # no pairs, or a gradient 0 in exact arithmetic only (dq of a row with one
            # key: dS = P (dP - delta) = 0 up to rounding, 1e-7 on an H100 at fp16): zero to rounding
            assert float(x.float().abs().max()) < 1e-4, (f"d{label} should be 0", float(x.float().abs().max()))
        else:
            assert rel(x, w) < GRAD_TOL, (f"d{label}", rel(x, w))
    assert torch.all(got[0][~seen] == 0), "dq of rows without keys"


def expected_walk(mod, D, real_or_patched):
    """The Gluon forward's walk auto takes for such a call ("causal", "rendered", ...), or None (tl)."""
    s = mod.SPEC
    if s.gluon is None or not s.gluon_auto or D not in gluon_pkg.AUTO_HEAD_DIMS or not real_or_patched:
        return None
    return s.gluon


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_random(monkeypatch, gluon_calls, case):
    c = case
    mod, p = spec_of(c["name"])
    gen = torch.Generator(device=DEV).manual_seed(c["seed"])
    lq, lk, lv = c["layouts"]
    q = operand(c["B"], c["Hq"], c["Nq"], c["D"], c["dtype"], lq, gen, c["grad"])
    k = operand(c["B"], c["Hkv"], c["Nk"], c["D"], c["dtype"], lk, gen, c["grad"])
    v = operand(c["B"], c["Hkv"], c["Nk"], c["D"], c["dtype"], lv, gen, c["grad"])
    kw = dict(c["params"], q_offset=c["q_offset"], k_offset=c["k_offset"])
    pairs = c["B"] * c["Hq"] * c["Nq"] * c["Nk"]
    monkeypatch.delenv("ATTNCC_BACKEND", raising=False)  # the default: auto
    if not c["real"]:
        monkeypatch.setattr(gluon_pkg, "AUTO_MIN_PAIRS", 0)
    else:
        assert pairs >= gluon_pkg.AUTO_MIN_PAIRS
    run_and_check(mod, p, q, k, v, B=c["B"], return_lse=c["return_lse"], grad=c["grad"], dlse=c["dlse"],
                  seed=c["seed"], kw=kw)
    walk = expected_walk(mod, c["D"], True)
    assert gluon_calls["fwd"] == ([walk] if walk else []), (gluon_calls, walk)
    assert gluon_calls["bwd"] == []  # auto: the tl backward (AUTO_SELECTS_GLUON_BACKWARD is False)
    if c["forced"] and mod.SPEC.gluon is not None and c["D"] in gluon_pkg.HEAD_DIMS:
        monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
        gluon_calls["fwd"].clear()
        run_and_check(mod, p, q, k, v, B=c["B"], return_lse=c["return_lse"], grad=c["grad"], dlse=c["dlse"],
                      seed=c["seed"], kw=kw)
        assert gluon_calls["fwd"] == [mod.SPEC.gluon]
    release()


# --------------------------------------------------------------------------------------------
# targeted cases


@pytest.mark.parametrize("backend", ["auto", "gluon"])
@pytest.mark.parametrize("layouts", [("bnhd", "bnhd", "bnhd"), ("heads", "dimslice", "heads"),
                                     ("offset", "offset", "offset"), ("contig", "bcast", "bcast"),
                                     ("dimslice", "bnhd", "offset")], ids="-".join)
def test_layouts(monkeypatch, gluon_calls, backend, layouts):
    """Each operand layout the TMA path reads in place (transposed, sliced heads, wider rows) or copies
    (unaligned base, broadcast batch), causal GQA 8/2 with a query offset, bf16."""
    monkeypatch.setenv("ATTNCC_BACKEND", backend)
    monkeypatch.setattr(gluon_pkg, "AUTO_MIN_PAIRS", 0)
    gen = torch.Generator(device=DEV).manual_seed(7)
    B, Hq, Hkv, Nq, Nk, D = 2, 8, 2, 777, 1029, 128
    q = operand(B, Hq, Nq, D, BF16, layouts[0], gen, True)
    k = operand(B, Hkv, Nk, D, BF16, layouts[1], gen, True)
    v = operand(B, Hkv, Nk, D, BF16, layouts[2], gen, True)
    run_and_check(module("causal"), pattern("causal"), q, k, v, B=B, kw=dict(q_offset=300))
    assert gluon_calls["fwd"] == ["causal"]
    assert gluon_calls["bwd"] == (["causal"] if backend == "gluon" else [])
    release()


EDGES = [(1, 300), (63, 65), (64, 64), (65, 1), (129, 127), (200, 65)]
EDGE_SPECS = [("causal", FP16, "split"), ("causal", FP16, "fused"), ("dense", BF16, "split"),
              ("sliding_window", BF16, "split")]


@pytest.mark.parametrize("name, dtype, method", EDGE_SPECS, ids=[f"{n}-{str(t)[6:]}-{m}" for n, t, m in EDGE_SPECS])
@pytest.mark.parametrize("Nq, Nk", EDGES, ids=[f"{a}x{b}" for a, b in EDGES])
def test_tile_edges(monkeypatch, gluon_calls, name, dtype, method, Nq, Nk):
    """Rows around the 128-row tile and its two 64-row warpgroups (one of them empty), keys around
    the blocks, GQA 6/2, an offset that puts keys after some rows; ATTNCC_BACKEND=gluon, both
    backwards."""
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    monkeypatch.setenv("ATTNCC_GLUON_BWD", method)
    gen = torch.Generator(device=DEV).manual_seed(Nq * 1000 + Nk)
    q = operand(2, 6, Nq, 64, dtype, "contig", gen, True)
    k, v = (operand(2, 2, Nk, 64, dtype, "contig", gen, True) for _ in range(2))
    kw = {"window": 50} if name == "sliding_window" else {}
    run_and_check(module(name), pattern(name), q, k, v, B=2, kw=dict(kw, q_offset=3, k_offset=40))
    walk = module(name).SPEC.gluon
    assert gluon_calls["fwd"] == [walk] and gluon_calls["bwd"] == [walk]
    release()


def test_many_heads(monkeypatch, gluon_calls):
    """B x Hq = 70000 query heads of 5 rows: the persistent forward walks every (b, h); the Gluon
    backward's grid axis would pass 65535, so the tl backward runs it."""
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    gen = torch.Generator(device=DEV).manual_seed(3)
    B, Hq, Hkv = 4375, 16, 4
    q = operand(B, Hq, 5, 64, BF16, "contig", gen, True)
    k, v = (operand(B, Hkv, 9, 64, BF16, "contig", gen, True) for _ in range(2))
    run_and_check(module("causal"), pattern("causal"), q, k, v, B=B, kw=dict(q_offset=4))
    assert gluon_calls["fwd"] == ["causal"] and gluon_calls["bwd"] == []
    release()


@pytest.mark.parametrize("B, Nq, Nk", [(0, 5, 7), (2, 0, 7), (2, 5, 0)])
def test_empty_calls(monkeypatch, B, Nq, Nk):
    """No pairs under ATTNCC_BACKEND=gluon: o = 0, lse = -inf, zero gradients (B = 0 was Triton's bare
    'shape must be positive' assert in the TMA descriptor)."""
    monkeypatch.setenv("ATTNCC_BACKEND", "gluon")
    q = torch.randn(B, 4, Nq, 128, device=DEV, dtype=BF16, requires_grad=True)
    k = torch.randn(B, 2, Nk, 128, device=DEV, dtype=BF16, requires_grad=True)
    v = torch.randn(B, 2, Nk, 128, device=DEV, dtype=BF16, requires_grad=True)
    o, lse = module("causal").attention(q, k, v, return_lse=True)
    assert o.shape == (B, 4, Nq, 128) and torch.all(o == 0) and torch.all(lse == float("-inf"))
    dq, dk, dv = torch.autograd.grad(o.float().sum(), (q, k, v), allow_unused=True, materialize_grads=True)
    assert dq.shape == q.shape and dk.shape == k.shape and torch.all(dq == 0) and torch.all(dk == 0)


@pytest.mark.parametrize("backend", ["auto", pytest.param("gluon", marks=pytest.mark.xfail(
    strict=True, reason="ATTNCC_BACKEND=gluon runs the rendered score, which adds the row term 0.1 * i to every "
                        "pair in float32 (tests/test_probe_gpu20.py)"))])
def test_row_term_far_into_the_sequence(monkeypatch, gluon_calls, backend):
    """bias = "0.1 * i" at positions near 2**29, a real-size call: auto took the Gluon forward before
    probe 20 (its scores collapse to multiples of float32's ulp 8); now the tl kernels, exact."""
    monkeypatch.setenv("ATTNCC_BACKEND", backend)
    mod, p = spec_of("text:row")
    gen = torch.Generator(device=DEV).manual_seed(29)
    B, Hq, Hkv, N = 1, 16, 4, 2 ** 12 + 1  # 16 x 4097**2 >= 2**28 pairs
    q = operand(B, Hq, N, 128, BF16, "contig", gen, True)
    k, v = (operand(B, Hkv, N, 128, BF16, "contig", gen, True) for _ in range(2))
    assert B * Hq * N * N >= gluon_pkg.AUTO_MIN_PAIRS
    run_and_check(mod, p, q, k, v, B=B, kw=dict(q_offset=2 ** 29, k_offset=2 ** 29))
    assert gluon_calls["fwd"] == ([] if backend == "auto" else ["rendered"])
    release()


@pytest.mark.parametrize("Nq, Nk, q_offset, k_offset", [(129, 65, 0, 0), (77, 300, 250, 0), (300, 77, 0, 500)])
def test_pipelined_kernel_direct(Nq, Nk, q_offset, k_offset):
    """The one-stream kernel (launch.attention with its config; the backend runs the ws one) at ragged
    sizes and offsets, causal GQA, fp16, against the reference."""
    from attncc.runtime.gluon import launch

    gen = torch.Generator(device=DEV).manual_seed(Nq)
    q = torch.randn(2, 6, Nq, 128, device=DEV, generator=gen).to(FP16)
    k, v = (torch.randn(2, 3, Nk, 128, device=DEV, generator=gen).to(FP16) for _ in range(2))
    o, lse = launch.attention(q, k, v, pattern="causal", q_offset=q_offset, k_offset=k_offset, return_lse=True,
                              config=launch.default_config(128, "pipelined"))
    ro, rl = attncc.reference(pattern("causal"), q.double(), k.double(), v.double(), return_lse=True,
                              q_offset=q_offset, k_offset=k_offset)
    seen = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), seen) and torch.all(o[~seen] == 0)
    if seen.any():
        assert rel(o[seen], ro[seen]) < TOL
        assert float((lse.double()[seen] - rl[seen]).abs().max()) < LSE_TOL
    release()
