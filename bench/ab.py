"""A/B timing of config variants (GPU): the forward, dK/dV and dQ kernels each timed alone, with
their built-in config and with variants of it, on the DEVELOPERS.md cases.

    PYTHONPATH=. python bench/ab.py [--fwd V ...] [--dkdv V ...] [--dq V ...] [-- case label ...]
    PYTHONPATH=. python bench/ab.py --env NAME=A,B [-- case label ...]

A variant is a comma-separated override of the built-in config's fields, e.g. ``pipeline=1`` or
``BLOCK_M=128,BLOCK_N=64,num_warps=8,pipeline=1``; the built-in config itself is always timed
first. Each line prints milliseconds, the change against the built-in config and the largest
difference of the kernel's output from the built-in config's (a variant must not change results
beyond rounding). ``--env NAME=A,B`` instead times the whole backward (both kernels and what
runs around them) and the forward with the environment variable NAME set to each value in turn.
"""
import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import CASES, case_tensors  # noqa: E402
from bwd_sweep import quick_bench  # noqa: E402
from common import heat_up  # noqa: E402

from attncc.runtime import bind  # noqa: E402
from attncc.runtime.configs import FLAGS, default_config  # noqa: E402


EXTRA = [  # timed only when named; the last field is the head dim (else 128)
    ("dense 16K", "dense", 16384, 2, {}),
    ("causal 8K D64", "causal", 8192, 4, {}, 64),
    ("causal 8K D256", "causal", 8192, 4, {}, 256),
    ("causal 1K", "causal", 1024, 64, {}),
    ("causal 2K", "causal", 2048, 32, {}),
    ("dense 1K", "dense", 1024, 64, {}),
]


def cfg_text(cfg) -> str:
    return ",".join(f"{f.name}={int(getattr(cfg, f.name))}" for f in dataclasses.fields(cfg))


def with_override(cfg, text: str):
    fields = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        fields[key.strip()] = bool(int(value)) if key.strip() in FLAGS else int(value)
    return dataclasses.replace(cfg, **fields)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fwd", nargs="*", default=[])
    ap.add_argument("--dkdv", nargs="*", default=[])
    ap.add_argument("--dq", nargs="*", default=[])
    ap.add_argument("--env", default="")
    ap.add_argument("cases", nargs="*")
    args = ap.parse_args()
    H = 16
    heat_up()
    for case in CASES + EXTRA:
        label, spec, N, B, params = case[:5]
        D = case[5] if len(case) > 5 else 128
        if (args.cases or case in EXTRA) and not any(w == label for w in args.cases):
            continue
        mod, q, k, v, kw, flops = case_tensors(spec, N, B, params, H, D)
        do = torch.randn_like(q)
        call = bind(mod.SPEC, q, k, v, kwargs=dict(kw))
        o, lse = mod.attention(q, k, v, return_lse=True, **kw)
        real_launch = mod._rt.launch

        def forward():
            return mod.attention(q, k, v, **kw)

        def backward_only(wanted):
            def run():
                mod._rt.launch = lambda call_, cfg, launch_fn, kernel="": launch_fn(cfg) if kernel == wanted else None
                try:
                    return mod._backward(call, o, lse, do)
                finally:
                    mod._rt.launch = real_launch
            return run

        if args.env:
            name, _, values = args.env.partition("=")
            base = {}
            for value in values.split(","):
                os.environ[name] = value
                for part, fn in (("forward", forward), ("backward", lambda: mod._backward(call, o, lse, do))):
                    ms = quick_bench(fn)
                    base.setdefault(part, ms)
                    print(f"{label:26s} {part:8s} {name}={value:10s} {ms:7.3f} ms ({ms / base[part] - 1:+6.1%})", flush=True)
            os.environ.pop(name)
            continue
        for kernel, variants, fn, pick in (("", args.fwd, forward, lambda r: r),
                                           ("dkdv", args.dkdv, backward_only("dkdv"), lambda r: r[1:3]),
                                           ("dq", args.dq, backward_only("dq"), lambda r: r[0])):
            if not variants:
                continue
            env = "ATTNCC_CONFIG" + (f"_{kernel.upper()}" if kernel else "")
            base = default_config(call, kernel)
            base_ms = base_out = None
            for text in [""] + variants:
                cfg = with_override(base, text)
                os.environ[env] = cfg_text(cfg)
                try:
                    out = pick(fn())
                    out = torch.cat([t.flatten().float() for t in out]) if isinstance(out, (tuple, list)) else out.float()
                    ms = quick_bench(fn)
                except Exception as e:
                    print(f"{label:26s} {kernel or 'fwd':4s} {text or 'built-in':40s} FAILED {type(e).__name__}: "
                          f"{str(e)[:160]}", flush=True)
                    continue
                finally:
                    os.environ.pop(env)
                if base_ms is None:
                    base_ms, base_out = ms, out
                diff = (out - base_out).abs().max().item()
                extra = f", fwd {flops / ms / 1e9:6.1f} TFLOP/s" if not kernel else ""
                print(f"{label:26s} {kernel or 'fwd':4s} {text or 'built-in':40s} {ms:7.3f} ms "
                      f"({ms / base_ms - 1:+6.1%}){extra}, max diff {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
