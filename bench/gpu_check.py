"""One-call GPU check: correctness of every spec in bf16 at real sizes, then forward timing of
attncc against FlexAttention (compiled) and SDPA (flash, cuDNN) on the DEVELOPERS.md cases.

    PYTHONPATH=. python bench/gpu_check.py [--quick] [--out DIR]

Prints a short table last; writes the full numbers as JSON to DIR (default: $OUT or .).
"""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import attncc  # noqa: E402
from attncc.spec import load_spec  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from common import bench, bench_grad, density, documents, flex_pattern, flex_setup, heat_up, rel  # noqa: E402,F401

DEV = "cuda"
BF16 = torch.bfloat16


SMALL = {"sliding_window": {"window": 1024}, "local_bidirectional": {"w": 256}, "dilated": {},
         "longformer": {}, "strided": {}, "prefix_lm": {"prefix": 1024}, "chunked_local": {"chunk": 1000},
         "sink_window": {"sinks": 4, "window": 500}, "neighborhood_2d": {"width": 64, "radius": 2},
         "block_diagonal": {"chunk": 700}}


def inputs_for(p, B, Hq, N):
    out = {}
    for d in p.inputs:
        if d.name == "doc":
            out["doc"] = documents(B, N)
        elif d.name == "kv_len":
            out["kv_len"] = torch.randint(N // 2, N + 1, (B,), dtype=torch.int32, device=DEV)
        else:
            shape = [{"b": B, "h": Hq, "n": N}.get(x, x) for x in d.dims]
            out[d.name] = torch.randn(*shape, device=DEV)
    return out


def same_dropout(p, mod, q, k, v, kw):
    """(kernel kwargs, reference kwargs): for a dropout spec, one seed and its keep mask, so both
    drop the same pairs."""
    if not p.dropout:
        return kw, dict(kw)
    return dict(kw, seed=1234), dict(kw, keep_mask=mod.dropout_keep_mask(q, k, v, seed=1234))


def check_specs(N, quick):
    rows = []
    for f in sorted(glob.glob(str(ROOT / "specs" / "*.toml"))):
        p = load_spec(f)
        if p.kind != "softmax":
            continue
        mod = importlib.import_module(f"generated.{p.name}")
        Hq = p.heads_q or 8
        Hkv = p.heads_kv or (Hq // 2 if Hq % 2 == 0 else Hq)
        B, D = 1, 128
        Nq, Nk = (N // 2, N) if p.name == "cross_causal" else (N, N)
        torch.manual_seed(0)
        q = torch.randn(B, Hq, Nq, D, device=DEV, dtype=BF16)
        k = torch.randn(B, Hkv, Nk, D, device=DEV, dtype=BF16)
        v = torch.randn(B, Hkv, Nk, D, device=DEV, dtype=BF16)
        kw = dict(SMALL.get(p.name, {}), **inputs_for(p, B, Hq, max(Nq, Nk)))
        kw, ref_kw = same_dropout(p, mod, q, k, v, kw)
        try:
            o, lse = mod.attention(q, k, v, return_lse=True, **kw)
            torch.cuda.synchronize()
        except Exception as e:
            rows.append(dict(spec=p.name, ok=False, error=f"{type(e).__name__}: {str(e)[-300:]}"))
            print(f"check {p.name:20s} FAIL {rows[-1]['error']}", flush=True)
            continue
        ref, ref_lse = attncc.reference(p, q.double(), k.double(), v.double(), return_lse=True, **ref_kw)
        fin = torch.isfinite(ref_lse)
        err = rel(o, ref)
        lse_err = float((lse.double()[fin] - ref_lse[fin]).abs().max()) if fin.any() else 0.0
        ok = err < 2e-2 and lse_err < 5e-2 and not torch.isnan(o).any() and torch.equal(torch.isfinite(lse), fin)
        rows.append(dict(spec=p.name, Nq=Nq, Nk=Nk, Hq=Hq, Hkv=Hkv, rel_err=err, lse_err=lse_err, ok=bool(ok)))
        print(f"check {p.name:20s} Nq={Nq} Nk={Nk} H={Hq}/{Hkv} rel_err={err:.2e} lse_err={lse_err:.2e} "
              f"{'ok' if ok else 'FAIL'}", flush=True)
        del ref, ref_lse
        torch.cuda.empty_cache()
    # head dims (padded inside the kernel when not a power of two) and fp16, on causal and ALiBi
    for spec, D, dtype in [("causal", 32, BF16), ("causal", 64, BF16), ("causal", 80, BF16), ("causal", 96, BF16),
                           ("causal", 256, BF16), ("alibi", 64, torch.float16), ("dense", 128, torch.float16)]:
        p = load_spec(ROOT / "specs" / f"{spec}.toml")
        mod = importlib.import_module(f"generated.{spec}")
        torch.manual_seed(1)
        q, k, v = (torch.randn(1, 8, N, D, device=DEV, dtype=dtype) for _ in range(3))
        try:
            o = mod.attention(q, k, v)
            err = rel(o, attncc.reference(p, q.double(), k.double(), v.double()))
            ok = err < 2e-2
        except Exception as e:
            err, ok = float("nan"), False
        rows.append(dict(spec=f"{spec} D={D} {str(dtype)[6:]}", rel_err=err, ok=bool(ok)))
        print(f"check {rows[-1]['spec']:20s} rel_err={err:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    return rows


def check_grads(N=1024, specs=None):
    """bf16 gradients of every softmax spec (or those named) against autograd of the float64
    reference, at B=1, N (1024: the reference is dense)."""
    rows = []
    for f in sorted(glob.glob(str(ROOT / "specs" / "*.toml"))):
        p = load_spec(f)
        if p.kind != "softmax" or (specs and p.name not in specs):
            continue
        mod = importlib.import_module(f"generated.{p.name}")
        Hq = p.heads_q or 4
        Hkv = p.heads_kv or (Hq // 2 if Hq % 2 == 0 else Hq)
        Nq, Nk, D = (N // 2 if p.name == "cross_causal" else N), N, 128
        torch.manual_seed(0)
        q = torch.randn(1, Hq, Nq, D, device=DEV, dtype=BF16, requires_grad=True)
        k = torch.randn(1, Hkv, Nk, D, device=DEV, dtype=BF16, requires_grad=True)
        v = torch.randn(1, Hkv, Nk, D, device=DEV, dtype=BF16, requires_grad=True)
        do = torch.randn(1, Hq, Nq, D, device=DEV, dtype=BF16)
        kw = dict(SMALL.get(p.name, {}), **inputs_for(p, 1, Hq, N))
        kw = {n: (t.detach() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
        kw, ref_kw = same_dropout(p, mod, q, k, v, kw)
        try:
            grads = torch.autograd.grad(mod.attention(q, k, v, **kw), (q, k, v), do)
            qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
            ref = torch.autograd.grad(attncc.reference(p, qd, kd, vd, **ref_kw), (qd, kd, vd), do.double())
            errs = [rel(a, r) for a, r in zip(grads, ref)]
            ok = max(errs) < 3e-2 and not any(torch.isnan(g).any() for g in grads)
            rows.append(dict(spec=p.name, dq=errs[0], dk=errs[1], dv=errs[2], ok=bool(ok)))
        except NotImplementedError as e:
            rows.append(dict(spec=p.name, ok=True, skipped=str(e)[:120]))
        except Exception as e:
            rows.append(dict(spec=p.name, ok=False, error=f"{type(e).__name__}: {str(e)[-300:]}"))
        print(f"grad check {p.name:20s} " + " ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in rows[-1].items() if k != "spec"), flush=True)
        torch.cuda.empty_cache()
    return rows


CASES = [  # name, spec, N, B, params, flex score_mod/mask_mod kind
    ("dense 4K", "dense", 4096, 8, {}),
    ("causal 8K", "causal", 8192, 4, {}),
    ("sliding window 1024, 16K", "sliding_window", 16384, 2, {"window": 1024}),
    ("document mask, 16K", "document", 16384, 2, {}),
    ("ALiBi causal, 4K", "alibi", 4096, 8, {}),
    ("softcap 30 causal, 8K", "softcap", 8192, 4, {}),
]
# The families of issue 16 at N = 16K (static masks: attncc's closed forms or exact block lists;
# Flex's block mask is built outside the timed region). `gpu_check.py --families` times these.
FAMILY_CASES = [
    ("sink 4 + window 1024, 16K", "sink_window", 16384, 2, {"sinks": 4, "window": 1024}),
    ("chunked local 2048, 16K", "chunked_local", 16384, 2, {"chunk": 2048}),
    ("block diagonal 1024, 16K", "block_diagonal", 16384, 2, {"chunk": 1024}),
    ("2D neighborhood 128x128 r3", "neighborhood_2d", 16384, 2, {"width": 128, "radius": 3}),
    ("prefix-LM 2048, 16K", "prefix_lm", 16384, 2, {"prefix": 2048}),
    ("prefix-LM 2048, 8K", "prefix_lm", 8192, 4, {"prefix": 2048}),
    ("Longformer w256 g64, 16K", "longformer", 16384, 2, {"w": 256, "g": 64}),
    ("BigBird 64-blocks, 16K", "bigbird", 16384, 2, {}),
    ("strided 128, 16K", "strided", 16384, 2, {"stride": 128}),
    ("dilated 2048/4, 16K", "dilated", 16384, 2, {"window": 2048, "dilation": 4}),
    ("causal 16K (reference)", "causal", 16384, 2, {}),
]


density_of = density


def case_tensors(spec, N, B, params, H=16, D=128):
    """(generated module, q, k, v, keyword arguments, forward FLOPs) of one timed case: bf16 inputs
    from seed 0, packed documents for the document mask."""
    mod = importlib.import_module(f"generated.{spec}")
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=DEV, dtype=BF16) for _ in range(3))
    kw = dict(params)
    if spec == "document":
        kw["doc"] = documents(B, N)
    return mod, q, k, v, kw, 4 * B * H * N * N * D * density_of(spec, N, kw)


def time_cases(H=16, D=128, quick=False, with_backward=True, cases=None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    results = []
    heat_up()
    for label, spec, N, B, params in cases or CASES:
        # A fresh compile per case: otherwise FlexAttention hits dynamo's recompile limit after a
        # few shapes (and requires_grad variants) and silently falls back to its slow eager path.
        torch._dynamo.reset()
        flex, create_block_mask = flex_setup()
        mod, q, k, v, kw, flops = case_tensors(spec, N, B, params, H, D)
        dens = density_of(spec, N, kw)
        row = dict(case=label, B=B, H=H, N=N, D=D, density=dens)
        row["attncc_ms"] = bench(lambda: mod.attention(q, k, v, **kw))
        o = mod.attention(q, k, v, **kw)

        # FlexAttention
        score_mod, mask_mod, per_batch = flex_pattern(spec, H, kw, n=N)
        bm = None
        if mask_mod is not None:
            bm = create_block_mask(mask_mod, B if per_batch else None, None, N, N, device=DEV)
            row["flex_mask_ms"] = bench(lambda: create_block_mask(mask_mod, B if per_batch else None,
                                                                   None, N, N, device=DEV))
        try:
            of = flex(q, k, v, score_mod=score_mod, block_mask=bm)
            row["flex_ms"] = bench(lambda: flex(q, k, v, score_mod=score_mod, block_mask=bm))
            row["err_vs_flex"] = rel(o, of)
        except Exception as e:  # keep going: report
            row["flex_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        # SDPA where it applies
        if spec in ("dense", "causal"):
            for name, backend in (("sdpa_flash_ms", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn_ms", SDPBackend.CUDNN_ATTENTION)):
                try:
                    with sdpa_kernel(backend):
                        os_ = F.scaled_dot_product_attention(q, k, v, is_causal=spec == "causal")
                        row[name] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=spec == "causal"))
                    row["err_vs_" + name[:-3]] = rel(o, os_)
                except Exception as e:
                    row[name.replace("_ms", "_error")] = f"{type(e).__name__}: {str(e)[:200]}"
        if with_backward:
            qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            do = torch.randn_like(q)
            def fwd_bwd_attncc():
                mod.attention(qg, kg, vg, **kw).backward(do)
            try:
                row["attncc_fb_ms"] = bench_grad(fwd_bwd_attncc, [qg, kg, vg])
                grads = [t.grad.clone() for t in (qg, kg, vg)]
                if "flex_ms" in row:
                    for t in (qg, kg, vg):
                        t.grad = None
                    def fwd_bwd_flex():
                        flex(qg, kg, vg, score_mod=score_mod, block_mask=bm).backward(do)
                    row["flex_fb_ms"] = bench_grad(fwd_bwd_flex, [qg, kg, vg])
                    row["grad_err_vs_flex"] = max(rel(a, t.grad) for a, t in zip(grads, (qg, kg, vg)))
            except Exception as e:
                row["backward_error"] = f"{type(e).__name__}: {str(e)[-200:]}"
        if hasattr(mod, "_exact_lists"):  # the exact block lists' one-time build (then cached)
            from attncc.runtime import bind, blocks, pick_config
            call = bind(mod.SPEC, q, k, v, kwargs=dict(kw))
            cfg = pick_config(call)
            blocks._exact_cache.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            mod._exact_lists(call, cfg.BLOCK_M, cfg.BLOCK_N)
            torch.cuda.synchronize()
            row["attncc_exact_lists_once_ms"] = (time.perf_counter() - t0) * 1e3
        if spec == "document":
            from attncc.runtime import bind, pick_config
            call = bind(mod.SPEC, q, k, v, kwargs=dict(kw))
            cfg = pick_config(call)
            row["attncc_lists_ms"] = bench(lambda: mod._block_lists(call, cfg.BLOCK_M, cfg.BLOCK_N))
        for key in list(row):
            if key.endswith("_fb_ms"):
                row[key.replace("_ms", "_tflops")] = 3.5 * flops / row[key] / 1e9
            elif key.endswith("_ms") and key not in ("flex_mask_ms", "attncc_lists_ms", "attncc_exact_lists_once_ms"):
                row[key.replace("_ms", "_tflops")] = flops / row[key] / 1e9
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="correctness at N=4096 only for the checks")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--no-backward", action="store_true", help="forward timing only")
    ap.add_argument("--families", action="store_true",
                    help="time the mask families of issue 16 (FAMILY_CASES) instead of CASES, no checks")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    print(f"torch {torch.__version__}, triton {__import__('triton').__version__}, {torch.cuda.get_device_name()}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    checks = [] if args.skip_check or args.families else check_specs(4096, args.quick) + check_grads(1024)
    timing = time_cases(with_backward=not args.no_backward, cases=FAMILY_CASES if args.families else None)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = "gpu_families.json" if args.families else "gpu_check.json"
    (Path(args.out) / name).write_text(json.dumps(dict(checks=checks, timing=timing), indent=1))
    print()
    if checks:
        bad = [c["spec"] for c in checks if not c["ok"]]
        print(f"correctness (bf16, N=4096, vs float64 reference): {len(checks) - len(bad)}/{len(checks)} ok"
              + (f"; FAILED: {', '.join(bad)}" if bad else ""))
    print(f"{'case (fwd TFLOP/s)':28s} {'attncc':>8s} {'flex':>8s} {'sdpa-fa':>8s} {'cudnn':>8s} {'flex mask ms':>12s} {'ratio':>6s}")
    for r in timing:
        f = lambda k: f"{r[k]:8.1f}" if k in r else f"{'-':>8s}"
        mask = f"{r['flex_mask_ms']:12.3f}" if "flex_mask_ms" in r else f"{'-':>12s}"
        ratio = f"{r['attncc_tflops'] / r['flex_tflops']:6.2f}" if "flex_tflops" in r and "attncc_tflops" in r else f"{'-':>6s}"
        print(f"{r['case']:28s} {f('attncc_tflops')} {f('flex_tflops')} {f('sdpa_flash_tflops')} {f('sdpa_cudnn_tflops')} {mask} {ratio}")
    if not args.no_backward:
        print(f"\n{'case (fwd+bwd TFLOP/s, x3.5)':28s} {'attncc':>8s} {'flex':>8s} {'ratio':>6s} {'grad err vs flex':>17s}")
        for r in timing:
            f = lambda k: f"{r[k]:8.1f}" if k in r else f"{'-':>8s}"
            ratio = f"{r['attncc_fb_tflops'] / r['flex_fb_tflops']:6.2f}" if "flex_fb_tflops" in r and "attncc_fb_tflops" in r else f"{'-':>6s}"
            err = f"{r['grad_err_vs_flex']:17.2e}" if "grad_err_vs_flex" in r else r.get("backward_error", "-")[:60]
            print(f"{r['case']:28s} {f('attncc_fb_tflops')} {f('flex_fb_tflops')} {ratio} {err}")


if __name__ == "__main__":
    main()
