"""The contract v1 additions (issue 19) on the GPU at real sizes in bfloat16 (formerly
bench/v1_gpu_check.py): gradients through the LSE, key chunks merged through their LSEs, a mask that
is never true, and the language additions (booleans, bitwise operators, erf, reductions, dot, 0-d
inputs) against the float64 reference. The CPU tests check the same at interpreter sizes.

    TRITON_INTERPRET=0 PYTHONPATH=. python -m pytest -q -m gpu tests/gpu/test_gpu_v1.py
"""
from __future__ import annotations

import math

import pytest
import torch

from gpu_env import DEV, LOW, MARKS, TOL, rel, release, size, skip_unless_enabled

skip_unless_enabled()  # before anything is built or loaded

import attncc  # noqa: E402
from attncc.module_cache import toml_text  # noqa: E402
from cases import module, pattern  # noqa: E402

pytestmark = MARKS
D = size(128, 32)


def qkv(B, Hq, Hkv, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, N, D, generator=g).to(DEV, LOW), torch.randn(B, Hkv, N, D, generator=g).to(DEV, LOW),
            torch.randn(B, Hkv, N, D, generator=g).to(DEV, LOW))


def check_vjp(fn, p, q, k, v, learned=(), **kw):
    """Kernel vs float64 reference: o, lse and the gradients of (o, lse) with random cotangents."""
    g = torch.Generator().manual_seed(1)

    def run(f, cast):
        leaves = [cast(t).detach().requires_grad_() for t in (q, k, v)]
        ins = {n: (cast(t).detach().requires_grad_() if n in learned else t) for n, t in kw.items()}
        o, lse = f(*leaves, return_lse=True, **ins)
        return o, lse, leaves + [ins[n] for n in learned]

    o, lse, wrt = run(fn, lambda t: t)
    go, gl = torch.randn(o.shape, generator=g).to(DEV), torch.randn(lse.shape, generator=g).to(DEV)
    got = torch.autograd.grad([o, lse], wrt, [go.to(o.dtype), gl], allow_unused=True, materialize_grads=True)
    ro, rlse, rwrt = run(lambda *a, **k: attncc.reference(p, *a, **k),
                         lambda t: t.double() if t.is_floating_point() else t)
    want = torch.autograd.grad([ro, rlse], rwrt, [go.double(), gl.double()], allow_unused=True, materialize_grads=True)
    finite = torch.isfinite(rlse)
    errors = {"o": rel(o, ro), "lse": rel(lse[finite], rlse[finite])}
    errors.update({name: rel(x, r) for name, x, r in zip(["dq", "dk", "dv"] + [f"d{n}" for n in learned], got, want)})
    bad = {name: err for name, err in errors.items() if not (math.isfinite(err) and err < TOL)}
    assert not bad, f"relative errors over {TOL}: {bad}"


@pytest.mark.parametrize("name, kw", [("causal", {}), ("sliding_window", {"window": size(512, 9)})])
def test_lse_gradients(name, kw):
    check_vjp(module(name).attention, pattern(name), *qkv(1, size(8, 4), size(4, 2), size(2048, 40)), **kw)
    release()


def _merge(parts):
    lses = torch.stack([lse for _, lse in parts])
    top = lses.max(0).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lses - top)
    total = w.sum(0)
    o = sum(wk[..., None] * o.float() for wk, (o, _) in zip(w, parts)) / torch.where(total > 0, total, 1.0)[..., None]
    return o, top + torch.log(total)


def test_chunks_merged_through_lse():
    """Key chunks of one call, merged through their LSEs, give the call (o, lse and gradients)."""
    causal = module("causal")
    N = size(8192, 60)
    q, k, v = qkv(1, size(16, 4), size(8, 2), N, seed=2)
    g = torch.Generator().manual_seed(3)
    go, gl = torch.randn(q.shape, generator=g).to(DEV), torch.randn(q.shape[:-1], generator=g).to(DEV)
    whole = [t.detach().requires_grad_() for t in (q, k, v)]
    o1, l1 = causal.attention(*whole, return_lse=True)
    want = torch.autograd.grad([o1, l1], whole, [go.to(LOW), gl])
    split = [t.detach().requires_grad_() for t in (q, k, v)]
    cuts = [0, size(3000, 22), size(5500, 41), N]
    parts = [causal.attention(split[0], split[1][:, :, a:b], split[2][:, :, a:b], return_lse=True, k_offset=a, n_k=N)
             for a, b in zip(cuts[:-1], cuts[1:])]
    o2, l2 = _merge(parts)
    got = torch.autograd.grad([o2, l2], split, [go, gl])
    assert rel(o2, o1) < TOL
    assert rel(l2, l1) < 1e-3
    for name, x, r in zip(("dq", "dk", "dv"), got, want):
        assert rel(x, r) < TOL, name
    release()


def test_never_true_mask():
    mod = attncc.compile({"name": "v1_never", "mask": {"where": "j <= i and j > i"}})
    q, k, v = (t.requires_grad_() for t in qkv(1, size(8, 2), size(8, 2), size(4096, 40), seed=4))
    o, lse = mod.attention(q, k, v, return_lse=True)
    grads = torch.autograd.grad([o, lse], (q, k, v), [torch.randn_like(o), torch.randn_like(lse)])
    assert (o == 0).all() and (lse == -math.inf).all()
    assert all((x == 0).all() for x in grads)


def _morton(bits):
    """A 2^bits x 2^bits image in Z order, a 5 x 5 neighbourhood."""
    return " and ".join(
        f"abs(({' | '.join(f'((i >> {k + axis}) & {1 << k})' for k in range(bits))}) - "
        f"({' | '.join(f'((j >> {k + axis}) & {1 << k})' for k in range(bits))})) <= 2" for axis in (0, 1))


LANGUAGE = {  # name -> (spec keys, learned inputs)
    "v1_morton": ({"mask": {"where": _morton(size(6, 3))}}, ()),
    "v1_gelu": ({"params": {"sh": 4}, "mask": {"where": "j <= i and (j >> sh) != 7"},
                 "score": {"mod": "0.5 * s * (1 + erf(s / sqrt(2)))"}}, ()),
    "v1_booleans": ({"inputs": {"is_image": {"dims": ["b", "n"], "dtype": "bool"}},
                     "mask": {"where": f"(i < {size(1024, 20)}) == (j < {size(1024, 20)}) or j <= i"},
                     "score": {"bias": "is_image[b, j] * 0.5 + (i < j) * 0.25 - ((i ^ j) & 3) * 0.1"}}, ()),
    "v1_mla_dot": ({"inputs": {"q_rope": {"dims": ["b", "h", "n", size(64, 8)], "dtype": "bfloat16", "grad": True},
                               "k_rope": {"dims": ["b", "n", size(64, 8)], "dtype": "bfloat16", "grad": True},
                               "temp": {"dims": [], "dtype": "float32", "grad": True}},
                    "mask": {"where": "causal"},
                    "score": {"bias": "0.125 * dot(q_rope[b, h, i, :], k_rope[b, j, :])", "mod": "s * temp"}},
                   ("q_rope", "k_rope", "temp")),
    "v1_topk": ({"params": {"K": 4}, "inputs": {"sel": {"dims": ["b", "h", "n", 8], "dtype": "int32"}},
                 "mask": {"where": "j // 64 == i // 64 or any(j // 64 == sel[b, h, i // 64, t] for t in range(K))"}},
                ()),
}


def _language_inputs(p, B, H, N):
    g = torch.Generator().manual_seed(5)
    out = {}
    for d in p.inputs:
        shape = [{"b": B, "h": H, "n": N}.get(x, x) for x in d.dims]
        if d.dtype == "bool":
            out[d.name] = (torch.rand(shape, generator=g) < 0.3).to(DEV)
        elif d.dtype == "int32":
            out[d.name] = torch.randint(0, max(1, N // 64), shape, generator=g, dtype=torch.int32).to(DEV)
        else:
            out[d.name] = (torch.randn(shape, generator=g) * 0.5 + (1.0 if not shape else 0.0)).to(
                DEV, getattr(torch, d.dtype))
    return out


@pytest.mark.parametrize("name", LANGUAGE)
def test_language_additions(name):
    spec, learned = LANGUAGE[name]
    keys = {"name": name, "head_dim": [D], **spec}
    mod, p = attncc.compile(keys), attncc.parse_spec(toml_text(keys))
    B, H, N = 1, size(8, 2), size(4096, 64)
    q, k, v = qkv(B, H, H, N, seed=6)
    kw = _language_inputs(p, B, H, N)
    # the reference is dense float64: the first half of the positions (the inputs cover all N)
    n = size(2048, N)
    check_vjp(mod.attention, p, q[:, :, :n], k[:, :, :n], v[:, :, :n], learned=learned, **kw)
    release()
