"""GPU check of issue 19 (contract v1 additions) at real sizes in bfloat16: gradients through the LSE,
partial attentions merged through their LSEs, a mask that is never true, and the language additions
(booleans, bitwise operators, erf, reductions, dot, 0-d inputs) against the float64 reference.

    PYTHONPATH=. python bench/v1_gpu_check.py            # a few minutes on an H200, mostly compiling

Prints one line per check and a timing line per language spec (forward + backward, next to causal
for scale: dot() is unrolled, so an MLA-style rope part of 64 costs 64 per-pair products); exits 1
on any failure. Not run yet: written in a session without a GPU.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import attncc  # noqa: E402
import generated.causal as causal  # noqa: E402
import generated.sliding_window as sliding_window  # noqa: E402
from attncc.module_cache import toml_text  # noqa: E402
from attncc.spec import load_spec  # noqa: E402

DEV, BF16 = "cuda", torch.bfloat16
TOL = 3e-2  # bfloat16 inputs, float32 accumulation: ||x - ref|| / ||ref||
FAILURES = []


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def report(what, err, tol=TOL):
    ok = math.isfinite(err) and err < tol
    print(f"    {what:52s} {err:9.2e}  {'ok' if ok else 'FAIL'}", flush=True)
    if not ok:
        FAILURES.append(what)


def qkv(B, Hq, Hkv, N, D, seed=0, Nk=None):
    g = torch.Generator(device=DEV).manual_seed(seed)
    Nk = N if Nk is None else Nk
    return (torch.randn(B, Hq, N, D, device=DEV, generator=g, dtype=BF16),
            torch.randn(B, Hkv, Nk, D, device=DEV, generator=g, dtype=BF16),
            torch.randn(B, Hkv, Nk, D, device=DEV, generator=g, dtype=BF16))


def vjp(fn, pattern, q, k, v, learned=(), **kw):
    """Kernel vs float64 reference: o, lse and the gradients of (o, lse) with random cotangents."""
    g = torch.Generator(device=DEV).manual_seed(1)

    def run(f, cast):
        leaves = [cast(t).detach().requires_grad_() for t in (q, k, v)]
        ins = {n: (cast(t).detach().requires_grad_() if n in learned else t) for n, t in kw.items()}
        o, lse = f(*leaves, return_lse=True, **ins)
        return o, lse, leaves + [ins[n] for n in learned]

    o, lse, wrt = run(fn, lambda t: t)
    go = torch.randn(o.shape, device=DEV, generator=g)
    gl = torch.randn(lse.shape, device=DEV, generator=g)
    got = torch.autograd.grad([o, lse], wrt, [go.to(o.dtype), gl], allow_unused=True, materialize_grads=True)
    ro, rlse, rwrt = run(lambda *a, **k: attncc.reference(pattern, *a, **k), lambda t: t.double() if t.is_floating_point() else t)
    want = torch.autograd.grad([ro, rlse], rwrt, [go.double(), gl.double()], allow_unused=True, materialize_grads=True)
    finite = torch.isfinite(rlse)
    report("o", rel(o, ro))
    report("lse (finite rows)", rel(lse[finite], rlse[finite]))
    for name, x, r in zip(["dq", "dk", "dv"] + [f"d{n}" for n in learned], got, want):
        report(name, rel(x, r))


def merge(parts):
    lses = torch.stack([lse for _, lse in parts])
    top = lses.max(0).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lses - top)
    total = w.sum(0)
    o = sum(wk[..., None] * o.float() for wk, (o, _) in zip(w, parts)) / torch.where(total > 0, total, 1.0)[..., None]
    return o, top + torch.log(total)


def check_lse_gradients():
    print("gradients through the LSE (vs float64 reference)")
    for name, mod, kw in (("causal", causal, {}), ("sliding_window", sliding_window, {"window": 512})):
        print(f"  {name}: B=1 Hq=8 Hkv=4 N=2048 D=128")
        vjp(mod.attention, load_spec(ROOT / "specs" / f"{name}.toml"), *qkv(1, 8, 4, 2048, 128), **kw)


def check_merge():
    print("key chunks merged through their LSEs vs one call (bf16, N=8192, 3 chunks)")
    q, k, v = qkv(1, 16, 8, 8192, 128, seed=2)
    g = torch.Generator(device=DEV).manual_seed(3)
    go, gl = torch.randn(1, 16, 8192, 128, device=DEV, generator=g), torch.randn(1, 16, 8192, device=DEV, generator=g)
    whole = [t.detach().requires_grad_() for t in (q, k, v)]
    o1, l1 = causal.attention(*whole, return_lse=True)
    want = torch.autograd.grad([o1, l1], whole, [go.to(BF16), gl])
    split = [t.detach().requires_grad_() for t in (q, k, v)]
    cuts = [0, 3000, 5500, 8192]
    parts = [causal.attention(split[0], split[1][:, :, a:b], split[2][:, :, a:b], return_lse=True, k_offset=a, n_k=8192)
             for a, b in zip(cuts[:-1], cuts[1:])]
    o2, l2 = merge(parts)
    got = torch.autograd.grad([o2, l2], split, [go, gl])
    report("o", rel(o2, o1))
    report("lse", rel(l2, l1), 1e-3)
    for name, x, r in zip(("dq", "dk", "dv"), got, want):
        report(name, rel(x, r))


def check_never_true():
    print("a mask that is never true (N=4096)")
    mod = attncc.compile({"name": "v1_never", "mask": {"where": "j <= i and j > i"}})
    q, k, v = (t.requires_grad_() for t in qkv(1, 8, 8, 4096, 128, seed=4))
    o, lse = mod.attention(q, k, v, return_lse=True)
    grads = torch.autograd.grad([o, lse], (q, k, v), [torch.randn_like(o), torch.randn_like(lse)])
    ok = bool((o == 0).all() and (lse == -math.inf).all() and all((x == 0).all() for x in grads))
    report("o = 0, lse = -inf, zero gradients", 0.0 if ok else math.inf)


MORTON = " and ".join(
    f"abs(({' | '.join(f'((i >> {2 * k + axis - k}) & {1 << k})' for k in range(6))}) - "
    f"({' | '.join(f'((j >> {2 * k + axis - k}) & {1 << k})' for k in range(6))})) <= 2" for axis in (0, 1))

LANGUAGE = {
    # a 64 x 64 image in Z order, a 5 x 5 neighbourhood
    "v1_morton": ({"mask": {"where": MORTON}}, {}),
    "v1_gelu": ({"params": {"sh": 4}, "mask": {"where": "j <= i and (j >> sh) != 7"},
                 "score": {"mod": "0.5 * s * (1 + erf(s / sqrt(2)))"}}, {}),
    "v1_booleans": ({"inputs": {"is_image": {"dims": ["b", "n"], "dtype": "bool"}},
                     "mask": {"where": "(i < 1024) == (j < 1024) or j <= i"},
                     "score": {"bias": "is_image[b, j] * 0.5 + (i < j) * 0.25 - ((i ^ j) & 3) * 0.1"}}, {}),
    "v1_mla_dot": ({"inputs": {"q_rope": {"dims": ["b", "h", "n", 64], "dtype": "bfloat16", "grad": True},
                               "k_rope": {"dims": ["b", "n", 64], "dtype": "bfloat16", "grad": True},
                               "temp": {"dims": [], "dtype": "float32", "grad": True}},
                    "mask": {"where": "causal"},
                    "score": {"bias": "0.125 * dot(q_rope[b, h, i, :], k_rope[b, j, :])", "mod": "s * temp"}},
                   {"q_rope", "k_rope", "temp"}),
    "v1_topk": ({"params": {"K": 4}, "inputs": {"sel": {"dims": ["b", "h", "n", 8], "dtype": "int32"}},
                 "mask": {"where": "j // 64 == i // 64 or any(j // 64 == sel[b, h, i // 64, t] for t in range(K))"}},
                {}),
}


def language_inputs(p, B, H, N):
    g = torch.Generator(device=DEV).manual_seed(5)
    out = {}
    for d in p.inputs:
        shape = [{"b": B, "h": H, "n": N}.get(x, x) for x in d.dims]
        if d.dtype == "bool":
            out[d.name] = torch.rand(shape, device=DEV, generator=g) < 0.3
        elif d.dtype == "int32":
            out[d.name] = torch.randint(0, N // 64, shape, device=DEV, generator=g, dtype=torch.int32)
        else:
            out[d.name] = (torch.randn(shape, device=DEV, generator=g) * 0.5 + (1.0 if not shape else 0.0)).to(
                getattr(torch, d.dtype))
    return out


def timed(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def check_language():
    print("language additions (vs float64 reference, B=1 Hq=8 Hkv=8 N=4096 D=128)")
    B, H, N, D = 1, 8, 4096, 128
    q, k, v = qkv(B, H, H, N, D, seed=6)

    def step(mod, kw):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        o, lse = mod.attention(*leaves, return_lse=True, **kw)
        (o.float().sum() + lse.sum()).backward()

    base = timed(lambda: step(causal, {}))
    print(f"  causal forward + backward: {base:.2f} ms (for scale)")
    for name, (spec, learned) in LANGUAGE.items():
        mod = attncc.compile({"name": name, "head_dim": [D], **spec})
        p = attncc.parse_spec(toml_text({"name": name, "head_dim": [D], **spec}))
        kw = language_inputs(p, B, H, N)
        print(f"  {name}")
        # the reference is dense float64: check on the first 2048 positions (inputs cover all N)
        vjp(mod.attention, p, q[:, :, :2048], k[:, :, :2048], v[:, :, :2048], learned=learned, **kw)
        print(f"    forward + backward at N={N}: {timed(lambda: step(mod, kw)):.2f} ms")


def main():
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    for check in (check_lse_gradients, check_merge, check_never_true, check_language):
        check()
    print("FAIL: " + ", ".join(FAILURES) if FAILURES else "PASS")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
