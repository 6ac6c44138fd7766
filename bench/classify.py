"""Block lists of a data-dependent mask: the one-kernel path vs the torch path, on a GPU.

    python -m bench classify                 # document spec, B=2, N=16384, 128x128 and 64x64
    python -m bench classify --n 8192 --blocks 128x64
    python -m bench classify --smoke         # CPU, Triton interpreter, tiny sizes: does it run

Times, per tile shape, the generated module's ``_tile_lists`` (attncc.codegen.tile_kernel: one
Triton launch) against ``_rt.blocks.classified_lists(..., dynamic=True)`` (tiles.classify_grid +
tiles.to_block_lists, about 50 small torch ops), forward lists alone and forward + transposed
lists (what a training step's forward asks for), and checks on the timed call that the lists are
equal (tests/gpu/test_gpu_classify.py sweeps shapes, offsets and tile shapes for equality). Then
``step``: everything one forward + backward asks for (the forward's shape, then the dK/dV and the
dQ tile shapes, ``--bwd-blocks``; a shape equal to the forward's is reused). Reported per path:

- ``do_bench``: bench/timer.py ``time_ms`` (the ``do_bench`` median, CUDA events; the L2 flush
  before each rep can hide part of the host time of a launch-bound function);
- ``wall``: wall-clock ms per call over back-to-back calls, synchronized at the end (the
  host time per call when the GPU keeps up, the budget that matters here; timer ``bursts``);
- ``host``: ms per call to enqueue (no synchronization inside the timed loop).

``--smoke`` runs on the CPU (kernels under TRITON_INTERPRET=1) with tiny sizes: the numbers there
mean nothing, the run shows the tool works.
"""
from __future__ import annotations

import argparse
import dataclasses

from bench import common  # (first: --smoke turns the interpreter on before triton loads)
from bench import timer
from bench.common import SMOKE, generated

import torch  # noqa: E402

import attncc.runtime as _rt  # noqa: E402


def make_call(module, *, B, H, Nq, Nk, q_offset=0, k_offset=0, device="cuda", gen=None, mean_len=1024, D=128):
    """A bound call of the generated ``module`` with documents (or key lengths) of its [inputs]."""
    # q / k / v only give the call its shapes: expand a tiny tensor instead of allocating [B, H, N, D]
    q = torch.zeros(1, 1, 1, D, dtype=torch.bfloat16, device=device).expand(B, H, Nq, D)
    k = torch.zeros(1, 1, 1, D, dtype=torch.bfloat16, device=device).expand(B, 1, Nk, D)
    n = max(q_offset + Nq, k_offset + Nk)
    kwargs = {}
    for d in module.SPEC.inputs:
        if d.dims == ("b", "n"):  # packed documents (bench/common.py), a seed from gen per call
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
            kwargs[d.name] = common.documents(B, n, seed=seed, mean=mean_len, device=device)
        elif d.dims == ("b",):
            kwargs[d.name] = torch.randint(0, n + 1, (B,), generator=gen, dtype=torch.int32).to(device)
        else:
            raise SystemExit(f"input {d.name}{d.dims}: no generator in this benchmark")
    return _rt.bind(module.SPEC, q, k, k, q_offset=q_offset, k_offset=k_offset, kwargs=kwargs)


def same_lists(fast, ref, B, H) -> bool:
    """Equal counts and equal first-count indices for every (b, h, qb) the attention kernel reads."""
    if fast[7] != ref[7]:
        return False
    width = fast[7]

    def rows(lists):
        fc, fi, pc, pi, sb, sh, sq, _ = lists
        nqb = fc.shape[-1]
        dev = fc.device
        r = (torch.arange(B, device=dev).view(-1, 1, 1) * sb + torch.arange(H, device=dev).view(1, -1, 1) * sh
             + torch.arange(nqb, device=dev).view(1, 1, -1) * sq).reshape(-1)
        return [(c.reshape(-1)[r].long(), i.reshape(c.numel(), width)[r].long()) for c, i in ((fc, fi), (pc, pi))]

    for (fc, fi), (rc, ri) in zip(rows(fast), rows(ref)):
        if not torch.equal(fc, rc):
            return False
        used = torch.arange(width, device=fc.device) < fc.unsqueeze(-1)
        if not torch.equal(fi[used], ri[used]) or not bool(((fi >= 0) & (fi < width)).all()):
            return False
    return True


def same_both(fast, ref, B, H) -> bool:
    """Equal forward lists, and equal transposed lists where both have them."""
    return same_lists(fast[0], ref[0], B, H) and (fast[1] is None or same_lists(fast[1], ref[1], B, H))


def blocks_arg(text):
    try:
        bm, bn = (int(x) for x in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a tile shape is BLOCK_MxBLOCK_N, e.g. 128x64; got {text!r}")
    return bm, bn


def run_bench(args, device):
    module = generated(args.spec)
    if not hasattr(module, "_tile_lists"):
        raise SystemExit(f"generated/{args.spec}.py has no one-kernel block lists (not a data-dependent mask)")
    program, fast_fn = module._TK_PROGRAM, module._tile_lists
    gen = torch.Generator().manual_seed(0)
    call = make_call(module, B=args.b, H=args.h, Nq=args.n, Nk=args.n, gen=gen, mean_len=args.doc_len, device=device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"{args.spec}: B={args.b} H={args.h} N={args.n}, documents of mean length ~{args.doc_len}, device {name}")
    print(f"{'blocks':>9} {'path':>14} {'do_bench ms':>12} {'wall ms':>9} {'host ms':>9}   lists")

    def row(label, shape, fn, tail=""):
        med = timer.time_ms(fn, warmup=25, rep=200)
        host, wall = timer.bursts(fn, args.iters, repeats=1, sync_fn=common.sync)
        print(f"{shape:>9} {label:>14} {med:12.4f} {wall:9.4f} {host:9.4f}   {tail}")

    ok = True
    for bm, bn in args.blocks:
        shape = f"{bm}x{bn}"
        ref = _rt.blocks.classified_lists(program, call, bm, bn, dynamic=True, transposed=True)
        summary = f"full {int(ref[0][0].sum())}, partial {int(ref[0][2].sum())} of {ref[0][0].numel() * ref[0][7]} tiles"
        for transposed, what in ((False, "fwd"), (True, "fwd+bwd")):
            good = same_both(fast_fn(call, bm, bn, transposed), ref, call.B, call.Hq)
            ok &= good
            row(f"fast {what}", shape, lambda: fast_fn(call, bm, bn, transposed),  # noqa: B023
                ("equal" if good else "DIFFERENT") + f" ({summary})")
            row(f"torch {what}", shape, lambda: _rt.blocks.classified_lists(  # noqa: B023
                program, call, bm, bn, dynamic=True, transposed=transposed))

    # one training step's lists: the forward's (kept for the backward), then dK/dV's and dQ's
    fwd_shape, (dkdv_shape, dq_shape) = args.blocks[0], args.bwd_blocks
    step_label = "x".join(map(str, fwd_shape)) + " fwd, " + ", ".join("x".join(map(str, s)) for s in args.bwd_blocks)

    def step(kernel):
        step_call = dataclasses.replace(call, for_backward={})
        _rt.blocks.block_lists(program, step_call, *fwd_shape, dynamic=True, kernel=kernel)
        _rt.blocks.backward_block_lists(program, step_call, *dkdv_shape, dynamic=True, kernel=kernel)  # lists_t
        _rt.blocks.backward_block_lists(program, step_call, *dq_shape, dynamic=True, kernel=kernel)  # lists
        return step_call.for_backward

    kept_fast, kept_torch = step(fast_fn), step(None)
    good = kept_fast.keys() == kept_torch.keys() and all(
        same_both(kept_fast[k], kept_torch[k], call.B, call.Hq) for k in kept_fast)
    ok &= good
    print(f"step: {step_label} ({len(kept_fast)} tile shape(s), one kernel launch each)")
    row("fast step", "", lambda: step(fast_fn), "equal" if good else "DIFFERENT")
    row("torch step", "", lambda: step(None))
    return 0 if ok else 1


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench classify", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="document")
    ap.add_argument("--b", type=int, default=2)
    ap.add_argument("--h", type=int, default=16)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--doc-len", type=int, default=1024, help="mean document length")
    ap.add_argument("--blocks", nargs="+", type=blocks_arg, default=[(128, 128), (64, 64)],
                    help="tile shapes; the first is the forward's in the step")
    ap.add_argument("--bwd-blocks", nargs=2, type=blocks_arg, default=[(64, 128), (128, 64)],
                    metavar=("DKDV", "DQ"), help="the dK/dV and dQ kernels' tile shapes in the step")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    args = ap.parse_args(argv)
    if args.smoke:
        assert SMOKE  # bench/common.py saw --smoke and turned the interpreter on
        device = torch.device("cpu")
        args.b, args.h, args.n, args.doc_len, args.iters = 2, 2, 128, 24, 1
        args.blocks, args.bwd_blocks = [(32, 32), (16, 32)], [(16, 32), (32, 16)]
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("needs a CUDA GPU (or --smoke for a CPU run under the Triton interpreter)")
    return run_bench(args, device)
