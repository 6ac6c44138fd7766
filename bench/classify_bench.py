"""Block lists of a data-dependent mask: the one-kernel path vs the torch path, on a GPU.

    python bench/classify_bench.py                 # document spec, B=2, N=16384, 128x128 and 64x64
    python bench/classify_bench.py --n 8192 --blocks 128x64
    python bench/classify_bench.py --check         # compiled-mode equality sweep first (small shapes)

Times ``_block_lists_fast`` (attncc.codegen.tile_kernel: one Triton launch) and
``_rt.blocks.block_lists(..., dynamic=True)`` (tiles.classify_grid + tiles.to_block_lists) on
the same call, and checks that their lists are equal. Reported per path:

- ``do_bench``: ``triton.testing.do_bench(fn, return_mode="median")`` in ms (CUDA events; the
  L2 flush before each rep can hide part of the host time of a launch-bound function);
- ``wall``: wall-clock ms per call over back-to-back calls, synchronized at the end (the
  host time per call when the GPU keeps up, the budget that matters here);
- ``host``: ms per call to enqueue (no synchronization inside the timed loop).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
import triton.testing

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import attncc.runtime as _rt  # noqa: E402
from attncc.analysis import analyze  # noqa: E402
from attncc.codegen.tile_kernel import render_tile_kernel  # noqa: E402
from attncc.spec import load_spec  # noqa: E402

_HEADER = "import torch\nimport triton\nimport triton.language as tl\nimport attncc.runtime as _rt\n\n"


def load_fast(program, pattern, workdir: Path):
    """The ``_block_lists_fast`` of ``program``, from a module file (Triton reads kernel sources)."""
    src = render_tile_kernel(program, pattern)
    if src is None:
        raise SystemExit(f"{pattern.name}: the tile kernel does not support this program")
    path = workdir / f"tk_{pattern.name}.py"
    path.write_text(_HEADER + src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._block_lists_fast


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


def wall_ms(fn, iters):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t2 - t0) / iters * 1e3, (t1 - t0) / iters * 1e3


def run_bench(args, workdir):
    p = load_spec(ROOT / "specs" / f"{args.spec}.toml")
    plan = analyze(p)
    fast_fn = load_fast(plan.classifier, p, workdir)
    gen = torch.Generator().manual_seed(0)
    call = make_call(p, B=args.b, H=args.h, Nq=args.n, Nk=args.n, gen=gen, mean_len=args.doc_len)
    print(f"{p.name}: B={args.b} H={args.h} N={args.n}, documents of mean length ~{args.doc_len}, "
          f"device {torch.cuda.get_device_name()}")
    print(f"{'blocks':>9} {'path':>6} {'do_bench ms':>12} {'wall ms':>9} {'host ms':>9}   lists")
    for spec in args.blocks:
        bm, bn = (int(x) for x in spec.split("x"))
        fast = lambda: fast_fn(call, bm, bn)  # noqa: E731
        torch_path = lambda: _rt.blocks.block_lists(plan.classifier, call, bm, bn, dynamic=True)  # noqa: E731
        ok = same_lists(fast(), torch_path(), call.B, call.Hq)
        ref = torch_path()
        summary = f"full {int(ref[0].sum())}, partial {int(ref[2].sum())} of {ref[0].numel() * ref[7]} tiles"
        for label, fn in (("fast", fast), ("torch", torch_path)):
            med = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
            wall, host = wall_ms(fn, args.iters)
            tail = ("equal" if ok else "DIFFERENT") + f" ({summary})" if label == "fast" else ""
            print(f"{spec:>9} {label:>6} {med:12.4f} {wall:9.4f} {host:9.4f}   {tail}")
    return 0


def run_check(workdir) -> bool:
    """Compiled-mode equality sweep: both specs, odd sizes, offsets, several block shapes."""
    ok = True
    gen = torch.Generator().manual_seed(1)
    for name in ("document", "padding"):
        p = load_spec(ROOT / "specs" / f"{name}.toml")
        plan = analyze(p)
        fast_fn = load_fast(plan.classifier, p, workdir)
        for (Nq, Nk, qo, ko) in ((77, 77, 0, 0), (45, 93, 13, 0), (61, 50, 30, 7), (1000, 1300, 300, 0),
                                 (4096, 4096, 0, 0), (1, 5, 0, 0)):
            for mean_len in (1, 7, 100):
                call = make_call(p, B=3, H=2, Nq=Nq, Nk=Nk, q_offset=qo, k_offset=ko, gen=gen, mean_len=mean_len)
                for bm, bn in ((16, 16), (32, 16), (16, 64), (64, 64), (128, 128), (128, 64), (64, 128)):
                    ref = _rt.blocks.block_lists(plan.classifier, call, bm, bn, dynamic=True)
                    good = same_lists(fast_fn(call, bm, bn), ref, call.B, call.Hq)
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
    ap.add_argument("--blocks", nargs="+", default=["128x128", "64x64"])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--check", action="store_true", help="run the equality sweep first")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    with tempfile.TemporaryDirectory() as tmp:
        if args.check and not run_check(Path(tmp)):
            return 1
        return run_bench(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
