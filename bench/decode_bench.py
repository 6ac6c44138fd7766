"""Decoding on the GPU: K/V read bandwidth of the generated ``decode`` against SDPA flash and
FlexAttention, bf16, Hq = 32, Hkv = 8, D = 128, one query token per row (issue 8).

    PYTHONPATH=. python bench/decode_bench.py [--out DIR] [--no-sweep] [--no-check]

Cases: B = 8, L = 32768 and B = 1, L = 131072, with the cache contiguous [B, Hkv, L, D] and
paged [pages, 64, Hkv, D] (pages in a random order). Bandwidth = bytes of valid K and V
(2 * B * Hkv * L * D * 2) / median time (triton.testing.do_bench, which flushes L2 between
runs). SDPA and FlexAttention read the contiguous cache (neither takes a page table); the
target is >= 90% of SDPA flash's bandwidth for both layouts. The sweep times a few tile
configs and split counts (ATTNCC_DECODE_CONFIG / ATTNCC_DECODE_SPLITS) to show whether the
defaults in attncc/runtime/decode.py are the best. Before timing it checks every case against
SDPA, and decode of a few other specs (paged, Nq = 4) against their ``attention`` on the GPU.
Prints a short table last; writes the numbers as JSON to DIR (default: $OUT or .).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEV = "cuda"
BF16 = torch.bfloat16
HQ, HKV, D, PAGE = 32, 8, 128, 64
CASES = [(8, 32768), (1, 131072)]
# (BLOCK_N, num_warps, num_stages); a paged cache's loads need 2 x in-flight + 1 stages (decode_config)
CONFIGS = {"contiguous": [(64, 4, 4), (64, 4, 3), (64, 4, 5), (32, 4, 4), (32, 4, 7), (128, 4, 3), (128, 8, 3),
                          (64, 8, 4)],
           "paged": [(64, 4, 7), (64, 4, 5), (64, 4, 9), (32, 4, 7), (32, 4, 13), (128, 4, 5), (128, 8, 5),
                     (64, 8, 7)]}
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def bench(fn, rep=200):
    if DEV == "cpu":  # --cpu-smoke: one run, to check this script under the interpreter
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep, return_mode="median")  # ms


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def decode_module(name):
    """generated.<name> when it has decode, else rendered now with decode.py.j2 included
    (until templates/softmax.py.j2 includes it)."""
    mod = importlib.import_module(f"generated.{name}")
    if hasattr(mod, "decode"):
        return mod
    import jinja2

    import attncc.codegen as cg
    from attncc.spec import load_spec

    env = cg._environment()
    src = (cg.TEMPLATES / "softmax.py.j2").read_text() + '{% include "decode.py.j2" %}\n'
    env.loader = jinja2.ChoiceLoader([jinja2.DictLoader({"softmax.py.j2": src}), env.loader])
    original, cg._environment = cg._environment, (lambda: env)
    try:
        text = cg.render(load_spec(ROOT / "specs" / f"{name}.toml"))
    finally:
        cg._environment = original
    path = Path(tempfile.mkdtemp(prefix="attncc_decode_")) / f"{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"_decode_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def paged(k, v, gen):
    """[B, Hkv, L, D] -> pages [B * L / PAGE, PAGE, Hkv, D] in a random order, block table [B, L / PAGE]."""
    B, H, L, Dh = k.shape
    n = L // PAGE
    table = torch.randperm(B * n, generator=gen).to(torch.int32).view(B, n).to(DEV)
    out = []
    for t in (k, v):
        pages = torch.empty(B * n, PAGE, H, Dh, dtype=t.dtype, device=DEV)
        pages[table.flatten().long()] = t.view(B, H, n, PAGE, Dh).permute(0, 2, 3, 1, 4).reshape(B * n, PAGE, H, Dh)
        out.append(pages)
    return out[0], out[1], table


def with_env(values, fn):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
    try:
        return fn()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def auto_choice(q, k, v, kv_len, table):
    """The tile config and split count decode picks on its own for these arguments."""
    import attncc.runtime as rt

    call = rt.decode.bind_decode(decode_module("causal").SPEC, q, k, v, kv_len=kv_len, block_table=table)
    cfg = rt.decode.decode_config(call)
    heads = rt.decode.heads_per_program(call, cfg)
    programs = call.B * call.Hkv * -(-call.group // heads)
    return (f"BLOCK_N={cfg.BLOCK_N},num_warps={cfg.num_warps},num_stages={cfg.num_stages}",
            rt.decode.num_splits(call, cfg, programs))


def check_specs(results):
    """decode (paged, Nq = 4, ragged kv_len) == attention's last rows, a few specs, bf16."""
    from attncc._reference import rotary
    from attncc.spec import load_spec

    specs = {"sliding_window": {"window": 1024}, "alibi": {}, "softcap": {}, "rope_causal": {}, "document": None}
    gen = torch.Generator().manual_seed(1)
    B, Nq, L = 2, 4, 4096
    for name, kw in specs.items():
        if time.time() - T0 > 100:
            log("spec checks: out of time, skipping", name)
            results["spec_checks"][name] = {"skipped": True}
            continue
        try:
            mod = decode_module(name)
            q = torch.randn(B, HQ, Nq, D, generator=gen).to(DEV, BF16)
            k, v = (torch.randn(B, HKV, L, D, generator=gen).to(DEV, BF16) for _ in range(2))
            if kw is None:
                kw = {"doc": (torch.arange(L, device=DEV) // 700).to(torch.int32).expand(B, L).contiguous()}
            kv_len = torch.tensor([L, 2999], dtype=torch.int32, device=DEV)
            rope = load_spec(ROOT / "specs" / f"{name}.toml").rope
            k_cache = k
            if rope is not None:  # the cache holds keys rotated at their positions; attention rotates its own
                k_cache = rotary(k.double(), torch.arange(L, device=DEV), rope.theta, rope.style,
                                 rope.rotary_dim or D).to(BF16)
            kp, vp, table = paged(k_cache, v, gen)
            o = mod.decode(q, kp, vp, kv_len=kv_len, block_table=table, **kw)
            errs = []
            for b in range(B):
                n = int(kv_len[b])
                kw_b = {key: t[b:b + 1] for key, t in kw.items()} if name == "document" else kw
                want = mod.attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], q_offset=n - Nq, **kw_b)
                errs.append(rel(o[b:b + 1], want))
            ok = max(errs) < 2e-2
            results["spec_checks"][name] = {"rel_err": errs, "ok": ok}
            log(f"check {name:15s} decode vs attention rel err {max(errs):.2e} {'ok' if ok else 'FAIL'}")
        except Exception as e:  # noqa: BLE001 - report and go on
            results["spec_checks"][name] = {"error": repr(e)[:300]}
            log(f"check {name:15s} ERROR {e!r}"[:300])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU under TRITON_INTERPRET=1")
    args = ap.parse_args()
    global DEV, CASES, PAGE, D, HQ, HKV
    if args.cpu_smoke:
        DEV, CASES, PAGE, D, HQ, HKV = "cpu", [(2, 128)], 16, 32, 8, 2
        CONFIGS["contiguous"], CONFIGS["paged"] = CONFIGS["contiguous"][:2], CONFIGS["paged"][:2]
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter)"
    torch.backends.cuda.matmul.allow_tf32 = True
    log(name, "torch", torch.__version__)
    results = {"device": name, "torch": torch.__version__, "cases": [], "spec_checks": {}}
    causal = decode_module("causal")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention)
    except Exception as e:  # noqa: BLE001
        flex = None
        log("no FlexAttention:", repr(e))

    if not args.no_check:
        check_specs(results)
    rows = []
    for B, L in CASES:
        gen = torch.Generator().manual_seed(0)  # page order
        data = torch.Generator(device=DEV).manual_seed(0)
        q = torch.randn(B, HQ, 1, D, generator=data, device=DEV, dtype=BF16)
        k = torch.randn(B, HKV, L, D, generator=data, device=DEV, dtype=BF16)
        v = torch.randn(B, HKV, L, D, generator=data, device=DEV, dtype=BF16)
        kv_len = torch.full((B,), L, dtype=torch.int32, device=DEV)
        nbytes = 2 * B * HKV * L * D * 2
        tbps = lambda ms: nbytes / (ms * 1e-3) / 1e12  # noqa: E731
        case = {"B": B, "L": L, "bytes": nbytes}

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION if DEV == "cuda" else SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        try:
            ref = sdpa()
            case["sdpa_flash_ms"] = bench(sdpa)
            log(f"B={B} L={L} SDPA flash {tbps(case['sdpa_flash_ms']):.2f} TB/s")
        except Exception as e:  # noqa: BLE001
            ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(HQ // HKV, 1),
                                                 v.float().repeat_interleave(HQ // HKV, 1))
            case["sdpa_flash_error"] = repr(e)[:300]
            log("SDPA flash failed:", repr(e)[:300])
        if flex is not None and DEV == "cuda":
            try:
                fx = lambda: flex(q, k, v, enable_gqa=True)  # noqa: E731
                fx()
                case["flex_ms"] = bench(fx)
                log(f"B={B} L={L} FlexAttention {tbps(case['flex_ms']):.2f} TB/s")
            except Exception as e:  # noqa: BLE001
                case["flex_error"] = repr(e)[:300]
                log("FlexAttention failed:", repr(e)[:300])

        kp, vp, table = paged(k, v, gen)
        layouts = {"contiguous": lambda: causal.decode(q, k, v, kv_len=kv_len),
                   "paged": lambda: causal.decode(q, kp, vp, kv_len=kv_len, block_table=table)}
        for layout, fn in layouts.items():
            err = rel(fn(), ref)
            ms = bench(fn)
            cfg, splits = auto_choice(q, k if layout == "contiguous" else kp, v if layout == "contiguous" else vp,
                                      kv_len, None if layout == "contiguous" else table)
            entry = {"layout": layout, "rel_err_vs_sdpa": err, "default_ms": ms, "default_tbps": tbps(ms),
                     "default_config": cfg, "default_splits": splits, "sweep": []}
            log(f"B={B} L={L} {layout:10s} attncc decode {tbps(ms):.2f} TB/s (rel err vs SDPA {err:.1e}; "
                f"{cfg}, {splits} splits)")
            if not args.no_sweep and time.time() - T0 < 220:
                for bn, w, st in CONFIGS[layout]:
                    env = {"ATTNCC_DECODE_CONFIG": f"BLOCK_N={bn},num_warps={w},num_stages={st}"}
                    try:
                        t = with_env(env, lambda: bench(fn, rep=100))
                        entry["sweep"].append({"config": env["ATTNCC_DECODE_CONFIG"], "splits": "auto", "ms": t,
                                               "tbps": tbps(t)})
                    except Exception as e:  # noqa: BLE001
                        entry["sweep"].append({"config": env["ATTNCC_DECODE_CONFIG"], "error": repr(e)[:200]})
                best = max((s for s in entry["sweep"] if "ms" in s), key=lambda s: s["tbps"], default=None)
                if best is not None:
                    for splits in ("2", "4", "8", "16", "32", "64"):
                        env = {"ATTNCC_DECODE_CONFIG": best["config"], "ATTNCC_DECODE_SPLITS": splits}
                        try:
                            t = with_env(env, lambda: bench(fn, rep=100))
                            entry["sweep"].append({"config": best["config"], "splits": splits, "ms": t,
                                                   "tbps": tbps(t)})
                        except Exception as e:  # noqa: BLE001
                            entry["sweep"].append({"config": best["config"], "splits": splits,
                                                   "error": repr(e)[:200]})
                best = max((s for s in entry["sweep"] if "ms" in s), key=lambda s: s["tbps"], default=None)
                entry["best"] = best
                if best:
                    log(f"   best of sweep {best['tbps']:.2f} TB/s with {best['config']} splits={best['splits']}")
            case[layout] = entry
        results["cases"].append(case)
        sd = tbps(case["sdpa_flash_ms"]) if "sdpa_flash_ms" in case else None
        fx = tbps(case["flex_ms"]) if "flex_ms" in case else None
        for layout in layouts:
            e = case[layout]
            rows.append((f"B={B}, L={L}", layout, e["default_tbps"], (e.get("best") or {}).get("tbps"),
                         (e.get("best") or {}).get("config", "") + (f" splits={e['best']['splits']}"
                                                                   if e.get("best") else ""), sd, fx))
        del k, v, kp, vp
        torch.cuda.empty_cache()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_bench.json").write_text(json.dumps(results, indent=1))
    print("\nK/V read bandwidth, TB/s (bf16, Hq=32, Hkv=8, D=128, Nq=1; SDPA/Flex on the contiguous cache)")
    print(f"| {'case':16s} | {'cache':10s} | attncc | best sweep | SDPA flash | Flex | attncc/SDPA | best config |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    fmt = lambda x: f"{x:.2f}" if x is not None else "-"  # noqa: E731
    for case, layout, dflt, best, cfg, sd, fx in rows:
        ratio = f"{100 * dflt / sd:.0f}%" if sd else "-"
        print(f"| {case:16s} | {layout:10s} | {fmt(dflt)} | {fmt(best)} | {fmt(sd)} | {fmt(fx)} | {ratio} | {cfg} |")
    bad = [n for n, r in results["spec_checks"].items() if not r.get("ok") and not r.get("skipped")]
    skipped = [n for n, r in results["spec_checks"].items() if r.get("skipped")]
    print("spec checks:", "ok" if not bad else f"FAILED {bad}", f"(skipped: {skipped})" if skipped else "",
          f"({time.time() - T0:.0f}s)")


if __name__ == "__main__":
    main()
