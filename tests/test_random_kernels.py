"""Kernels of random static masks (tests/tile_oracle.py's generators) under the interpreter:
forward and backward against attncc.reference at small sizes, with tile shapes per kernel and
call-time params that break a closed form's precondition (the exact block lists then), and the
generated exact tile classifier against brute force."""
from __future__ import annotations

import random

import pytest
import torch

import attncc
from attncc.analysis import analyze
from attncc.runtime import bind
from cases import build_inline, rel_err
from tile_oracle import Problem, mask_spec, random_cover_mask, random_mask, truth_classes

N_KERNEL_MASKS = 6  # per generator: each builds a module and runs its kernels in the interpreter
CONFIGS = [("BLOCK_M=16,BLOCK_N=32", "BLOCK_M=32,BLOCK_N=16", "BLOCK_M=16,BLOCK_N=16"),
           ("BLOCK_M=32,BLOCK_N=16", "BLOCK_M=16,BLOCK_N=32", "BLOCK_M=32,BLOCK_N=32")]
TOL = 1e-3


def _masks():
    out = []
    for gen, seed in ((random_cover_mask, 161), (random_mask, 162)):
        rng = random.Random(seed)
        for n in range(N_KERNEL_MASKS):
            mask, params = gen(rng)
            # every other mask of each generator by default (CI's time), all with -m slow
            out.append(pytest.param(f"k{seed}_{n}", mask, params, id=f"{gen.__name__}{n}",
                                    marks=pytest.mark.slow if n % 2 else ()))
    return out


def _close(x, ref):
    return float((x.double() - ref).abs().max()) <= 1e-4 + TOL * float(ref.abs().max())


def _set_configs(monkeypatch, configs):
    suffix = ",num_warps=4,num_stages=1"
    for env, cfg in zip(("ATTNCC_CONFIG", "ATTNCC_CONFIG_DKDV", "ATTNCC_CONFIG_DQ"), configs):
        monkeypatch.setenv(env, cfg + suffix)


@pytest.mark.parametrize("name, mask, params", _masks())
def test_random_mask_kernels_match_the_reference(tmp_path, monkeypatch, name, mask, params):
    p, mod = build_inline({name: mask_spec(name, mask, params)}, tmp_path)[name]
    rng = random.Random(name)
    for case, configs in enumerate(CONFIGS):
        _set_configs(monkeypatch, configs)
        Nq, Nk = rng.randint(20, 70), rng.randint(20, 70)
        pos = dict(q_offset=rng.choice([0, 0, 7, 33]), k_offset=rng.choice([0, 5, 21]))
        # the second case moves windows, sinks and rows to 0..3: preconditions break, lists take over
        kw = {k: (rng.randint(0, 3) if case else v) for k, v in params.items() if k.rstrip("0123456789") in "wgsr"}
        gen = torch.Generator().manual_seed(case)
        q = torch.randn(1, 4, Nq, 16, generator=gen).requires_grad_()
        k = torch.randn(1, 2, Nk, 16, generator=gen).requires_grad_()
        v = torch.randn(1, 2, Nk, 16, generator=gen).requires_grad_()
        g = torch.randn(1, 4, Nq, 16, generator=gen)
        o = mod.attention(q, k, v, **pos, **kw)
        grads = torch.autograd.grad((o * g).sum(), (q, k, v))
        ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = attncc.reference(p, *ref_in, **pos, **kw)
        ref_grads = torch.autograd.grad((ref * g.double()).sum(), ref_in)
        where = f"{mask!r} {params} call {kw} {pos} Nq={Nq} Nk={Nk} configs={configs}"
        assert rel_err(o.detach(), ref.detach()) < TOL, where
        for label, x, r in zip("qkv", grads, ref_grads):
            # absolute too: a row that sees one key has a zero gradient, computed as ~1e-7
            assert torch.isfinite(x).all() and _close(x, r), (label, float((x.double() - r).abs().max()), where)


LIST_MASKS = {  # no closed form: the exact block lists always
    "strided": ("j <= i and ((i - j) < w or j % st == st - 1)", {"w": 7, "st": 5}),
    "dilated2d": ("(i - j) % 3 == 0 or (abs(i // 7 - j // 7) <= 1 and abs(i % 7 - j % 7) <= 1)", {}),
    "bigbird": ("abs(i // 8 - j // 8) <= 1 or i < 8 or j < 8 or random_blocks(2, block=8, seed=3)", {}),
    "heads": ("h < 1 or (j <= i and j % 4 == 0)", {}),
}


@pytest.mark.parametrize("name", LIST_MASKS)
def test_exact_tile_classifier_matches_brute_force(tmp_path, name):
    """The generated _exact_tiles_kernel's lists, forward and transposed, equal the oracle's."""
    mask, params = LIST_MASKS[name]
    p, mod = build_inline({name: mask_spec(name, mask, params)}, tmp_path)[name]
    for problem in (Problem(45, 70, 0, 0, block_m=16, block_n=32), Problem(61, 33, 9, 40, block_m=32, block_n=16)):
        call = bind(mod.SPEC, torch.zeros(1, 2, problem.q_rows, 16), torch.zeros(1, 2, problem.k_rows, 16),
                    torch.zeros(1, 2, problem.k_rows, 16), q_offset=problem.q_offset, k_offset=problem.k_offset)
        fwd, t = mod._exact_lists(call, problem.block_m, problem.block_n)
        for h in range(2):
            want_fwd, want_t = truth_classes(p, problem, h=h)
            for lists, want in ((fwd, want_fwd), (t, want_t)):
                hh = h if lists[0].shape[1] > 1 else 0
                got = torch.zeros_like(want)
                for r in range(want.shape[0]):
                    for cls, (count, index) in ((2, (0, 1)), (1, (2, 3))):
                        got[r, lists[index][0, hh, r, :lists[count][0, hh, r]].long()] = cls
                assert torch.equal(got, want), (mask, problem, h)
    assert analyze(p).needs_exact_lists


def test_calls_that_break_a_precondition_take_the_exact_lists(tmp_path, monkeypatch):
    """``j >= i - i % C + a and j <= i + 2``: a band whose consecutive rows leave no hole only for
    a <= 2 (rows x with x % C < a - 2 see no key). a = 1: the closed form; a = 5: the exact block
    lists, built once for the shape and cached."""
    text = mask_spec("pre", "j >= i - i % C + a and j <= i + 2", {"a": 1, "C": 8})
    p, mod = build_inline({"pre": text}, tmp_path)["pre"]
    plan = analyze(p)
    assert plan.forward.kind.value == "bands" and str(plan.forward.precondition) != "True"
    built = []
    real = mod._exact_tile_codes
    monkeypatch.setattr(mod, "_exact_tile_codes", lambda *args: built.append(args[1:]) or real(*args))
    _set_configs(monkeypatch, CONFIGS[0])
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, 50, 16, generator=gen).requires_grad_() for h in (2, 1, 1))
    for a, lists in ((1, False), (5, True), (5, True)):
        o = mod.attention(q, k, v, a=a, k_offset=3)
        dq, dk, dv = torch.autograd.grad(o.sum(), (q, k, v))
        ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = attncc.reference(p, *ref_in, a=a, k_offset=3)
        rq, rk, rv = torch.autograd.grad(ref.sum(), ref_in)
        assert rel_err(o.detach(), ref.detach()) < TOL and all(_close(x, r) for x, r in ((dq, rq), (dk, rk), (dv, rv)))
        assert bool(built) == lists
    # one classification per tile shape (forward, dK/dV, dQ configs), reused by the repeated call
    assert sorted(set(built)) == sorted(built) and len(built) == 3


def test_exact_tile_kernel_computes_the_mask_values_only(tmp_path):
    """The exact tile kernel evaluates the mask alone: the score's hoisted values (here a row term
    of the transform, printed with FAST_MATH, which that kernel does not have) stay in the attention
    kernels. They were copied into it: NameError for FAST_MATH (fuzz seed 36)."""
    text = ('name = "lists_and_score"\n[mask]\nwhere = "(j + h) % 3 == 0 or j % 5 == 4"\n'
            '[score]\nmod = "s * (1.0 + 0.1 * cos(0.5 * i))"\n')
    p, mod = build_inline({"lists_and_score": text}, tmp_path)["lists_and_score"]
    assert analyze(p).needs_exact_lists
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for n in (37, 41, 41))
    o = mod.attention(q, k, v, q_offset=2)
    ref = attncc.reference(p, q.double(), k.double(), v.double(), q_offset=2)
    assert rel_err(o, ref) < TOL
