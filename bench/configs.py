"""The backward's kernels of attncc's softmax attention, each alone, on the cases of bench/cases.py (GPU).

    python -m bench configs bwd [CASE ...] [--split-only] [--kernels dkdv dq]   # time split, config sweeps
    python -m bench configs ab [CASE ...] [--fwd V ...] [--dkdv V ...] [--dq V ...]
    python -m bench configs ... --smoke                     # CPU, interpreter, tiny sizes: does it run

Cases default to the ``dev`` group. ``bwd`` first splits the backward's time (each kernel launched
alone, then neither: delta, lists, allocations), then sweeps the dK/dV and dQ configs
(ATTNCC_CONFIG_DKDV / _DQ) with the other kernel at its default, and times the best pair. ``ab``
times the built-in config of each kernel named and variants of it (``V``: comma-separated
overrides of its fields, e.g. ``BLOCK_M=128,num_warps=4``), each kernel launched alone, all variants
interleaved (bench/timer.py), and prints the largest difference of each variant's output from the
built-in config's (a variant must change results by rounding only). The forward's tile configs and
whole-call A/B of environment variables are rows of the runner: ``python -m bench CASE --sweep
tile-configs``, ``python -m bench CASE --env NAME=A --env NAME=B``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from typing import Callable, Dict

from bench import common  # noqa: F401  (first: --smoke turns the interpreter on before triton loads)
from bench import timer
from bench.cases import select
from bench.common import FWD_BWD_FLOPS, banner, require_device, short_error, tflops, with_environment
from bench.impls import Prepared, prepare

import torch  # noqa: E402

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
BWD_CONFIGS = {
    "dkdv": [(64, 64, 4, 2), (64, 64, 4, 3), (32, 128, 4, 2), (32, 128, 4, 3), (64, 128, 4, 2), (64, 128, 8, 2),
             (64, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2)],
    "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (128, 128, 8, 2),
           (64, 32, 4, 3), (128, 64, 4, 2)],
}


def env_name(kernel: str) -> str:
    """The variable that forces a kernel's config ("": the forward)."""
    return "ATTNCC_CONFIG" + (f"_{kernel.upper()}" if kernel else "")


def config_text(fields) -> str:
    names = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "warp_specialize")
    return ",".join(f"{n}={int(v)}" for n, v in zip(names, fields))


@contextlib.contextmanager
def only_kernel(mod, wanted: str):
    """Launch only kernel ``wanted`` of the generated ``mod`` ("dkdv", "dq"; "none": no kernel at
    all): the backward's other kernel is skipped, so that one kernel's time can be read off."""
    rt = mod._rt
    real = rt.launch

    def launch(call, cfg, run, kernel=""):
        return real(call, cfg, run, kernel=kernel) if kernel == wanted else None

    rt.launch = launch
    try:
        yield
    finally:
        rt.launch = real


class Backward:
    """The backward launcher of a case's generated module on its tensors, the forward done once."""

    def __init__(self, p: Prepared):
        from attncc.runtime import bind

        self.mod, self.p = p.module, p
        self.call = bind(p.module.SPEC, p.q, p.k, p.v, kwargs=dict(p.kw))
        self.o, self.lse = p.module.attention(p.q, p.k, p.v, return_lse=True, **p.kw)

    def __call__(self):
        return self.mod._backward(self.call, self.o, self.lse, self.p.do)

    def only(self, kernel: str) -> Callable:
        def run():
            with only_kernel(self.mod, kernel):
                return self()
        return run


def forward(p: Prepared) -> Callable:
    return lambda: p.module.attention(p.q, p.k, p.v, **p.kw)


def sweep_backward(cases, kernels, split_only, rounds) -> None:
    print("fused dQ:", os.environ.get("ATTNCC_FUSED_DQ", "default"), flush=True)
    for case in cases:
        p = prepare(case)
        bwd = Backward(p)
        fwd_ms = timer.time_ms(forward(p))
        split = timer.interleaved({k: bwd.only(k) for k in ("dkdv", "dq", "none")}, rounds=rounds)
        print(f"SPLIT {case.label:28s} fwd {fwd_ms:.3f} ms; backward at defaults: dkdv "
              f"{split['dkdv'] - split['none']:.3f} ms, dq {split['dq'] - split['none']:.3f} ms, rest (delta, lists, "
              f"allocs) {split['none']:.3f} ms", flush=True)
        if split_only:
            continue
        best = {}
        for kernel in kernels:
            configs = BWD_CONFIGS[kernel][:2] if common.SMOKE else BWD_CONFIGS[kernel]
            fns = {config_text(c): with_environment({env_name(kernel): config_text(c)}, bwd) for c in configs}
            for label, ms in timer.interleaved(fns, rounds=rounds).items():
                if isinstance(ms, BaseException):
                    print(f"{case.label:28s} {kernel:4s} {label}: FAILED {short_error(ms, 120)}", flush=True)
                    continue
                print(f"{case.label:28s} {kernel:4s} {label}: bwd {ms:7.3f} ms, fwd+bwd "
                      f"{tflops(FWD_BWD_FLOPS * p.flops, ms + fwd_ms):6.1f} TFLOP/s", flush=True)
                if kernel not in best or ms < best[kernel][0]:
                    best[kernel] = (ms, label)
        pair = {env_name(k): label for k, (_, label) in best.items()}
        ms = timer.time_ms(with_environment(pair, bwd))
        print(f"BEST {case.label:28s} " + " ".join(f"{k} {label}" for k, (_, label) in best.items())
              + f": fwd {fwd_ms:.3f} ms, bwd {ms:.3f} ms, fwd+bwd {tflops(FWD_BWD_FLOPS * p.flops, ms + fwd_ms):.1f} "
              f"TFLOP/s", flush=True)
        common.release()


def with_override(cfg, text: str):
    """``cfg`` with the fields of ``text`` ("BLOCK_M=128,pipeline=1") replaced."""
    from attncc.runtime.launch import _FLAGS

    fields = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        fields[key.strip()] = bool(int(value)) if key.strip() in _FLAGS else int(value)
    return dataclasses.replace(cfg, **fields)


def full_text(cfg) -> str:
    return ",".join(f"{f.name}={int(getattr(cfg, f.name))}" for f in dataclasses.fields(cfg))


def ab(cases, variants: Dict[str, list], rounds) -> None:
    from attncc.runtime.launch import default_config

    for case in cases:
        p = prepare(case)
        bwd = Backward(p)
        for kernel, fn, pick in (("", forward(p), lambda r: r), ("dkdv", bwd.only("dkdv"), lambda r: r[1:3]),
                                 ("dq", bwd.only("dq"), lambda r: r[0])):
            texts = variants[kernel or "fwd"]
            if not texts:
                continue
            base = default_config(bwd.call, kernel)
            fns, outs = {}, {}
            for text in [""] + texts:
                label = text or "built-in"
                run = with_environment({env_name(kernel): full_text(with_override(base, text))}, fn)
                try:
                    out = pick(run())
                    outs[label] = torch.cat([t.flatten().float() for t in out]) if isinstance(out, (tuple, list)) \
                        else out.float()
                    fns[label] = run
                except Exception as e:  # noqa: BLE001 - a variant that does not compile: a line, then the others
                    print(f"{case.label:26s} {kernel or 'fwd':4s} {label:40s} FAILED {short_error(e, 160)}", flush=True)
            results = timer.interleaved(fns, rounds=rounds)
            base_ms = results.get("built-in")
            for label, ms in results.items():
                if isinstance(ms, BaseException):
                    print(f"{case.label:26s} {kernel or 'fwd':4s} {label:40s} FAILED {short_error(ms, 160)}", flush=True)
                    continue
                change = f" ({ms / base_ms - 1:+6.1%})" if isinstance(base_ms, float) else ""
                diff = (outs[label] - outs["built-in"]).abs().max().item() if "built-in" in outs else float("nan")
                extra = f", fwd {tflops(p.flops, ms):6.1f} TFLOP/s" if not kernel else ""
                print(f"{case.label:26s} {kernel or 'fwd':4s} {label:40s} {ms:7.3f} ms{change}{extra}, "
                      f"max diff {diff:.2e}", flush=True)
        common.release()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench configs", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="tool", required=True)
    tools = {name: sub.add_parser(name, help=text) for name, text in (
        ("bwd", "backward split and per-kernel sweep"), ("ab", "built-in config of each kernel against variants"))}
    for name, p in tools.items():
        p.add_argument("cases", nargs="*", default=["dev"], metavar="CASE", help="cases or groups (default: dev)")
        p.add_argument("--rounds", type=int, default=3 if name == "ab" else 1, help="interleaved rounds (median)")
        p.add_argument("--smoke", action="store_true", help="CPU, interpreter, tiny sizes")
    tools["bwd"].add_argument("--split-only", action="store_true", help="only where the backward's time goes")
    tools["bwd"].add_argument("--kernels", nargs="+", choices=["dkdv", "dq"], default=["dkdv", "dq"])
    for kernel in ("fwd", "dkdv", "dq"):
        tools["ab"].add_argument(f"--{kernel}", nargs="*", default=[], metavar="V", help=f"variants of the {kernel} config")
    args = ap.parse_args(argv)
    try:
        cases = select(args.cases)
    except ValueError as e:
        ap.error(str(e))
    require_device(f"python -m bench configs {args.tool}")
    print(banner(f"python -m bench configs {args.tool}"), flush=True)
    timer.heat_up()
    if args.tool == "bwd":
        sweep_backward(cases, args.kernels, args.split_only, args.rounds)
    else:
        ab(cases, {"fwd": args.fwd, "dkdv": args.dkdv, "dq": args.dq}, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
