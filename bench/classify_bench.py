"""Block lists of a data-dependent mask: the one-kernel path vs the torch path, on a GPU.

    python bench/classify_bench.py                 # document spec, B=2, N=16384, 128x128 and 64x64
    python bench/classify_bench.py --n 8192 --blocks 128x64
    python bench/classify_bench.py --check         # compiled-mode equality sweep first (small shapes)
    python bench/classify_bench.py --smoke         # CPU, Triton interpreter, tiny sizes: does it run

Times, per tile shape, the generated ``_tile_lists`` (attncc.codegen.tile_kernel: one Triton
launch) against ``_rt.blocks.classified_lists(..., dynamic=True)`` (tiles.classify_grid +
tiles.to_block_lists), for the forward lists alone (``fwd``) and for the forward and the
transposed lists of a training step (``fwd+bwd``; one launch / one classification), and checks
that the lists are equal. Then ``step``: everything one forward + backward asks for through
``_rt.blocks`` (the forward's lists with ``call.for_backward`` set, then the backward's lists
for the dK/dV and the dQ tile shapes, ``--bwd-blocks``; a shape equal to the forward's is
reused). Reported per path:

- ``do_bench``: ``triton.testing.do_bench(fn, return_mode="median")`` in ms (CUDA events; the
  L2 flush before each rep can hide part of the host time of a launch-bound function);
- ``wall``: wall-clock ms per call over back-to-back calls, synchronized at the end (the
  host time per call when the GPU keeps up, the budget that matters here);
- ``host``: ms per call to enqueue (no synchronization inside the timed loop).

``--smoke`` runs on the CPU (kernels under TRITON_INTERPRET=1) with tiny sizes and reports
wall and host ms only: the numbers there mean nothing, the run shows the script works.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

if "--smoke" in sys.argv[1:]:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import attncc.runtime as _rt  # noqa: E402
from attncc.analysis import analyze  # noqa: E402
from attncc.codegen.tile_kernel import render_tile_kernel  # noqa: E402
from attncc.spec import load_spec  # noqa: E402

_HEADER = "import torch\nimport triton\nimport triton.language as tl\nimport attncc.runtime as _rt\n\n"


def load_fast(program, pattern, workdir: Path):
    """The ``_tile_lists`` of ``program``, from a module file (Triton reads kernel sources)."""
    src = render_tile_kernel(program, pattern)
    if src is None:
        raise SystemExit(f"{pattern.name}: the tile kernel does not support this program")
    path = workdir / f"tk_{pattern.name}.py"
    path.write_text(_HEADER + src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._tile_lists


def spec_info(p):
    return _rt.SpecInfo(name=p.name, source=p.source, spec_hash="bench",
                        params=tuple(_rt.ParamInfo(x.name, x.value, x.kind) for x in p.params),
                        inputs=tuple(_rt.InputInfo(d.name, tuple(d.dims), d.dtype) for d in p.inputs))


def documents(B, n, mean_len, gen, device):
    """Packed documents: lengths uniform in [1, 2 * mean_len], one row of ids per batch row."""
    rows = []
    for _ in range(B):
        lengths = torch.randint(1, 2 * mean_len + 1, (n // max(mean_len, 1) + 2,), generator=gen)
        while int(lengths.sum()) < n:
            lengths = torch.cat([lengths, torch.randint(1, 2 * mean_len + 1, (len(lengths),), generator=gen)])
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), lengths)[:n])
    return torch.stack(rows).to(torch.int32).to(device)


def make_call(p, *, B, H, Nq, Nk, q_offset=0, k_offset=0, device="cuda", gen=None, mean_len=1024, D=128):
    # q / k / v only give the call its shapes: expand a tiny tensor instead of allocating [B, H, N, D]
    q = torch.zeros(1, 1, 1, D, dtype=torch.bfloat16, device=device).expand(B, H, Nq, D)
    k = torch.zeros(1, 1, 1, D, dtype=torch.bfloat16, device=device).expand(B, 1, Nk, D)
    n = max(q_offset + Nq, k_offset + Nk)
    kwargs = {}
    for d in p.inputs:
        if d.dims == ("b", "n"):
            kwargs[d.name] = documents(B, n, mean_len, gen, device)
        elif d.dims == ("b",):
            kwargs[d.name] = torch.randint(0, n + 1, (B,), generator=gen, dtype=torch.int32).to(device)
        else:
            raise SystemExit(f"input {d.name}{d.dims}: no generator in this benchmark")
    return _rt.bind(spec_info(p), q, k, k, q_offset=q_offset, k_offset=k_offset, kwargs=kwargs)


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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def wall_ms(fn, iters, device):
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t1 = time.perf_counter()
    sync(device)
    t2 = time.perf_counter()
    return (t2 - t0) / iters * 1e3, (t1 - t0) / iters * 1e3


def same_both(fast, ref, B, H) -> bool:
    """Equal forward lists, and equal transposed lists where both have them."""
    return same_lists(fast[0], ref[0], B, H) and (fast[1] is None or same_lists(fast[1], ref[1], B, H))


def blocks_arg(text):
    try:
        bm, bn = (int(x) for x in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a tile shape is BLOCK_MxBLOCK_N, e.g. 128x64; got {text!r}")
    return bm, bn


def run_bench(args, workdir, device):
    p = load_spec(ROOT / "specs" / f"{args.spec}.toml")
    plan = analyze(p)
    program = plan.classifier
    fast_fn = load_fast(program, p, workdir)
    gen = torch.Generator().manual_seed(0)
    call = make_call(p, B=args.b, H=args.h, Nq=args.n, Nk=args.n, gen=gen, mean_len=args.doc_len, device=device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"{p.name}: B={args.b} H={args.h} N={args.n}, documents of mean length ~{args.doc_len}, device {name}")
    print(f"{'blocks':>9} {'path':>14} {'do_bench ms':>12} {'wall ms':>9} {'host ms':>9}   lists")

    def row(label, shape, fn, tail=""):
        med = (triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") if device.type == "cuda"
               else float("nan"))
        wall, host = wall_ms(fn, args.iters, device)
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


def run_check(workdir, device, smoke=False) -> bool:
    """Compiled-mode equality sweep, forward and transposed lists: both specs, odd sizes, offsets,
    several block shapes (``smoke``: one small case each, for the interpreter)."""
    ok = True
    gen = torch.Generator().manual_seed(1)
    shapes = ((77, 77, 0, 0), (45, 93, 13, 0), (61, 50, 30, 7), (1000, 1300, 300, 0), (4096, 4096, 0, 0), (1, 5, 0, 0))
    blocks = ((16, 16), (32, 16), (16, 64), (64, 64), (128, 128), (128, 64), (64, 128))
    doc_lens = (1, 7, 100)
    if smoke:
        shapes, blocks, doc_lens = shapes[2:3], ((16, 32),), (7,)
    for name in ("document", "padding"):
        p = load_spec(ROOT / "specs" / f"{name}.toml")
        plan = analyze(p)
        fast_fn = load_fast(plan.classifier, p, workdir)
        for (Nq, Nk, qo, ko) in shapes:
            for mean_len in doc_lens:
                call = make_call(p, B=3, H=2, Nq=Nq, Nk=Nk, q_offset=qo, k_offset=ko, gen=gen, mean_len=mean_len,
                                 device=device)
                for bm, bn in blocks:
                    ref = _rt.blocks.classified_lists(plan.classifier, call, bm, bn, dynamic=True, transposed=True)
                    good = same_both(fast_fn(call, bm, bn, True), ref, call.B, call.Hq)
                    ok &= good
                    if not good:
                        print(f"MISMATCH {name} Nq={Nq} Nk={Nk} q_offset={qo} k_offset={ko} docs~{mean_len} {bm}x{bn}")
    print("check:", "all lists equal" if ok else "MISMATCHES")
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    ap.add_argument("--check", action="store_true", help="run the equality sweep first")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    args = ap.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke needs TRITON_INTERPRET=1 before triton is imported (run this file as a script)")
        device = torch.device("cpu")
        args.b, args.h, args.n, args.doc_len, args.iters = 2, 2, 128, 24, 1
        args.blocks, args.bwd_blocks = [(32, 32), (16, 32)], [(16, 32), (32, 16)]
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("needs a CUDA GPU (or --smoke for a CPU run under the Triton interpreter)")
    with tempfile.TemporaryDirectory() as tmp:
        if (args.check or args.smoke) and not run_check(Path(tmp), device, smoke=args.smoke):
            return 1
        return run_bench(args, Path(tmp), device)


if __name__ == "__main__":
    sys.exit(main())
