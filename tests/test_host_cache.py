"""What a call binds once per signature (issue 18, item 1) is reused, and never where it must not be.

- Counted (launches stubbed): a repeated call binds nothing again: no bind-cache miss, no launch
  plan (``_fwd_launch``, ``_pre_launch``, ``_dkdv_launch``, ``_dq_launch``, the tile-list kernel's
  ``_tile_plan``) made again, the backward's configs looked up once.
- Against ``attncc.reference``: seeded random sequences of calls that alternate what a cached binding
  depends on (shapes, strides, dtypes, params, offsets, n_k, the operands' alignment, the layout of
  dO) and what it must not (document ids, padding lengths, return_lse), each call's output (and
  gradients) checked, so that a binding reused for a call that differs in anything that matters
  gives a wrong answer here. On the CPU interpreter, and on a GPU (the ``cuda`` cases, ``-m gpu``
  with ``TRITON_INTERPRET=0``: not run yet).
"""
from __future__ import annotations

import importlib
import os
import random

import pytest
import torch

import attncc
from attncc.runtime import call as call_mod
from cases import REL_TOL, module, pattern, share

from bench.host_overhead import stub_launches, unstub

launch = importlib.import_module("attncc.runtime.launch")  # the module (attncc.runtime.launch is its function)

PLANS = ("_fwd_launch", "_pre_launch", "_dkdv_launch", "_dq_launch", "_tile_plan")


def _doc_ids(B, N, gen):
    return torch.cumsum(torch.rand(B, N, generator=gen) < 0.2, 1).to(torch.int32)


@pytest.mark.parametrize("name", ["causal", "document", "padding", "sliding_window", "gqa"])
def test_repeated_calls_make_nothing_again(name, monkeypatch):
    mod = module(name)
    made = {}
    for plan in PLANS:
        if hasattr(mod, plan):
            real = getattr(mod, plan)
            monkeypatch.setattr(mod, plan, lambda *a, _real=real, _plan=plan: made.update({_plan: made.get(_plan, 0) + 1})
                                or _real(*a))
    real_configs = launch._backward_configs
    monkeypatch.setattr(launch, "_backward_configs",
                        lambda *a: made.update(configs=made.get("configs", 0) + 1) or real_configs(*a))
    p = pattern(name)
    hq, hkv = (p.heads_q or 4, p.heads_kv or 2)
    gen = torch.Generator().manual_seed(0)
    N = 43  # a length no other test here uses: the first call binds
    q, k, v = (torch.randn(2, h, N, 16, generator=gen, requires_grad=True) for h in (hq, hkv, hkv))
    g = torch.randn(2, hq, N, 16, generator=gen)

    def inputs():  # new values every call: only their layout is part of the signature
        return {"document": lambda: {"doc": _doc_ids(2, N, gen)},
                "padding": lambda: {"kv_len": torch.randint(1, N + 1, (2,), generator=gen, dtype=torch.int32)},
                "sliding_window": lambda: {"window": 7}}.get(name, dict)()

    log = stub_launches(mod)
    try:
        mod.attention(q, k, v, **inputs()).backward(g)
        with torch.no_grad():
            mod.attention(q, k, v, **inputs())
        first = dict(made)
        # one of each (the tile lists: with and without the transposed lists)
        assert {plan: first.get(plan) for plan in PLANS if hasattr(mod, plan)} == {
            plan: 2 if plan == "_tile_plan" else 1 for plan in PLANS if hasattr(mod, plan)}
        assert first["configs"] == 1
        before = dict(call_mod.BIND_STATS)
        log.clear()
        for _ in range(3):
            mod.attention(q, k, v, **inputs()).backward(g)
            with torch.no_grad():
                mod.attention(q, k, v, **inputs())
        assert made == first  # nothing made again
        after = dict(call_mod.BIND_STATS)
        assert after.get("miss", 0) == before.get("miss", 0)
        assert after.get("hit", 0) - before.get("hit", 0) == 6
        launches_per_step = len(log) // 3
        assert launches_per_step == (6 if hasattr(mod, "_tile_plan") else 4)  # fwd+bwd (3), then fwd (+ the lists)
    finally:
        unstub(mod)


# ---------------------------------------------------------------------------------------------
# alternating calls against the reference
# ---------------------------------------------------------------------------------------------

NAMES = ("causal", "document", "padding", "sliding_window", "gqa")
LAYOUTS = ("contiguous", "bnhd", "misaligned")


def _operand(shape, dtype, gen, layout, device="cpu"):
    """A [B, H, N, D] tensor: contiguous; a [B, N, H, D] view with its head dim a slice of a wider
    row ("bnhd": other strides, which the kernels read as they are when D's bytes are a multiple
    of 16); or that view with its base 2 or 4 bytes off 16 ("misaligned": the same shape and
    strides, so the same call signature, but the kernels read a contiguous copy)."""
    B, H, N, D = shape
    if layout == "contiguous":
        return torch.randn(B, H, N, D, generator=gen).to(dtype).to(device)
    wide = D + 8
    flat = torch.randn(B * N * H * wide + 8, generator=gen).to(dtype).to(device)  # made on the device as a whole
    start = 8 if layout == "bnhd" else 1  # 8 elements: 16-byte aligned in float16 and float32
    return flat[start:start + B * N * H * wide].view(B, N, H, wide)[..., :D].transpose(1, 2)


def _random_case(rng: random.Random):
    """What one call is: spec, sizes, dtype, operand layouts and keywords (values drawn later)."""
    name = rng.choice(NAMES)
    p = pattern(name)
    Nq = rng.choice([24, 37])
    Nk = Nq if rng.random() < 0.7 else rng.choice([24, 37])
    case = dict(name=name, B=rng.choice([1, 2]), Hq=p.heads_q or 4, Hkv=p.heads_kv or 2, Nq=Nq, Nk=Nk,
                # 16: views read as they are (bnhd) or copied (misaligned); 18: rows of 36 / 72 bytes, copied
                # with the rows padded to 48 / 80 bytes (whatever the alignment)
                D=rng.choice([16, 16, 18]),
                dtype=rng.choice([torch.float32, torch.float32, torch.float16]),
                layouts=[rng.choice(LAYOUTS) for _ in "qkv"], kw={})
    if rng.random() < 0.4 and Nk >= Nq:
        case["kw"]["q_offset"] = Nk - Nq
    if rng.random() < 0.3:
        case["kw"]["n_k"] = Nk + rng.choice([0, 3])
    if name == "sliding_window":
        case["kw"]["window"] = rng.choice([3, 9])
    return case


def _changed(case, rng: random.Random):
    """``case`` with one thing a binding depends on changed, often keeping the call signature
    (an operand's alignment, the layout of dO, the values of the inputs)."""
    case = dict(case, layouts=list(case["layouts"]), kw=dict(case["kw"]))
    what = rng.choice(["alignment", "alignment", "dtype", "offset", "window", "same"])
    if what == "alignment":  # bnhd <-> misaligned: the same signature, another operand layout
        i = rng.choice([0, 1])
        case["layouts"][i] = {"bnhd": "misaligned", "misaligned": "bnhd", "contiguous": "misaligned"}[case["layouts"][i]]
    elif what == "dtype":
        case["dtype"] = torch.float16 if case["dtype"] == torch.float32 else torch.float32
    elif what == "offset" and case["Nk"] >= case["Nq"]:
        case["kw"]["q_offset"] = 0 if case["kw"].get("q_offset") else case["Nk"] - case["Nq"]
        case["kw"].pop("n_k", None)
    elif what == "window" and case["name"] == "sliding_window":
        case["kw"]["window"] = 12 - case["kw"]["window"]
    return case


def _arguments(case, gen, device="cpu"):
    """(q, k, v, keywords) of a case, with fresh values."""
    B, Hq, Hkv, Nq, Nk, D = (case[x] for x in ("B", "Hq", "Hkv", "Nq", "Nk", "D"))
    q, k, v = (_operand(shape, case["dtype"], gen, layout, device) for shape, layout in
               zip(((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D)), case["layouts"]))
    kw = dict(case["kw"])
    n = max(Nq + kw.get("q_offset", 0), Nk)
    if case["name"] == "document":
        kw["doc"] = _doc_ids(B, n, gen).to(device)
    if case["name"] == "padding":
        kw["kv_len"] = torch.randint(0, Nk + 1, (B,), generator=gen, dtype=torch.int32).to(device)
    return q, k, v, kw


def _close(got, want, dtype, what):
    err = ((got.double() - want).norm() / want.norm().clamp_min(1e-12)).item()
    assert err < REL_TOL[dtype] * 4, f"{what}: relative error {err:.2e}"


_GPU = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                          reason="needs a CUDA GPU and TRITON_INTERPRET=0")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, _GPU])])
@pytest.mark.parametrize("seed", share(range(3), 0, 2))  # seeds 0 and 2 by default, 1 too with -m slow
def test_alternating_calls_match_the_reference(seed, device):
    """A few calls, then each again with new values (its bindings reused) or with one thing changed
    (often within the same signature), in random order: every output against the reference, and
    the gradients of every third call (with dO contiguous or a [B, N, H, D] view)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cases = [_random_case(rng) for _ in range(3)]
    for i in range(15):
        case = rng.choice(cases)
        if i % 2:
            case = _changed(case, rng)
            cases.append(case)
        q, k, v, kw = _arguments(case, gen, device)
        _check_call(case["name"], q, k, v, kw, grads=i % 3 == 0, rng=rng, gen=gen,
                    what=f"call {i}: {case['name']} {case['dtype']} {case['layouts']} {case['kw']}")


def _check_call(name, q, k, v, kw, grads, rng, gen, what):
    mod, p = module(name), pattern(name)
    dtype = q.dtype
    return_lse = rng.random() < 0.5
    leaves = [t.detach().requires_grad_(grads) for t in (q, k, v)]  # detach keeps strides and alignment
    out = mod.attention(*leaves, return_lse=return_lse, **kw)
    o, lse = out if return_lse else (out, None)
    ref_in = [t.detach().double().requires_grad_(grads) for t in leaves]
    ref_o, ref_lse = attncc.reference(p, *ref_in, return_lse=True, **kw)
    _close(o, ref_o, dtype, f"{what}: o")
    if return_lse:
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite), what
        _close(lse[finite], ref_lse[finite], dtype, f"{what}: lse")
    if grads:
        B, H, N, Dv = o.shape
        if rng.random() < 0.5:
            g = torch.randn(B, H, N, Dv, generator=gen).to(dtype).to(o.device)
        else:
            g = torch.randn(B, N, H, Dv, generator=gen).to(dtype).to(o.device).transpose(1, 2)
        o.backward(g)
        ref_o.backward(g.double())
        for arg, a, b in zip("qkv", leaves, ref_in):
            _close(a.grad, b.grad, dtype, f"{what}: d{arg}")


@pytest.mark.parametrize("dtype,D,wide", [(torch.float32, 18, 20), (torch.float16, 20, 24)])
def test_views_with_rows_off_16_bytes(dtype, D, wide):
    """Operands that are views of wider rows, with suitable strides but a head dim whose bytes are
    not a multiple of 16 (found by the test above): the kernels read them padded, like contiguous
    ones. Before, o, dq, dk, dv were made with such rows (a descriptor the kernels refuse), and a
    q padded beside an unpadded k view read k's storage past the view (here inf: NaN outputs)."""
    gen = torch.Generator().manual_seed(0)
    B, H, N = 1, 2, 24
    rows = torch.randn(B, N, H, wide, generator=gen).to(dtype)  # rows of 80 / 48 bytes: the views' strides suit
    rows[..., D:] = float("inf")  # past the view: never part of k
    q = torch.randn(B, H, N, D, generator=gen).to(dtype).requires_grad_()
    k = rows[..., :D].transpose(1, 2).detach().requires_grad_()
    v = torch.randn(B, N, H, wide, generator=gen).to(dtype)[..., :D].transpose(1, 2).detach().requires_grad_()
    o = module("causal").attention(q, k, v)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attncc.reference(pattern("causal"), *ref_in)
    _close(o, ref, dtype, "o")
    g = torch.randn(o.shape, generator=gen).to(dtype)
    o.backward(g)
    ref.backward(g.double())
    for arg, a, b in zip("qkv", (q, k, v), ref_in):
        _close(a.grad, b.grad, dtype, f"d{arg}")


def test_bound_launch_passes_what_the_plain_launch_passes():
    """Signatures.bound splits a launch into a plan (computed once) and a closure (per call): run
    both against a recording kernel, the arguments are the plain launch's (unread parameters left
    out, groups, starred values, per-call keywords, options)."""
    from attncc.codegen.params import Signatures

    sig = Signatures({"f": frozenset({"Q", "s0", "s1", "N", "P", "C", "F"})})
    sig.define("def f(Q, s0, s1, N, X, P,\n      C: tl.constexpr, D: tl.constexpr, F: tl.constexpr):")
    values = [("Q", "q"), ("s0 s1", "*q.stride()[:2]"), ("N", "call.N"), ("X", "x"), ("P", "p"),
              ("C", "cfg.C"), ("D", "4"), ("F", "flag")]
    options = [("num_warps", "cfg.w")]
    plain = sig.launch("f", values, "        ")
    bound = sig.bound("f", values, per_call=["Q", "X", "P", "F"], options=options, reserved=["call", "cfg", "q"])
    assert "X" not in bound.params and "D=" not in bound.plan  # unread: left out
    # bound: the plan at 4 spaces (its closure's body at 8, the kernel's arguments at 12), call args at 8
    src = "\n".join([
        "def plain(call, cfg, q, p, flag):",
        "    return f[(1,)](",
        plain,
        "        num_warps=cfg.w)",
        "",
        "def plan(call, cfg, q):",
        bound.plan,
        f"    def launch({bound.params}):",
        "        return f[(1,)](",
        bound.launch,
        "        )",
        "    return launch",
        "",
        "def per_call(call, cfg, q, p, flag):",
        "    return plan(call, cfg, q)(",
        bound.args,
        "    )",
    ])

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: (args, kwargs)

    class Call:
        N = 7

    class Cfg:
        C, w = 3, 8

    scope = {"f": Recorder()}
    exec(src, scope)
    q, p = torch.zeros(2, 5), torch.ones(3)
    want = scope["plain"](Call, Cfg, q, p, True)
    got = scope["per_call"](Call, Cfg, q, p, True)
    assert got[0][0] is q and got[0][-1] is p
    assert got[0][1:-1] == want[0][1:-1] == (5, 1, 7) and got[1] == want[1] == {"C": 3, "F": True, "num_warps": 8}
    with pytest.raises(ValueError, match="shadow"):
        sig.bound("f", values, per_call=["Q"], reserved=["N"])
