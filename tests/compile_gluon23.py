"""Probe 23, compile side: the Gluon split backward's launches that ATTNCC_BACKEND=auto makes for
chunk-aligned specs (tests/probe_gluon23.py), compiled for sm90 (GPUTarget("cuda", 90, 32)) without a GPU
as Triton specializes the recorded arguments (tests/kernel_compile.py): values Triton turns into
constexprs or divisibility hints (a chunk of 1 or 16, Nq = 1, offsets 0 / 1 / 16, one head, MQA).

Run without TRITON_INTERPRET (the kernels must be JITFunctions):

    env -u TRITON_INTERPRET python tests/compile_gluon23.py --cases 4 --start 0 [--stage ptx]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback
import types
from pathlib import Path

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"
_HERE = Path(__file__).resolve().parent
for _p in (str(_HERE), str(_HERE.parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import attncc  # noqa: E402
from attncc.runtime import backend, call as call_mod  # noqa: E402
from attncc.runtime.gluon import bwd, bwd_fused, launch, preprocess  # noqa: E402
from kernel_compile import compile_launch, launch_of  # noqa: E402

RECORDED = []


def install():
    os.environ["ATTNCC_BACKEND"] = "auto"
    backend.gluon.AUTO_MIN_PAIRS = 0
    call_mod.interpreting = lambda: True  # CPU tensors pass the call's checks, as under the interpreter
    backend.interpreting = lambda: False  # and the backend takes them for an sm90 GPU's
    backend.device_problem = lambda device: None
    launch.check_devices = lambda q, k, v: None
    torch.cuda.get_device_properties = lambda device: types.SimpleNamespace(multi_processor_count=132)
    import collections
    preprocess.bwd_preprocess = preprocess.bwd_postprocess = collections.defaultdict(lambda: lambda *a, **kw: None)
    for kernel in (bwd.attn_bwd_dkdv, bwd.attn_bwd_dq, bwd_fused.attn_bwd_fused):
        kernel.run = (lambda kernel: lambda *a, grid, warmup, **kw: RECORDED.append(launch_of(kernel, a, kw)))(kernel)


def draw(seed):
    import probe_gluon23 as P

    rng = random.Random(seed)
    names = [n for n in (*P.SHIPPED, *P.USER) if P.spec_of(n)[1].SPEC.gluon_backward_auto]
    name = rng.choice(names)
    p, mod = P.spec_of(name)
    hkv = rng.choice((1, 2))
    Hq = hkv * rng.choice((1, 2, 4))
    if p.heads_q is not None:
        Hq, hkv = p.heads_q, p.heads_kv or p.heads_q
    params = {prm.name: rng.choice((1, 16, 37, 64, 128)) if prm.name in ("chunk", "c2") else
              rng.choice((1, 16, -3)) for prm in p.params}
    return types.SimpleNamespace(name=name, mod=mod, dtype=rng.choice((torch.bfloat16, torch.float16)),
                                 B=rng.choice((1, 2)), Hq=Hq, Hkv=hkv, Nq=rng.choice((1, 16, 100, 300)),
                                 Nk=rng.choice((1, 16, 100, 300)), params=params,
                                 q_offset=rng.choice((0, 1, 16, 37)), k_offset=rng.choice((0, 1, 16, 37)))


def run(seed, stage):
    c = draw(seed)
    q = torch.randn(c.B, c.Hq, c.Nq, 128).to(c.dtype)
    k, v = (torch.randn(c.B, c.Hkv, c.Nk, 128).to(c.dtype) for _ in range(2))
    RECORDED.clear()
    call_mod._BOUND.clear()
    call = attncc.runtime.bind(c.mod.SPEC, q, k, v, q_offset=c.q_offset, k_offset=c.k_offset, kwargs=dict(c.params))
    desc = " ".join(f"{k}={v}" for k, v in vars(c).items() if k != "mod")
    if not backend.gluon_backward_selected(call):
        return f"seed {seed}: tl ({backend.gluon_backward_problems(call)}) {desc}"
    backend.gluon_backward(call, "rendered", torch.zeros_like(q), torch.zeros(c.B, c.Hq, c.Nq), torch.zeros_like(q))
    assert len(RECORDED) == 2, RECORDED
    out = []
    for rec in RECORDED:
        t0 = time.time()
        compiled = compile_launch(rec, stage)
        out.append(f"{rec.name} {time.time() - t0:.0f}s ({len(compiled.stages[stage])} chars of {stage})")
    return f"seed {seed}: {desc}: " + "; ".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=2)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--stage", default="cubin")
    args = ap.parse_args(argv)
    install()
    failed = 0
    for seed in range(args.start, args.start + args.cases):
        try:
            print(run(seed, args.stage), flush=True)
        except Exception as e:  # noqa: BLE001
            failed += 1
            print(f"=== seed {seed}: {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
