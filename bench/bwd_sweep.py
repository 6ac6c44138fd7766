"""Backward tile-config sweep (GPU): the dK/dV and dQ kernels' BLOCK_M, BLOCK_N, warps and stages.

    PYTHONPATH=. python bench/bwd_sweep.py [case-substring ...]

For each case the forward runs once; then the backward launcher (``_backward`` of the generated
module) is timed with one kernel's config swept and the other's at its default, and the
forward+backward TFLOP/s (x3.5) of the best pair is printed with FlexAttention's from
docs/performance.md for reference.
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import CASES, case_tensors, check_grads  # noqa: E402

from attncc.runtime import bind  # noqa: E402

DKDV = [(64, 64, 4, 2), (64, 64, 4, 3), (32, 128, 4, 2), (32, 128, 4, 3), (64, 128, 4, 2), (64, 128, 8, 2),
        (64, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2)]
DQ = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (128, 128, 8, 2),
      (64, 32, 4, 3), (128, 64, 4, 2)]


def quick_bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=120, return_mode="median")


def cfg_text(c):
    bm, bn, w, s = c
    return f"BLOCK_M={bm},BLOCK_N={bn},num_warps={w},num_stages={s}"


def main():
    want = sys.argv[1:]
    H, D = 16, 128
    check_grads(1024, {spec for label, spec, *_ in CASES if not want or any(w in label for w in want)})
    print("fused dQ:", os.environ.get("ATTNCC_FUSED_DQ", "default"), flush=True)
    for label, spec, N, B, params in CASES:
        if want and not any(w in label for w in want):
            continue
        mod, q, k, v, kw, flops = case_tensors(spec, N, B, params, H, D)
        do = torch.randn_like(q)
        fwd_ms = quick_bench(lambda: mod.attention(q, k, v, **kw))
        o, lse = mod.attention(q, k, v, return_lse=True, **kw)
        call = bind(mod.SPEC, q, k, v, kwargs=dict(kw))
        split = {}
        real_launch = mod._rt.launch
        for only in ("dkdv", "dq", "none"):  # the backward with one kernel (or neither) launched
            mod._rt.launch = lambda call_, cfg, run, kernel="", only=only: run(cfg) if kernel == only else None
            try:
                split[only] = quick_bench(lambda: mod._backward(call, o, lse, do))
            finally:
                mod._rt.launch = real_launch
        print(f"SPLIT {label:28s} fwd {fwd_ms:.3f} ms; backward at defaults: dkdv {split['dkdv'] - split['none']:.3f} ms, "
              f"dq {split['dq'] - split['none']:.3f} ms, rest (delta, lists, allocs) {split['none']:.3f} ms", flush=True)
        if os.environ.get("SPLIT_ONLY"):
            continue
        best = {}
        for which, configs in (("DKDV", DKDV), ("DQ", DQ)):
            if os.environ.get("SWEEP", which).upper() != which:
                continue
            for c in configs:
                os.environ["ATTNCC_CONFIG_" + which] = cfg_text(c)
                try:
                    ms = quick_bench(lambda: mod._backward(call, o, lse, do))
                    tf = 3.5 * flops / (ms + fwd_ms) / 1e9
                    print(f"{label:28s} {which:4s} {c}: bwd {ms:7.3f} ms, fwd+bwd {tf:6.1f} TFLOP/s", flush=True)
                    if which not in best or ms < best[which][0]:
                        best[which] = (ms, c)
                except Exception as e:
                    print(f"{label:28s} {which:4s} {c}: FAILED {type(e).__name__}: {str(e)[:120]}", flush=True)
            os.environ.pop("ATTNCC_CONFIG_" + which)
        for which in best:
            os.environ["ATTNCC_CONFIG_" + which] = cfg_text(best[which][1])
        ms = quick_bench(lambda: mod._backward(call, o, lse, do))
        for which in best:
            os.environ.pop("ATTNCC_CONFIG_" + which)
        print(f"BEST {label:28s} dkdv {best.get('DKDV')} dq {best.get('DQ')}: fwd {fwd_ms:.3f} ms, "
              f"bwd {ms:.3f} ms, fwd+bwd {3.5 * flops / (ms + fwd_ms) / 1e9:.1f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
