"""Forward tile-config sweep on the DEVELOPERS.md cases (GPU): which BLOCK_M, BLOCK_N, warps,
stages and warp specialization are fastest per case.

    PYTHONPATH=. python bench/sweep.py [case-substring ...]
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import CASES, bench, case_tensors  # noqa: E402

CONFIGS = [(128, 128, 8, 2, 0), (128, 128, 8, 3, 0), (128, 128, 8, 4, 0), (128, 64, 4, 3, 0), (128, 64, 8, 3, 0),
           (128, 64, 4, 4, 0), (64, 128, 4, 3, 0), (64, 64, 4, 3, 0), (128, 128, 8, 3, 1), (128, 64, 4, 3, 1)]


def main():
    want = sys.argv[1:]
    H, D = 16, 128
    for label, spec, N, B, params in CASES:
        if want and not any(w in label for w in want):
            continue
        mod, q, k, v, kw, flops = case_tensors(spec, N, B, params, H, D)
        best = None
        for bm, bn, w, s, ws in CONFIGS:
            os.environ["ATTNCC_CONFIG"] = f"BLOCK_M={bm},BLOCK_N={bn},num_warps={w},num_stages={s},warp_specialize={ws}"
            try:
                ms = bench(lambda: mod.attention(q, k, v, **kw))
                tf = flops / ms / 1e9
                print(f"{label:28s} {bm}x{bn} w{w} s{s} ws{ws}: {tf:7.1f} TFLOP/s", flush=True)
                best = max(best or (0, ""), (tf, f"{bm}x{bn} w{w} s{s} ws{ws}"))
            except Exception as e:
                print(f"{label:28s} {bm}x{bn} w{w} s{s} ws{ws}: FAILED {type(e).__name__}", flush=True)
        print(f"BEST {label:28s} {best[1]} {best[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
