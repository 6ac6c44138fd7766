"""GPU timing of generated linear attention (specs/linear_elu.toml: elu+1, causal, normalized).

    PYTHONPATH=. python bench/linear_bench.py [--quick] [--no-sweep] [--bwd-chunks 32,64] [--no-crossover] [--out DIR]
    PYTHONPATH=. python bench/linear_bench.py --bwd-chunks 32,64 --only-bwd-chunks   # that sweep alone, ~1 min

1. correctness at a moderate size (forward and gradients against attncc.reference in float64);
2. the main case, B=2, T=16384, H=16, D=128, bfloat16: forward and forward+backward, median ms
   (triton.testing.do_bench), against flash-linear-attention's chunk_linear_attn when `fla`
   imports (its kernel on inputs already mapped by elu+1, and with the map in PyTorch);
3. a short sweep of tile configs (ATTNCC_LINEAR_CONFIG) on the main case, to pick the defaults;
3b. the backward chunk sweep (--bwd-chunks, default 32,64): for each backward chunk and 4 or 8 warps
   of the backward kernels (bwd_chunk, bwd_warps), forward+backward ms on the main case and the
   gradients' relative difference from the default config's;
4. the crossover against softmax causal attention (generated/causal.py and SDPA on cuDNN) for
   T = 1K .. 64K at B=2, H=16, D=128: forward and forward+backward.

Prints tables (Markdown, ready for docs/performance.md) and writes every number as JSON to
DIR/linear_bench.json (default: $OUT or .). Runs in one call, well under 5 minutes on an H100.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
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

DEV = "cuda"
BF16 = torch.bfloat16
B, H, D = 2, 16, 128
T_MAIN = 16384
FLA_REFERENCE = {"fwd": 1.66, "fwd_bwd": 5.33}  # ms, H100, measured by the lead (issue 6)
CROSSOVER_T = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
CROSSOVER_T_QUICK = [1024, 4096, 16384]


def bench(fn, grad_to=None, quick=False):
    """Median ms (do_bench); gradients reset between runs when ``grad_to`` is given."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=10 if quick else 25, rep=50 if quick else 200, grad_to_none=grad_to,
                    return_mode="median")


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def inputs(T, batch=B, heads=H, dim=D, dtype=BF16, grad=False, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [torch.randn(batch, heads, T, dim, device=DEV, dtype=dtype, generator=g).requires_grad_(grad)
            for _ in range(3)]


def fwd_bwd(fn, q, k, v, do):
    def run():
        fn(q, k, v).backward(do)
    return run


# --------------------------------------------------------------------------------------


def correctness(mod, pattern):
    """bf16 at T=4096 forward, T=2048 gradients, against the float64 reference."""
    out = {}
    q, k, v = inputs(4096, batch=1, heads=4)
    o = mod.attention(q, k, v)
    out["fwd_rel_err_T4096"] = rel(o, attncc.reference(pattern, q.double(), k.double(), v.double()))
    q, k, v = inputs(2048, batch=1, heads=4, grad=True)
    o = mod.attention(q, k, v)
    do = torch.randn_like(o)
    o.backward(do)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    attncc.reference(pattern, qd, kd, vd).backward(do.double())
    for n, a, r in (("dq", q, qd), ("dk", k, kd), ("dv", v, vd)):
        out[f"{n}_rel_err_T2048"] = rel(a.grad, r.grad)
    # chunked inference: two calls carrying the state equal one call
    q, k, v = inputs(4096, batch=1, heads=4)
    whole = mod.attention(q, k, v)
    o1, s = mod.attention(q[:, :, :1500], k[:, :, :1500], v[:, :, :1500], return_state=True)
    o2 = mod.attention(q[:, :, 1500:], k[:, :, 1500:], v[:, :, 1500:], initial_state=s, q_offset=1500, k_offset=1500)
    out["state_carry_rel_err"] = rel(torch.cat([o1, o2], 2), whole)
    st = None
    rows = []
    for t in range(64):
        o_t, st = mod.step(q[:, :, t], k[:, :, t], v[:, :, t], st)
        rows.append(o_t)
    out["step_rel_err"] = rel(torch.stack(rows, 2), whole[:, :, :64])
    return out


def fla_entry():
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as e:  # noqa: BLE001 - any import failure means: skip
        return None, f"flash-linear-attention not importable ({type(e).__name__}: {str(e)[:120]})"
    params = inspect.signature(chunk_linear_attn).parameters
    kw = dict(scale=1.0, normalize=True)
    if "head_first" in params:
        kw["head_first"] = False

    def run(q, k, v):  # [B, T, H, D] layout; returns o
        o = chunk_linear_attn(q, k, v, **kw)
        return o[0] if isinstance(o, tuple) else o
    return run, None


def main_case(mod, quick):
    res = {}
    q, k, v = inputs(T_MAIN, grad=True)
    do = torch.randn_like(q)
    with torch.no_grad():
        res["attncc_fwd_ms"] = bench(lambda: mod.attention(q, k, v), quick=quick)
    res["attncc_fwd_bwd_ms"] = bench(fwd_bwd(mod.attention, q, k, v, do), grad_to=[q, k, v], quick=quick)
    fla, why = fla_entry()
    if fla is None:
        print(f"skip fla: {why}")
        res["fla"] = why
        return res
    # fla's kernel on inputs already mapped by elu+1 ([B, T, H, D]), normalize=True, scale=1
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous() for t in (q, k, v))
    fq, fk = (F.elu(t) + 1 for t in (qt, kt))
    fq, fk, vt = (t.detach().requires_grad_() for t in (fq, fk, vt))
    dot_ = do.transpose(1, 2).contiguous()
    with torch.no_grad():
        res["fla_kernel_fwd_ms"] = bench(lambda: fla(fq, fk, vt), quick=quick)
        o_fla = fla(fq, fk, vt)
        o_ours = mod.attention(q, k, v)
        res["rel_diff_vs_fla"] = rel(o_ours, o_fla.transpose(1, 2))  # fla normalizes with its own eps
    res["fla_kernel_fwd_bwd_ms"] = bench(fwd_bwd(fla, fq, fk, vt, dot_), grad_to=[fq, fk, vt], quick=quick)
    # with the feature map in PyTorch (what a user of fla writes)
    qt, kt = (t.detach().requires_grad_() for t in (qt, kt))

    def fla_mapped(q_, k_, v_):
        return fla(F.elu(q_) + 1, F.elu(k_) + 1, v_)
    with torch.no_grad():
        res["fla_mapped_fwd_ms"] = bench(lambda: fla_mapped(qt, kt, vt), quick=quick)
    res["fla_mapped_fwd_bwd_ms"] = bench(fwd_bwd(fla_mapped, qt, kt, vt, dot_), grad_to=[qt, kt, vt], quick=quick)
    return res


SWEEP = [  # ATTNCC_LINEAR_CONFIG values (fields of attncc.runtime.linear.LinearConfig)
    "",
    "scan_dv=64",
    "scan_dv=16,scan_warps=4",
    "chunk=128,out_dv=64",
    "out_dv=64",
    "num_warps=4",
    "bwd_chunk=32,bwd_warps=8",
    "bwd_chunk=64,bwd_warps=8",
]


def sweep(mod, quick):
    rows = []
    q, k, v = inputs(T_MAIN, grad=True)
    do = torch.randn_like(q)
    with torch.no_grad():
        ref = mod.attention(q, k, v)
    for cfg in SWEEP:
        os.environ["ATTNCC_LINEAR_CONFIG"] = cfg
        row = {"config": cfg or "(default)"}
        try:
            with torch.no_grad():
                row["fwd_ms"] = bench(lambda: mod.attention(q, k, v), quick=True)
                row["rel_diff"] = rel(mod.attention(q, k, v), ref)
            row["fwd_bwd_ms"] = bench(fwd_bwd(mod.attention, q, k, v, do), grad_to=[q, k, v], quick=True)
        except Exception as e:  # noqa: BLE001 - report and go on
            row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        rows.append(row)
        print(f"  sweep {row}", flush=True)
    os.environ.pop("ATTNCC_LINEAR_CONFIG", None)
    return rows


def bwd_chunk_sweep(mod, chunks):
    """fwd+bwd ms per (bwd_chunk, bwd_warps) on the main case, and the gradients against the default's."""
    rows = []
    q, k, v = inputs(T_MAIN, grad=True)
    do = torch.randn_like(q)
    os.environ.pop("ATTNCC_LINEAR_CONFIG", None)
    mod.attention(q, k, v).backward(do)
    want = [t.grad.clone() for t in (q, k, v)]
    for chunk in chunks:
        for warps in (8, 4):
            cfg = f"bwd_chunk={chunk},bwd_warps={warps}"
            os.environ["ATTNCC_LINEAR_CONFIG"] = cfg
            row = {"bwd_chunk": chunk, "bwd_warps": warps}
            try:
                for t in (q, k, v):
                    t.grad = None
                mod.attention(q, k, v).backward(do)
                row["grad_rel_diff"] = max(rel(t.grad, w) for t, w in zip((q, k, v), want))
                row["fwd_bwd_ms"] = bench(fwd_bwd(mod.attention, q, k, v, do), grad_to=[q, k, v], quick=True)
            except Exception as e:  # noqa: BLE001 - report and go on
                row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
            rows.append(row)
            print(f"  bwd chunk {row}", flush=True)
    os.environ.pop("ATTNCC_LINEAR_CONFIG", None)
    return rows


def crossover(mod, quick):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    soft = importlib.import_module("generated.causal")
    rows = []
    for T in (CROSSOVER_T_QUICK if quick else CROSSOVER_T):
        q, k, v = inputs(T, grad=True)
        do = torch.randn_like(q)
        row = {"T": T}

        def sdpa(q_, k_, v_):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)
        for name, fn in (("linear", mod.attention), ("softmax_attncc", soft.attention), ("sdpa_cudnn", sdpa)):
            for label, run, grad in (("fwd", lambda fn=fn: fn(q, k, v), None),
                                     ("fwd_bwd", fwd_bwd(fn, q, k, v, do), [q, k, v])):
                try:
                    if grad is None:
                        with torch.no_grad():
                            row[f"{name}_{label}_ms"] = bench(run, quick=quick or T >= CROSSOVER_T[-2])
                    else:
                        row[f"{name}_{label}_ms"] = bench(run, grad_to=grad, quick=quick or T >= CROSSOVER_T[-2])
                except Exception as e:  # noqa: BLE001 - e.g. a backward that does not exist yet
                    row[f"{name}_{label}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        rows.append(row)
        print(f"  crossover {row}", flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()
    return rows


def crossover_point(rows, label, other):
    """The first T at which linear is faster than `other` (None: never in the range)."""
    for r in rows:
        a, b = r.get(f"linear_{label}_ms"), r.get(f"{other}_{label}_ms")
        if a is not None and b is not None and a < b:
            return r["T"]
    return None


def fmt(x):
    return "—" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--bwd-chunks", default="32,64",
                    help="backward chunk sizes to time (comma-separated powers of two >= 16; '' skips)")
    ap.add_argument("--only-bwd-chunks", action="store_true", help="run the backward chunk sweep alone")
    ap.add_argument("--no-crossover", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    try:
        chunks = [int(c) for c in args.bwd_chunks.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--bwd-chunks: comma-separated integers, got {args.bwd_chunks!r}")
    if any(c < 16 or c & (c - 1) for c in chunks):
        ap.error(f"--bwd-chunks: powers of two >= 16, got {chunks}")
    t0 = time.time()
    mod = importlib.import_module("generated.linear_elu")
    pattern = load_spec(ROOT / "specs" / "linear_elu.toml")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton
    result["triton"] = triton.__version__

    if chunks:
        print(f"== backward chunk sweep {chunks} (main case)", flush=True)
        result["bwd_chunks"] = bwd_chunk_sweep(mod, chunks)
        print_bwd_chunks(result["bwd_chunks"], result["device"])
    if args.only_bwd_chunks:
        write(result, args.out, t0)
        return
    print("== correctness (bf16 vs float64 reference)", flush=True)
    result["correctness"] = correctness(mod, pattern)
    print(result["correctness"], flush=True)
    print(f"== main case B={B} T={T_MAIN} H={H} D={D} bf16 elu+1 causal", flush=True)
    result["main"] = main_case(mod, args.quick)
    print(result["main"], flush=True)
    if not args.no_sweep:
        print("== config sweep (main case)", flush=True)
        result["sweep"] = sweep(mod, args.quick)
    result["crossover"] = []
    if not args.no_crossover:
        print("== crossover against softmax causal attention", flush=True)
        result["crossover"] = crossover(mod, args.quick)

    m = result["main"]
    print("\n## Linear attention (elu+1, causal, normalized), B=2 T=16384 H=16 D=128 bf16,", result["device"])
    print("| | forward ms | forward+backward ms |\n|---|---|---|")
    print(f"| attncc linear_elu | {fmt(m.get('attncc_fwd_ms'))} | {fmt(m.get('attncc_fwd_bwd_ms'))} |")
    if "fla_kernel_fwd_ms" in m:
        print(f"| fla chunk_linear_attn (inputs already mapped) | {fmt(m['fla_kernel_fwd_ms'])} | {fmt(m['fla_kernel_fwd_bwd_ms'])} |")
        print(f"| fla chunk_linear_attn + elu+1 in PyTorch | {fmt(m['fla_mapped_fwd_ms'])} | {fmt(m['fla_mapped_fwd_bwd_ms'])} |")
    else:
        print(f"| fla chunk_linear_attn | skipped: {m.get('fla')} | |")
    print(f"| target (fla, measured by the lead on an H100) | {FLA_REFERENCE['fwd']} | {FLA_REFERENCE['fwd_bwd']} |")
    if result.get("sweep"):
        print("\n| ATTNCC_LINEAR_CONFIG | forward ms | forward+backward ms |\n|---|---|---|")
        for r in result["sweep"]:
            print(f"| {r['config']} | {fmt(r.get('fwd_ms'))} | {fmt(r.get('fwd_bwd_ms', r.get('error')))} |")
    if result.get("bwd_chunks"):
        print_bwd_chunks(result["bwd_chunks"], result["device"])
    if not result["crossover"]:
        write(result, args.out, t0)
        return
    print("\n## Crossover against softmax causal attention, B=2 H=16 D=128 bf16 (ms)")
    print("| T | linear fwd | attncc softmax fwd | cuDNN fwd | linear fwd+bwd | attncc softmax fwd+bwd | cuDNN fwd+bwd |")
    print("|---|---|---|---|---|---|---|")
    for r in result["crossover"]:
        cells = [r.get(f"{n}_{lab}_ms") for lab in ("fwd", "fwd_bwd") for n in ("linear", "softmax_attncc", "sdpa_cudnn")]
        print(f"| {r['T']} | " + " | ".join(fmt(c) for c in cells) + " |")
    for lab in ("fwd", "fwd_bwd"):
        for other in ("softmax_attncc", "sdpa_cudnn"):
            result[f"crossover_{lab}_vs_{other}"] = crossover_point(result["crossover"], lab, other)
            print(f"linear faster than {other} ({lab}) from T = {fmt(result[f'crossover_{lab}_vs_{other}'])}")
    write(result, args.out, t0)


def print_bwd_chunks(rows, device):
    print(f"\n## Backward chunk (LinearConfig.bwd_chunk), main case, {device}")
    print("| bwd_chunk | bwd_warps | forward+backward ms | grad rel diff vs default |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['bwd_chunk']} | {r['bwd_warps']} | {fmt(r.get('fwd_bwd_ms', r.get('error')))} | "
              f"{'—' if r.get('grad_rel_diff') is None else format(r['grad_rel_diff'], '.1e')} |")


def write(result, out_dir, t0):
    result["seconds"] = time.time() - t0
    print(f"\n{result['seconds']:.0f} s")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "linear_bench.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
